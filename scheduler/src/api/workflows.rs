//! `/v1/workflows`: registering, listing and showing workflow definitions.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskfleet_common::WorkflowDefinition;
use taskfleet_common::jq::ProgramCache;
use taskfleet_common::names::is_valid_name;

use super::ErrorBody;
use super::runs::check_python_code;
use super::{ApiError, AppState, JsonBody, QueryParams, owner};
use crate::auth::{Principal, Scope};
use crate::planning::ProgramRunner;
use crate::store;
use utoipa::{IntoParams, ToSchema};

/// A registered workflow's name and version.
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    /// The workflow's name.
    name: String,
    /// The version the definition has.
    version: i32,
}

/// The registered workflows, each at its latest version.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowList {
    /// The workflows, by name.
    workflows: Vec<WorkflowSummary>,
}

/// A registered workflow in a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowSummary {
    /// Its name.
    name: String,
    /// Its latest version.
    version: i32,
    /// How many steps that version has.
    steps: usize,
    /// When that version was registered.
    created_at: DateTime<Utc>,
}

/// A registered workflow's definition at one version.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowView {
    /// Its name.
    name: String,
    /// The version shown.
    version: i32,
    /// The definition, as registered.
    #[schema(value_type = WorkflowDefinition)]
    definition: Value,
    /// When that version was registered.
    created_at: DateTime<Utc>,
}

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

/// Registers a definition under a name: a new version when it differs from the latest.
#[utoipa::path(put, path = "/v1/workflows/{name}", operation_id = "registerWorkflow", tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name",
        pattern = "^[A-Za-z0-9_.-]{1,64}$")),
    request_body = WorkflowDefinition,
    responses(
        (status = 422, description = "The definition cannot run, or its name differs from the path's", body = ErrorBody),
        (status = 201, description = "Registered as a new version", body = Registered),
        (status = 200, description = "The same as the latest version, which is answered",
            body = Registered),
    ))]
pub async fn register(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    JsonBody(mut definition): JsonBody<WorkflowDefinition>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
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
    Ok((status, Json(Registered { name, version })))
}

/// The latest version of each registered workflow.
#[utoipa::path(get, path = "/v1/workflows", operation_id = "listWorkflows", tag = "workflows",
    responses((status = 200, description = "The workflows", body = WorkflowList)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<WorkflowList>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let rows = store::list_workflows(&state.db, owner(&state, &principal)).await?;
    let workflows = rows
        .into_iter()
        .map(|row| WorkflowSummary {
            steps: row
                .definition
                .0
                .get("steps")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
            name: row.name,
            version: row.version,
            created_at: row.created_at,
        })
        .collect();
    Ok(Json(WorkflowList { workflows }))
}

/// The query of `GET /v1/workflows/{name}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ShowQuery {
    /// The version to show (default: the latest).
    #[param(minimum = 1)]
    version: Option<i32>,
}

/// One version of a registered workflow (the latest unless `?version=N`).
#[utoipa::path(get, path = "/v1/workflows/{name}", operation_id = "getWorkflow", tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name"), ShowQuery),
    responses((status = 200, description = "The workflow", body = WorkflowView)))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    QueryParams(query): QueryParams<ShowQuery>,
) -> Result<Json<WorkflowView>, ApiError> {
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
    Ok(Json(WorkflowView {
        name: row.name,
        version: row.version,
        definition: row.definition.0,
        created_at: row.created_at,
    }))
}
