//! What a step prints or logs, captured per call: `sys.stdout` and `sys.stderr` point at a capped
//! buffer while the call runs, and a handler on the root logger writes to the same buffer. The
//! Python side is `capture.py`. It must not lose a step's outcome: a capture that fails is logged
//! and the step runs (or ends) uncaptured.

use std::ffi::CStr;

use pyo3::prelude::*;
use pyo3::types::PyModule;

use super::exception::{describe, start_error};
use super::{DEFAULT_MAX_LOG_CHARS, PythonStartError};

/// Captures what a step prints or logs: `sys.stdout` and `sys.stderr` point at a capped buffer
/// for the duration of one call, and a handler on the root logger, installed once, writes to the
/// same buffer. The `taskfleet.step` loggers (the `ctx.logger` of every step) record from INFO;
/// other loggers keep their levels. Between calls the buffer passes what it gets (a log record
/// of a thread a step left running) to the process's standard error.
const CAPTURE_SOURCE: &CStr = pyo3::ffi::c_str!(include_str!("capture.py"));

/// The capture of one interpreter thread.
pub(super) struct OutputCapture {
    /// The module of [`CAPTURE_SOURCE`].
    module: Py<PyModule>,
    /// The cap on a call's captured output, in characters.
    max_log_chars: usize,
}

impl OutputCapture {
    /// Loads the capture; `max_log_chars` 0 means [`DEFAULT_MAX_LOG_CHARS`].
    pub(super) fn load(py: Python<'_>, max_log_chars: usize) -> Result<Self, PythonStartError> {
        let module = PyModule::from_code(
            py,
            CAPTURE_SOURCE,
            c"taskfleet_capture.py",
            c"_taskfleet_capture",
        )
        .map_err(|error| start_error(py, "loading the output capture", &error))?
        .unbind();
        let max_log_chars = if max_log_chars == 0 {
            DEFAULT_MAX_LOG_CHARS
        } else {
            max_log_chars
        };
        Ok(Self {
            module,
            max_log_chars,
        })
    }

    /// Points the step's output at a capture; `None` (logged) if that failed, and the step
    /// then runs uncaptured.
    pub(super) fn start<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match self
            .module
            .bind(py)
            .call_method1("start", (self.max_log_chars,))
        {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(error = %describe(py, &error), "capturing a python step's output");
                None
            }
        }
    }

    /// Restores the output and returns what the step printed or logged.
    pub(super) fn finish(&self, py: Python<'_>, state: Option<Bound<'_, PyAny>>) -> String {
        let Some(state) = state else {
            return String::new();
        };
        match self
            .module
            .bind(py)
            .call_method1("finish", (state,))
            .and_then(|logs| logs.extract::<String>())
        {
            Ok(logs) => logs,
            Err(error) => {
                tracing::warn!(error = %describe(py, &error), "reading a python step's output");
                String::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::PythonTarget;
    use super::super::test_support::fixture;

    #[test]
    fn printed_and_logged_output_is_captured_per_call() {
        let target = PythonTarget::Code {
            source: "import logging, sys\n\ndef main(input, ctx):\n    print('hello', input)\n    ctx.logger.info('working on %s', input)\n    logging.getLogger('quiet').info('not captured below WARNING')\n    logging.getLogger('loud').warning('careful')\n    print('oops', file=sys.stderr)\n    return input\n".to_owned(),
        };
        let output = fixture().interpreter.call(target, json!(7));
        assert_eq!(output.result, Ok(json!(7)));
        let logs = output.logs;
        assert!(logs.contains("hello 7\n"), "{logs:?}");
        assert!(
            logs.contains("INFO taskfleet.step.price: working on 7"),
            "{logs:?}"
        );
        assert!(logs.contains("WARNING loud: careful"), "{logs:?}");
        assert!(logs.contains("oops"), "{logs:?}");
        assert!(!logs.contains("not captured"), "{logs:?}");
        // The next call starts with nothing, and output is capped.
        let chatty = PythonTarget::Code {
            source: "def main(input):\n    print('x' * 200000)\n".to_owned(),
        };
        let output = fixture().interpreter.call(chatty, json!(null));
        assert!(
            output.logs.len() < super::super::DEFAULT_MAX_LOG_CHARS + 100,
            "{}",
            output.logs.len()
        );
        assert!(
            output
                .logs
                .ends_with("[logs truncated at 65536 characters]\n")
        );
        assert!(!output.logs.contains("hello"));
    }
}
