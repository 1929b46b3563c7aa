//! Python exceptions as the errors of this directory: a [`StepError`] with the exception's class,
//! `str()` and formatted traceback, a [`PythonStartError`] for a failed setup, and `Class: message`
//! for logs. It only reads exceptions (and trims a traceback's leading frames); it never raises or
//! clears one.

use pyo3::prelude::*;
use pyo3::types::{PyString, PyTraceback};
use taskfleet_common::StepError;

use super::PythonStartError;

/// Describes a Python exception as a step error: its class name, `str(exc)` and the formatted
/// traceback.
pub(super) fn exception_error(py: Python<'_>, error: &PyErr) -> StepError {
    let kind = error
        .get_type(py)
        .name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "Exception".to_owned());
    let message = error
        .value(py)
        .str()
        .map(|text| text.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<str() of the exception failed>".to_owned());
    let traceback = py
        .import("traceback")
        .and_then(|traceback| {
            traceback.call_method1(
                "format_exception",
                (error.get_type(py), error.value(py), error.traceback(py)),
            )
        })
        .and_then(|lines| PyString::new(py, "").call_method1("join", (lines,)))
        .and_then(|text| text.extract::<String>())
        .ok();
    StepError {
        kind,
        message,
        traceback,
    }
}

/// Formats an exception as `Class: message` for logs and start errors.
pub(super) fn describe(py: Python<'_>, error: &PyErr) -> String {
    let step_error = exception_error(py, error);
    format!("{}: {}", step_error.kind, step_error.message)
}

/// Turns an exception raised while starting into a start error.
pub(super) fn start_error(
    py: Python<'_>,
    operation: &'static str,
    error: &PyErr,
) -> PythonStartError {
    PythonStartError::Python {
        operation,
        message: describe(py, error),
    }
}

/// Drops the frames of `package` (the event loop that ran a coroutine step) from the start of an
/// exception's traceback, so it starts at the step's own code. Keeps the traceback whole when
/// every frame belongs to the package.
pub(super) fn skip_leading_frames(py: Python<'_>, error: &PyErr, package: &str) {
    let inner = format!("{package}.");
    let mut frame = error.traceback(py);
    while let Some(current) = frame {
        let module = current
            .getattr("tb_frame")
            .and_then(|frame| frame.getattr("f_globals"))
            .and_then(|globals| globals.get_item("__name__"))
            .and_then(|name| name.extract::<String>())
            .unwrap_or_default();
        if module != package && !module.starts_with(&inner) {
            error.set_traceback(py, Some(current));
            return;
        }
        frame = current
            .getattr("tb_next")
            .ok()
            .and_then(|next| next.cast_into::<PyTraceback>().ok());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::{STEPS, step};

    #[test]
    fn raised_exception_gives_class_message_and_traceback() {
        let error = step("fail", json!(3)).expect_err("the step raises");
        assert_eq!(error.kind, "ValueError");
        assert_eq!(error.message, "bad value: 3");
        let line = STEPS
            .lines()
            .position(|line| line.contains("raise ValueError"))
            .expect("the fixture raises ValueError")
            + 1;
        let traceback = error.traceback.expect("a traceback");
        assert!(
            traceback.contains(&format!("steps_under_test.py\", line {line}, in fail")),
            "{traceback}"
        );
        assert!(
            traceback.contains("ValueError: bad value: 3"),
            "{traceback}"
        );

        let error = step("fail_custom", json!(null)).expect_err("the step raises");
        assert_eq!(
            (error.kind.as_str(), error.message.as_str()),
            ("PricingError", "no price")
        );
        let error = step("fail_key", json!({})).expect_err("the step raises");
        assert_eq!(
            (error.kind.as_str(), error.message.as_str()),
            ("KeyError", "'missing'")
        );
    }
}
