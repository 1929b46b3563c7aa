//! New runs: what one is made of before planning ([`NewRunParts`]) and its planning into what
//! the accept writer (or a schedule's tick) writes ([`plan_new_run`]). The API's submissions
//! and the schedules' ticks both start runs through here, so a scheduled run is planned
//! exactly as a submitted one.

use std::collections::BTreeMap;

use serde_json::Value;
use taskfleet_common::{RunKind, RunStatus, TraceId, WorkflowDefinition};
use uuid::Uuid;

use super::{Halted, ProgramRunner, plan_run};
use crate::accept::Submission;
use crate::store::NewRun;

/// What a new run is made of, before planning.
pub struct NewRunParts {
    /// A workflow's run or a job.
    pub kind: RunKind,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The definition it runs.
    pub definition: WorkflowDefinition,
    /// Whether the definition came inline and is still to be checked.
    pub unchecked: bool,
    /// The registered workflow (or the inline definition's name).
    pub workflow: Option<String>,
    /// The registered workflow's version.
    pub version: Option<i32>,
    /// Its input.
    pub input: Value,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Seconds before the first steps are dispatched (`delay_s`, or `not_before` from now).
    pub delay_s: Option<f64>,
    /// The W3C trace of the request (or tick) that made it.
    pub trace_id: TraceId,
    /// The span its own span is a child of (the request's), when its trace's spans are
    /// exported.
    pub trace_span_id: Option<taskfleet_common::trace::SpanId>,
}

/// Plans a new run's first steps (its definition already checked) and returns what to write.
pub fn plan_new_run(
    programs: &dyn ProgramRunner,
    parts: NewRunParts,
) -> Result<Submission, Halted> {
    let id = Uuid::now_v7();
    let run = super::RunRef {
        id,
        trace_id: Some(parts.trace_id),
        tenant: &parts.tenant,
    };
    let planned = plan_run(
        programs,
        run,
        &parts.definition,
        &parts.input,
        &BTreeMap::new(),
    )?;
    let mut rows = planned.rows;
    let (status, output, error, delay_s) = match planned.end {
        Some(finished) => (finished.status, finished.output, finished.error, None),
        None => {
            if let Some(seconds) = parts.delay_s {
                rows.delay(seconds);
            }
            (RunStatus::Running, None, None, parts.delay_s)
        }
    };
    Ok(Submission {
        run: NewRun {
            id,
            kind: parts.kind,
            tenant: parts.tenant,
            workflow: parts.workflow,
            workflow_version: parts.version,
            definition: serde_json::to_value(&parts.definition).unwrap_or(Value::Null),
            input: parts.input,
            status,
            output,
            error,
            idempotency_key: parts.idempotency_key,
            trace_id: Some(parts.trace_id),
            trace_span_id: parts.trace_span_id,
            delay_s,
        },
        tasks: rows.tasks,
        dispatches: rows.dispatches,
    })
}
