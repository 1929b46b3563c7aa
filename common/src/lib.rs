//! Shared vocabulary of taskfleet: workflow definitions, the wire protocol between scheduler and
//! workers, identifiers (W3C trace ids among them), statuses, error types, the names of queues
//! and Redis keys, and the records kept under those keys.
//!
//! This crate does no I/O: it never talks to a network, a database or a Python interpreter.

pub mod amqp;
pub mod definition;
pub mod error;
pub mod ids;
pub mod jq;
pub mod names;
pub mod protocol;
pub mod records;
pub mod seal;
pub mod settings;
pub mod status;
pub mod sync;
pub mod trace;
pub mod value;

pub use definition::{StepDefinition, StepKind, WorkflowDefinition};
pub use error::StepError;
pub use ids::{RunId, TaskId};
pub use names::Namespace;
pub use status::{RunKind, RunStatus, StepStatus, TaskStatus};
pub use trace::TraceId;
