//! `GET /v1/runs` and `GET /v1/tasks`: workflow runs and jobs, newest first, with cursor
//! pagination.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use taskfleet_common::names::is_valid_name;
use taskfleet_common::{RunKind, RunStatus};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::api::{ApiError, AppState, QueryParams, owner};
use crate::auth::{Principal, Scope};
use crate::store::{self, RunFilter, RunSummaryRow};

/// The most runs or jobs one page lists unless asked.
const DEFAULT_LIMIT: i64 = 50;

/// The query of `GET /v1/runs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only runs with this status.
    #[param(value_type = Option<RunStatus>)]
    status: Option<String>,
    /// Only runs of this workflow.
    #[param(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    workflow: Option<String>,
    /// The most runs on the page (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next_cursor` of the page before.
    #[param(value_type = Option<Uuid>)]
    cursor: Option<String>,
}

/// The query of `GET /v1/tasks`: that of runs, without a workflow.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobListQuery {
    /// Only jobs with this status.
    #[param(value_type = Option<RunStatus>)]
    status: Option<String>,
    /// The most jobs on the page (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next_cursor` of the page before.
    #[param(value_type = Option<Uuid>)]
    cursor: Option<String>,
}

/// A page of workflow runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    /// The runs.
    runs: Vec<RunSummary>,
    /// The cursor of the next page; null on the last page.
    #[schema(required = true)]
    next_cursor: Option<Uuid>,
}

/// A workflow run in a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunSummary {
    /// The run's id.
    id: Uuid,
    /// The workflow it runs, or its inline definition's name.
    #[schema(required = true)]
    workflow: Option<String>,
    /// The registered workflow's version.
    #[schema(required = true)]
    version: Option<i32>,
    /// Where it stands.
    status: RunStatus,
    /// When it was accepted.
    created_at: DateTime<Utc>,
    /// When it finished.
    #[schema(required = true)]
    finished_at: Option<DateTime<Utc>>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    /// The jobs.
    jobs: Vec<JobSummary>,
    /// The cursor of the next page; null on the last page.
    #[schema(required = true)]
    next_cursor: Option<Uuid>,
}

/// A job in a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobSummary {
    /// The job's id.
    id: Uuid,
    /// Its step's id.
    #[schema(required = true)]
    step: Option<String>,
    /// What runs it: `python`, `python_code` or `dataflow`.
    #[schema(required = true)]
    executor: Option<String>,
    /// The queue it is dispatched to.
    queue: String,
    /// Where it stands.
    status: RunStatus,
    /// When it was accepted.
    created_at: DateTime<Utc>,
    /// When it finished.
    #[schema(required = true)]
    finished_at: Option<DateTime<Utc>>,
}

/// Workflow runs, newest first, with cursor pagination.
#[utoipa::path(get, path = "/v1/runs", operation_id = "listRuns", tag = "runs", params(ListQuery),
    responses((status = 200, description = "A page of runs", body = RunPage)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<RunPage>, ApiError> {
    principal.require(Scope::RunsRead)?;
    if let Some(workflow) = &query.workflow
        && !is_valid_name(workflow)
    {
        return Err(ApiError::bad_request(format!(
            "workflow {workflow:?} is not a valid workflow name"
        )));
    }
    let filter = filter(
        RunKind::Workflow,
        query.status.as_deref(),
        query.workflow,
        query.limit,
        query.cursor.as_deref(),
    )?;
    let rows = store::list_runs(&state.db, owner(&state, &principal), &filter).await?;
    let next_cursor = next_cursor(&rows, filter.limit);
    let runs = rows
        .into_iter()
        .map(|row| RunSummary {
            id: row.id,
            workflow: row.workflow,
            version: row.workflow_version,
            status: row.status,
            created_at: row.created_at,
            finished_at: row.finished_at,
        })
        .collect();
    Ok(Json(RunPage { runs, next_cursor }))
}

/// Jobs, newest first, with cursor pagination.
#[utoipa::path(get, path = "/v1/tasks", operation_id = "listJobs", tag = "jobs", params(JobListQuery),
    responses((status = 200, description = "A page of jobs", body = JobPage)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<JobListQuery>,
) -> Result<Json<JobPage>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let filter = filter(
        RunKind::Job,
        query.status.as_deref(),
        None,
        query.limit,
        query.cursor.as_deref(),
    )?;
    let rows = store::list_runs(&state.db, owner(&state, &principal), &filter).await?;
    let next_cursor = next_cursor(&rows, filter.limit);
    let jobs = rows
        .into_iter()
        .map(|row| JobSummary {
            id: row.id,
            step: row.step,
            executor: row.executor,
            queue: row
                .queue
                .unwrap_or_else(|| taskfleet_common::names::DEFAULT_QUEUE.to_owned()),
            status: row.status,
            created_at: row.created_at,
            finished_at: row.finished_at,
        })
        .collect();
    Ok(Json(JobPage { jobs, next_cursor }))
}

/// Returns the listing's filter from the query's fields, or the 400 naming the bad one.
fn filter(
    kind: RunKind,
    status: Option<&str>,
    workflow: Option<String>,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<RunFilter, ApiError> {
    let status = match status {
        None => None,
        Some(status) => Some(RunStatus::parse(status).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status {status:?} is not one of pending, running, succeeded, failed, cancelled"
            ))
        })?),
    };
    let (limit, before) = crate::api::page(limit, cursor, DEFAULT_LIMIT)?;
    Ok(RunFilter {
        kind,
        status,
        workflow,
        before,
        limit,
    })
}

/// Returns the cursor of the next page: the last id of a full page.
fn next_cursor(rows: &[RunSummaryRow], limit: i64) -> Option<Uuid> {
    crate::api::next_cursor(rows.len(), limit, rows.last().map(|row| row.id))
}
