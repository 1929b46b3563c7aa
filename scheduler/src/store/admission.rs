//! Concurrency permits: admitting the tasks that wait for one, a group at a time, and finding
//! the groups whose waiters could be admitted.
//!
//! A task of a step with a `concurrency` limit names its group and the limit. It holds a permit
//! while it is queued and admitted (`admitted_at` set), through its retries, until it finishes;
//! cancelled, it holds it for [`STOP_GRACE`] more, as its attempt may still run on a worker. It
//! waits while it is queued and not admitted (`due_at` 'infinity', so neither the timer nor the
//! relay sends it). Only [`admit`] makes holders, under a transaction-scoped advisory lock on
//! its group, so two schedulers never admit into one group at once. Every other write only
//! ends holders (a re-run that deletes a cancelled holder within its grace keeps its permit in
//! `lingering_permits`), so a count can only be too high, which admits too few for a moment,
//! never too many.
//!
//! Tasks of one group may have different limits (a new version of a workflow may change it;
//! all of a tenant's jobs of one step id share a group): no task is admitted while it would run
//! with more tasks of its group than its own limit, or than the limit of any task holding a
//! permit, allows.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;

/// How long an admitted task that was cancelled keeps its permit after the cancel. Its attempt
/// may be running on a worker when the run is cancelled (by a request, its timeout or another
/// step failing it): the worker hears of the cancel within about a second, interrupts a Python
/// step and, if it has not ended within `python_kill_grace` (2 s by default), kills its
/// process. Five seconds cover both with room to spare, so the next waiter of the group starts
/// only once the cancelled attempt has stopped (a worker configured with a longer kill grace,
/// or cut off from Redis, can outlast it).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The permits held in group `grp.name` of namespace `$1`, with the lowest limit among their
/// holders (NULL without any), for a grace of `$3` seconds: tasks queued and admitted, admitted
/// tasks cancelled within the grace (a range of `tasks_stopping_by_group`) and permits a re-run
/// kept (`lingering_permits`). A fragment for a `LATERAL` join that has `grp` in scope.
const HOLDERS: &str = "
    SELECT count(*) AS held, min(h.concurrency_limit) AS lowest FROM (
        SELECT concurrency_limit FROM tasks
        WHERE namespace = $1 AND concurrency_group = grp.name AND status = 'queued'
          AND concurrency_group IS NOT NULL AND admitted_at IS NOT NULL
        UNION ALL
        SELECT concurrency_limit FROM tasks
        WHERE namespace = $1 AND concurrency_group = grp.name AND status = 'cancelled'
          AND concurrency_group IS NOT NULL AND admitted_at IS NOT NULL
          AND finished_at > now() - make_interval(secs => $3)
        UNION ALL
        SELECT concurrency_limit FROM lingering_permits
        WHERE namespace = $1 AND concurrency_group = grp.name AND until > now()) h";

/// The first waiter of group `grp.name` of namespace `$1` that could be admitted now (its delay
/// over, its run running), in admission order, with its limit. A fragment like [`HOLDERS`].
const FIRST_READY: &str = "
    SELECT t.concurrency_limit FROM tasks t
    WHERE t.namespace = $1 AND t.concurrency_group = grp.name AND t.status = 'queued'
      AND t.concurrency_group IS NOT NULL AND t.admitted_at IS NULL AND t.ready_at <= now()
      AND (SELECT r.status = 'running' FROM runs r WHERE r.id = t.run_id)
    ORDER BY t.priority DESC, t.id LIMIT 1";

/// Admits the waiting tasks of `group` in `namespace` that the group's free permits allow, in
/// its own transaction, and returns how many it admitted. The waiters that could be admitted
/// are those whose delay is over (`ready_at`) and whose run is running, highest priority first
/// and oldest first within a priority; of them, it admits the longest prefix in that order in
/// which each task, counted with the holders and the tasks before it, is within its own limit,
/// the limits of the tasks before it and those of the holders (the running minimum). The
/// admitted are made due at once, so the timer dispatches them.
pub async fn admit(db: &PgPool, namespace: &str, group: &str) -> Result<u64, StoreError> {
    let mut tx = db.begin().await?;
    // The lock comes in a statement of its own: under READ COMMITTED the next statement takes
    // its snapshot once the lock is granted, so its count of holders sees every admission
    // committed before, including the one whose commit released the lock.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 7302))")
        .bind(namespace)
        .bind(group)
        .execute(&mut *tx)
        .await?;
    // Holders are counted through `tasks_admitted_by_group` and `tasks_stopping_by_group`,
    // waiters read in admission order from `tasks_waiting_by_group`; each candidate's run is
    // read by its id. Rows another transaction holds (a run being cancelled) are passed over
    // rather than waited for: the next admission of the group sees them as they end. The
    // candidates are locked first, at most as many as the first ready waiter's limit leaves
    // (a bound only: the prefix is decided by the running minimum over those locked), and
    // ranked after, since a locking SELECT cannot hold window functions.
    let sql = format!(
        "WITH grp AS (SELECT $2::text AS name),
         holders AS MATERIALIZED (SELECT h.held, h.lowest FROM grp CROSS JOIN LATERAL ({HOLDERS}) h),
         bound AS (
             SELECT greatest(least(f.concurrency_limit, h.lowest) - h.held, 0) AS most
             FROM grp CROSS JOIN LATERAL ({FIRST_READY}) f CROSS JOIN holders h),
         candidates AS (
             SELECT t.id, t.priority, t.concurrency_limit FROM tasks t
             WHERE t.namespace = $1 AND t.concurrency_group = $2 AND t.status = 'queued'
               AND t.concurrency_group IS NOT NULL AND t.admitted_at IS NULL
               AND t.ready_at <= now()
               AND (SELECT r.status = 'running' FROM runs r WHERE r.id = t.run_id)
             ORDER BY t.priority DESC, t.id
             LIMIT coalesce((SELECT most FROM bound), 0)
             FOR UPDATE OF t SKIP LOCKED),
         ranked AS (
             SELECT c.id, row_number() OVER w AS rank, min(c.concurrency_limit) OVER w AS lowest
             FROM candidates c
             WINDOW w AS (ORDER BY c.priority DESC, c.id
                          ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW))
         UPDATE tasks t SET admitted_at = now(), due_at = now()
         FROM ranked r CROSS JOIN holders h
         WHERE t.id = r.id AND h.held + r.rank <= least(r.lowest, coalesce(h.lowest, r.lowest))"
    );
    let admitted = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(namespace)
        .bind(group)
        .bind(STOP_GRACE.as_secs_f64())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(admitted)
}

