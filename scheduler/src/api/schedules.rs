//! `/v1/schedules`: setting, listing, showing and deleting schedules, which start runs on a
//! cron expression in a time zone. The runs are started by [`crate::schedules`]; this module
//! checks and stores what the schedule says.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use taskfleet_common::WorkflowDefinition;
use taskfleet_common::names::is_valid_name;
use utoipa::ToSchema;

use super::runs::{check_input, check_python_code, resolve};
use super::workflows::check_definition;
use super::{ApiError, AppState, ErrorBody, JsonBody, owner};
use crate::auth::{Principal, Scope};
use crate::planning::ProgramRunner;
use crate::schedules::ticks::{CatchUp, Overlap, Timetable};
use crate::store::{self, NewSchedule, ScheduleRow};

/// How many of its next fire times a schedule's view shows.
const SHOWN_FIRE_TIMES: usize = 5;

/// What to do with a tick while the schedule's previous run is unfinished.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// Start its run all the same.
    Allow,
    /// Skip the tick.
    Skip,
}

/// What to do with ticks missed while no scheduler ran.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUpPolicy {
    /// Skip them; the next run is the next tick to come.
    None,
    /// Start one run, for the latest of them.
    Last,
}

/// The body of `PUT /v1/schedules/{name}`: what to run (a registered `workflow`, optionally
/// at a `version`, or an inline `definition`) with which `input`, and when.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"workflow": "orders", "input": {"day": "today"}, "cron": "0 6 * * MON-FRI", "timezone": "Europe/Paris", "overlap": "skip"}))]
pub struct ScheduleRequest {
    /// The name of a registered workflow.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    workflow: Option<String>,
    /// The registered workflow's version (default: its latest at each tick).
    #[schema(minimum = 1)]
    version: Option<i32>,
    /// An inline workflow definition.
    definition: Option<WorkflowDefinition>,
    /// The input of every run (default null).
    #[serde(default)]
    input: Value,
    /// A cron expression of 5 fields (minute hour day-of-month month day-of-week) or 6
    /// (seconds first).
    cron: String,
    /// The IANA time zone the expression is read in (default `UTC`).
    timezone: Option<String>,
    /// `allow` (default) or `skip`: skip a tick while the previous run is unfinished.
    #[schema(value_type = Option<OverlapPolicy>)]
    overlap: Option<String>,
    /// `none` (default) or `last`: after the schedulers were down, start one run for the
    /// ticks missed.
    #[schema(value_type = Option<CatchUpPolicy>)]
    catch_up: Option<String>,
    /// Whether the schedule is paused (default false).
    #[serde(default)]
    paused: bool,
}

/// A schedule as it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    /// Its name.
    name: String,
    /// The registered workflow it starts; null with a definition.
    #[schema(required = true)]
    workflow: Option<String>,
    /// That workflow's version; null for its latest at each tick.
    #[schema(required = true)]
    version: Option<i32>,
    /// The inline definition it starts; null with a workflow.
    #[schema(value_type = Option<WorkflowDefinition>, required = true)]
    definition: Option<Value>,
    /// The input of every run.
    input: Value,
    /// The cron expression.
    cron: String,
    /// The IANA time zone it is read in.
    timezone: String,
    /// What a tick does while the previous run is unfinished.
    overlap: OverlapPolicy,
    /// What happens to ticks missed while no scheduler ran.
    catch_up: CatchUpPolicy,
    /// Whether it is paused.
    paused: bool,
    /// Its next fire times (up to 5, none while paused), RFC 3339 in its time zone's offset.
    next_fire_times: Vec<String>,
    /// The run its last fired tick started.
    #[schema(required = true)]
    last_run_id: Option<uuid::Uuid>,
    /// The last tick that started a run.
    #[schema(required = true)]
    last_fired_at: Option<DateTime<Utc>>,
    /// The last tick skipped because the previous run was unfinished.
    #[schema(required = true)]
    last_skipped_at: Option<DateTime<Utc>>,
    /// Ticks skipped so far because the previous run was unfinished.
    skipped_ticks: i64,
    /// Why the last tick that failed could not start its run.
    #[schema(required = true)]
    last_error: Option<String>,
    /// That tick.
    #[schema(required = true)]
    last_error_at: Option<DateTime<Utc>>,
    /// When it was made.
    created_at: DateTime<Utc>,
    /// When it was last set.
    updated_at: DateTime<Utc>,
}

