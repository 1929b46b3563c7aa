//! What a completion writes on its task: recorded once (fenced by the attempt and the task still
//! being queued), together with the lock of its run where the batch allows, or, for a failure
//! that is retried, the task moved to its next attempt and due after its backoff.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Transaction};
use taskfleet_common::{RunKind, RunStatus, TaskStatus};
use uuid::Uuid;

use super::{EndedRun, LockedRun, Payload, RunRow, StoreError, TaskRow, sealed, sealed_text};

/// A completion to record.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The task.
    pub task_id: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// The attempt it reports on.
    pub attempt: i32,
    /// Succeeded or failed.
    pub status: TaskStatus,
    /// The output of a success.
    pub output: Option<Value>,
    /// The error of a failure.
    pub error: Option<Value>,
    /// The worker that ran it.
    pub worker_id: String,
    /// When the attempt started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// What the step printed or logged.
    pub logs: Option<String>,
    /// Whether the task said its success ends its run (see [`finish_single_steps`]).
    pub ends_run: bool,
}

/// A completion that was recorded.
#[derive(Debug, sqlx::FromRow)]
pub struct Recorded {
    /// Its run.
    pub run_id: Uuid,
    /// Its step.
    pub step_id: String,
    /// Its item of a `for_each` step, or -1.
    pub item: i32,
    /// Succeeded or failed.
    #[sqlx(try_from = "String")]
    pub status: TaskStatus,
    /// The output of a success.
    pub output: Option<Payload>,
    /// The error of a failure.
    pub error: Option<Payload>,
    /// The concurrency group whose permit the task held, for a step with a `concurrency`
    /// limit: recorded, it no longer holds it.
    pub concurrency_group: Option<String>,
}

/// The completions, bound as arrays (`$1` to `$9`), one row per attempt of a task (a batch
/// may hold the same completion twice). Joined to `tasks` by id and attempt, each task row is
/// written at most once.
const COMPLETION_ROWS: &str = "(SELECT DISTINCT ON (u.id, u.attempt) u.*
               FROM UNNEST($1::uuid[], $2::integer[], $3::text[], $4::jsonb[], $5::jsonb[],
                           $6::text[], $7::timestamptz[], $8::timestamptz[], $9::text[])
                    AS u(id, attempt, status, output, error, worker, started, finished, logs)
               ORDER BY u.id, u.attempt) AS c";

/// Writes the completions of `c` on their tasks still queued at that attempt. Like every
/// statement that finishes a task, it clears `due_at`: a finished task waits for nothing, and
/// the timer's index (`tasks_due_by_priority`) holds only tasks that do.
const RECORD_COMPLETIONS: &str = "UPDATE tasks SET status = c.status, output = c.output,
                error = c.error, worker_id = c.worker, started_at = c.started,
                finished_at = c.finished, logs = c.logs, due_at = NULL";

/// What a recorded completion returns.
const RECORDED_COLUMNS: &str = "tasks.run_id, tasks.step_id, tasks.item, tasks.status,
                tasks.output, tasks.error, tasks.concurrency_group";

/// Binds `completions` as the arrays `$1` to `$9` of [`COMPLETION_ROWS`].
fn bind_completions<'q, O, C: std::borrow::Borrow<Completion>>(
    query: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
    rows: &'q [C],
) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    let completions = || rows.iter().map(C::borrow);
    let ids: Vec<Uuid> = completions().map(|c| c.task_id).collect();
    let attempts: Vec<i32> = completions().map(|c| c.attempt).collect();
    let statuses: Vec<&str> = completions().map(|c| c.status.as_str()).collect();
    let outputs: Vec<Option<Json<Cow<'_, Value>>>> = completions()
        .map(|c| c.output.as_ref().map(sealed))
        .collect();
    let errors: Vec<Option<Json<Cow<'_, Value>>>> = completions()
        .map(|c| c.error.as_ref().map(sealed))
        .collect();
    let workers: Vec<&str> = completions().map(|c| c.worker_id.as_str()).collect();
    let started: Vec<DateTime<Utc>> = completions().map(|c| c.started_at).collect();
    let finished: Vec<DateTime<Utc>> = completions().map(|c| c.finished_at).collect();
    let logs: Vec<Option<Cow<'_, str>>> = completions()
        .map(|c| c.logs.as_deref().map(sealed_text))
        .collect();
    query
        .bind(ids)
        .bind(attempts)
        .bind(statuses)
        .bind(outputs)
        .bind(errors)
        .bind(workers)
        .bind(started)
        .bind(finished)
        .bind(logs)
}

