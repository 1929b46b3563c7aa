//! `POST /v1/runs/{id}/retry` and `POST /v1/tasks/{id}/retry`: running a failed or cancelled
//! run again from its failed, cancelled and unstarted steps.
//!
//! In one transaction the run is locked, the rows of its steps that neither succeeded nor were
//! skipped are deleted (with their items), the run is planned again from the states it keeps
//! (so the steps that succeeded keep their outputs and are not run again, and the others are
//! planned as if new: first attempt, new task ids, so a late report of an old attempt matches
//! nothing) and written running again. The flag that told workers to drop the run's tasks is
//! cleared before the commit; the new tasks are dispatched after it. A retry while the re-run
//! is under way answers as the first did.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::{RunKind, RunStatus, TraceId};

use super::{RunStatusView, noun, parse_id};
use crate::api::{ApiError, AppState, ErrorBody, owner};
use crate::auth::{Principal, Scope};
use crate::planning::{self, PlanningError};
use crate::store::{self, Rerun, StoreError};

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
    state.quotas.admit_one(state, principal, kind, None).await?;
    let mut tx = state.db.begin().await.map_err(StoreError::from)?;
    let load = match store::clear_for_rerun(&mut tx, owner(state, principal), id, kind).await? {
        Rerun::NotFound => return Err(ApiError::not_found(format!("no {what} with id {id}"))),
        Rerun::UnderWay => {
            return Ok(Json(RunStatusView {
                id,
                status: RunStatus::Running,
            }));
        }
        Rerun::Refused(RunStatus::Running) => {
            return Err(ApiError::conflict(format!(
                "{what} {id} is still running: only a failed or cancelled {what} runs again"
            )));
        }
        Rerun::Refused(status) => {
            return Err(ApiError::conflict(format!(
                "{what} {id} has {status}: only a failed or cancelled {what} runs again"
            )));
        }
        Rerun::Cleared(load) => load,
    };
    let definition: WorkflowDefinition =
        serde_json::from_value(load.definition.0).map_err(|error| ApiError::internal(&error))?;
    let trace_id = load
        .trace_id
        .as_deref()
        .and_then(|id| id.parse::<TraceId>().ok());
    let states: BTreeMap<_, _> = load
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
    let input = load.input.0;
    let programs = state.programs.clone();
    let planned = planning::run_planning(false, move || {
        planning::plan_run(&programs, id, trace_id, &definition, &input, &states)
    })
    .await
    .map_err(|error| match error {
        PlanningError::Halted(halted) => ApiError::unavailable(halted.to_string()),
        error @ PlanningError::Panicked(_) => ApiError::internal(&error),
    })?;
    let ended = store::restart_run(
        &mut tx,
        state.config.namespace.as_str(),
        id,
        &planned.rows.tasks,
        planned.end,
    )
    .await?;
    // Workers drop the tasks of a run whose flag is set: it goes before the tasks exist.
    state.notifier.resume_run(id).await.map_err(|error| {
        ApiError::unavailable(format!(
            "redis cannot clear the {what}'s stop flag: {error}"
        ))
    })?;
    tx.commit().await.map_err(StoreError::from)?;
    state.dispatcher.send(planned.rows.dispatches);
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
