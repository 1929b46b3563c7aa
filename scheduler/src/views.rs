//! The JSON shapes of runs and jobs in API answers, built from stored rows and live leases.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};
use taskfleet_common::{StepStatus, TaskStatus, WorkflowDefinition};
use uuid::Uuid;

use crate::store::{RunRow, TaskRow};

/// Returns the API view of a run (or job): `{"id", "workflow", "status", "input", "output",
/// "error", "created_at", "finished_at", "steps"}`. `running` holds the queued tasks a worker
/// holds a lease on.
pub fn run_view(run: RunRow, tasks: Vec<TaskRow>, running: &HashSet<Uuid>) -> Value {
    let definition: Option<WorkflowDefinition> = serde_json::from_value(run.definition.0).ok();
    let mut by_step: HashMap<String, TaskRow> = tasks
        .into_iter()
        .map(|task| (task.step_id.clone(), task))
        .collect();
    let mut steps = Map::new();
    let step_ids: Vec<String> = definition
        .map(|definition| definition.steps.into_iter().map(|step| step.id).collect())
        .unwrap_or_default();
    for step_id in step_ids {
        let view = match by_step.remove(&step_id) {
            Some(task) => step_view(task, running),
            None => json!({
                "status": StepStatus::Pending, "attempts": 0, "output": null, "error": null,
                "logs": null, "started_at": null, "finished_at": null,
            }),
        };
        steps.insert(step_id, view);
    }
    json!({
        "id": run.id,
        "workflow": run.workflow,
        "version": run.workflow_version,
        "status": run.status,
        "input": run.input.0,
        "output": run.output.map(|output| output.0),
        "error": run.error.map(|error| error.0),
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "steps": steps,
    })
}

fn step_view(task: TaskRow, running: &HashSet<Uuid>) -> Value {
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
    let mut view = json!({
        "task_id": task.id,
        "status": status,
        "attempts": attempts,
        "output": task.output.map(|output| output.0),
        "error": task.error.map(|error| error.0),
        "logs": task.logs,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    });
    if let Some(total) = task.items_total {
        view["items"] = json!({"done": task.items_done, "total": total});
    }
    view
}
