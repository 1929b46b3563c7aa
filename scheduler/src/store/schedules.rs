//! Schedules: setting, reading and deleting them for the API, and what the firing loop does
//! in one transaction per batch: claiming the due ones (`FOR UPDATE SKIP LOCKED`, so two
//! schedulers never claim the same), marking the run a tick started and moving the cursor.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Owner, Payload, StoreError, sealed};

/// A schedule to set.
#[derive(Debug, Clone)]
pub struct NewSchedule<'a> {
    /// The registered workflow it starts, if any.
    pub workflow: Option<&'a str>,
    /// That workflow's version (none: its latest at each tick).
    pub workflow_version: Option<i32>,
    /// The inline definition it starts, if any.
    pub definition: Option<&'a Value>,
    /// The runs' input.
    pub input: &'a Value,
    /// The cron expression.
    pub cron: &'a str,
    /// The IANA time zone.
    pub timezone: &'a str,
    /// `allow` or `skip`.
    pub overlap: &'a str,
    /// `none` or `last`.
    pub catch_up: &'a str,
    /// Whether it is paused.
    pub paused: bool,
    /// Its first tick after now, used unless the schedule keeps its cursor.
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// A schedule as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    /// Its tenant.
    pub tenant: String,
    /// Its name.
    pub name: String,
    /// The registered workflow it starts.
    pub workflow: Option<String>,
    /// That workflow's version; none for its latest.
    pub workflow_version: Option<i32>,
    /// The inline definition it starts.
    pub definition: Option<Json<Value>>,
    /// The runs' input.
    pub input: Payload,
    /// The cron expression.
    pub cron: String,
    /// The IANA time zone.
    pub timezone: String,
    /// `allow` or `skip`.
    pub overlap: String,
    /// `none` or `last`.
    pub catch_up: String,
    /// Whether it is paused.
    pub paused: bool,
    /// The next tick to fire (the cursor).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The run its last fired tick started.
    pub last_run_id: Option<Uuid>,
    /// The last tick it fired.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// The last tick it skipped.
    pub last_skipped_at: Option<DateTime<Utc>>,
    /// Ticks skipped so far because the previous run was unfinished (`overlap: skip`); ticks
    /// passed over by `catch_up` are logged, not counted.
    pub skipped_ticks: i64,
    /// Why the last tick that failed could not start its run.
    pub last_error: Option<String>,
    /// That tick.
    pub last_error_at: Option<DateTime<Utc>>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}

/// The columns of a [`ScheduleRow`].
const SCHEDULE_COLUMNS: &str = "tenant, name, workflow, workflow_version, definition, input, \
    cron, timezone, overlap, catch_up, paused, next_fire_at, last_run_id, last_fired_at, \
    last_skipped_at, skipped_ticks, last_error, last_error_at, created_at, updated_at";

