//! `GET /v1/runs/{id}` and `GET /v1/tasks/{id}`: a run or job as it stands, long-polling until
//! it finishes when asked to.

use std::collections::HashSet;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use taskfleet_common::{RunKind, TaskId, TaskStatus};
use utoipa::IntoParams;
use uuid::Uuid;

use super::{noun, parse_id};
use crate::api::{ApiError, AppState, QueryParams, owner};
use crate::auth::{Principal, Scope};
use crate::notify::Notifier;
use crate::store;
use crate::views::{RunView, run_view};

/// The query of `GET /v1/runs/{id}` and `GET /v1/tasks/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ShowQuery {
    /// Seconds to wait for the run to finish before answering (capped by the scheduler's
    /// `TASKFLEET_MAX_WAIT_S`); the answer comes as soon as it finishes.
    #[param(minimum = 0)]
    wait: Option<f64>,
}

async fn show_kind(
    state: &AppState,
    principal: &Principal,
    id: &str,
    kind: RunKind,
    wait: Option<f64>,
) -> Result<Json<RunView>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let what = noun(kind);
    let id = parse_id(id, what)?;
    let wait = match wait {
        Some(seconds) if !(seconds.is_finite() && seconds >= 0.0) => {
            return Err(ApiError::bad_request(
                "wait must be a number of seconds, 0 or more",
            ));
        }
        Some(seconds) => Duration::from_secs_f64(seconds.min(state.config.max_wait.as_secs_f64())),
        None => Duration::ZERO,
    };
    // Watch before reading, so an end recorded in between wakes us.
    let mut watch = state.notifier.watch(id);
    let deadline = tokio::time::Instant::now() + wait;
    let mut woken = false;
    loop {
        let get_run = store::get_run(&state.db, owner(state, principal), id, kind);
        // Once woken (most often by the run's end) the steps are read alongside the run, on a
        // second connection, so the answer waits for one round trip rather than two.
        let (run, tasks) = if woken {
            let (run, tasks) = tokio::try_join!(get_run, store::get_tasks(&state.db, id))?;
            (run, Some(tasks))
        } else {
            (get_run.await?, None)
        };
        let run = run.ok_or_else(|| ApiError::not_found(format!("no {what} with id {id}")))?;
        let done = run.status.is_finished();
        let now = tokio::time::Instant::now();
        // A stopping scheduler answers long polls at once with what it has.
        if done || now >= deadline || state.shutdown.is_cancelled() {
            let tasks = match tasks {
                Some(tasks) => tasks,
                None => store::get_tasks(&state.db, id).await?,
            };
            let running = leased_tasks(state, &tasks).await;
            return Ok(Json(run_view(run, tasks, &running)));
        }
        woken = true;
        tokio::select! {
            // The scheduler that finished the run may have handed over its final view.
            view = Notifier::wait(&mut watch, deadline - now) => {
                if let Some(finished) = view
                    && finished.kind == kind
                {
                    return Ok(Json(finished.view.clone()));
                }
            }
            () = state.shutdown.cancelled() => {}
        }
    }
}

/// Returns the queued tasks that a worker holds a lease on (best effort: Redis being down
/// only makes running steps show as pending).
async fn leased_tasks(state: &AppState, tasks: &[store::TaskRow]) -> HashSet<Uuid> {
    let queued: Vec<Uuid> = tasks
        .iter()
        .filter(|task| task.status == TaskStatus::Queued)
        .map(|task| task.id)
        .collect();
    if queued.is_empty() {
        return HashSet::new();
    }
    let keys: Vec<String> = queued
        .iter()
        .map(|id| state.config.namespace.lease_key(TaskId(*id)))
        .collect();
    let mut redis = state.redis.clone();
    match redis::cmd("MGET")
        .arg(&keys)
        .query_async::<Vec<Option<String>>>(&mut redis)
        .await
    {
        Ok(values) => queued
            .into_iter()
            .zip(values)
            .filter_map(|(id, value)| value.map(|_| id))
            .collect(),
        Err(error) => {
            tracing::debug!(%error, "reading leases");
            HashSet::new()
        }
    }
}

/// A run, long-polling up to `?wait=S` seconds for it to finish.
#[utoipa::path(get, path = "/v1/runs/{id}", operation_id = "getRun", tag = "runs",
    params(("id" = Uuid, Path, description = "The run's id"), ShowQuery),
    responses((status = 200, description = "The run as it stands", body = RunView)))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<ShowQuery>,
) -> Result<Json<RunView>, ApiError> {
    show_kind(&state, &principal, &id, RunKind::Workflow, query.wait).await
}

/// A job, with the same shape and long poll as a run.
#[utoipa::path(get, path = "/v1/tasks/{id}", operation_id = "getJob", tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id"), ShowQuery),
    responses((status = 200, description = "The job as it stands", body = RunView)))]
pub async fn show_job(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<ShowQuery>,
) -> Result<Json<RunView>, ApiError> {
    show_kind(&state, &principal, &id, RunKind::Job, query.wait).await
}
