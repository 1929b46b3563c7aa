//! Runs Python steps in an interpreter embedded with pyo3; this directory is the only part of the
//! project where pyo3 appears.
//!
//! One dedicated OS thread, named `python`, owns the interpreter for the life of the process and
//! serves the calls that [`serve_calls`]'s source hands it (in an executor process, read from the
//! worker's socket); [`CallStopper`] gives calls up, so the threads that hand it calls never wait
//! for the GIL. Values cross between Rust and Python by direct conversion, never as JSON text. The
//! module does not decide retries, timeouts or statuses: it returns the step's output or a
//! [`StepError`] describing why the attempt failed.
//!
//! - `thread`: the interpreter thread and its loop over calls, and the process's signals;
//! - `interrupt`: giving a call up, and raising `taskfleet.StepCancelled` in a running step;
//! - `runtime`: what the thread keeps between calls, and one call from callable to output;
//! - `paths`: the settings' python path and virtualenv, applied to `sys.path` at start;
//! - `loader`: resolving a target to a callable (imported module or compiled `python_code`);
//! - `capture`: what a step prints or logs, captured per call;
//! - `exception`: Python exceptions as step errors and start errors;
//! - `convert`: values between JSON and Python.
//!
//! The Python helpers run inside the interpreter are the `.py` files next to these modules.

mod capture;
mod convert;
mod exception;
mod interrupt;
mod loader;
mod paths;
mod runtime;
mod thread;

#[cfg(test)]
mod test_support;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskfleet_common::StepError;

pub use interrupt::CallStopper;
pub use thread::{IncomingCall, ignore_termination_signals, serve_calls};

/// The default cap on the captured output of one call, in characters.
pub const DEFAULT_MAX_LOG_CHARS: usize = 64 * 1024;

/// What a call came to: the step's output or error, and what it printed or logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PythonOutput {
    /// The output, or why the step failed.
    pub result: Result<Value, StepError>,
    /// What the step printed or logged, capped; empty if nothing.
    pub logs: String,
}

/// Settings of the embedded interpreter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PythonSettings {
    /// The most characters of a call's output kept as its logs (0: the default).
    pub max_log_chars: usize,
    /// Directories prepended to `sys.path`, the first one searched first.
    pub python_path: Vec<PathBuf>,
    /// A virtualenv whose `lib/pythonX.Y/site-packages` is added, for the running X.Y.
    pub virtual_env: Option<PathBuf>,
    /// What the executor process may use; applied by the process itself before its
    /// interpreter starts.
    pub confinement: crate::executor::process::Confinement,
}

/// Describes what a Python step calls.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PythonTarget {
    /// A function in an importable module (`"module.path:function"` in a definition).
    Function {
        /// The dotted module path passed to the import system.
        module: String,
        /// The function's name in the module; dots reach nested attributes (`Class.method`).
        function: String,
    },
    /// Source text that defines `main(input)` (a `python_code` step).
    Code {
        /// The Python source.
        source: String,
    },
}

/// Identity of the attempt, handed to steps that take a `ctx` parameter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepContext {
    /// The run (or standalone task) the step belongs to.
    pub run_id: String,
    /// The task being executed.
    pub task_id: String,
    /// The step's id in the workflow definition.
    pub step_id: String,
    /// The attempt number, 1 for the first try.
    pub attempt: u32,
    /// The W3C trace id of the run (32 lowercase hex digits), if it has one.
    #[serde(default)]
    pub trace_id: Option<String>,
}

/// Describes why the interpreter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PythonStartError {
    /// The interpreter thread could not be created.
    #[error("spawning the python interpreter thread")]
    Spawn(#[source] std::io::Error),
    /// The interpreter thread ended before reporting whether it started.
    #[error("the python interpreter thread stopped while starting")]
    ThreadStopped,
    /// The virtualenv has no site-packages directory for the running Python version.
    #[error(
        "virtualenv {virtual_env} has no site-packages for python {version}: {site_packages} is not a directory"
    )]
    MissingSitePackages {
        /// The virtualenv from the settings.
        virtual_env: PathBuf,
        /// The running interpreter's `X.Y`.
        version: String,
        /// The directory that was expected.
        site_packages: PathBuf,
    },
    /// A Python operation needed to set up the interpreter raised an exception.
    #[error("{operation}: {message}")]
    Python {
        /// What was being done, such as `adding the virtualenv to sys.path`.
        operation: &'static str,
        /// The Python exception, as `Class: message`.
        message: String,
    },
}