/// The tenant's schedules.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    /// The schedules, by name.
    schedules: Vec<ScheduleView>,
}

/// Returns a 422 naming the field of a schedule that is wrong.
fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    ApiError::invalid(
        format!("{field}: {message}"),
        Some(json!([{"field": field, "message": message}])),
    )
}

/// Returns a stored schedule as the API shows it.
fn view(row: ScheduleRow) -> ScheduleView {
    let next_fire_times = match (&row.next_fire_at, row.paused) {
        (Some(cursor), false) => match Timetable::parse(&row.cron, &row.timezone) {
            Ok(timetable) => {
                let zone = timetable.zone();
                std::iter::once(cursor.with_timezone(&zone))
                    .chain(timetable.upcoming(*cursor, SHOWN_FIRE_TIMES - 1))
                    .map(|tick| tick.fixed_offset().to_rfc3339())
                    .collect()
            }
            Err(_) => Vec::new(),
        },
        _ => Vec::new(),
    };
    ScheduleView {
        name: row.name,
        workflow: row.workflow,
        version: row.workflow_version,
        definition: row.definition.map(|definition| definition.0),
        input: row.input.0,
        cron: row.cron,
        timezone: row.timezone,
        overlap: match Overlap::parse(&row.overlap) {
            Some(Overlap::Skip) => OverlapPolicy::Skip,
            _ => OverlapPolicy::Allow,
        },
        catch_up: match CatchUp::parse(&row.catch_up) {
            Some(CatchUp::Last) => CatchUpPolicy::Last,
            _ => CatchUpPolicy::None,
        },
        paused: row.paused,
        next_fire_times,
        last_run_id: row.last_run_id,
        last_fired_at: row.last_fired_at,
        last_skipped_at: row.last_skipped_at,
        skipped_ticks: row.skipped_ticks,
        last_error: row.last_error,
        last_error_at: row.last_error_at,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

/// Sets a schedule: makes it, or replaces what it says. Its cursor is kept when its `cron`
/// and `timezone` are unchanged and it was not paused; otherwise it fires from its next tick.
#[utoipa::path(put, path = "/v1/schedules/{name}", operation_id = "setSchedule", tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name",
        pattern = "^[A-Za-z0-9_.-]{1,64}$")),
    request_body = ScheduleRequest,
    responses(
        (status = 404, description = "No such registered workflow (or version)", body = ErrorBody),
        (status = 422, description = "The schedule cannot run: `details` names the field", body = ErrorBody),
        (status = 201, description = "The schedule was made", body = ScheduleView),
        (status = 200, description = "The schedule was replaced", body = ScheduleView),
    ))]
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<ScheduleRequest>,
) -> Result<(StatusCode, Json<ScheduleView>), ApiError> {
    principal.require(Scope::RunsWrite)?;
    if !is_valid_name(&name) {
        return Err(invalid(
            "name",
            format!("schedule name {name:?} must be 1 to 64 characters among A-Z a-z 0-9 _ - ."),
        ));
    }
    let timezone = request.timezone.as_deref().unwrap_or("UTC");
    let timetable = Timetable::parse(&request.cron, timezone).map_err(|error| {
        let field = match error {
            crate::schedules::ticks::TimetableError::UnknownZone(_) => "timezone",
            _ => "cron",
        };
        invalid(field, error.to_string())
    })?;
    let overlap = match request.overlap.as_deref() {
        None => Overlap::Allow,
        Some(text) => Overlap::parse(text).ok_or_else(|| {
            invalid(
                "overlap",
                format!("{text:?} is not one of \"allow\", \"skip\""),
            )
        })?,
    };
    let catch_up = match request.catch_up.as_deref() {
        None => CatchUp::None,
        Some(text) => CatchUp::parse(text).ok_or_else(|| {
            invalid(
                "catch_up",
                format!("{text:?} is not one of \"none\", \"last\""),
            )
        })?,
    };
    check_input(&state, &request.input)?;
    let definition = match (&request.workflow, request.definition) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "workflow",
                "give either \"workflow\" or \"definition\", not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "workflow",
                "give \"workflow\" (a registered name) or \"definition\" (an inline workflow)",
            ));
        }
        (Some(workflow), None) => {
            // The workflow must exist now; each tick reads it again.
            resolve(&state, &principal, workflow, request.version).await?;
            None
        }
        (None, Some(definition)) => {
            if request.version.is_some() {
                return Err(invalid(
                    "version",
                    "\"version\" only applies to a registered \"workflow\"",
                ));
            }
            check_python_code(&principal, &definition)?;
            check_definition(state.programs.cache(), &definition)?;
            Some(serde_json::to_value(&definition).map_err(|error| ApiError::internal(&error))?)
        }
    };
    let next_fire_at = timetable.next_after(Utc::now());
    if next_fire_at.is_none() {
        return Err(invalid(
            "cron",
            format!("{:?} has no time left to fire at", request.cron),
        ));
    }
    let schedule = NewSchedule {
        workflow: request.workflow.as_deref(),
        workflow_version: request.version,
        definition: definition.as_ref(),
        input: &request.input,
        cron: &request.cron,
        timezone,
        overlap: overlap.as_str(),
        catch_up: catch_up.as_str(),
        paused: request.paused,
        next_fire_at,
    };
    let (row, created) =
        store::put_schedule(&state.db, owner(&state, &principal), &name, &schedule).await?;
    state.schedule_wake.notify_one();
    let shown = view(row);
    let detail = json!({
        "workflow": shown.workflow, "version": shown.version, "cron": shown.cron,
        "timezone": shown.timezone, "paused": shown.paused,
    });
    super::keys::record(&state, &principal, "schedule.set", Some(name), Some(detail)).await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(shown)))
}

