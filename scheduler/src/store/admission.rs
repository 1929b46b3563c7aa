//! Concurrency permits: admitting the tasks that wait for one, a group at a time, and finding
//! the groups whose waiters could be admitted.
//!
//! A task of a step with a `concurrency` limit names its group and the limit. It holds a permit
//! while it is queued and admitted (`admitted_at` set), through its retries, until it finishes
//! or is cancelled; it waits while it is queued and not admitted (`due_at` 'infinity', so
//! neither the timer nor the relay sends it). Only [`admit`] makes holders, under a
//! transaction-scoped advisory lock on its group, so two schedulers never admit into one group
//! at once. Every other write only ends holders, so a count can only be too high, which admits
//! too few for a moment, never too many.

use sqlx::PgPool;

use super::StoreError;

/// Admits the waiting tasks of `group` in `namespace` that the group's free permits allow, in
/// its own transaction, and returns how many it admitted. The waiters admitted are those whose
/// delay is over (`ready_at`) and whose run is running, highest priority first and oldest first
/// within a priority; they are made due at once, so the timer dispatches them. The limit is the
/// first waiter's (a new version of a workflow may change it; the group then follows its
/// newest waiters in order).
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
    // Holders are counted through `tasks_admitted_by_group`, waiters read in admission order
    // from `tasks_waiting_by_group`; each candidate's run is read by its id. Rows another
    // transaction holds (a run being cancelled) are passed over rather than waited for: the
    // next admission of the group sees them as they end.
    let admitted = sqlx::query(
        "WITH limits AS (
             SELECT greatest(
                 (SELECT concurrency_limit FROM tasks
                  WHERE namespace = $1 AND concurrency_group = $2 AND status = 'queued'
                    AND concurrency_group IS NOT NULL AND admitted_at IS NULL
                  ORDER BY priority DESC, id LIMIT 1)
                 - (SELECT count(*) FROM tasks
                    WHERE namespace = $1 AND concurrency_group = $2 AND status = 'queued'
                      AND concurrency_group IS NOT NULL AND admitted_at IS NOT NULL),
                 0) AS free),
         admitted AS (
             SELECT t.id FROM tasks t
             WHERE t.namespace = $1 AND t.concurrency_group = $2 AND t.status = 'queued'
               AND t.concurrency_group IS NOT NULL AND t.admitted_at IS NULL
               AND t.ready_at <= now()
               AND (SELECT r.status = 'running' FROM runs r WHERE r.id = t.run_id)
             ORDER BY t.priority DESC, t.id
             LIMIT (SELECT free FROM limits)
             FOR UPDATE OF t SKIP LOCKED)
         UPDATE tasks t SET admitted_at = now(), due_at = now()
         FROM admitted
         WHERE t.id = admitted.id",
    )
    .bind(namespace)
    .bind(group)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(admitted)
}

/// Returns up to `limit` groups of `namespace` after `after` (in their order; from the first
/// with an empty `after`) that have a waiter ready to be admitted (its
/// delay over, its run running) and fewer holders than their limit: the groups [`admit`]
/// would admit into now. The groups with waiters are found by a loose scan of
/// `tasks_waiting_by_group` (one probe per group, however many tasks wait in it); each is then
/// checked by its first ready waiter and its holders.
pub async fn groups_to_admit(
    db: &PgPool,
    namespace: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE waiting(concurrency_group) AS (
             (SELECT concurrency_group FROM tasks
              WHERE namespace = $1 AND status = 'queued' AND concurrency_group IS NOT NULL
                AND admitted_at IS NULL AND concurrency_group > $3
              ORDER BY concurrency_group LIMIT 1)
             UNION ALL
             SELECT (SELECT t.concurrency_group FROM tasks t
                     WHERE t.namespace = $1 AND t.status = 'queued'
                       AND t.concurrency_group IS NOT NULL AND t.admitted_at IS NULL
                       AND t.concurrency_group > w.concurrency_group
                     ORDER BY t.concurrency_group LIMIT 1)
             FROM waiting w WHERE w.concurrency_group IS NOT NULL)
         SELECT w.concurrency_group FROM waiting w
         WHERE w.concurrency_group IS NOT NULL
           AND EXISTS (
               SELECT 1 FROM tasks t
               WHERE t.namespace = $1 AND t.concurrency_group = w.concurrency_group
                 AND t.status = 'queued' AND t.concurrency_group IS NOT NULL
                 AND t.admitted_at IS NULL AND t.ready_at <= now()
                 AND (SELECT r.status = 'running' FROM runs r WHERE r.id = t.run_id))
           AND (SELECT count(*) FROM tasks h
                WHERE h.namespace = $1 AND h.concurrency_group = w.concurrency_group
                  AND h.status = 'queued' AND h.concurrency_group IS NOT NULL
                  AND h.admitted_at IS NOT NULL)
               < (SELECT t.concurrency_limit FROM tasks t
                  WHERE t.namespace = $1 AND t.concurrency_group = w.concurrency_group
                    AND t.status = 'queued' AND t.concurrency_group IS NOT NULL
                    AND t.admitted_at IS NULL
                  ORDER BY t.priority DESC, t.id LIMIT 1)
         LIMIT $2",
    )
    .bind(namespace)
    .bind(limit)
    .bind(after)
    .fetch_all(db)
    .await?)
}
