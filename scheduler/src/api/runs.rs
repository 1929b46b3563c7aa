//! `/v1/runs` and `/v1/tasks`: starting runs and jobs, showing them (with long polling), listing.
//!
//! A job is a run of a one-step definition, kept apart from workflow runs by its kind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use taskfleet_common::definition::StepDefinition;
use taskfleet_common::names::is_valid_name;
use taskfleet_common::{RunStatus, TaskId, WorkflowDefinition};
use uuid::Uuid;

use super::views::run_view;
use super::workflows::check_definition;
use super::{ApiError, AppState, JsonBody, QueryParams};
use crate::accept::{Accepted, Submission};
use crate::engine::{Materialized, finished_run};
use crate::notify::Notifier;
use crate::planner;
use crate::programs::{ProgramRunner, SandboxedPrograms};
use crate::store::{self, NewRun, RunFilter};
use taskfleet_common::jq::{self, ProgramCache};
use taskfleet_common::value;

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
/// The longest `delay_s` accepted: a year.
const MAX_DELAY_S: f64 = 365.0 * 24.0 * 3600.0;
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
    /// Returns what the API calls one of this kind in messages.
    fn noun(self) -> &'static str {
        match self {
            Self::Workflow => "run",
            Self::Job => "task",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Workflow => "workflow",
            Self::Job => "job",
        }
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

/// Checks that a run input can be stored and sent.
fn check_input(input: &Value) -> Result<(), ApiError> {
    taskfleet_common::value::check(input)
        .map_err(|error| ApiError::bad_request(format!("input: {error}")))
}

/// Registered definitions already read while handling one request, by name and version.
type Resolved = HashMap<(String, Option<i32>), (WorkflowDefinition, i32)>;

/// Resolves a run request to its definition (reading a registered workflow once per request);
/// checking and planning follow in [`plan`].
async fn prepare(
    state: &AppState,
    request: RunRequest,
    resolved: &mut Resolved,
) -> Result<NewRunParts, ApiError> {
    check_idempotency_key(request.idempotency_key.as_ref())?;
    check_input(&request.input)?;
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
                    let found = resolve(state, &name, request.version).await?;
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
            (definition, None, None)
        }
    };
    Ok(NewRunParts {
        kind: RunKind::Workflow,
        // A registered definition was checked when it was registered.
        unchecked: workflow.is_none(),
        definition,
        workflow,
        version,
        input: request.input,
        idempotency_key: request.idempotency_key,
        delay_s: None,
    })
}

/// Returns a registered workflow's definition and version.
async fn resolve(
    state: &AppState,
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
    let row = store::get_workflow(&state.db, state.config.namespace.as_str(), name, version)
        .await?
        .ok_or_else(not_found)?;
    let definition =
        serde_json::from_value(row.definition.0).map_err(|error| ApiError::internal(&error))?;
    Ok((definition, row.version))
}

/// What a new run is made of, before planning.
struct NewRunParts {
    kind: RunKind,
    definition: WorkflowDefinition,
    /// Whether the definition came inline and is still to be checked.
    unchecked: bool,
    workflow: Option<String>,
    version: Option<i32>,
    input: Value,
    idempotency_key: Option<String>,
    /// Seconds before the first steps are dispatched (jobs' `delay_s`).
    delay_s: Option<f64>,
}

/// The most runs of a request planned on the async thread when they all plan quickly.
const QUICK_PLANS: usize = 32;

/// Checks the inline definitions of new runs and plans their first steps. Compiling and
/// running jq programs stays off the async threads: a few runs that compile nothing and run
/// no program, or only quick ones on inputs of at most [`jq::QUICK_INPUT_SIZE`] in all, are
/// planned in place, any other request in one trip to the blocking pool. Returns what to
/// write, or the first problem with the index of the run that has it.
async fn plan(
    state: &AppState,
    runs: Vec<NewRunParts>,
) -> Result<Vec<Submission>, (usize, ApiError)> {
    let quick = plans_in_place(state.programs.cache(), &runs);
    let programs = state.programs.clone();
    let plan_all = move || {
        runs.into_iter()
            .enumerate()
            .map(|(index, parts)| plan_blocking(&programs, parts).map_err(|error| (index, error)))
            .collect()
    };
    if quick {
        return plan_all();
    }
    tokio::task::spawn_blocking(plan_all)
        .await
        .map_err(|error| (0, ApiError::internal(&error)))?
}

/// Whether a request's runs are few and each [`plans_quickly`], on inputs of at most
/// [`jq::QUICK_INPUT_SIZE`] in all where planning runs programs.
fn plans_in_place(programs: &ProgramCache, runs: &[NewRunParts]) -> bool {
    let with_programs = runs
        .iter()
        .filter(|parts| parts.definition.plans_with_programs());
    runs.len() <= QUICK_PLANS
        && runs.iter().all(|parts| plans_quickly(programs, parts))
        && value::sizes_at_most(
            with_programs.map(|parts| &parts.input),
            jq::QUICK_INPUT_SIZE,
        )
}

