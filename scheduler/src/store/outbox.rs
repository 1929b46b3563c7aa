//! The outbox: task rows committed but not yet confirmed by the broker. Marking tasks dispatched
//! once confirmed, the relay's claim of rows left unpublished, the retry timer's claim of
//! tasks whose due time has passed, and tasks sent back to the timer because their start is
//! over a rate limit. Each claim reads its own index in order and claims only rows of its
//! namespace that can be sent now.

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use taskfleet_common::names::MAX_PRIORITY;

use super::StoreError;

/// Marks tasks as confirmed by the broker, so the relay leaves them alone: each task with how
/// long ago the broker confirmed it. Tasks that finished meanwhile are left as they are: they
/// are out of the outbox already. So is a task claimed again since its confirm (by the timer,
/// after a deferral or for a retry; by the relay): its new publish has not been confirmed, and
/// a mark would leave it undispatched for good if that publish never happens. A claim sets
/// `relayed_at`, and every claim of a confirmed publish came before its confirm, so the mark
/// requires `relayed_at` (or `created_at`, never claimed) no later than the confirm.
pub async fn mark_dispatched(
    conn: &mut PgConnection,
    confirmed: &[(Uuid, std::time::Duration)],
) -> Result<(), StoreError> {
    let ids: Vec<Uuid> = confirmed.iter().map(|(id, _)| *id).collect();
    let ages: Vec<f64> = confirmed.iter().map(|(_, age)| age.as_secs_f64()).collect();
    sqlx::query(
        "UPDATE tasks SET dispatched_at = now()
         FROM UNNEST($1::uuid[], $2::float8[]) AS c(id, age)
         WHERE tasks.id = c.id AND tasks.dispatched_at IS NULL AND tasks.status = 'queued'
           AND coalesce(tasks.relayed_at, tasks.created_at) <= now() - make_interval(secs => c.age)",
    )
    .bind(ids)
    .bind(ages)
    .execute(conn)
    .await?;
    Ok(())
}

/// A committed task that the broker has not confirmed, with what is needed to publish it.
#[derive(Debug, sqlx::FromRow)]
pub struct UndispatchedTask {
    /// The task.
    pub id: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// Its step.
    pub step_id: String,
    /// The current attempt.
    pub attempt: i32,
    /// Its task queue.
    pub queue: String,
    /// Its priority.
    pub priority: i16,
    /// Its input as stored: sealed when encryption is on, opened by [`Self::open_input`], so
    /// that one value this scheduler's keys cannot open fails its own task only.
    pub input: Option<Json<Value>>,
    /// The definition of its run.
    pub definition: Json<Value>,
    /// Its run's trace id, as stored; see [`Self::trace_id`].
    pub run_trace_id: Option<String>,
    /// The group its starts count in, for a step with a rate limit.
    pub rate_group: Option<String>,
}

impl UndispatchedTask {
    /// Returns its run's trace id; none for a run made before runs had one.
    pub fn trace_id(&self) -> Option<taskfleet_common::TraceId> {
        self.run_trace_id.as_deref().and_then(|id| id.parse().ok())
    }

    /// Returns the task's input, opened (`null` when it has none).
    pub fn open_input(&mut self) -> Result<Value, taskfleet_common::seal::SealError> {
        match self.input.take() {
            Some(Json(input)) => taskfleet_common::seal::open(input),
            None => Ok(Value::Null),
        }
    }
}

