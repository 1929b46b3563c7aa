//! Turns planning decisions into rows to insert and messages to publish. Shared by the accept
//! path (a new run's first steps) and the completion path (the steps that follow).

use serde_json::Value;
use taskfleet_common::definition::WorkflowDefinition;
use uuid::Uuid;

use crate::dispatch::Dispatch;
use crate::planner::{Planned, RunEnd};
use crate::store::{FinishedRun, NewTask};

/// Rows and messages that carry out a set of planning decisions.
#[derive(Debug, Default)]
pub struct Materialized {
    /// Task rows to insert.
    pub tasks: Vec<NewTask>,
    /// Messages to publish after the commit.
    pub dispatches: Vec<Dispatch>,
}

impl Materialized {
    /// Adds the rows and messages for `planned`, decisions about steps of run `run_id`.
    pub fn add(&mut self, definition: &WorkflowDefinition, run_id: Uuid, planned: Vec<Planned>) {
        for decision in planned {
            let (step_id, status, input, error) = match decision {
                Planned::Dispatch { step_id, input } => (step_id, "queued", Some(input), None),
                Planned::Skip { step_id } => (step_id, "skipped", None, None),
                Planned::Fail { step_id, error } => {
                    let error = serde_json::to_value(&error).unwrap_or(Value::Null);
                    (step_id, "failed", None, Some(error))
                }
            };
            let Some(step) = definition.step(&step_id) else {
                continue;
            };
            let task_id = Uuid::now_v7();
            if let Some(input) = &input
                && let Some(dispatch) =
                    Dispatch::new(definition, run_id, task_id, &step_id, 1, input.clone())
            {
                self.dispatches.push(dispatch);
            }
            self.tasks.push(NewTask {
                id: task_id,
                run_id,
                queue: step.queue().to_owned(),
                priority: i16::from(step.priority()),
                step_id,
                status,
                input,
                error,
                delay_s: None,
            });
        }
    }
}

impl Materialized {
    /// Delays the dispatch of every planned task by `seconds`: the tasks are written with a due
    /// time and the timer loop dispatches them, so nothing is published now.
    pub fn delay(&mut self, seconds: f64) {
        self.dispatches.clear();
        for task in &mut self.tasks {
            if task.status == "queued" {
                task.delay_s = Some(seconds);
            }
        }
    }

    /// Cancels every planned task that would have been dispatched, for a run that ended while
    /// being planned (a step that failed at once fails the whole run).
    pub fn cancel_dispatches(&mut self) {
        self.dispatches.clear();
        for task in &mut self.tasks {
            if task.status == "queued" {
                task.status = "cancelled";
                task.error = Some(serde_json::json!({
                    "type": taskfleet_common::error::CANCELLED,
                    "message": "the run ended before this step started",
                }));
            }
        }
    }
}

/// Returns the record of a run that ended.
pub fn finished_run(run_id: Uuid, end: RunEnd) -> FinishedRun {
    match end {
        RunEnd::Succeeded { output } => FinishedRun {
            id: run_id,
            status: "succeeded",
            output: Some(output),
            error: None,
        },
        RunEnd::Failed { error } => FinishedRun {
            id: run_id,
            status: "failed",
            output: None,
            error: Some(error),
        },
    }
}
