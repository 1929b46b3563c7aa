//! `POST /v1/runs/{id}/cancel` and `POST /v1/tasks/{id}/cancel`.

use axum::Json;
use axum::extract::{Path, State};
use taskfleet_common::{RunKind, RunStatus};

use super::{noun, parse_id};
use crate::api::ErrorBody;
use crate::api::{ApiError, AppState, owner};
use crate::auth::{Principal, Scope};
use crate::store;

use super::RunStatusView;

/// Cancels a run. No new task of it starts, tasks delivered later are dropped, and workers
/// stop its running tasks. A finished run answers 409.
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", operation_id = "cancelRun", tag = "runs",
    params(("id" = Uuid, Path, description = "The run's id")),
    responses(
        (status = 409, description = "The run has finished already", body = ErrorBody),(status = 200, description = "Cancelled", body = RunStatusView)))]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunStatusView>, ApiError> {
    cancel_kind(&state, &principal, &id, RunKind::Workflow).await
}

/// Cancels a job, as a run is cancelled.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", operation_id = "cancelJob", tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id")),
    responses(
        (status = 409, description = "The job has finished already", body = ErrorBody),(status = 200, description = "Cancelled", body = RunStatusView)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunStatusView>, ApiError> {
    cancel_kind(&state, &principal, &id, RunKind::Job).await
}

async fn cancel_kind(
    state: &AppState,
    principal: &Principal,
    id: &str,
    kind: RunKind,
) -> Result<Json<RunStatusView>, ApiError> {
    principal.require(Scope::RunsWrite)?;
    let what = noun(kind);
    let id = parse_id(id, what)?;
    match store::cancel_run(&state.db, owner(state, principal), id, kind).await? {
        store::Cancellation::NotFound => {
            Err(ApiError::not_found(format!("no {what} with id {id}")))
        }
        store::Cancellation::Finished(status) => Err(ApiError::conflict(format!(
            "{what} {id} has already finished ({status})"
        ))),
        store::Cancellation::Cancelled(ended) => {
            crate::ended::runs(&[ended]);
            state.notifier.stop_runs(&[id]).await;
            state.notifier.announce(&[id]).await;
            let action = match kind {
                RunKind::Workflow => "run.cancel",
                RunKind::Job => "job.cancel",
            };
            crate::api::keys::record(state, principal, action, Some(id.to_string()), None).await;
            Ok(Json(RunStatusView {
                id,
                status: RunStatus::Cancelled,
            }))
        }
    }
}
