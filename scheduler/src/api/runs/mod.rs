//! `/v1/runs` and `/v1/tasks`: starting runs and jobs ([`submit`]), showing them with long
//! polling ([`show`]), listing them ([`list`]), cancelling them ([`cancel`]) and running them
//! again ([`retry`]).
//!
//! A job is a run of a one-step definition, kept apart from workflow runs by its kind. This
//! module holds what those share: the request, the run's kind and the checks of its fields.

mod cancel;
mod list;
mod retry;
mod show;
mod submit;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskfleet_common::names::is_valid_name;
use taskfleet_common::{RunKind, RunStatus, WorkflowDefinition};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiError, AppState, owner};
use crate::api::trace::RequestTrace;
use crate::auth::{Principal, Scope};
use crate::planning::NewRunParts;
use crate::store;

pub use cancel::{__path_cancel, __path_cancel_job, cancel, cancel_job};
pub use list::{__path_list, __path_list_jobs, list, list_jobs};
pub use retry::{__path_retry, __path_retry_job, retry, retry_job};
pub use show::{__path_show, __path_show_job, show, show_job};
pub use submit::{
    __path_create, __path_create_batch, __path_create_job, create, create_batch, create_job,
};

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// The body of `POST /v1/runs`: a registered workflow (`workflow`, optionally `version`) or an
/// inline `definition`, and the run's input.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"definition": {"steps": [{"id": "double", "dataflow": ". * 2"}]}, "input": 21}))]
pub struct RunRequest {
    /// The name of a registered workflow.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    workflow: Option<String>,
    /// The registered workflow's version (default: its latest).
    #[schema(minimum = 1)]
    version: Option<i32>,
    /// An inline workflow definition.
    definition: Option<WorkflowDefinition>,
    /// The run's input (default null).
    #[serde(default)]
    input: Value,
    /// A key that makes the submission idempotent: a repeat answers the first run.
    #[schema(min_length = 1, max_length = 256)]
    idempotency_key: Option<String>,
    /// Seconds to wait before the run's first steps are dispatched (at most a year); not with
    /// `not_before`.
    #[schema(minimum = 0, maximum = 31_536_000)]
    delay_s: Option<f64>,
    /// The time (RFC 3339) before which the run's first steps are not dispatched; a time past
    /// is now. Not with `delay_s`.
    #[schema(value_type = Option<String>, format = DateTime)]
    not_before: Option<String>,
}

/// The longest delay accepted (`delay_s`, or `not_before` from now): a year.
const MAX_DELAY_S: f64 = 365.0 * 24.0 * 3600.0;

/// Returns the seconds before a new run's or job's first steps are dispatched, from its
/// `delay_s` or its `not_before` (none: at once). Both at once answer 422 naming them; a
/// delay out of range or a time that does not read answers 400 naming the field.
fn start_delay(delay_s: Option<f64>, not_before: Option<&str>) -> Result<Option<f64>, ApiError> {
    let seconds = match (delay_s, not_before) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give \"delay_s\" or \"not_before\", not both",
                Some(serde_json::json!([{"field": "delay_s"}, {"field": "not_before"}])),
            ));
        }
        (None, None) => return Ok(None),
        (Some(seconds), None) => {
            if !(seconds.is_finite() && (0.0..=MAX_DELAY_S).contains(&seconds)) {
                return Err(ApiError::bad_request(format!(
                    "delay_s must be between 0 and {MAX_DELAY_S} seconds"
                )));
            }
            seconds
        }
        (None, Some(text)) => {
            let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|error| {
                ApiError::bad_request(format!(
                    "not_before {text:?} is not an RFC 3339 time (such as \"2026-12-24T18:00:00Z\"): {error}"
                ))
            })?;
            let seconds = (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds()
                as f64
                / 1000.0;
            if seconds > MAX_DELAY_S {
                return Err(ApiError::bad_request(format!(
                    "not_before {text:?} is more than a year ahead"
                )));
            }
            seconds.max(0.0)
        }
    };
    Ok((seconds > 0.0).then_some(seconds))
}

/// A run or job's id and where it stands, answered when it is submitted or cancelled.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunStatusView {
    /// The run's id.
    pub id: Uuid,
    /// Where it stands.
    pub status: RunStatus,
}

/// Returns what the API calls a run of this kind in messages.
fn noun(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Workflow => "run",
        RunKind::Job => "task",
    }
}

