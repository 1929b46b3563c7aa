//! Giving calls up: a call abandoned before it starts is skipped, and one abandoned while it runs
//! gets `taskfleet.StepCancelled` raised in its Python code (`PyThreadState_SetAsyncExc`).
//!
//! This module owns the bookkeeping the interpreter thread and [`CallStopper`] share to do that
//! safely: an interrupt must only ever reach the call it was meant for, never the next one. It
//! does not decide when a call is given up (the worker does, at a timeout or a cancelled run),
//! and it must not block the caller of [`CallStopper::stop`] on the GIL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use pyo3::prelude::*;
use pyo3::types::PyType;

use super::exception::describe;

/// State shared by the [`CallStopper`] and the interpreter thread, used to interrupt abandoned
/// calls.
#[derive(Default)]
pub(super) struct InterruptState {
    /// The job the interpreter thread is running, or 0. Written only while that thread holds the
    /// GIL, so a reader holding the GIL sees a value that cannot change under it.
    running: AtomicU64,
    /// The last job an interrupt was delivered to, so the thread can clear one that arrived late.
    interrupted: AtomicU64,
    /// The last job given up by [`CallStopper::stop`]: skipped if it has not started.
    abandoned: AtomicU64,
    /// `threading.get_ident()` of the interpreter thread.
    thread_ident: OnceLock<u64>,
    /// The exception class raised inside an interrupted step.
    cancelled_type: OnceLock<Py<PyType>>,
}

impl InterruptState {
    /// Records, once the interpreter is set up, which thread runs the steps and the exception
    /// raised in one that is interrupted; until then no interrupt is delivered.
    pub(super) fn arm(&self, thread_ident: u64, cancelled_type: Py<PyType>) {
        let _ = self.thread_ident.set(thread_ident);
        let _ = self.cancelled_type.set(cancelled_type);
    }

