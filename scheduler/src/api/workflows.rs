//! `/v1/workflows`: registering, listing and showing workflow definitions.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use taskfleet_common::WorkflowDefinition;
use taskfleet_common::jq::ProgramCache;
use taskfleet_common::names::is_valid_name;

use super::runs::check_python_code;
use super::{ApiError, AppState, JsonBody, QueryParams, owner};
use crate::auth::{Principal, Scope};
use crate::planning::ProgramRunner;
use crate::store;

/// Checks a definition as the API accepts it.
pub fn check_definition(
    programs: &ProgramCache,
    definition: &WorkflowDefinition,
) -> Result<(), ApiError> {
    if let Err(error) = definition.validate(programs) {
        let details = serde_json::to_value(&error.problems).ok();
        return Err(ApiError::invalid(error.to_string(), details));
    }
    Ok(())
}

/// `PUT /v1/workflows/{name}`: registers a definition; 201 for a new version, 200 if unchanged.
pub async fn register(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    JsonBody(mut definition): JsonBody<WorkflowDefinition>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    principal.require(Scope::WorkflowsWrite)?;
    if !is_valid_name(&name) {
        return Err(ApiError::bad_request(format!(
            "workflow name {name:?} must be 1 to 64 characters among A-Z a-z 0-9 _ - ."
        )));
    }
    match &definition.name {
        Some(inner) if inner != &name => {
            return Err(ApiError::invalid(
                format!(
                    "the definition's name {inner:?} differs from the name in the path {name:?}"
                ),
                None,
            ));
        }
        _ => definition.name = Some(name.clone()),
    }
    check_python_code(&principal, &definition)?;
    check_definition(state.programs.cache(), &definition)?;
    let value = serde_json::to_value(&definition).map_err(|error| ApiError::internal(&error))?;
    let (version, created) =
        store::put_workflow(&state.db, owner(&state, &principal), &name, &value).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"name": name, "version": version}))))
}

/// `GET /v1/workflows`: the latest version of each workflow.
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let rows = store::list_workflows(&state.db, owner(&state, &principal)).await?;
    let workflows: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            json!({
                "name": row.name,
                "version": row.version,
                "steps": row.definition.0.get("steps").and_then(Value::as_array).map_or(0, Vec::len),
                "created_at": row.created_at,
            })
        })
        .collect();
    Ok(Json(json!({ "workflows": workflows })))
}

/// The query of `GET /v1/workflows/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    version: Option<i32>,
}

/// `GET /v1/workflows/{name}`: one version (the latest unless `?version=N`).
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    QueryParams(query): QueryParams<ShowQuery>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let row = if is_valid_name(&name) {
        store::get_workflow(&state.db, owner(&state, &principal), &name, query.version).await?
    } else {
        None
    };
    let row = row.ok_or_else(|| match query.version {
        Some(version) => ApiError::not_found(format!("workflow {name:?} has no version {version}")),
        None => ApiError::not_found(format!("no workflow named {name:?}")),
    })?;
    Ok(Json(json!({
        "name": row.name,
        "version": row.version,
        "definition": row.definition.0,
        "created_at": row.created_at,
    })))
}
