//! The shapes of runs and jobs in API answers, built from stored rows and live leases.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use taskfleet_common::{RunStatus, StepStatus, TaskStatus, WorkflowDefinition};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::store::{RunRow, TaskRow};

/// A run (or a job) as it stands, with each of its steps.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunView {
    /// The run's id.
    pub id: Uuid,
    /// The registered workflow it runs, or the name of its inline definition.
    #[schema(required = true)]
    pub workflow: Option<String>,
    /// The registered workflow's version; null for an inline definition or a job.
    #[schema(required = true)]
    pub version: Option<i32>,
    /// Where the run stands.
    pub status: RunStatus,
    /// The run's input.
    pub input: Value,
    /// The run's output, once it succeeded.
    #[schema(required = true)]
    pub output: Option<Value>,
    /// Why the run failed or was cancelled: `{"step"?, "type", "message", "traceback"?}`.
    #[schema(value_type = Option<Object>, required = true)]
    pub error: Option<Value>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it finished.
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Each step of its definition, by id.
    pub steps: BTreeMap<String, StepView>,
    /// The W3C trace id the run belongs to (32 lowercase hex digits): its submission's
    /// `traceparent`, or one the scheduler made; null for a run made before runs had one.
    #[schema(required = true, pattern = "^[0-9a-f]{32}$")]
    pub trace_id: Option<String>,
    /// The schedule that started the run; null for a run submitted through the API.
    #[schema(required = true)]
    pub schedule: Option<String>,
    /// The tick of that schedule the run was started for.
    #[schema(required = true)]
    pub scheduled_for: Option<DateTime<Utc>>,
}

/// One step of a run as it stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StepView {
    /// The task that carries the step; absent until the step is planned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<Uuid>,
    /// Where the step stands.
    pub status: StepStatus,
    /// Attempts started so far.
    pub attempts: i32,
    /// The step's output, once it succeeded.
    #[schema(required = true)]
    pub output: Option<Value>,
    /// Why its last attempt failed: `{"type", "message", "traceback"?}`.
    #[schema(value_type = Option<Object>, required = true)]
    pub error: Option<Value>,
    /// What its Python code printed, when it printed anything.
    #[schema(required = true)]
    pub logs: Option<String>,
    /// When its current or last attempt started.
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// A `for_each` step's items: how many are done, of how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<ItemsView>,
}

/// How far a `for_each` step is through its items.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ItemsView {
    /// Items finished.
    pub done: i32,
    /// Items in all.
    pub total: i32,
}

/// Returns the API view of a run (or job). `running` holds the queued tasks a worker holds a
/// lease on.
pub fn run_view(run: RunRow, tasks: Vec<TaskRow>, running: &HashSet<Uuid>) -> RunView {
    let definition: Option<WorkflowDefinition> = serde_json::from_value(run.definition.0).ok();
    let mut by_step: HashMap<String, TaskRow> = tasks
        .into_iter()
        .map(|task| (task.step_id.clone(), task))
        .collect();
    let step_ids: Vec<String> = definition
        .map(|definition| definition.steps.into_iter().map(|step| step.id).collect())
        .unwrap_or_default();
    let steps = step_ids
        .into_iter()
        .map(|step_id| {
            let view = match by_step.remove(&step_id) {
                Some(task) => step_view(task, running),
                None => StepView {
                    task_id: None,
                    status: StepStatus::Pending,
                    attempts: 0,
                    output: None,
                    error: None,
                    logs: None,
                    started_at: None,
                    finished_at: None,
                    items: None,
                },
            };
            (step_id, view)
        })
        .collect();
    RunView {
        id: run.id,
        workflow: run.workflow,
        version: run.workflow_version,
        status: run.status,
        input: run.input.0,
        output: run.output.map(|output| output.0),
        error: run.error.map(|error| error.0),
        created_at: run.created_at,
        finished_at: run.finished_at,
        steps,
        trace_id: run.trace_id,
        schedule: run.schedule,
        scheduled_for: run.scheduled_for,
    }
}

fn step_view(task: TaskRow, running: &HashSet<Uuid>) -> StepView {
    let fanned_out = task.items_total.is_some_and(|total| total > 0);
    let (status, attempts) = match task.status {
        TaskStatus::Queued if fanned_out || running.contains(&task.id) => {
            (StepStatus::Running, task.attempt)
        }
        TaskStatus::Queued => (StepStatus::Pending, task.attempt - 1),
        TaskStatus::Skipped => (StepStatus::Skipped, 0),
        // A step cancelled or failed before any attempt started shows no attempt.
        other if task.started_at.is_none() && task.items_total.is_none() => {
            (other.step_status(), 0)
        }
        other => (other.step_status(), task.attempt),
    };
    StepView {
        task_id: Some(task.id),
        status,
        attempts,
        output: task.output.map(|output| output.0),
        error: task.error.map(|error| error.0),
        logs: task.logs.map(|logs| logs.0),
        started_at: task.started_at,
        finished_at: task.finished_at,
        items: task.items_total.map(|total| ItemsView {
            done: task.items_done,
            total,
        }),
    }
}
