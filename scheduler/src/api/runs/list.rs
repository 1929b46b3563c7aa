//! `GET /v1/runs`: workflow runs, newest first, with cursor pagination.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use taskfleet_common::RunStatus;
use taskfleet_common::names::is_valid_name;
use uuid::Uuid;

use crate::api::{ApiError, AppState, QueryParams};
use crate::store::{self, RunFilter};

/// The query of `GET /v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    workflow: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/runs`: workflow runs, newest first, with cursor pagination.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match &query.status {
        None => None,
        Some(status) => Some(RunStatus::parse(status).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status {status:?} is not one of pending, running, succeeded, failed, cancelled"
            ))
        })?),
    };
    if let Some(workflow) = &query.workflow
        && !is_valid_name(workflow)
    {
        return Err(ApiError::bad_request(format!(
            "workflow {workflow:?} is not a valid workflow name"
        )));
    }
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let before = match &query.cursor {
        Some(cursor) => Some(
            cursor
                .parse::<Uuid>()
                .map_err(|_| ApiError::bad_request(format!("cursor {cursor:?} is not valid")))?,
        ),
        None => None,
    };
    let rows = store::list_runs(
        &state.db,
        state.config.namespace.as_str(),
        &RunFilter {
            status,
            workflow: query.workflow,
            before,
            limit,
        },
    )
    .await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|row| row.id))
        .flatten();
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
