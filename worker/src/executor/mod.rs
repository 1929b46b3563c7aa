//! Executors: one per step runtime. Each turns a task's step and input into an output or a step
//! error; none of them touches the broker or Redis.

pub mod dataflow;
pub mod python;

use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::protocol::TaskMessage;

/// Runs steps of one kind.
pub trait Executor {
    /// Runs the step of `task` on its input.
    fn execute(&self, task: &TaskMessage) -> impl Future<Output = Result<Value, StepError>> + Send;
}
