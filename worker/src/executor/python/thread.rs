//! The interpreter thread: starting the interpreter, and the loop that takes each call from its
//! source, runs it and hands its outcome back; also the process's termination signals, which only
//! the thread that initialised Python may set.
//!
//! The loop only orders a call's phases (skip or run, capture, interrupt bookkeeping); what a call
//! does is [`super::runtime`]'s, and how a call is stopped is [`super::interrupt`]'s. It must not
//! block with the GIL held: it waits for the next call, and hands an outcome back, without it.

use std::ffi::CStr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use pyo3::prelude::*;
use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::error::CANCELLED;

use super::exception::start_error;
use super::interrupt::{CallStopper, InterruptState};
use super::runtime::Runtime;
use super::{PythonOutput, PythonSettings, PythonStartError, PythonTarget, StepContext};

/// Stack of the interpreter thread: Python code and the recursive converters run on it.
const THREAD_STACK_SIZE: usize = 16 * 1024 * 1024;
/// Makes the process ignore SIGINT and SIGTERM.
const IGNORE_SIGNALS: &CStr = pyo3::ffi::c_str!(include_str!("ignore_signals.py"));

/// A call handed to the interpreter thread by the source given to [`serve_calls`].
pub struct IncomingCall {
    /// Identifies the call for [`CallStopper::stop`]; not 0.
    pub id: u64,
    /// What to call.
    pub target: PythonTarget,
    /// The step's input.
    pub input: Value,
    /// The attempt's identity.
    pub ctx: StepContext,
    /// Called with the outcome on the interpreter thread, without the GIL, exactly once.
    pub done: Box<dyn FnOnce(PythonOutput) + Send>,
}

/// Starts the interpreter on its own OS thread, named `python`, which owns it for the life of the
/// process, applies the settings and serves the calls `next` returns, one at a time, until it
/// returns `None`. `next` runs on the interpreter thread without the GIL, so it may block (reading
/// a socket, say) while threads that steps started run on. Blocks until the interpreter is ready.
///
/// Each `python_path` entry is prepended to `sys.path` in the given order (the first is searched
/// first). A virtualenv adds `<venv>/lib/pythonX.Y/site-packages` for the running `X.Y` through
/// `site.addsitedir` (so `.pth` files work), placed before the interpreter's own site-packages; a
/// missing directory is an error naming it. A process has one interpreter: a second call starts
/// a second thread serving calls on it, and its settings extend the same `sys.path`.
pub fn serve_calls(
    settings: PythonSettings,
    next: impl FnMut() -> Option<IncomingCall> + Send + 'static,
) -> Result<CallStopper, PythonStartError> {
    // Initialised here, not on the interpreter thread: Python takes the initialising thread for
    // its main thread, and only the main thread may install signal handlers, so a step calling
    // `signal.signal` cannot take SIGTERM away from the process's own shutdown.
    Python::initialize();
    let state = Arc::new(InterruptState::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread_state = Arc::clone(&state);
    std::thread::Builder::new()
        .name("python".to_owned())
        .stack_size(THREAD_STACK_SIZE)
        .spawn(move || interpreter_thread(&settings, next, &thread_state, &ready_tx))
        .map_err(PythonStartError::Spawn)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(CallStopper(state)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(PythonStartError::ThreadStopped),
    }
}

/// Makes this process ignore SIGINT and SIGTERM. Call it on the thread that started the first
/// executor (Python's main thread, the only one that may set signal handlers). Executor
/// processes use it: the worker they serve decides when they stop, by closing their connection.
pub fn ignore_termination_signals() -> Result<(), PythonStartError> {
    Python::attach(|py| {
        py.run(IGNORE_SIGNALS, None, None)
            .map_err(|error| start_error(py, "ignoring SIGINT and SIGTERM", &error))
    })
}

/// Body of the interpreter thread: sets up the runtime, reports readiness, then serves the calls
/// `next` returns until it returns `None`.
fn interpreter_thread(
    settings: &PythonSettings,
    mut next: impl FnMut() -> Option<IncomingCall> + Send,
    state: &InterruptState,
    ready: &std::sync::mpsc::SyncSender<Result<(), PythonStartError>>,
) {
    Python::attach(|py| {
        let mut runtime = match Runtime::start(py, settings, state) {
            Ok(runtime) => runtime,
            Err(error) => {
                // `serve_calls` is waiting for this reply; if it is gone there is nobody to tell.
                let _ = ready.send(Err(error));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        // The GIL is released while waiting so other Python threads (started by steps) run.
        while let Some(job) = py.detach(&mut next) {
            if !state.begin(job.id) {
                // The caller gave up before the job started.
                let error = StepError::new(CANCELLED, "the step was given up before it started");
                (job.done)(PythonOutput {
                    result: Err(error),
                    logs: String::new(),
                });
                continue;
            }
            let capture = runtime.capture.start(py);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                runtime.run(py, &job.target, &job.input, &job.ctx)
            }))
            .unwrap_or_else(|panic| Err(panicked(&*panic)));
            let logs = runtime.capture.finish(py, capture);
            let outcome = PythonOutput { result, logs };
            state.end(py, job.id);
            py.detach(|| (job.done)(outcome));
        }
    });
}

/// The error of a job whose Rust side panicked.
fn panicked(panic: &(dyn std::any::Any + Send)) -> StepError {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    StepError::new(
        "RuntimeError",
        format!("the python executor panicked: {detail}"),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::step;

    #[test]
    fn concurrent_calls_all_complete() {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..50)
                .map(|n| scope.spawn(move || step("echo", json!(n))))
                .collect();
            for (n, handle) in handles.into_iter().enumerate() {
                let output = handle.join().expect("the calling thread finished");
                assert_eq!(output, Ok(json!(n)));
            }
        });
    }
}