/// Records completions whose task is still queued at that attempt, and returns those
/// recorded. Replays and late completions of other attempts change nothing.
pub async fn record_completions(
    tx: &mut Transaction<'_, Postgres>,
    completions: &[Completion],
) -> Result<Vec<Recorded>, StoreError> {
    let sql = format!(
        "{RECORD_COMPLETIONS}
         FROM {COMPLETION_ROWS}
         WHERE tasks.id = c.id AND tasks.attempt = c.attempt AND tasks.status = 'queued'
         RETURNING {RECORDED_COLUMNS}"
    );
    Ok(
        bind_completions(sqlx::query_as(sqlx::AssertSqlSafe(sql)), completions)
            .fetch_all(&mut **tx)
            .await?,
    )
}

/// Keeps the logs of attempts stopped because their run was cancelled: their task was recorded
/// as cancelled with the run, and nothing else of such a completion is written (the step's
/// status, output and error stay as the cancellation left them). It also says which worker ran
/// the attempt and when it started, so the step shows that an attempt ran.
pub async fn keep_logs_of_cancelled(
    tx: &mut Transaction<'_, Postgres>,
    completions: &[&Completion],
) -> Result<(), StoreError> {
    if completions.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = completions.iter().map(|c| c.task_id).collect();
    let attempts: Vec<i32> = completions.iter().map(|c| c.attempt).collect();
    let logs: Vec<Option<Cow<'_, str>>> = completions
        .iter()
        .map(|c| c.logs.as_deref().map(sealed_text))
        .collect();
    let workers: Vec<&str> = completions.iter().map(|c| c.worker_id.as_str()).collect();
    let started: Vec<DateTime<Utc>> = completions.iter().map(|c| c.started_at).collect();
    sqlx::query(
        "UPDATE tasks SET logs = c.logs, worker_id = coalesce(tasks.worker_id, c.worker),
                started_at = coalesce(tasks.started_at, c.started)
         FROM UNNEST($1::uuid[], $2::integer[], $3::text[], $4::text[], $5::timestamptz[])
              AS c(id, attempt, logs, worker, started)
         WHERE tasks.id = c.id AND tasks.attempt = c.attempt AND tasks.status = 'cancelled'
           AND tasks.logs IS NULL",
    )
    .bind(ids)
    .bind(attempts)
    .bind(logs)
    .bind(workers)
    .bind(started)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What [`finish_single_steps`] did.
#[derive(Debug, Default)]
pub struct SingleStepsFinished {
    /// The runs it locked: their completions need nothing more.
    pub locked: Vec<Uuid>,
    /// Those it finished.
    pub finished: Vec<Uuid>,
    /// The rows of the finished runs that were asked for, each with its only task.
    pub rows: Vec<(RunRow, TaskRow)>,
    /// The finished runs, as they ended.
    pub ended: Vec<EndedRun>,
    /// The concurrency groups of the tasks recorded that held a permit, one per task.
    pub freed: Vec<String>,
}

/// Records the successes among `completions` whose run is a single step that plans without
/// programs (no `input`, `for_each` or `when`), and finishes those runs with their step's
/// output, in one statement: nothing is left to plan for such a run once its step succeeded.
/// Each run is locked (in id order) before its task is written, as
/// [`lock_runs`](super::lock_runs) does. Returns the rows, as written, of the finished runs among
/// `wanted`.
pub async fn finish_single_steps(
    conn: &mut PgConnection,
    completions: &[&Completion],
    wanted: &[Uuid],
) -> Result<SingleStepsFinished, StoreError> {
    let sql = format!(
        "WITH locked AS MATERIALIZED (
             SELECT id FROM runs
             WHERE id = ANY($10) AND status = 'running'
               AND jsonb_array_length(definition->'steps') = 1
               AND NOT (definition->'steps'->0 ?| array['input', 'for_each', 'when'])
             ORDER BY id FOR UPDATE),
         recorded AS (
             {RECORD_COMPLETIONS}
             FROM {COMPLETION_ROWS}
             WHERE tasks.id = c.id AND tasks.attempt = c.attempt AND tasks.status = 'queued'
               AND tasks.item = -1 AND c.status = 'succeeded'
               AND tasks.run_id = ANY (ARRAY(SELECT id FROM locked))
             RETURNING tasks.run_id, tasks.output, tasks.concurrency_group,
                       CASE WHEN tasks.run_id = ANY($11) THEN to_jsonb(tasks) END AS task),
         finished AS (
             UPDATE runs SET status = 'succeeded', output = r.output, finished_at = now()
             FROM recorded r
             WHERE runs.id = r.run_id
             RETURNING runs.id, CASE WHEN runs.id = ANY($11) THEN to_jsonb(runs) END AS run,
                       r.task,
                       extract(epoch FROM runs.finished_at - runs.created_at)::float8 AS seconds,
                       runs.kind, runs.trace_id, runs.trace_span_id, r.concurrency_group)
         SELECT id, false, NULL::jsonb, NULL::jsonb, NULL::float8, NULL::text, NULL::text,
                NULL::text, NULL::text
         FROM locked
         UNION ALL
         SELECT id, true, run, task, seconds, kind, trace_id, trace_span_id, concurrency_group
         FROM finished"
    );
    let mut run_ids: Vec<Uuid> = completions.iter().map(|c| c.run_id).collect();
    run_ids.sort_unstable();
    run_ids.dedup();
    type Row = (
        Uuid,
        bool,
        Option<Json<RunRow>>,
        Option<Json<TaskRow>>,
        Option<f64>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = bind_completions(sqlx::query_as(sqlx::AssertSqlSafe(sql)), completions)
        .bind(run_ids)
        .bind(wanted)
        .fetch_all(&mut *conn)
        .await?;
    let mut done = SingleStepsFinished::default();
    for (id, finished, run, task, seconds, kind, trace_id, trace_span_id, group) in rows {
        if !finished {
            done.locked.push(id);
            continue;
        }
        done.finished.push(id);
        done.freed.extend(group);
        done.ended.push(EndedRun {
            id,
            // Every stored kind reads.
            kind: kind
                .and_then(|kind| RunKind::try_from(kind).ok())
                .unwrap_or(RunKind::Workflow),
            status: RunStatus::Succeeded,
            seconds: seconds.unwrap_or_default(),
            trace_id,
            trace_span_id,
        });
        if let (Some(Json(run)), Some(Json(task))) = (run, task) {
            done.rows.push((run, task));
        }
    }
    Ok(done)
}

/// A row of [`lock_and_record`]: a locked run (`step_id` null) or a recorded completion.
#[derive(sqlx::FromRow)]
struct LockedOrRecorded {
    run_id: Uuid,
    definition: Option<Json<Value>>,
    input: Option<Payload>,
    trace_id: Option<String>,
    tenant: Option<String>,
    status: String,
    step_id: Option<String>,
    item: Option<i32>,
    output: Option<Payload>,
    error: Option<Payload>,
    concurrency_group: Option<String>,
}

/// Locks the runs of `completions` (as [`lock_runs`](super::lock_runs) does) and records the
/// completions (as [`record_completions`] does) in one statement: a task is written only if its
/// run is among the locked rows, so only once its run is locked. For batches that need no
/// decision between the two (no failure that a retry policy may take back).
pub async fn lock_and_record(
    tx: &mut Transaction<'_, Postgres>,
    run_ids: &[Uuid],
    completions: &[Completion],
) -> Result<(Vec<LockedRun>, Vec<Recorded>), StoreError> {
    let sql = format!(
        "WITH locked AS MATERIALIZED (
             SELECT id, definition, input, status, trace_id, tenant FROM runs
             WHERE id = ANY($10) ORDER BY id FOR UPDATE),
         recorded AS (
             {RECORD_COMPLETIONS}
             FROM {COMPLETION_ROWS}
             WHERE tasks.id = c.id AND tasks.attempt = c.attempt AND tasks.status = 'queued'
               AND tasks.run_id = ANY (ARRAY(SELECT id FROM locked))
             RETURNING {RECORDED_COLUMNS})
         SELECT id AS run_id, definition, input, trace_id, tenant, status,
                NULL::text AS step_id, NULL::integer AS item, NULL::jsonb AS output,
                NULL::jsonb AS error, NULL::text AS concurrency_group
         FROM locked
         UNION ALL
         SELECT run_id, NULL, NULL, NULL, NULL, status, step_id, item, output, error,
                concurrency_group
         FROM recorded"
    );
    let rows: Vec<LockedOrRecorded> =
        bind_completions(sqlx::query_as(sqlx::AssertSqlSafe(sql)), completions)
            .bind(run_ids)
            .fetch_all(&mut **tx)
            .await?;
    let mut locked = Vec::new();
    let mut recorded = Vec::new();
    // The column holds a task's status on a recorded row and a run's on a locked one.
    let unknown = |error: taskfleet_common::status::UnknownName| {
        StoreError::from(sqlx::Error::Decode(Box::new(error)))
    };
    for row in rows {
        match (row.step_id, row.definition, row.input) {
            (Some(step_id), _, _) => recorded.push(Recorded {
                run_id: row.run_id,
                step_id,
                item: row.item.unwrap_or(-1),
                status: row.status.parse::<TaskStatus>().map_err(unknown)?,
                output: row.output,
                error: row.error,
                concurrency_group: row.concurrency_group,
            }),
            (None, Some(definition), Some(input)) => locked.push(LockedRun {
                id: row.run_id,
                definition,
                input,
                status: row.status.parse::<RunStatus>().map_err(unknown)?,
                trace_id: row.trace_id,
                tenant: row.tenant.unwrap_or_default(),
            }),
            (None, _, _) => {}
        }
    }
    Ok((locked, recorded))
}