    /// Marks `job` as running, on the interpreter thread holding the GIL; false, and nothing
    /// running, if the job was given up before it started.
    pub(super) fn begin(&self, job: u64) -> bool {
        // Publishing `running` first pairs with `abandon`, which publishes the abandonment before
        // checking `running`: with a fence on each side, either this thread skips the job or
        // that one sees it running.
        self.running.store(job, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.abandoned.load(Ordering::SeqCst) == job {
            self.running.store(0, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Marks `job` as finished, on the interpreter thread holding the GIL, first clearing an
    /// interrupt meant for it that is still pending.
    pub(super) fn end(&self, py: Python<'_>, job: u64) {
        if self.interrupted.load(Ordering::SeqCst) == job {
            // An interrupt that arrived after the step's last bytecode is still pending and
            // would hit the next job.
            if let Some(ident) = self.thread_ident.get()
                && let Err(error) = set_async_exc(py, *ident, None)
            {
                tracing::warn!(error = %describe(py, &error), "clearing a python interrupt");
            }
        }
        self.running.store(0, Ordering::SeqCst);
    }
}

/// Stops calls of [`super::serve_calls`].
#[derive(Clone)]
pub struct CallStopper(pub(super) Arc<InterruptState>);

impl CallStopper {
    /// Gives up call `id`: if it has not started it is skipped (its outcome is a `cancelled`
    /// error), and if it is running the step is interrupted by an exception raised in its
    /// Python code. Either way its `done` is still called when it ends.
    pub fn stop(&self, id: u64) {
        abandon(&self.0, id);
    }
}

/// Marks `job` abandoned and interrupts it if it is running.
fn abandon(state: &Arc<InterruptState>, job: u64) {
    // Publishing the abandonment first pairs with the interpreter thread, which publishes
    // `running` before checking it: with a fence on each side, either that thread skips the job
    // or this one sees it running.
    state.abandoned.store(job, Ordering::SeqCst);
    std::sync::atomic::fence(Ordering::SeqCst);
    if state.running.load(Ordering::SeqCst) != job {
        return;
    }
    let state = Arc::clone(state);
    // Taking the GIL can take as long as the running step holds it, so the interrupt is
    // delivered from a short-lived thread instead of the caller.
    let spawned = std::thread::Builder::new()
        .name("python-interrupt".to_owned())
        .spawn(move || interrupt(&state, job));
    if let Err(error) = spawned {
        tracing::warn!(%error, "spawning a thread to interrupt an abandoned python step");
    }
}

/// Raises the cancellation exception in the interpreter thread if it is still running `job`.
fn interrupt(state: &InterruptState, job: u64) {
    Python::attach(|py| {
        // Holding the GIL, the interpreter thread can neither start nor finish a job.
        if state.running.load(Ordering::SeqCst) != job {
            return;
        }
        let (Some(ident), Some(cancelled)) = (state.thread_ident.get(), state.cancelled_type.get())
        else {
            return;
        };
        // Preparing the call runs Python code, during which the interpreter thread may take the
        // GIL and move on to another job; the second check, with no Python code between it and
        // the call, makes sure the exception only ever reaches the job it was meant for.
        let raise = prepare_async_exc(py, *ident, Some(cancelled.bind(py).as_any())).and_then(
            |(function, args)| {
                if state.running.load(Ordering::SeqCst) != job {
                    return Ok(false);
                }
                function.call1(args).map(|_| true)
            },
        );
        match raise {
            Ok(true) => state.interrupted.store(job, Ordering::SeqCst),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(error = %describe(py, &error), "interrupting a python step")
            }
        }
    });
}

/// Sets (or with `None` clears) the exception pending for a Python thread.
///
/// `PyThreadState_SetAsyncExc` is reached through ctypes because the workspace forbids unsafe
/// code; ctypes passes Python's `None` as a NULL pointer, which clears the pending exception.
fn set_async_exc(py: Python<'_>, ident: u64, exception: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let (function, args) = prepare_async_exc(py, ident, exception)?;
    function.call1(args)?;
    Ok(())
}

/// Returns `PyThreadState_SetAsyncExc` and its arguments, ready to call.
#[allow(clippy::type_complexity, reason = "a function and its argument tuple")]
fn prepare_async_exc<'py>(
    py: Python<'py>,
    ident: u64,
    exception: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyAny>, Bound<'py, PyAny>))> {
    let ctypes = py.import("ctypes")?;
    let ident = ctypes.getattr("c_ulong")?.call1((ident,))?;
    let exception = match exception {
        Some(exception) => ctypes.getattr("py_object")?.call1((exception,))?,
        None => py.None().into_bound(py),
    };
    let function = ctypes
        .getattr("pythonapi")?
        .getattr("PyThreadState_SetAsyncExc")?;
    Ok((function, (ident, exception)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use taskfleet_common::error::CANCELLED;

    use super::super::PythonTarget;
    use super::super::test_support::{Interpreter, fixture, function};

    #[test]
    fn stopped_call_is_interrupted() {
        fixture();
        // An interpreter thread of its own: no other test's call runs on it or stops it.
        let interpreter = Interpreter::start_default();
        let (id, spinning) = interpreter.send(function("steps_under_test", "spin"), json!(null));
        assert!(
            spinning.recv_timeout(Duration::from_millis(300)).is_err(),
            "spin never returns"
        );
        interpreter.stopper.stop(id);
        let stopped = spinning
            .recv_timeout(Duration::from_secs(30))
            .expect("the stopped call ends");
        assert_eq!(
            stopped.result.map_err(|error| error.kind),
            Err("StepCancelled".to_owned())
        );
        // The interpreter is free again only if the spinning step was interrupted.
        let after = interpreter.call(function("steps_under_test", "echo"), json!("after"));
        assert_eq!(after.result, Ok(json!("after")));
    }

    #[test]
    fn call_stopped_before_it_starts_is_skipped() {
        fixture();
        let interpreter = Interpreter::start_default();
        let busy = PythonTarget::Code {
            source: "import time\n\ndef main(input):\n    time.sleep(0.2)\n    return input\n"
                .to_owned(),
        };
        let (_, first) = interpreter.send(busy, json!(1));
        let (id, second) = interpreter.send(function("steps_under_test", "echo"), json!(2));
        interpreter.stopper.stop(id);
        let timeout = Duration::from_secs(30);
        let first = first.recv_timeout(timeout).expect("the first call ends");
        assert_eq!(first.result, Ok(json!(1)));
        let second = second.recv_timeout(timeout).expect("the skipped call ends");
        let error = second.result.expect_err("the call was skipped");
        assert_eq!(
            (error.kind.as_str(), error.message.as_str()),
            (CANCELLED, "the step was given up before it started")
        );
    }
}
