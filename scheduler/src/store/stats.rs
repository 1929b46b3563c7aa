//! Counts over a whole namespace, for `/v1/stats`, `/v1/queues` and `/metrics`: the only
//! statements that may scan tables whole (those of `/metrics` read the queued tasks' own
//! indexes). Nothing on a run's path reads them.

use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;

/// Begins a transaction whose statements may scan tables whole: counts over a namespace read
/// most of its rows, which a sequential scan does faster than any index (the pool's
/// connections have `enable_seqscan` off; see [`connect`](super::connect)).
async fn scanning(db: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL enable_seqscan = on")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Returns counts of runs and of tasks by status, of one tenant or (with `None`) of all.
pub async fn stats(
    db: &PgPool,
    namespace: &str,
    tenant: Option<&str>,
) -> Result<(Vec<(String, i64)>, Vec<(String, i64)>), StoreError> {
    let mut tx = scanning(db).await?;
    let runs = sqlx::query_as(
        "SELECT status, count(*) FROM runs
         WHERE namespace = $1 AND ($2::text IS NULL OR tenant = $2) GROUP BY status",
    )
    .bind(namespace)
    .bind(tenant)
    .fetch_all(&mut *tx)
    .await?;
    let tasks = sqlx::query_as(
        "SELECT t.status, count(*) FROM tasks t JOIN runs r ON r.id = t.run_id
         WHERE r.namespace = $1 AND ($2::text IS NULL OR r.tenant = $2) GROUP BY t.status",
    )
    .bind(namespace)
    .bind(tenant)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((runs, tasks))
}

/// Returns the task queues of `namespace` that have tasks queued to run now (waiting in the
/// broker, held by a worker, or a moment from being published), leaving out retries and delays
/// waiting for their time and `for_each` steps waiting for their items.
pub async fn queues_with_queued_tasks(
    db: &PgPool,
    namespace: &str,
) -> Result<Vec<String>, StoreError> {
    let mut tx = scanning(db).await?;
    let queues = sqlx::query_scalar(
        "SELECT DISTINCT t.queue FROM tasks t JOIN runs r ON r.id = t.run_id
         WHERE r.namespace = $1 AND r.status = 'running' AND t.status = 'queued'
           AND t.due_at IS NULL AND t.items_total IS NULL",
    )
    .bind(namespace)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(queues)
}

/// Returns, per task queue of `namespace` with tasks queued to run now, the age in seconds of
/// its oldest such task, since it was last dispatched (or committed, if it was not yet). Reads
/// the queued tasks only, from their own index.
pub async fn queue_ages(db: &PgPool, namespace: &str) -> Result<Vec<(String, f64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT queue,
                extract(epoch FROM now() - min(coalesce(dispatched_at, created_at)))::float8
         FROM tasks
         WHERE namespace = $1 AND status = 'queued' AND due_at IS NULL AND items_total IS NULL
         GROUP BY queue",
    )
    .bind(namespace)
    .fetch_all(db)
    .await?)
}

/// Returns how many tasks of `namespace` are committed and not yet confirmed by the broker:
/// the outbox the relay drains.
pub async fn outbox_pending(db: &PgPool, namespace: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM tasks
         WHERE namespace = $1 AND status = 'queued' AND dispatched_at IS NULL
           AND due_at IS NULL AND items_total IS NULL",
    )
    .bind(namespace)
    .fetch_one(db)
    .await?)
}
