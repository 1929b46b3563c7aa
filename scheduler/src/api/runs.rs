//! `/v1/runs` and `/v1/tasks`: starting runs and jobs, showing them (with long polling), listing.
//!
//! A job is a run of a one-step definition, kept apart from workflow runs by its kind.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use taskfleet_common::definition::StepDefinition;
use taskfleet_common::{Namespace, TaskId, WorkflowDefinition};
use uuid::Uuid;

use super::views::run_view;
use super::workflows::check_definition;
use super::{ApiError, AppState, JsonBody, QueryParams};
use crate::accept::{Accepted, Submission};
use crate::engine::{Materialized, finished_run};
use crate::notify::Notifier;
use crate::planner;
use crate::store::{self, NewRun, RunFilter};

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
/// The most runs in one batch request.
const MAX_BATCH_RUNS: usize = 1000;

/// The body of `POST /v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    workflow: Option<String>,
    version: Option<i32>,
    definition: Option<WorkflowDefinition>,
    #[serde(default)]
    input: Value,
    idempotency_key: Option<String>,
}

/// What kind of run a submission makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    Workflow,
    Job,
}

impl RunKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Workflow => "workflow",
            Self::Job => "job",
        }
    }
}

fn check_idempotency_key(key: Option<&String>) -> Result<(), ApiError> {
    match key {
        Some(key) if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN => {
            Err(ApiError::bad_request(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
            )))
        }
        _ => Ok(()),
    }
}

/// Resolves, validates and plans a run request into a submission.
async fn prepare(state: &AppState, request: RunRequest) -> Result<Submission, ApiError> {
    check_idempotency_key(request.idempotency_key.as_ref())?;
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
            let row = store::get_workflow(&state.db, &name, request.version)
                .await?
                .ok_or_else(|| match request.version {
                    Some(version) => {
                        ApiError::not_found(format!("workflow {name:?} has no version {version}"))
                    }
                    None => ApiError::not_found(format!("no workflow named {name:?}")),
                })?;
            let definition: WorkflowDefinition = serde_json::from_value(row.definition.0)
                .map_err(|error| ApiError::internal(&error))?;
            (definition, Some(name), Some(row.version))
        }
        (None, Some(definition)) => {
            if request.version.is_some() {
                return Err(ApiError::bad_request(
                    "\"version\" only applies to a registered \"workflow\"",
                ));
            }
            check_definition(&definition)?;
            (definition, None, None)
        }
    };
    Ok(plan(
        state,
        RunKind::Workflow,
        definition,
        workflow,
        version,
        request.input,
        request.idempotency_key,
    ))
}

/// Plans a new run's first steps and returns what to write.
fn plan(
    state: &AppState,
    kind: RunKind,
    definition: WorkflowDefinition,
    workflow: Option<String>,
    version: Option<i32>,
    input: Value,
    idempotency_key: Option<String>,
) -> Submission {
    let id = Uuid::now_v7();
    let advance = planner::advance(&state.programs, &definition, &input, &BTreeMap::new());
    let mut materialized = Materialized::default();
    materialized.add(&definition, id, advance.planned);
    let (status, output, error) = match advance.end.map(|end| finished_run(id, end)) {
        Some(finished) => (finished.status, finished.output, finished.error),
        None => ("running", None, None),
    };
    let definition_value = serde_json::to_value(&definition).unwrap_or(Value::Null);
    let dispatches = if status == "running" {
        materialized.dispatches
    } else {
        Vec::new()
    };
    Submission {
        run: NewRun {
            id,
            kind: kind.as_str(),
            workflow,
            workflow_version: version,
            definition: definition_value,
            input,
            status,
            output,
            error,
            idempotency_key,
        },
        tasks: materialized.tasks,
        dispatches,
    }
}

fn accepted_response(accepted: Accepted) -> (StatusCode, Json<Value>) {
    match accepted {
        Accepted::Created { id, status } => (
            StatusCode::CREATED,
            Json(json!({"id": id, "status": status})),
        ),
        Accepted::Existing { id, status } => {
            (StatusCode::OK, Json(json!({"id": id, "status": status})))
        }
    }
}

/// `POST /v1/runs`: starts a run of a registered workflow or an inline definition.
pub async fn create(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<RunRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let submission = prepare(&state, request).await?;
    Ok(accepted_response(state.acceptor.submit(submission).await?))
}

/// The body of `POST /v1/runs:batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    runs: Vec<RunRequest>,
}

/// `POST /v1/runs:batch`: starts many runs; all are checked before any is written.
pub async fn create_batch(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<BatchRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if request.runs.len() > MAX_BATCH_RUNS {
        return Err(ApiError::bad_request(format!(
            "a batch holds at most {MAX_BATCH_RUNS} runs, this one has {}",
            request.runs.len()
        )));
    }
    let mut submissions = Vec::with_capacity(request.runs.len());
    for (index, run) in request.runs.into_iter().enumerate() {
        let submission = prepare(&state, run)
            .await
            .map_err(|error| error.in_batch(index))?;
        submissions.push(submission);
    }
    let results = futures_util::future::join_all(
        submissions
            .into_iter()
            .map(|submission| state.acceptor.submit(submission)),
    )
    .await;
    let mut ids = Vec::with_capacity(results.len());
    for result in results {
        match result? {
            Accepted::Created { id, .. } | Accepted::Existing { id, .. } => ids.push(id),
        }
    }
    Ok((StatusCode::CREATED, Json(json!({ "ids": ids }))))
}