/// A claimed look of the backstop: the namespace's lock on it is held until [`Self::finish`]
/// (or until it is dropped).
pub struct BackstopRound(Transaction<'static, Postgres>);

impl BackstopRound {
    /// Ends the look, releasing the namespace's lock on it.
    pub async fn finish(self) -> Result<(), StoreError> {
        Ok(self.0.commit().await?)
    }
}

/// Claims the backstop's look for groups to admit into of `namespace`, unless another
/// scheduler looks now or one looked less than `every` ago (then `None`), so that a fleet of
/// schedulers looks about as often as one does. A claim also forgets the namespace's
/// `lingering_permits` that have expired.
pub async fn claim_backstop_round(
    db: &PgPool,
    namespace: &str,
    every: Duration,
) -> Result<Option<BackstopRound>, StoreError> {
    let mut tx = db.begin().await?;
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(7304, hashtext($1))")
        .bind(namespace)
        .fetch_one(&mut *tx)
        .await?;
    if !held {
        return Ok(None);
    }
    let claimed: Option<bool> = sqlx::query_scalar(
        "INSERT INTO admission_backstop AS b (namespace, last_round_at) VALUES ($1, now())
         ON CONFLICT (namespace) DO UPDATE SET last_round_at = excluded.last_round_at
         WHERE b.last_round_at <= now() - make_interval(secs => $2)
         RETURNING true",
    )
    .bind(namespace)
    .bind(every.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_none() {
        return Ok(None);
    }
    sqlx::query("DELETE FROM lingering_permits WHERE namespace = $1 AND until <= now()")
        .bind(namespace)
        .execute(&mut *tx)
        .await?;
    Ok(Some(BackstopRound(tx)))
}

/// Returns up to `limit` groups of `namespace` after `after` (in their order; from the first
/// with an empty `after`) into which [`admit`] would admit now: whose first waiter ready to be
/// admitted (its delay over, its run running) fits, with the holders, within its own limit and
/// those of the holders. The groups with waiters are found by a loose scan of
/// `tasks_waiting_by_group` (one probe per group, however many tasks wait in it); each is then
/// checked by its first ready waiter and its holders, counted as [`admit`] counts them.
pub async fn groups_to_admit(
    db: &PgPool,
    namespace: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let sql = format!(
        "WITH RECURSIVE waiting(concurrency_group) AS (
             (SELECT concurrency_group FROM tasks
              WHERE namespace = $1 AND status = 'queued' AND concurrency_group IS NOT NULL
                AND admitted_at IS NULL AND concurrency_group > $2
              ORDER BY concurrency_group LIMIT 1)
             UNION ALL
             SELECT (SELECT t.concurrency_group FROM tasks t
                     WHERE t.namespace = $1 AND t.status = 'queued'
                       AND t.concurrency_group IS NOT NULL AND t.admitted_at IS NULL
                       AND t.concurrency_group > w.concurrency_group
                     ORDER BY t.concurrency_group LIMIT 1)
             FROM waiting w WHERE w.concurrency_group IS NOT NULL)
         SELECT grp.name FROM waiting w
         CROSS JOIN LATERAL (SELECT w.concurrency_group AS name) grp
         CROSS JOIN LATERAL ({FIRST_READY}) f
         CROSS JOIN LATERAL ({HOLDERS}) h
         WHERE w.concurrency_group IS NOT NULL
           AND h.held + 1 <= least(f.concurrency_limit, coalesce(h.lowest, f.concurrency_limit))
         LIMIT $4"
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(namespace)
        .bind(after)
        .bind(STOP_GRACE.as_secs_f64())
        .bind(limit)
        .fetch_all(db)
        .await?)
}
