//! Turns planning decisions into rows to insert and messages to publish.

use serde_json::Value;
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::{RunStatus, TaskStatus, TraceId};
use uuid::Uuid;

use super::planner::{Planned, RunEnd};
use crate::dispatch::Dispatch;
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
    /// Adds the rows and messages for `planned`, decisions about steps of run `run_id`, whose
    /// messages carry the run's `trace_id`.
    pub fn add(
        &mut self,
        definition: &WorkflowDefinition,
        run_id: Uuid,
        trace_id: Option<TraceId>,
        planned: Vec<Planned>,
    ) {
        for decision in planned {
            match decision {
                Planned::Dispatch { step_id, input } => {
                    self.task(
                        definition,
                        (run_id, trace_id),
                        &step_id,
                        -1,
                        TaskStatus::Queued,
                        Some(input),
                        None,
                    );
                }
                Planned::Skip { step_id } => {
                    self.task(
                        definition,
                        (run_id, trace_id),
                        &step_id,
                        -1,
                        TaskStatus::Skipped,
                        None,
                        None,
                    );
                }
                Planned::Fail { step_id, error } => {
                    let error = serde_json::to_value(&error).unwrap_or(Value::Null);
                    self.task(
                        definition,
                        (run_id, trace_id),
                        &step_id,
                        -1,
                        TaskStatus::Failed,
                        None,
                        Some(error),
                    );
                }
                Planned::FanOut { step_id, items } => {
                    self.fan_out(definition, (run_id, trace_id), &step_id, items);
                }
            }
        }
    }

    /// Adds the row of a `for_each` step, which holds no input of its own and is never
    /// dispatched (it waits for its items), and one dispatched task per item.
    fn fan_out(
        &mut self,
        definition: &WorkflowDefinition,
        run: (Uuid, Option<TraceId>),
        step_id: &str,
        items: Vec<Value>,
    ) {
        let total = i32::try_from(items.len()).unwrap_or(i32::MAX);
        let status = if items.is_empty() {
            TaskStatus::Succeeded
        } else {
            TaskStatus::Queued
        };
        let Some(parent) = self.task(definition, run, step_id, -1, status, None, None) else {
            return;
        };
        parent.items_total = Some(total);
        if items.is_empty() {
            parent.output = Some(Value::Array(Vec::new()));
        }
        for (index, item) in items.into_iter().enumerate() {
            let index = i32::try_from(index).unwrap_or(i32::MAX);
            self.task(
                definition,
                run,
                step_id,
                index,
                TaskStatus::Queued,
                Some(item),
                None,
            );
        }
    }

    /// Adds one task row (and its dispatch, if it is queued with an input) and returns it; `run`
    /// is the run's id and trace id.
    #[allow(clippy::too_many_arguments, reason = "the columns of one row")]
    fn task(
        &mut self,
        definition: &WorkflowDefinition,
        (run_id, trace_id): (Uuid, Option<TraceId>),
        step_id: &str,
        item: i32,
        status: TaskStatus,
        input: Option<Value>,
        error: Option<Value>,
    ) -> Option<&mut NewTask> {
        let step = definition.step(step_id)?;
        let task_id = Uuid::now_v7();
        if status == TaskStatus::Queued
            && let Some(input) = &input
            && let Some(dispatch) = Dispatch::new(
                definition,
                run_id,
                trace_id,
                task_id,
                step_id,
                1,
                input.clone(),
            )
        {
            self.dispatches.push(dispatch);
        }
        self.tasks.push(NewTask {
            id: task_id,
            run_id,
            step_id: step_id.to_owned(),
            status,
            queue: step.queue().to_owned(),
            priority: i16::from(step.priority()),
            input,
            error,
            delay_s: None,
            item,
            items_total: None,
            output: None,
        });
        self.tasks.last_mut()
    }
}

impl Materialized {
    /// Adds the rows and messages of `other`.
    pub fn extend(&mut self, other: Materialized) {
        self.tasks.extend(other.tasks);
        self.dispatches.extend(other.dispatches);
    }

    /// Delays the dispatch of every planned task by `seconds`: the tasks are written with a due
    /// time and the timer loop dispatches them, so nothing is published now.
    pub fn delay(&mut self, seconds: f64) {
        self.dispatches.clear();
        for task in &mut self.tasks {
            if task.status == TaskStatus::Queued {
                task.delay_s = Some(seconds);
            }
        }
    }

    /// Cancels every planned task that would have been dispatched, for a run that ended while
    /// being planned (a step that failed at once fails the whole run).
    pub fn cancel_dispatches(&mut self) {
        self.dispatches.clear();
        for task in &mut self.tasks {
            if task.status == TaskStatus::Queued {
                task.status = TaskStatus::Cancelled;
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
            status: RunStatus::Succeeded,
            output: Some(output),
            error: None,
        },
        RunEnd::Failed { error } => FinishedRun {
            id: run_id,
            status: RunStatus::Failed,
            output: None,
            error: Some(error),
        },
    }
}
