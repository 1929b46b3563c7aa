//! `GET /v1/runs` and `GET /v1/tasks`: workflow runs and jobs, newest first, with cursor
//! pagination.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use taskfleet_common::names::is_valid_name;
use taskfleet_common::{RunKind, RunStatus};
use uuid::Uuid;

use crate::api::{ApiError, AppState, QueryParams, owner};
use crate::auth::{Principal, Scope};
use crate::store::{self, RunFilter, RunSummaryRow};

/// The most runs or jobs one page lists unless asked.
const DEFAULT_LIMIT: i64 = 50;

/// The query of `GET /v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    workflow: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// The query of `GET /v1/tasks`: that of runs, without a workflow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobListQuery {
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/runs`: workflow runs, newest first, with cursor pagination.
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<Value>, ApiError> {
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
    let runs: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            json!({
                "id": row.id,
                "workflow": row.workflow,
                "version": row.workflow_version,
                "status": row.status,
                "created_at": row.created_at,
                "finished_at": row.finished_at,
            })
        })
        .collect();
    Ok(Json(json!({"runs": runs, "next_cursor": next_cursor})))
}

/// `GET /v1/tasks`: jobs, newest first, with cursor pagination.
pub async fn list_jobs(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<JobListQuery>,
) -> Result<Json<Value>, ApiError> {
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
    let jobs: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            json!({
                "id": row.id,
                "step": row.step,
                "executor": row.executor,
                "queue": row.queue.as_deref().unwrap_or(taskfleet_common::names::DEFAULT_QUEUE),
                "status": row.status,
                "created_at": row.created_at,
                "finished_at": row.finished_at,
            })
        })
        .collect();
    Ok(Json(json!({"jobs": jobs, "next_cursor": next_cursor})))
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
