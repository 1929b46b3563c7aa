//! The spans of a task's attempt, exported when spans are exported (`taskfleet_io::spans`): the
//! attempt's own, a child of its run's span (whose id every process derives from the run id),
//! and, when the step ran on an executor, the executor call's, a child of the attempt's.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use taskfleet_common::protocol::{Outcome, TaskMessage};
use taskfleet_common::trace::SpanId;
use taskfleet_io::spans::{self, KeyValue};

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
    /// When it started and ended.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// How long its executor ran it, if one did.
    pub ran: Option<Duration>,
}

/// Exports the spans of `attempt`, if spans are exported and its task carries a trace.
pub(super) fn export(attempt: &Attempt<'_>) {
    let Some(trace_id) = attempt.task.trace_id.filter(|_| spans::enabled()) else {
        return;
    };
    let task = attempt.task;
    let kind = crate::metrics::kind(&task.step);
    let end = SystemTime::from(attempt.finished_at);
    let span_id = SpanId::random();
    let error = match attempt.outcome {
        Outcome::Failed { error } => Some(format!("{}: {}", error.kind, error.message)),
        _ => None,
    };
    spans::export(spans::Span {
        name: "step".into(),
        kind: spans::Kind::Consumer,
        trace_id,
        span_id,
        parent: Some((SpanId::of_run(task.run_id.0), true)),
        start: SystemTime::from(attempt.started_at),
        end,
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
    if let Some(ran) = attempt.ran {
        // The executor's time ends where the attempt's does, less the moments spent reporting.
        spans::export(spans::Span {
            name: "executor call".into(),
            kind: spans::Kind::Internal,
            trace_id,
            span_id: SpanId::random(),
            parent: Some((span_id, false)),
            start: end.checked_sub(ran).unwrap_or(end),
            end,
            attributes: vec![KeyValue::new("taskfleet.step.kind", kind)],
            error,
        });
    }
}
