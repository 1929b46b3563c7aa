//! Each queue's settings (`PUT /v1/queues/{name}`): its rate limit across the fleet.

use sqlx::PgPool;

use super::StoreError;

/// A queue's settings as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QueueSettings {
    /// The queue.
    pub queue: String,
    /// Its rate limit, in starts per second, for every task sent to it.
    pub rate_limit_per_s: Option<f64>,
    /// When they were last set.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Sets a queue's settings and returns them.
pub async fn set_queue_settings(
    db: &PgPool,
    namespace: &str,
    queue: &str,
    rate_limit_per_s: Option<f64>,
) -> Result<QueueSettings, StoreError> {
    Ok(sqlx::query_as(
        "INSERT INTO queue_settings (namespace, queue, rate_limit_per_s)
         VALUES ($1, $2, $3)
         ON CONFLICT (namespace, queue)
         DO UPDATE SET rate_limit_per_s = EXCLUDED.rate_limit_per_s, updated_at = now()
         RETURNING queue, rate_limit_per_s, updated_at",
    )
    .bind(namespace)
    .bind(queue)
    .bind(rate_limit_per_s)
    .fetch_one(db)
    .await?)
}

/// Returns the settings of every queue of `namespace` that has any, by queue name.
pub async fn queue_settings(
    db: &PgPool,
    namespace: &str,
) -> Result<Vec<QueueSettings>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT queue, rate_limit_per_s, updated_at FROM queue_settings
         WHERE namespace = $1 ORDER BY queue",
    )
    .bind(namespace)
    .fetch_all(db)
    .await?)
}
