//! Per-tenant quotas, and the count of a tenant's runs in flight that one of them limits.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{Owner, StoreError};

/// A tenant's quotas; `None` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, sqlx::FromRow)]
pub struct QuotaRow {
    /// The most runs and jobs it may submit per second, across the fleet.
    pub submissions_per_s: Option<i32>,
    /// The most of its runs and jobs unfinished at once.
    pub runs_in_flight: Option<i32>,
}

/// A tenant's quotas as listed.
#[derive(Debug, sqlx::FromRow)]
pub struct TenantQuotaRow {
    /// The tenant.
    pub tenant: String,
    /// Its quotas.
    #[sqlx(flatten)]
    pub quota: QuotaRow,
    /// When they were last set.
    pub updated_at: DateTime<Utc>,
}

/// Sets a tenant's quotas.
pub async fn put_quota(db: &PgPool, owner: Owner<'_>, quota: QuotaRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tenant_quotas (namespace, tenant, submissions_per_s, runs_in_flight)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (namespace, tenant) DO UPDATE
         SET submissions_per_s = $3, runs_in_flight = $4, updated_at = now()",
    )
    .bind(owner.namespace)
    .bind(owner.tenant)
    .bind(quota.submissions_per_s)
    .bind(quota.runs_in_flight)
    .execute(db)
    .await?;
    Ok(())
}

/// Returns a tenant's quotas (none set: no limits).
pub async fn get_quota(
    db: impl sqlx::PgExecutor<'_>,
    owner: Owner<'_>,
) -> Result<QuotaRow, StoreError> {
    let row: Option<QuotaRow> = sqlx::query_as(
        "SELECT submissions_per_s, runs_in_flight FROM tenant_quotas
         WHERE namespace = $1 AND tenant = $2",
    )
    .bind(owner.namespace)
    .bind(owner.tenant)
    .fetch_optional(db)
    .await?;
    Ok(row.unwrap_or_default())
}

/// Lists the namespace's tenants with quotas, by name.
pub async fn list_quotas(db: &PgPool, namespace: &str) -> Result<Vec<TenantQuotaRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT tenant, submissions_per_s, runs_in_flight, updated_at FROM tenant_quotas
         WHERE namespace = $1 ORDER BY tenant",
    )
    .bind(namespace)
    .fetch_all(db)
    .await?)
}

/// Returns how many of a tenant's runs and jobs are unfinished, counting no further than
/// `up_to` (so the count costs no more than the quota it is checked against).
pub async fn runs_in_flight(
    db: impl sqlx::PgExecutor<'_>,
    owner: Owner<'_>,
    up_to: i64,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM runs
             WHERE namespace = $1 AND tenant = $2 AND status IN ('pending', 'running')
             LIMIT $3) AS unfinished",
    )
    .bind(owner.namespace)
    .bind(owner.tenant)
    .bind(up_to)
    .fetch_one(db)
    .await?)
}