/// The current attempt of a queued task.
#[derive(Debug, sqlx::FromRow)]
pub struct CurrentAttempt {
    /// The task.
    pub id: Uuid,
    /// Its step.
    pub step_id: String,
    /// Its current attempt.
    pub attempt: i32,
}

/// Returns the current attempt of those of the given tasks that are still queued.
pub async fn current_attempts(
    tx: &mut Transaction<'_, Postgres>,
    task_ids: &[Uuid],
) -> Result<Vec<CurrentAttempt>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, step_id, attempt FROM tasks WHERE id = ANY($1) AND status = 'queued'",
    )
    .bind(task_ids)
    .fetch_all(&mut **tx)
    .await?)
}

/// A failed attempt to be followed by another after a delay.
#[derive(Debug, Clone)]
pub struct Retry {
    /// The task.
    pub task_id: Uuid,
    /// The attempt that failed.
    pub attempt: i32,
    /// Its error, shown on the step until the next attempt ends.
    pub error: Value,
    /// The worker that ran it.
    pub worker_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long to wait before the next attempt.
    pub delay: std::time::Duration,
    /// What the failed attempt printed or logged.
    pub logs: Option<String>,
}

/// Moves failed tasks to their next attempt, due after their delay. Fenced like completions:
/// only a task still queued at the failed attempt moves.
pub async fn schedule_retries(
    tx: &mut Transaction<'_, Postgres>,
    retries: &[Retry],
) -> Result<(), StoreError> {
    if retries.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = retries.iter().map(|r| r.task_id).collect();
    let attempts: Vec<i32> = retries.iter().map(|r| r.attempt).collect();
    let errors: Vec<Json<Cow<'_, Value>>> = retries.iter().map(|r| sealed(&r.error)).collect();
    let workers: Vec<&str> = retries.iter().map(|r| r.worker_id.as_str()).collect();
    let started: Vec<DateTime<Utc>> = retries.iter().map(|r| r.started_at).collect();
    let delays: Vec<f64> = retries.iter().map(|r| r.delay.as_secs_f64()).collect();
    let logs: Vec<Option<Cow<'_, str>>> = retries
        .iter()
        .map(|r| r.logs.as_deref().map(sealed_text))
        .collect();
    sqlx::query(
        "UPDATE tasks SET attempt = tasks.attempt + 1, error = r.error, worker_id = r.worker,
                started_at = r.started, due_at = now() + make_interval(secs => r.delay),
                dispatched_at = NULL, relayed_at = NULL, logs = r.logs
         FROM (SELECT DISTINCT ON (id) * FROM UNNEST($1::uuid[], $2::integer[], $3::jsonb[],
                      $4::text[], $5::timestamptz[], $6::float8[], $7::text[])
                      AS u(id, attempt, error, worker, started, delay, logs) ORDER BY id) AS r
         WHERE tasks.id = r.id AND tasks.attempt = r.attempt AND tasks.status = 'queued'",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&errors)
    .bind(&workers)
    .bind(&started)
    .bind(&delays)
    .bind(&logs)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
