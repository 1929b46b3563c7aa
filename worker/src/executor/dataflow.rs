//! The dataflow executor: runs jq programs with jaq, compiled once per program text and cached.
//! Programs run on tokio's blocking pool, never on the async threads.

use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::DATAFLOW_ERROR;
use taskfleet_common::jq::ProgramCache;
use taskfleet_common::protocol::TaskMessage;

use super::Executor;

/// Runs `dataflow` steps.
#[derive(Clone, Default)]
pub struct DataflowExecutor {
    programs: ProgramCache,
}

impl Executor for DataflowExecutor {
    async fn execute(&self, task: &TaskMessage) -> Result<Value, StepError> {
        let StepKind::Dataflow { program } = &task.step else {
            return Err(StepError::new(
                DATAFLOW_ERROR,
                "the dataflow executor got a step of another kind",
            ));
        };
        let program = self
            .programs
            .get(program)
            .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))?;
        let input = task.input.clone();
        tokio::task::spawn_blocking(move || program.run(input))
            .await
            .map_err(|error| {
                StepError::new(DATAFLOW_ERROR, format!("jq program panicked: {error}"))
            })?
            .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))
    }
}
