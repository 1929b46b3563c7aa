//! The dataflow executor: runs jq programs with jaq, compiled once per program text and cached.
//! Programs run on tokio's blocking pool, never on the async threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::DATAFLOW_ERROR;
use taskfleet_common::jq::Program;
use taskfleet_common::protocol::TaskMessage;

use super::Executor;

/// The most compiled programs kept; past it the cache starts over.
const CACHE_LIMIT: usize = 10_000;

/// Runs `dataflow` steps.
#[derive(Clone, Default)]
pub struct DataflowExecutor {
    programs: Arc<Mutex<HashMap<String, Program>>>,
}

impl DataflowExecutor {
    /// Returns the compiled program for `source`, compiling it on first use.
    fn program(&self, source: &str) -> Result<Program, StepError> {
        let mut programs = self
            .programs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(program) = programs.get(source) {
            return Ok(program.clone());
        }
        let program = Program::compile(source)
            .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))?;
        if programs.len() >= CACHE_LIMIT {
            programs.clear();
        }
        programs.insert(source.to_owned(), program.clone());
        Ok(program)
    }
}

impl Executor for DataflowExecutor {
    async fn execute(&self, task: &TaskMessage) -> Result<Value, StepError> {
        let StepKind::Dataflow { program } = &task.step else {
            return Err(StepError::new(
                DATAFLOW_ERROR,
                "the dataflow executor got a step of another kind",
            ));
        };
        let program = self.program(program)?;
        let input = task.input.clone();
        tokio::task::spawn_blocking(move || program.run(input))
            .await
            .map_err(|error| {
                StepError::new(DATAFLOW_ERROR, format!("jq program panicked: {error}"))
            })?
            .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))
    }
}
