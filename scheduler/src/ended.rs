//! What a scheduler does when runs end, besides writing them: counts them in the metrics and
//! exports their spans (`taskfleet_io::spans`).
//!
//! A run's span covers it from acceptance to its end. Its id is derived from the run id
//! (`SpanId::of_run`), so the workers that run its steps make their attempts' spans its
//! children without being told; its parent is the span of the request that started it.

use std::time::{Duration, SystemTime};

use taskfleet_common::trace::{SpanId, TraceId};
use taskfleet_common::{RunKind, RunStatus};
use taskfleet_io::spans;

use crate::store::EndedRun;

/// Counts runs that ended and exports their spans.
pub fn runs(ended: &[EndedRun]) {
    crate::metrics::finished(ended.iter().map(|run| (run.status, run.seconds)));
    if spans::enabled() {
        let now = SystemTime::now();
        for run in ended {
            export_span(run, now);
        }
    }
}

/// Exports the span of `run`, which ended at `end`, if its trace's spans are exported.
fn export_span(run: &EndedRun, end: SystemTime) {
    // A run made before runs had a trace has no span.
    let Some(trace_id) = run
        .trace_id
        .as_deref()
        .and_then(|id| id.parse::<TraceId>().ok())
        .filter(|id| spans::sampled(*id))
    else {
        return;
    };
    let parent = run
        .trace_span_id
        .as_deref()
        .and_then(|id| id.parse::<SpanId>().ok());
    let ran = Duration::try_from_secs_f64(run.seconds).unwrap_or_default();
    spans::export(spans::Span {
        name: match run.kind {
            RunKind::Workflow => "run".into(),
            RunKind::Job => "job".into(),
        },
        kind: spans::Kind::Internal,
        trace_id,
        span_id: SpanId::of_run(run.id),
        parent: parent.map(|parent| (parent, false)),
        start: end.checked_sub(ran).unwrap_or(end),
        end,
        attributes: vec![
            spans::KeyValue::new("taskfleet.run.id", run.id.to_string()),
            spans::KeyValue::new("taskfleet.run.status", run.status.as_str()),
        ],
        error: match run.status {
            RunStatus::Failed => Some("the run failed".to_owned()),
            RunStatus::Cancelled => Some("the run was cancelled".to_owned()),
            _ => None,
        },
    });
}