/// The tenant's schedules, with their next fire times.
#[utoipa::path(get, path = "/v1/schedules", operation_id = "listSchedules", tag = "schedules",
    responses((status = 200, description = "The schedules", body = ScheduleList)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<ScheduleList>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let rows = store::list_schedules(&state.db, owner(&state, &principal)).await?;
    Ok(Json(ScheduleList {
        schedules: rows.into_iter().map(view).collect(),
    }))
}

/// A schedule, with its next fire times and what its last ticks came to.
#[utoipa::path(get, path = "/v1/schedules/{name}", operation_id = "getSchedule", tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses((status = 200, description = "The schedule", body = ScheduleView)))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let row = if is_valid_name(&name) {
        store::get_schedule(&state.db, owner(&state, &principal), &name).await?
    } else {
        None
    };
    row.map(|row| Json(view(row)))
        .ok_or_else(|| ApiError::not_found(format!("no schedule named {name:?}")))
}

/// The answer of `DELETE /v1/schedules/{name}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleDeleted {
    /// The schedule deleted.
    name: String,
}

/// Deletes a schedule; its runs stay.
#[utoipa::path(delete, path = "/v1/schedules/{name}", operation_id = "deleteSchedule", tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses((status = 200, description = "Deleted", body = ScheduleDeleted)))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<ScheduleDeleted>, ApiError> {
    principal.require(Scope::RunsWrite)?;
    let deleted = is_valid_name(&name)
        && store::delete_schedule(&state.db, owner(&state, &principal), &name).await?;
    if !deleted {
        return Err(ApiError::not_found(format!("no schedule named {name:?}")));
    }
    super::keys::record(
        &state,
        &principal,
        "schedule.delete",
        Some(name.clone()),
        None,
    )
    .await;
    Ok(Json(ScheduleDeleted { name }))
}
