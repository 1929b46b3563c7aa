//! `POST /v1/runs/{id}/retry` and `POST /v1/tasks/{id}/retry`: running a failed or cancelled
//! run again from its failed, cancelled and unstarted steps.
//!
//! The run and the steps it keeps are read, and the run planned again from them, holding
//! nothing (see `store::rerun`); then one short transaction locks the run, finds it as it was
//! read, deletes the rows of its steps that neither succeeded nor were skipped, inserts the new
//! tasks and writes it running. The steps that succeeded keep their outputs and are not run
//! again; the others are planned as if new: first attempt, new task ids, so a late report of an
//! old attempt matches nothing. The new tasks are made after the run was stopped, so the
//! workers' stop flag of the run, which stops the tasks made before it
//! (`records::stop_flag`), lets them run. A retry while the re-run is under way answers as the
//! first did, and only a run that runs again counts against the tenant's quotas.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::{RunKind, RunStatus, TraceId};

use super::{RunStatusView, noun, parse_id};
use crate::api::{ApiError, AppState, ErrorBody, owner};
use crate::auth::{Principal, Scope};
use crate::planning::{self, PlanningError};
use crate::store::{self, Restart, StoreError};

/// Runs a failed or cancelled run again from its failed, cancelled and unstarted steps; the
/// steps that succeeded keep their outputs. Asked again while the re-run is under way, it
/// answers the same.
#[utoipa::path(post, path = "/v1/runs/{id}/retry", operation_id = "retryRun", tag = "runs",
    params(("id" = Uuid, Path, description = "The run's id")),
    responses(
        (status = 409, description = "The run succeeded, or is running and was never re-run", body = ErrorBody),
        (status = 429, description = "The tenant's quota is used up for now; see `Retry-After`", body = ErrorBody),
        (status = 200, description = "The run is running again", body = RunStatusView)))]
pub async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunStatusView>, ApiError> {
    retry_kind(&state, &principal, &id, RunKind::Workflow).await
}

/// Runs a failed or cancelled job again, as a run is retried.
#[utoipa::path(post, path = "/v1/tasks/{id}/retry", operation_id = "retryJob", tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id")),
    responses(
        (status = 409, description = "The job succeeded, or is running and was never re-run", body = ErrorBody),
        (status = 429, description = "The tenant's quota is used up for now; see `Retry-After`", body = ErrorBody),
        (status = 200, description = "The job is running again", body = RunStatusView)))]
pub async fn retry_job(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunStatusView>, ApiError> {
    retry_kind(&state, &principal, &id, RunKind::Job).await
}

async fn retry_kind(
    state: &AppState,
    principal: &Principal,
    id: &str,
    kind: RunKind,
) -> Result<Json<RunStatusView>, ApiError> {
    principal.require(Scope::RunsWrite)?;
    let what = noun(kind);
    let id = parse_id(id, what)?;
    let Some(read) = store::read_for_rerun(&state.db, owner(state, principal), id, kind).await?
    else {
        return Err(ApiError::not_found(format!("no {what} with id {id}")));
    };
    if let Some(answer) = refuse_unless_ended(what, id, (read.status, read.reruns))? {
        return Ok(Json(answer));
    }
    // Only a run that will run again counts against the quotas.
    state.quotas.admit_one(state, principal, kind, None).await?;
    let definition: WorkflowDefinition =
        serde_json::from_value(read.definition.0).map_err(|error| ApiError::internal(&error))?;
    let trace_id = read
        .trace_id
        .as_deref()
        .and_then(|id| id.parse::<TraceId>().ok());
    let states: BTreeMap<_, _> = read
        .kept
        .into_iter()
        .map(|row| {
            let state = planning::stored_state(
                row.status,
                row.output.map(|output| output.0),
                row.error.map(|error| error.0),
            );
            (row.step_id, state)
        })
        .collect();
    let input = read.input.0;
    let programs = state.programs.clone();
    let tenant = principal.tenant.clone();
    let planned = planning::run_planning(false, move || {
        let run = planning::RunRef {
            id,
            trace_id,
            tenant: &tenant,
        };
        planning::plan_run(&programs, run, &definition, &input, &states)
    })
    .await
    .map_err(|error| match error {
        PlanningError::Halted(halted) => ApiError::unavailable(halted.to_string()),
        error @ PlanningError::Panicked(_) => ApiError::internal(&error),
    })?;
    let mut tx = state.db.begin().await.map_err(StoreError::from)?;
    let restart = store::restart_run(
        &mut tx,
        state.config.namespace.as_str(),
        id,
        (read.status, read.reruns),
        &planned.rows.tasks,
        planned.end,
    )
    .await?;
    let ended = match restart {
        Restart::Restarted(ended) => ended,
        // Another request ran it again meanwhile (or it is gone): answered as it now stands.
        Restart::Changed(None) => {
            return Err(ApiError::not_found(format!("no {what} with id {id}")));
        }
        Restart::Changed(Some(now)) => {
            let answer =
                refuse_unless_ended(what, id, now)?.unwrap_or(RunStatusView { id, status: now.0 });
            return Ok(Json(answer));
        }
    };
    tx.commit().await.map_err(StoreError::from)?;
    state.dispatcher.send(planned.rows.dispatches);
    state
        .dispatcher
        .admit(crate::admission::waiting(&planned.rows.tasks).collect());
    let status = match &ended {
        Some(ended) => ended.status,
        None => RunStatus::Running,
    };
    if let Some(ended) = ended {
        crate::ended::runs(&[ended]);
        state.notifier.announce(&[id]).await;
    }
    let action = match kind {
        RunKind::Workflow => "run.retry",
        RunKind::Job => "job.retry",
    };
    crate::api::keys::record(state, principal, action, Some(id.to_string()), None).await;
    Ok(Json(RunStatusView { id, status }))
}

/// Returns what a retry of a run with this status and count of re-runs answers at once:
/// nothing for a run that failed or was cancelled (it runs again), the first answer while a
/// re-run is under way, else 409.
fn refuse_unless_ended(
    what: &str,
    id: uuid::Uuid,
    (status, reruns): (RunStatus, i32),
) -> Result<Option<RunStatusView>, ApiError> {
    match status {
        RunStatus::Failed | RunStatus::Cancelled => Ok(None),
        RunStatus::Running if reruns > 0 => Ok(Some(RunStatusView {
            id,
            status: RunStatus::Running,
        })),
        RunStatus::Running | RunStatus::Pending => Err(ApiError::conflict(format!(
            "{what} {id} is still running: only a failed or cancelled {what} runs again"
        ))),
        status => Err(ApiError::conflict(format!(
            "{what} {id} has {status}: only a failed or cancelled {what} runs again"
        ))),
    }
}