/// The query of `GET /v1/runs/{id}` and `GET /v1/tasks/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    wait: Option<f64>,
}

fn parse_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    text.parse()
        .map_err(|_| ApiError::not_found(format!("no {what} with id {text:?}")))
}

async fn show_kind(
    state: &AppState,
    id: &str,
    kind: RunKind,
    wait: Option<f64>,
) -> Result<Json<Value>, ApiError> {
    let what = match kind {
        RunKind::Workflow => "run",
        RunKind::Job => "task",
    };
    let id = parse_id(id, what)?;
    let wait = match wait {
        Some(seconds) if !(seconds.is_finite() && seconds >= 0.0) => {
            return Err(ApiError::bad_request(
                "wait must be a number of seconds, 0 or more",
            ));
        }
        Some(seconds) => Duration::from_secs_f64(seconds).min(state.config.max_wait),
        None => Duration::ZERO,
    };
    // Subscribe before reading, so an end recorded in between wakes us.
    let mut finished = state.notifier.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let run = store::get_run(&state.db, id, kind.as_str())
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no {what} with id {id}")))?;
        let done = matches!(run.status.as_str(), "succeeded" | "failed" | "cancelled");
        let now = tokio::time::Instant::now();
        if done || now >= deadline {
            let tasks = store::get_tasks(&state.db, id).await?;
            let running = leased_tasks(state, &tasks).await;
            return Ok(Json(run_view(run, tasks, &running)));
        }
        Notifier::wait(&mut finished, id, deadline - now).await;
    }
}

/// Returns the queued tasks that a worker holds a lease on (best effort: Redis being down
/// only makes running steps show as pending).
async fn leased_tasks(state: &AppState, tasks: &[store::TaskRow]) -> HashSet<Uuid> {
    let queued: Vec<Uuid> = tasks
        .iter()
        .filter(|task| task.status == "queued")
        .map(|task| task.id)
        .collect();
    if queued.is_empty() {
        return HashSet::new();
    }
    let namespace: &Namespace = &state.config.namespace;
    let keys: Vec<String> = queued
        .iter()
        .map(|id| namespace.lease_key(TaskId(*id)))
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

/// `GET /v1/runs/{id}`: a run, long-polling up to `?wait=S` seconds for it to finish.
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<ShowQuery>,
) -> Result<Json<Value>, ApiError> {
    show_kind(&state, &id, RunKind::Workflow, query.wait).await
}

/// `GET /v1/tasks/{id}`: a job, with the same shape and long poll as a run.
pub async fn show_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<ShowQuery>,
) -> Result<Json<Value>, ApiError> {
    show_kind(&state, &id, RunKind::Job, query.wait).await
}

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
    if let Some(status) = &query.status
        && taskfleet_common::RunStatus::parse(status).is_none()
    {
        return Err(ApiError::bad_request(format!(
            "status {status:?} is not one of pending, running, succeeded, failed, cancelled"
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
        &RunFilter {
            status: query.status,
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

/// The fields of `POST /v1/tasks` besides the step's own.
const JOB_FIELDS: [&str; 3] = ["input", "delay_s", "idempotency_key"];

/// `POST /v1/tasks`: enqueues one step as a job.
pub async fn create_job(
    State(state): State<AppState>,
    JsonBody(mut body): JsonBody<Map<String, Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut extra: BTreeMap<&str, Value> = BTreeMap::new();
    for field in JOB_FIELDS {
        if let Some(value) = body.remove(field) {
            extra.insert(field, value);
        }
    }
    body.entry("id")
        .or_insert_with(|| Value::String("job".to_owned()));
    let step: StepDefinition = serde_json::from_value(Value::Object(body))
        .map_err(|error| ApiError::bad_request(format!("request body is not valid: {error}")))?;
    let idempotency_key = match extra.remove("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(key),
        Some(_) => return Err(ApiError::bad_request("idempotency_key must be a string")),
    };
    check_idempotency_key(idempotency_key.as_ref())?;
    match extra.remove("delay_s") {
        None | Some(Value::Null) => {}
        Some(Value::Number(delay)) if delay.as_f64() == Some(0.0) => {}
        Some(Value::Number(_)) => {
            return Err(ApiError::invalid(
                "`delay_s` is not supported by this scheduler version",
                None,
            ));
        }
        Some(_) => return Err(ApiError::bad_request("delay_s must be a number of seconds")),
    }
    let definition = WorkflowDefinition {
        name: None,
        steps: vec![step],
        output: None,
    };
    check_definition(&definition)?;
    let input = extra.remove("input").unwrap_or(Value::Null);
    let submission = plan(
        &state,
        RunKind::Job,
        definition,
        None,
        None,
        input,
        idempotency_key,
    );
    Ok(accepted_response(state.acceptor.submit(submission).await?))
}
