//! Step errors as they travel from a worker to the scheduler and out through the API.
//!
//! This module only describes errors; it does not decide retries or statuses.

use serde::{Deserialize, Serialize};

/// The error type recorded when a step attempt ran longer than its `timeout_s`.
pub const TIMEOUT: &str = "timeout";
/// The error type recorded when a run took longer than its definition's `timeout_s`, and of
/// the steps it stopped.
pub const RUN_TIMEOUT: &str = "run_timeout";
/// The error type recorded when a step was cancelled.
pub const CANCELLED: &str = "cancelled";
/// The error type recorded when a task lost its worker too many times.
pub const WORKER_LOST: &str = "worker_lost";
/// The error type recorded when a jq program failed at run time.
pub const DATAFLOW_ERROR: &str = "dataflow_error";
/// The error type recorded when a step produced a value JSON cannot express.
pub const INVALID_OUTPUT: &str = "invalid_output";
/// The error type recorded when a worker could not read a task it was sent (a protocol version it
/// does not know, a malformed message or an input that cannot travel).
pub const INVALID_TASK: &str = "invalid_task";
/// The error type recorded when a Python step could not be loaded (bad module or function).
pub const IMPORT_ERROR: &str = "ImportError";

/// Describes why a step attempt failed: `{"type", "message", "traceback"?}` on the wire and in the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    /// The Python exception class, or one of the error types named by the constants of this module.
    #[serde(rename = "type")]
    pub kind: String,
    /// The human-readable message.
    pub message: String,
    /// The formatted traceback of a Python exception.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl StepError {
    /// Returns an error of the given type with a message and no traceback.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            traceback: None,
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}