/// Whether checking and planning a run is quick work on values: planning runs no program, or
/// only quick ones (on inputs that [`plan`] checks are small, all its runs' together), and
/// checking compiles none (every program is compiled already).
fn plans_quickly(programs: &ProgramCache, parts: &NewRunParts) -> bool {
    parts.definition.plans_with_quick_programs(programs)
        && (!parts.unchecked
            || parts.definition.steps.iter().all(|step| {
                step.dataflow
                    .as_deref()
                    .is_none_or(|code| programs.contains(code))
            }))
}

fn plan_blocking(programs: &SandboxedPrograms, parts: NewRunParts) -> Result<Submission, ApiError> {
    if parts.unchecked {
        check_definition(programs.cache(), &parts.definition)?;
    }
    let id = Uuid::now_v7();
    let advance = planner::advance(programs, &parts.definition, &parts.input, &BTreeMap::new())
        .map_err(|stopped| ApiError::unavailable(stopped.to_string()))?;
    let mut materialized = Materialized::default();
    materialized.add(&parts.definition, id, advance.planned);
    let (status, output, error) = match advance.end.map(|end| finished_run(id, end)) {
        Some(finished) => {
            // The run ended while being planned: nothing of it may run later.
            materialized.cancel_dispatches();
            (finished.status, finished.output, finished.error)
        }
        None => {
            if let Some(seconds) = parts.delay_s {
                materialized.delay(seconds);
            }
            ("running", None, None)
        }
    };
    Ok(Submission {
        run: NewRun {
            id,
            kind: parts.kind.as_str(),
            workflow: parts.workflow,
            workflow_version: parts.version,
            definition: serde_json::to_value(&parts.definition).unwrap_or(Value::Null),
            input: parts.input,
            status,
            output,
            error,
            idempotency_key: parts.idempotency_key,
        },
        tasks: materialized.tasks,
        dispatches: materialized.dispatches,
    })
}

/// Plans one new run and returns what to write.
async fn plan_one(state: &AppState, parts: NewRunParts) -> Result<Submission, ApiError> {
    let mut planned = plan(state, vec![parts]).await.map_err(|(_, error)| error)?;
    planned
        .pop()
        .ok_or_else(|| ApiError::internal(&"planning returned nothing"))
}

/// Writes one run and answers 201 for a new run, 200 for an existing idempotency key.
async fn submit_one(
    state: &AppState,
    submission: Submission,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match state.acceptor.submit(vec![submission]).await?.pop() {
        Some(Accepted::Created { id, status }) => Ok((
            StatusCode::CREATED,
            Json(json!({"id": id, "status": status})),
        )),
        Some(Accepted::Existing { id, status }) => {
            Ok((StatusCode::OK, Json(json!({"id": id, "status": status}))))
        }
        None => Err(ApiError::internal(&"the writer answered nothing")),
    }
}

/// `POST /v1/runs`: starts a run of a registered workflow or an inline definition.
pub async fn create(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<RunRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let parts = prepare(&state, request, &mut Resolved::new()).await?;
    let submission = plan_one(&state, parts).await?;
    submit_one(&state, submission).await
}

/// The body of `POST /v1/runs:batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    runs: Vec<RunRequest>,
}

/// `POST /v1/runs:batch`: starts many runs, all or none: every run is checked before any is
/// written, and they are written in one transaction.
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
    let mut runs = Vec::with_capacity(request.runs.len());
    let mut resolved = Resolved::new();
    for (index, run) in request.runs.into_iter().enumerate() {
        let parts = prepare(&state, run, &mut resolved)
            .await
            .map_err(|error| error.in_batch(index))?;
        runs.push(parts);
    }
    let submissions = plan(&state, runs)
        .await
        .map_err(|(index, error)| error.in_batch(index))?;
    let ids: Vec<Uuid> = state
        .acceptor
        .submit(submissions)
        .await?
        .into_iter()
        .map(|outcome| match outcome {
            Accepted::Created { id, .. } | Accepted::Existing { id, .. } => id,
        })
        .collect();
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
    let what = kind.noun();
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
    let namespace = state.config.namespace.as_str();
    let mut woken = false;
    loop {
        let get_run = store::get_run(&state.db, namespace, id, kind.as_str());
        // Once woken (most often by the run's end) the steps are read alongside the run, on a
        // second connection, so the answer waits for one round trip rather than two.
        let (run, tasks) = if woken {
            let (run, tasks) = tokio::try_join!(get_run, store::get_tasks(&state.db, id))?;
            (run, Some(tasks))
        } else {
            (get_run.await?, None)
        };
        let run = run.ok_or_else(|| ApiError::not_found(format!("no {what} with id {id}")))?;
        let done = RunStatus::parse(&run.status).is_some_and(RunStatus::is_finished);
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
                    && finished.kind == kind.as_str()
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
        .filter(|task| task.status == "queued")
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
        && RunStatus::parse(status).is_none()
    {
        return Err(ApiError::bad_request(format!(
            "status {status:?} is not one of pending, running, succeeded, failed, cancelled"
        )));
    }
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
    let delay_s = match extra.remove("delay_s") {
        None | Some(Value::Null) => None,
        Some(Value::Number(delay)) => match delay.as_f64() {
            Some(0.0) => None,
            Some(seconds) if seconds > 0.0 && seconds <= MAX_DELAY_S => Some(seconds),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "delay_s must be between 0 and {MAX_DELAY_S} seconds"
                )));
            }
        },
        Some(_) => return Err(ApiError::bad_request("delay_s must be a number of seconds")),
    };
    let definition = WorkflowDefinition {
        name: None,
        steps: vec![step],
        output: None,
    };
    let input = extra.remove("input").unwrap_or(Value::Null);
    check_input(&input)?;
    let parts = NewRunParts {
        kind: RunKind::Job,
        unchecked: true,
        definition,
        workflow: None,
        version: None,
        input,
        idempotency_key,
        delay_s,
    };
    let submission = plan_one(&state, parts).await?;
    submit_one(&state, submission).await
}