/// Sets a schedule, making it if it is new; returns it and whether it was made. The cursor
/// is kept when the expression and time zone are unchanged and the schedule was not paused
/// (so setting the same schedule again neither loses nor repeats a tick); otherwise it moves
/// to `next_fire_at`, so a schedule resumed fires from the next tick to come.
pub async fn put_schedule(
    db: &PgPool,
    owner: Owner<'_>,
    name: &str,
    schedule: &NewSchedule<'_>,
) -> Result<(ScheduleRow, bool), StoreError> {
    let sql = format!(
        "INSERT INTO schedules AS s (namespace, tenant, name, workflow, workflow_version,
                                     definition, input, cron, timezone, overlap, catch_up,
                                     paused, next_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (namespace, tenant, name) DO UPDATE SET
             workflow = EXCLUDED.workflow, workflow_version = EXCLUDED.workflow_version,
             definition = EXCLUDED.definition, input = EXCLUDED.input,
             cron = EXCLUDED.cron, timezone = EXCLUDED.timezone,
             overlap = EXCLUDED.overlap, catch_up = EXCLUDED.catch_up,
             paused = EXCLUDED.paused, updated_at = now(),
             next_fire_at = CASE
                 WHEN s.cron = EXCLUDED.cron AND s.timezone = EXCLUDED.timezone
                      AND NOT s.paused AND s.next_fire_at IS NOT NULL
                 THEN s.next_fire_at
                 ELSE EXCLUDED.next_fire_at END
         RETURNING {SCHEDULE_COLUMNS}, (xmax = 0) AS created"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(owner.namespace)
        .bind(owner.tenant)
        .bind(name)
        .bind(schedule.workflow)
        .bind(schedule.workflow_version)
        .bind(schedule.definition.map(Json))
        .bind(sealed(schedule.input))
        .bind(schedule.cron)
        .bind(schedule.timezone)
        .bind(schedule.overlap)
        .bind(schedule.catch_up)
        .bind(schedule.paused)
        .bind(schedule.next_fire_at)
        .fetch_one(db)
        .await?;
    let created: bool = sqlx::Row::try_get(&row, "created")?;
    Ok((sqlx::FromRow::from_row(&row)?, created))
}

/// Returns a schedule of the owner.
pub async fn get_schedule(
    db: &PgPool,
    owner: Owner<'_>,
    name: &str,
) -> Result<Option<ScheduleRow>, StoreError> {
    let sql = format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules
         WHERE namespace = $1 AND tenant = $2 AND name = $3"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(owner.namespace)
        .bind(owner.tenant)
        .bind(name)
        .fetch_optional(db)
        .await?)
}

/// Returns the owner's schedules, by name.
pub async fn list_schedules(db: &PgPool, owner: Owner<'_>) -> Result<Vec<ScheduleRow>, StoreError> {
    let sql = format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules
         WHERE namespace = $1 AND tenant = $2 ORDER BY name"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(owner.namespace)
        .bind(owner.tenant)
        .fetch_all(db)
        .await?)
}

/// Deletes a schedule; returns whether there was one. Its runs stay.
pub async fn delete_schedule(
    db: &PgPool,
    owner: Owner<'_>,
    name: &str,
) -> Result<bool, StoreError> {
    let deleted =
        sqlx::query("DELETE FROM schedules WHERE namespace = $1 AND tenant = $2 AND name = $3")
            .bind(owner.namespace)
            .bind(owner.tenant)
            .bind(name)
            .execute(db)
            .await?;
    Ok(deleted.rows_affected() > 0)
}

/// Claims up to `limit` due schedules of `namespace` (not paused, cursor at or before now),
/// earliest first, locking them until the transaction ends; schedules another transaction
/// holds are passed over. Returns them with the database's time, without their inputs (read,
/// and opened, schedule by schedule with [`schedule_input`], so that one input no key opens
/// fails its own tick only).
pub async fn claim_due_schedules(
    conn: &mut PgConnection,
    namespace: &str,
    limit: i64,
) -> Result<(Vec<ScheduleRow>, DateTime<Utc>), StoreError> {
    let columns = SCHEDULE_COLUMNS.replacen(", input,", ", 'null'::jsonb AS input,", 1);
    let sql = format!(
        "SELECT {columns} FROM schedules
         WHERE namespace = $1 AND NOT paused AND next_fire_at <= now()
         ORDER BY next_fire_at LIMIT $2
         FOR UPDATE SKIP LOCKED"
    );
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(namespace)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await?;
    Ok((rows, now))
}

/// Returns a schedule's input, opened, or why it cannot be (sealed with a key this scheduler
/// does not have, or altered).
pub async fn schedule_input(
    conn: &mut PgConnection,
    owner: Owner<'_>,
    name: &str,
) -> Result<Result<Value, String>, StoreError> {
    let input: Option<Json<Value>> = sqlx::query_scalar(
        "SELECT input FROM schedules WHERE namespace = $1 AND tenant = $2 AND name = $3",
    )
    .bind(owner.namespace)
    .bind(owner.tenant)
    .bind(name)
    .fetch_optional(conn)
    .await?;
    Ok(match input {
        Some(Json(input)) => taskfleet_common::seal::open(input)
            .map_err(|error| format!("the schedule's input cannot be opened: {error}")),
        None => Err("the schedule is gone".to_owned()),
    })
}

