//! `POST /v1/runs`, `POST /v1/runs:batch` and `POST /v1/tasks`: checks new runs and jobs, plans
//! their first steps (through [`crate::planning`]) and hands them to the accept writer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskfleet_common::definition::{Concurrency, RateLimit, RetryPolicy, StepDefinition};
use taskfleet_common::jq::ProgramCache;
use taskfleet_common::{RunKind, WorkflowDefinition};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    Resolved, RunRequest, RunStatusView, check_idempotency_key, check_input, check_python_code,
    prepare, start_delay,
};
use crate::accept::{Accepted, Submission};
use crate::api::ErrorBody;
use crate::api::trace::{RequestTrace, TraceHeader};
use crate::api::workflows::check_definition;
use crate::api::{ApiError, AppState, JsonBody};
use crate::auth::{Principal, Scope};
use crate::planning::{
    self, Halted, NewRunParts, PlanningError, PlanningLoad, ProgramRunner, SandboxedPrograms,
};

/// The most runs in one batch request.
const MAX_BATCH_RUNS: usize = 1000;

/// The most runs of a request planned on the async thread when they all plan quickly.
const QUICK_PLANS: usize = 32;

/// Checks the inline definitions of new runs and plans their first steps. Compiling and
/// running jq programs stays off the async threads: a few runs that compile nothing and run
/// no program, or only quick ones on inputs of at most [`taskfleet_common::jq::QUICK_INPUT_SIZE`] in all, are
/// planned in place, any other request in one trip to the blocking pool. Returns what to
/// write, or the first problem with the index of the run that has it (none when the whole
/// request failed).
async fn plan(
    state: &AppState,
    runs: Vec<NewRunParts>,
) -> Result<Vec<Submission>, (Option<usize>, ApiError)> {
    let in_place = plans_in_place(state.programs.cache(), &runs);
    let programs = if in_place {
        state.programs.in_place()
    } else {
        state.programs.clone()
    };
    let planned = planning::run_planning(in_place, move || {
        let threads = if in_place { 1 } else { programs.parallelism() };
        let planned =
            planning::plan_each(threads, runs, |parts| plan_submission(&programs, parts))?;
        let mut submissions = Vec::with_capacity(planned.len());
        for (index, submission) in planned.into_iter().enumerate() {
            match submission {
                Ok(submission) => submissions.push(submission),
                Err(error) => return Ok(Err((Some(index), error))),
            }
        }
        Ok(Ok(submissions))
    })
    .await;
    match planned {
        Ok(submissions) => submissions,
        Err(PlanningError::Halted(halted)) => {
            Err((None, ApiError::unavailable(halted.to_string())))
        }
        Err(error @ PlanningError::Panicked(_)) => Err((None, ApiError::internal(&error))),
    }
}

/// Whether a request's runs are few and each [`plans_quickly`], on inputs of at most
/// [`taskfleet_common::jq::QUICK_INPUT_SIZE`] in all where planning runs programs.
fn plans_in_place(programs: &ProgramCache, runs: &[NewRunParts]) -> bool {
    runs.len() <= QUICK_PLANS
        && runs.iter().all(|parts| plans_quickly(programs, parts))
        && planning::plans_in_place(
            programs,
            runs.iter().map(|parts| PlanningLoad {
                definition: &parts.definition,
                values: vec![&parts.input],
            }),
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

/// Checks a new run's definition if it came inline, plans its first steps and returns what to
/// write; the outer error stops the whole request (the scheduler is shutting down).
fn plan_submission(
    programs: &SandboxedPrograms,
    parts: NewRunParts,
) -> Result<Result<Submission, ApiError>, Halted> {
    if parts.unchecked
        && let Err(error) = check_definition(programs.cache(), &parts.definition)
    {
        return Ok(Err(error));
    }
    Ok(Ok(planning::plan_new_run(programs, parts)?))
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
) -> Result<(StatusCode, Json<RunStatusView>), ApiError> {
    match state.acceptor.submit(vec![submission]).await?.pop() {
        Some(Accepted::Created { id, status }) => {
            Ok((StatusCode::CREATED, Json(RunStatusView { id, status })))
        }
        Some(Accepted::Existing { id, status }) => {
            Ok((StatusCode::OK, Json(RunStatusView { id, status })))
        }
        None => Err(ApiError::internal(&"the writer answered nothing")),
    }
}

/// Starts a run of a registered workflow or an inline definition.
#[utoipa::path(post, path = "/v1/runs", operation_id = "createRun", params(TraceHeader), tag = "runs", request_body = RunRequest,
    responses(
        (status = 404, description = "No such registered workflow (or version)", body = ErrorBody),
        (status = 422, description = "The definition cannot run; `details` lists why", body = ErrorBody),
        (status = 429, description = "The tenant's quota is used up for now; see `Retry-After`", body = ErrorBody),
        (status = 201, description = "The run was accepted", body = RunStatusView),
        (status = 200, description = "A run with this idempotency key exists already; it is \
            answered instead", body = RunStatusView),
    ))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    Extension(trace): Extension<RequestTrace>,
    JsonBody(request): JsonBody<RunRequest>,
) -> Result<(StatusCode, Json<RunStatusView>), ApiError> {
    principal.require(Scope::RunsWrite)?;
    state
        .quotas
        .admit_one(
            &state,
            &principal,
            RunKind::Workflow,
            request.idempotency_key.as_deref(),
        )
        .await?;
    let parts = prepare(&state, &principal, request, trace, &mut Resolved::new()).await?;
    let submission = plan_one(&state, parts).await?;
    submit_one(&state, submission).await
}