/// `POST /v1/runs/{id}/cancel`: cancels a run. No new task of it starts, tasks delivered later
/// are dropped, and workers stop its running tasks. A finished run answers 409.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    cancel_kind(&state, &id, RunKind::Workflow).await
}

/// `POST /v1/tasks/{id}/cancel`: cancels a job, as a run is cancelled.
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    cancel_kind(&state, &id, RunKind::Job).await
}

async fn cancel_kind(state: &AppState, id: &str, kind: RunKind) -> Result<Json<Value>, ApiError> {
    let what = kind.noun();
    let id = parse_id(id, what)?;
    let namespace = &state.config.namespace;
    match store::cancel_run(&state.db, namespace.as_str(), id, kind.as_str()).await? {
        store::Cancellation::NotFound => {
            Err(ApiError::not_found(format!("no {what} with id {id}")))
        }
        store::Cancellation::Finished(status) => Err(ApiError::conflict(format!(
            "{what} {id} has already finished ({status})"
        ))),
        store::Cancellation::Cancelled => {
            state.notifier.stop_runs(&[id]).await;
            state.notifier.announce(&[id]).await;
            Ok(Json(json!({"id": id, "status": "cancelled"})))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(definition: Value, unchecked: bool) -> NewRunParts {
        NewRunParts {
            kind: RunKind::Workflow,
            definition: serde_json::from_value(definition).expect("a definition"),
            unchecked,
            workflow: None,
            version: None,
            input: json!({}),
            idempotency_key: None,
            delay_s: None,
        }
    }

    #[test]
    fn only_runs_that_compile_nothing_and_run_only_quick_programs_plan_in_place() {
        let programs = ProgramCache::default();
        let plain = json!({"steps": [{"id": "a", "dataflow": ".x"}, {"id": "b", "python": "m:f"}]});
        assert!(
            !plans_quickly(&programs, &parts(plain.clone(), true)),
            "its program is not compiled yet"
        );
        assert!(
            plans_quickly(&programs, &parts(plain.clone(), false)),
            "checked already"
        );
        programs.get(".x").expect("compiles");
        assert!(plans_quickly(&programs, &parts(plain, true)));
        let with = |field: &str, program: &str| {
            let mut step = json!({"id": "a", "dataflow": ".x"});
            step[field] = json!(program);
            parts(json!({"steps": [step]}), false)
        };
        assert!(
            !plans_quickly(&programs, &with("input", ".y")),
            "not compiled yet"
        );
        programs.get(".y").expect("compiles");
        programs.get("map(.)").expect("compiles");
        for field in ["input", "when"] {
            assert!(plans_quickly(&programs, &with(field, ".y")), "{field}");
            assert!(!plans_quickly(&programs, &with(field, "map(.)")), "{field}");
        }
        assert!(
            !plans_quickly(&programs, &with("for_each", ".y")),
            "a for_each may plan thousands of tasks"
        );
        let on = |input: Value| NewRunParts {
            input,
            ..with("input", ".y")
        };
        let half = || json!({"y": "x".repeat(jq::QUICK_INPUT_SIZE / 2)});
        assert!(plans_in_place(&programs, &[on(half())]));
        assert!(
            !plans_in_place(&programs, &[on(half()), on(half())]),
            "large inputs together"
        );
        let large = json!({"y": "x".repeat(jq::QUICK_INPUT_SIZE)});
        assert!(!plans_in_place(&programs, &[on(large.clone())]));
        let no_program = NewRunParts {
            input: large,
            ..parts(json!({"steps": [{"id": "a", "dataflow": ".x"}]}), false)
        };
        assert!(
            plans_in_place(&programs, &[no_program]),
            "planning without programs reads values only"
        );
        let many: Vec<NewRunParts> = (0..=QUICK_PLANS).map(|_| on(json!({}))).collect();
        assert!(!plans_in_place(&programs, &many), "too many runs");
    }
}