/// Returns whether a run has not finished yet (false for a run that is gone).
pub async fn run_unfinished(conn: &mut PgConnection, run_id: Uuid) -> Result<bool, StoreError> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_optional(conn)
        .await?;
    Ok(matches!(status.as_deref(), Some("pending" | "running")))
}

/// Records on a run just inserted the schedule and tick that started it. The unique index on
/// `(namespace, tenant, schedule, scheduled_for)` refuses a second run of one tick.
pub async fn mark_scheduled_run(
    conn: &mut PgConnection,
    run_id: Uuid,
    schedule: &str,
    scheduled_for: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE runs SET schedule = $2, scheduled_for = $3 WHERE id = $1")
        .bind(run_id)
        .bind(schedule)
        .bind(scheduled_for)
        .execute(conn)
        .await?;
    Ok(())
}

/// What a claimed schedule's tick came to.
#[derive(Debug, Clone)]
pub enum TickOutcome {
    /// A run was started for the tick.
    Fired {
        /// The tick.
        at: DateTime<Utc>,
        /// The run.
        run_id: Uuid,
    },
    /// The tick was skipped: its previous run is unfinished.
    Skipped {
        /// The tick.
        at: DateTime<Utc>,
        /// How many ticks were skipped.
        count: i64,
    },
    /// Ticks were missed while no scheduler ran, and none is caught up: only the cursor moves.
    Missed,
    /// The tick's run could not be started.
    Failed {
        /// The tick.
        at: DateTime<Utc>,
        /// Why.
        error: String,
    },
}

/// Moves a claimed schedule's cursor to `next` and records what its tick came to.
pub async fn advance_schedule(
    conn: &mut PgConnection,
    owner: Owner<'_>,
    name: &str,
    next: Option<DateTime<Utc>>,
    outcome: &TickOutcome,
) -> Result<(), StoreError> {
    let (fired, run_id, skipped, skipped_count, failed, error) = match outcome {
        TickOutcome::Fired { at, run_id } => (Some(*at), Some(*run_id), None, 0, None, None),
        TickOutcome::Skipped { at, count } => (None, None, Some(*at), *count, None, None),
        TickOutcome::Failed { at, error } => (None, None, None, 0, Some(*at), Some(error)),
        TickOutcome::Missed => (None, None, None, 0, None, None),
    };
    sqlx::query(
        "UPDATE schedules SET next_fire_at = $4,
                last_fired_at = COALESCE($5, last_fired_at),
                last_run_id = COALESCE($6, last_run_id),
                last_skipped_at = COALESCE($7, last_skipped_at),
                skipped_ticks = skipped_ticks + $8,
                last_error_at = COALESCE($9, last_error_at),
                last_error = CASE WHEN $9::timestamptz IS NULL THEN last_error ELSE $10 END
         WHERE namespace = $1 AND tenant = $2 AND name = $3",
    )
    .bind(owner.namespace)
    .bind(owner.tenant)
    .bind(name)
    .bind(next)
    .bind(fired)
    .bind(run_id)
    .bind(skipped)
    .bind(skipped_count)
    .bind(failed)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Returns the seconds until the namespace's earliest tick (negative when one is due), or
/// none when no schedule will fire. Measured by the database's clock, as the claims are.
pub async fn seconds_to_next_tick(db: &PgPool, namespace: &str) -> Result<Option<f64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT extract(epoch FROM min(next_fire_at) - now())::float8 FROM schedules
         WHERE namespace = $1 AND NOT paused",
    )
    .bind(namespace)
    .fetch_one(db)
    .await?)
}
