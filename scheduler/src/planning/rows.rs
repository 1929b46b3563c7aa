//! Turns planning decisions into rows to insert and messages to publish.

use serde_json::Value;
use taskfleet_common::definition::{WorkflowDefinition, limits};
use taskfleet_common::{RunStatus, TaskStatus, TraceId};
use uuid::Uuid;

use super::planner::{Keys, Planned, RunEnd};
use crate::dispatch::{Dispatch, TaskRef};
use crate::store::{FinishedRun, NewTask};

/// The run a plan is for.
#[derive(Debug, Clone, Copy)]
pub struct RunRef<'a> {
    /// The run.
    pub id: Uuid,
    /// Its trace, which its messages carry.
    pub trace_id: Option<TraceId>,
    /// Its tenant, whose limits its steps count against.
    pub tenant: &'a str,
}

/// Rows and messages that carry out a set of planning decisions.
#[derive(Debug, Default)]
pub struct Materialized {
    /// Task rows to insert.
    pub tasks: Vec<NewTask>,
    /// Messages to publish after the commit.
    pub dispatches: Vec<Dispatch>,
}

impl Materialized {
    /// Adds the rows and messages for `planned`, decisions about steps of `run`.
    pub fn add(&mut self, definition: &WorkflowDefinition, run: RunRef<'_>, planned: Vec<Planned>) {
        let none = Keys::default();
        for decision in planned {
            match decision {
                Planned::Dispatch {
                    step_id,
                    input,
                    keys,
                } => {
                    let row = Row {
                        item: -1,
                        status: TaskStatus::Queued,
                        keys: &keys,
                    };
                    self.task(definition, run, &step_id, row, Some(input), None);
                }
                Planned::Skip { step_id } => {
                    let row = Row {
                        item: -1,
                        status: TaskStatus::Skipped,
                        keys: &none,
                    };
                    self.task(definition, run, &step_id, row, None, None);
                }
                Planned::Fail { step_id, error } => {
                    let error = serde_json::to_value(&error).unwrap_or(Value::Null);
                    let row = Row {
                        item: -1,
                        status: TaskStatus::Failed,
                        keys: &none,
                    };
                    self.task(definition, run, &step_id, row, None, Some(error));
                }
                Planned::FanOut {
                    step_id,
                    items,
                    keys,
                } => {
                    self.fan_out(definition, run, &step_id, items, &keys);
                }
            }
        }
    }

    /// Adds the row of a `for_each` step, which holds no input of its own and is never
    /// dispatched (it waits for its items), and one dispatched task per item.
    fn fan_out(
        &mut self,
        definition: &WorkflowDefinition,
        run: RunRef<'_>,
        step_id: &str,
        items: Vec<Value>,
        keys: &[Keys],
    ) {
        let total = i32::try_from(items.len()).unwrap_or(i32::MAX);
        let status = if items.is_empty() {
            TaskStatus::Succeeded
        } else {
            TaskStatus::Queued
        };
        let none = Keys::default();
        // The step's own row is never dispatched: it counts against no limit.
        let parent = Row {
            item: -1,
            status,
            keys: &none,
        };
        let Some(parent) = self.task(definition, run, step_id, parent, None, None) else {
            return;
        };
        parent.rate_group = None;
        parent.concurrency = None;
        parent.items_total = Some(total);
        if items.is_empty() {
            parent.output = Some(Value::Array(Vec::new()));
        }
        for (index, item) in items.into_iter().enumerate() {
            let row = Row {
                item: i32::try_from(index).unwrap_or(i32::MAX),
                status: TaskStatus::Queued,
                keys: keys.get(index).unwrap_or(&none),
            };
            self.task(definition, run, step_id, row, Some(item), None);
        }
    }

    /// Adds one task row (and its dispatch, if it is queued with an input and waits for no
    /// concurrency permit) and returns it.
    fn task(
        &mut self,
        definition: &WorkflowDefinition,
        run: RunRef<'_>,
        step_id: &str,
        Row { item, status, keys }: Row<'_>,
        input: Option<Value>,
        error: Option<Value>,
    ) -> Option<&mut NewTask> {
        let step = definition.step(step_id)?;
        let task_id = Uuid::now_v7();
        let workflow = definition.name.as_deref();
        let rate_group = step
            .rate_limit
            .as_ref()
            .map(|_| limits::group(run.tenant, workflow, step_id, keys.rate.as_deref()));
        let concurrency = step.concurrency.as_ref().map(|concurrency| {
            let group = limits::group(run.tenant, workflow, step_id, keys.concurrency.as_deref());
            (group, i32::try_from(concurrency.limit).unwrap_or(i32::MAX))
        });
        // A task that waits for a permit is dispatched by the timer once admitted.
        if status == TaskStatus::Queued
            && concurrency.is_none()
            && let Some(input) = &input
        {
            let task = TaskRef {
                run_id: run.id,
                trace_id: run.trace_id,
                task_id,
                step_id,
                rate_group: rate_group.as_deref(),
            };
            if let Some(dispatch) = Dispatch::new(definition, task, 1, input.clone()) {
                self.dispatches.push(dispatch);
            }
        }
        self.tasks.push(NewTask {
            id: task_id,
            run_id: run.id,
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
            rate_group,
            concurrency,
        });
        self.tasks.last_mut()
    }
}

/// Where a row stands: its item (-1 for a step's own row), status, and its limits' key values.
struct Row<'a> {
    item: i32,
    status: TaskStatus,
    keys: &'a Keys,
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