/// The body of `POST /v1/runs:batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"runs": [{"definition": {"steps": [{"id": "double", "dataflow": ". * 2"}]}, "input": 1}, {"definition": {"steps": [{"id": "double", "dataflow": ". * 2"}]}, "input": 2}]}))]
pub struct BatchRequest {
    /// The runs, each as the body of `POST /v1/runs`.
    #[schema(max_items = 1000)]
    runs: Vec<RunRequest>,
}

/// The answer to `POST /v1/runs:batch`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAccepted {
    /// The runs' ids, in the order of the request (a repeated idempotency key answers the
    /// first run's id).
    ids: Vec<Uuid>,
}

/// Starts many runs, all or none: every run is checked before any is written, and they are
/// written in one transaction.
#[utoipa::path(post, path = "/v1/runs:batch", operation_id = "createRuns", params(TraceHeader), tag = "runs", request_body = BatchRequest,
    responses(
        (status = 404, description = "No such registered workflow (or version)", body = ErrorBody),
        (status = 422, description = "A definition cannot run; `details` lists why", body = ErrorBody),
        (status = 429, description = "The tenant's quota is used up for now; see `Retry-After`", body = ErrorBody),(status = 201, description = "The runs were accepted", body = BatchAccepted)))]
pub async fn create_batch(
    State(state): State<AppState>,
    principal: Principal,
    Extension(trace): Extension<RequestTrace>,
    JsonBody(request): JsonBody<BatchRequest>,
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
    principal.require(Scope::RunsWrite)?;
    if request.runs.len() > MAX_BATCH_RUNS {
        return Err(ApiError::bad_request(format!(
            "a batch holds at most {MAX_BATCH_RUNS} runs, this one has {}",
            request.runs.len()
        )));
    }
    state
        .quotas
        .admit(&state, &principal, request.runs.len())
        .await?;
    let mut runs = Vec::with_capacity(request.runs.len());
    let mut resolved = Resolved::new();
    for (index, run) in request.runs.into_iter().enumerate() {
        let parts = prepare(&state, &principal, run, trace, &mut resolved)
            .await
            .map_err(|error| error.in_batch(index))?;
        runs.push(parts);
    }
    let submissions = plan(&state, runs)
        .await
        .map_err(|(index, error)| match index {
            Some(index) => error.in_batch(index),
            None => error,
        })?;
    let ids: Vec<Uuid> = state
        .acceptor
        .submit(submissions)
        .await?
        .into_iter()
        .map(|outcome| match outcome {
            Accepted::Created { id, .. } | Accepted::Existing { id, .. } => id,
        })
        .collect();
    Ok((StatusCode::CREATED, Json(BatchAccepted { ids })))
}