fn check_idempotency_key(key: Option<&String>) -> Result<(), ApiError> {
    match key {
        Some(key)
            if key.is_empty()
                || key.len() > MAX_IDEMPOTENCY_KEY_LEN
                || key.chars().any(char::is_control) =>
        {
            Err(ApiError::bad_request(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters, none of them a control character"
            )))
        }
        _ => Ok(()),
    }
}

/// Checks that a run input can be stored and sent, and is within the size limit.
pub(super) fn check_input(state: &AppState, input: &Value) -> Result<(), ApiError> {
    taskfleet_common::value::check(input)
        .map_err(|error| ApiError::bad_request(format!("input: {error}")))?;
    taskfleet_common::value::check_size(input, state.config.max_value_bytes)
        .map_err(|too_large| ApiError::value_too_large(format!("input is {too_large}")))
}

/// Registered definitions already read while handling one request, by name and version.
type Resolved = HashMap<(String, Option<i32>), (WorkflowDefinition, i32)>;

/// Resolves a run request to its definition (reading a registered workflow once per request);
/// checking and planning follow in [`submit`].
async fn prepare(
    state: &AppState,
    principal: &Principal,
    request: RunRequest,
    trace: RequestTrace,
    resolved: &mut Resolved,
) -> Result<NewRunParts, ApiError> {
    check_idempotency_key(request.idempotency_key.as_ref())?;
    let delay_s = start_delay(request.delay_s, request.not_before.as_deref())?;
    check_input(state, &request.input)?;
    let (definition, workflow, version) = match (request.workflow, request.definition) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either \"workflow\" or \"definition\", not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "give \"workflow\" (a registered name) or \"definition\" (an inline workflow)",
            ));
        }
        (Some(name), None) => {
            let key = (name.clone(), request.version);
            let (definition, version) = match resolved.get(&key) {
                Some(found) => found.clone(),
                None => {
                    let found = resolve(state, principal, &name, request.version).await?;
                    resolved.insert(key, found.clone());
                    found
                }
            };
            (definition, Some(name), Some(version))
        }
        (None, Some(definition)) => {
            if request.version.is_some() {
                return Err(ApiError::bad_request(
                    "\"version\" only applies to a registered \"workflow\"",
                ));
            }
            check_python_code(principal, &definition)?;
            // A run of an inline definition is listed under the definition's name, if any.
            let name = definition.name.clone();
            (definition, name, None)
        }
    };
    Ok(NewRunParts {
        kind: RunKind::Workflow,
        tenant: principal.tenant.clone(),
        // A registered definition (the only kind with a version) was checked when registered.
        unchecked: version.is_none(),
        definition,
        workflow,
        version,
        input: request.input,
        idempotency_key: request.idempotency_key,
        delay_s,
        trace_id: trace.trace_id,
        trace_span_id: trace.span_id,
    })
}

/// Returns a registered workflow's definition and version.
pub(super) async fn resolve(
    state: &AppState,
    principal: &Principal,
    name: &str,
    version: Option<i32>,
) -> Result<(WorkflowDefinition, i32), ApiError> {
    let not_found = || match version {
        Some(version) => ApiError::not_found(format!("workflow {name:?} has no version {version}")),
        None => ApiError::not_found(format!("no workflow named {name:?}")),
    };
    if !is_valid_name(name) {
        return Err(not_found());
    }
    let row = store::get_workflow(&state.db, owner(state, principal), name, version)
        .await?
        .ok_or_else(not_found)?;
    let definition =
        serde_json::from_value(row.definition.0).map_err(|error| ApiError::internal(&error))?;
    Ok((definition, row.version))
}

/// Returns the 403 naming the first step with `python_code` unless the caller may submit
/// Python source.
pub fn check_python_code(
    principal: &Principal,
    definition: &WorkflowDefinition,
) -> Result<(), ApiError> {
    if principal.has(Scope::PythonCode) {
        return Ok(());
    }
    match definition
        .steps
        .iter()
        .find(|step| step.python_code.is_some())
    {
        Some(step) => Err(ApiError::forbidden(format!(
            "step {:?} has python_code, which needs the scope python_code; this API key lacks it",
            step.id
        ))),
        None => Ok(()),
    }
}

fn parse_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    text.parse()
        .map_err(|_| ApiError::not_found(format!("no {what} with id {text:?}")))
}