/// Claims queued tasks of running runs in `namespace` that no broker confirmed and that were
/// committed (or last relayed) more than `older_than` ago, highest priority first and oldest
/// first within a priority, moving their relay time forward so that no other relay takes them
/// in the same period. Delayed jobs, waiting retries and `for_each` steps' own rows are never
/// claimed, however many of them are older.
pub async fn claim_undispatched(
    db: &PgPool,
    namespace: &str,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<Vec<UndispatchedTask>, StoreError> {
    // The candidates of each priority, highest first, come in order from one range of
    // `tasks_sendable_by_priority`, which holds only rows that can be sent, by namespace and
    // priority: no other namespace's row is read, and a backlog of low priorities is not
    // read before the higher ones. Each candidate's run is read by its id in a scalar
    // subquery, which PostgreSQL evaluates per candidate and never turns into a join: the
    // plan never reads the namespace's runs, whatever the statistics of a young table say,
    // and it stops at the limit.
    let sql = format!(
        "WITH claimed AS (
             SELECT c.id
             FROM generate_series({MAX_PRIORITY}, 0, -1) AS p(priority)
             CROSS JOIN LATERAL (
                 SELECT t.id FROM tasks t
                 WHERE t.namespace = $1 AND t.priority = p.priority
                   AND t.status = 'queued' AND t.dispatched_at IS NULL AND t.due_at IS NULL
                   AND t.items_total IS NULL
                   AND coalesce(t.relayed_at, t.created_at) < now() - make_interval(secs => $2)
                   AND (SELECT r.status = 'running' FROM runs r WHERE r.id = t.run_id)
                 ORDER BY coalesce(t.relayed_at, t.created_at) LIMIT $3
                 FOR UPDATE OF t SKIP LOCKED) c
             LIMIT $3)
         UPDATE tasks t SET relayed_at = now()
         FROM claimed, runs r
         WHERE t.id = claimed.id AND r.id = t.run_id
         RETURNING t.id, t.run_id, t.step_id, t.attempt, t.queue, t.priority, t.input, r.definition,
                   r.trace_id AS run_trace_id, t.rate_group"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(namespace)
        .bind(older_than.as_secs_f64())
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// Claims queued tasks of running runs in `namespace` whose retry or delay is due, highest
/// priority first and earliest first within a priority, clearing their due time so they are
/// dispatched once. A claimed task is not dispatched until the broker confirms it again, so
/// that the relay takes it if this claim never publishes it (a task sent back to the timer
/// after a dispatch may have been marked dispatched since).
pub async fn claim_due(
    db: &PgPool,
    namespace: &str,
    limit: i64,
) -> Result<Vec<UndispatchedTask>, StoreError> {
    // As in `claim_undispatched`: candidates of this namespace, one range of
    // `tasks_due_by_priority` per priority, highest first, each run read by id.
    let sql = format!(
        "WITH due AS (
             SELECT c.id
             FROM generate_series({MAX_PRIORITY}, 0, -1) AS p(priority)
             CROSS JOIN LATERAL (
                 SELECT t.id FROM tasks t
                 WHERE t.namespace = $1 AND t.priority = p.priority AND t.due_at <= now()
                   AND t.status = 'queued'
                   AND (SELECT r.status = 'running' FROM runs r WHERE r.id = t.run_id)
                 ORDER BY t.due_at LIMIT $2
                 FOR UPDATE OF t SKIP LOCKED) c
             LIMIT $2)
         UPDATE tasks t SET due_at = NULL, relayed_at = now(), dispatched_at = NULL
         FROM due, runs r
         WHERE t.id = due.id AND r.id = t.run_id
         RETURNING t.id, t.run_id, t.step_id, t.attempt, t.queue, t.priority, t.input, r.definition,
                   r.trace_id AS run_trace_id, t.rate_group"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(namespace)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// A task whose start waits: sent back to the timer, due after `delay`.
#[derive(Debug, Clone, PartialEq)]
pub struct Deferral {
    /// The task.
    pub task_id: Uuid,
    /// The attempt that waits; the task moves only if it is still at this attempt.
    pub attempt: i32,
    /// How long it waits.
    pub delay: std::time::Duration,
}

/// Sends tasks back to the timer, each due after its delay: a start over its rate limit, or
/// one that could not be checked. Nothing else of the task changes (its attempt stays); fenced
/// like completions, only a task still queued at that attempt moves. Not dispatched any more,
/// the task is claimed again by the timer only ([`claim_due`]), not by the relay.
pub async fn defer_tasks(
    conn: &mut PgConnection,
    deferrals: &[Deferral],
) -> Result<(), StoreError> {
    if deferrals.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = deferrals.iter().map(|d| d.task_id).collect();
    let attempts: Vec<i32> = deferrals.iter().map(|d| d.attempt).collect();
    let delays: Vec<f64> = deferrals.iter().map(|d| d.delay.as_secs_f64()).collect();
    sqlx::query(
        "UPDATE tasks SET due_at = now() + make_interval(secs => d.delay), dispatched_at = NULL,
                relayed_at = NULL
         FROM UNNEST($1::uuid[], $2::integer[], $3::float8[]) AS d(id, attempt, delay)
         WHERE tasks.id = d.id AND tasks.attempt = d.attempt AND tasks.status = 'queued'",
    )
    .bind(ids)
    .bind(attempts)
    .bind(delays)
    .execute(conn)
    .await?;
    Ok(())
}