/// The body of `POST /v1/tasks`: one step (the fields of a workflow's step, of which exactly
/// one of `python`, `python_code` and `dataflow`) and the job's input, delay and idempotency
/// key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"dataflow": ". + 1", "input": 41, "idempotency_key": "order-17"}))]
pub struct JobRequest {
    /// The step's id, shown in the job's view (default `job`).
    #[serde(default = "default_job_step")]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", default = "job")]
    id: String,
    /// A Python function, `"module.path:function"`.
    python: Option<String>,
    /// Python source text that defines `main(input)`.
    python_code: Option<String>,
    /// A jq program.
    dataflow: Option<String>,
    /// Accepted empty, as in a step copied from a definition: a job waits for no step.
    #[serde(default)]
    #[schema(max_items = 0)]
    after: Vec<String>,
    /// A jq program over the input yielding the array to fan out over.
    for_each: Option<String>,
    /// A jq program over the input; false skips the job.
    when: Option<String>,
    /// How failed attempts are retried.
    retry: Option<RetryPolicy>,
    /// The longest one attempt may run, in seconds.
    timeout_s: Option<f64>,
    /// The task queue (default `default`).
    queue: Option<String>,
    /// 0 to 9, higher first (default 0).
    #[schema(maximum = 9)]
    priority: Option<u8>,
    /// At most this many starts per second across the fleet (per key value).
    rate_limit: Option<RateLimit>,
    /// At most this many attempts at once across the fleet (per key value).
    concurrency: Option<Concurrency>,
    /// The job's input (default null).
    #[serde(default)]
    input: Value,
    /// Seconds to wait before the job is dispatched (at most a year); not with `not_before`.
    #[schema(minimum = 0, maximum = 31_536_000)]
    delay_s: Option<f64>,
    /// The time (RFC 3339) before which the job is not dispatched; a time past is now. Not
    /// with `delay_s`.
    #[schema(value_type = Option<String>, format = DateTime)]
    not_before: Option<String>,
    /// A key that makes the submission idempotent: a repeat answers the first job.
    #[schema(min_length = 1, max_length = 256)]
    idempotency_key: Option<String>,
}

fn default_job_step() -> String {
    "job".to_owned()
}

/// Enqueues one step as a job.
#[utoipa::path(post, path = "/v1/tasks", operation_id = "createJob", params(TraceHeader), tag = "jobs", request_body = JobRequest,
    responses(
        (status = 422, description = "The step cannot run; `details` lists why", body = ErrorBody),
        (status = 429, description = "The tenant's quota is used up for now; see `Retry-After`", body = ErrorBody),
        (status = 201, description = "The job was accepted", body = RunStatusView),
        (status = 200, description = "A job with this idempotency key exists already; it is \
            answered instead", body = RunStatusView),
    ))]
pub async fn create_job(
    State(state): State<AppState>,
    principal: Principal,
    Extension(trace): Extension<RequestTrace>,
    JsonBody(request): JsonBody<JobRequest>,
) -> Result<(StatusCode, Json<RunStatusView>), ApiError> {
    principal.require(Scope::RunsWrite)?;
    if !request.after.is_empty() {
        return Err(ApiError::bad_request(
            "after: a job waits for no step; leave it out or empty",
        ));
    }
    let idempotency_key = request.idempotency_key;
    check_idempotency_key(idempotency_key.as_ref())?;
    let delay_s = start_delay(request.delay_s, request.not_before.as_deref())?;
    let step = StepDefinition {
        id: request.id,
        python: request.python,
        python_code: request.python_code,
        dataflow: request.dataflow,
        after: Vec::new(),
        input: None,
        for_each: request.for_each,
        when: request.when,
        retry: request.retry,
        timeout_s: request.timeout_s,
        queue: request.queue,
        priority: request.priority,
        rate_limit: request.rate_limit,
        concurrency: request.concurrency,
    };
    let definition = WorkflowDefinition {
        name: None,
        steps: vec![step],
        output: None,
        timeout_s: None,
    };
    check_python_code(&principal, &definition)?;
    state
        .quotas
        .admit_one(&state, &principal, RunKind::Job, idempotency_key.as_deref())
        .await?;
    let input = request.input;
    check_input(&state, &input)?;
    let parts = NewRunParts {
        kind: RunKind::Job,
        tenant: principal.tenant.clone(),
        unchecked: true,
        definition,
        workflow: None,
        version: None,
        input,
        idempotency_key,
        delay_s,
        trace_id: trace.trace_id,
        trace_span_id: trace.span_id,
    };
    let submission = plan_one(&state, parts).await?;
    submit_one(&state, submission).await
}

#[cfg(test)]
mod tests {
    use taskfleet_common::{TraceId, jq};

    use serde_json::json;

    use super::*;

    fn parts(definition: Value, unchecked: bool) -> NewRunParts {
        NewRunParts {
            kind: RunKind::Workflow,
            tenant: "t".to_owned(),
            definition: serde_json::from_value(definition).expect("a definition"),
            unchecked,
            workflow: None,
            version: None,
            input: json!({}),
            idempotency_key: None,
            delay_s: None,
            trace_id: TraceId::random(),
            trace_span_id: None,
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
