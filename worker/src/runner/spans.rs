//! The spans of a task's attempt, exported when spans are exported and its trace is sampled
//! (`taskfleet_io::spans`): the attempt's own, a child of its run's span (whose id every
//! process derives from the run id), and, when the step ran on an executor, the executor
//! call's, a child of the attempt's. Their ids are derived from the task and the attempt.

use std::time::SystemTime;

use chrono::{DateTime, Utc};
use taskfleet_common::protocol::{Outcome, TaskMessage};
use taskfleet_common::trace::SpanId;
use taskfleet_io::spans::{self, KeyValue};

use super::execute::ExecutorTime;

/// An attempt that ended, as its spans show it.
pub(super) struct Attempt<'a> {
    /// The task.
    pub task: &'a TaskMessage,
    /// The queue it came from.
    pub queue: Option<&'a str>,
    /// This worker.
    pub worker_id: &'a str,
    /// How it ended.
    pub outcome: &'a Outcome,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// How long its executor ran it, and when, if one did.
    pub executor: Option<ExecutorTime>,
}

/// Exports the spans of `attempt`, if its task carries a trace whose spans are exported.
pub(super) fn export(attempt: &Attempt<'_>) {
    let Some(trace_id) = attempt.task.trace_id.filter(|id| spans::sampled(*id)) else {
        return;
    };
    let task = attempt.task;
    let kind = crate::metrics::kind(&task.step);
    let span_id = SpanId::of_attempt(task.task_id.0, task.attempt, false);
    // The error's type only: its message may hold payload, and spans leave unencrypted.
    let error = match attempt.outcome {
        Outcome::Failed { error } => Some(error.kind.clone()),
        _ => None,
    };
    spans::export(spans::Span {
        name: "step".into(),
        kind: spans::Kind::Consumer,
        trace_id,
        span_id,
        parent: Some((SpanId::of_run(task.run_id.0), true)),
        start: SystemTime::from(attempt.started_at),
        end: SystemTime::from(attempt.finished_at),
        attributes: vec![
            KeyValue::new("taskfleet.run.id", task.run_id.to_string()),
            KeyValue::new("taskfleet.task.id", task.task_id.to_string()),
            KeyValue::new("taskfleet.step.id", task.step_id.clone()),
            KeyValue::new("taskfleet.step.kind", kind),
            KeyValue::new("taskfleet.attempt", i64::from(task.attempt)),
            KeyValue::new("taskfleet.worker.id", attempt.worker_id.to_owned()),
            KeyValue::new(
                "messaging.destination.name",
                attempt.queue.unwrap_or("unknown").to_owned(),
            ),
        ],
        error: error.clone(),
    });
    if let Some(executor) = attempt.executor {
        spans::export(spans::Span {
            name: "executor call".into(),
            kind: spans::Kind::Internal,
            trace_id,
            span_id: SpanId::of_attempt(task.task_id.0, task.attempt, true),
            parent: Some((span_id, false)),
            start: executor
                .ended
                .checked_sub(executor.ran)
                .unwrap_or(executor.ended),
            end: executor.ended,
            attributes: vec![KeyValue::new("taskfleet.step.kind", kind)],
            error,
        });
    }
}
