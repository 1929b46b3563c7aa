//! API keys and the audit trail: keys are stored by the SHA-256 of their secret, never the
//! secret itself; audit events record what a key did.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreError;

/// A key as stored: everything but its secret.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    /// Its id, which names it in listings and revocations.
    pub id: Uuid,
    /// The tenant whose objects it reaches.
    pub tenant: String,
    /// What it may do.
    pub scopes: Vec<String>,
    /// What its maker said it is for.
    pub description: Option<String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it was last used (to within a minute).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The columns of a [`KeyRow`].
const KEY_COLUMNS: &str = "id, tenant, scopes, description, created_at, revoked_at, last_used_at";

/// A key to store.
#[derive(Debug)]
pub struct NewKey<'a> {
    /// Its id.
    pub id: Uuid,
    /// The SHA-256 of its secret.
    pub secret_hash: &'a [u8],
    /// Its tenant.
    pub tenant: &'a str,
    /// Its scopes.
    pub scopes: &'a [String],
    /// What it is for.
    pub description: Option<&'a str>,
    /// The key that made it (none for one made on the command line).
    pub created_by: Option<Uuid>,
}

/// Stores a new key.
pub async fn insert_key(db: &PgPool, namespace: &str, key: &NewKey<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO api_keys (id, namespace, secret_hash, tenant, scopes, description, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(key.id)
    .bind(namespace)
    .bind(key.secret_hash)
    .bind(key.tenant)
    .bind(key.scopes)
    .bind(key.description)
    .bind(key.created_by)
    .execute(db)
    .await?;
    Ok(())
}

/// Returns the key whose secret hashes to `secret_hash`, revoked or not.
pub async fn find_key(
    db: &PgPool,
    namespace: &str,
    secret_hash: &[u8],
) -> Result<Option<KeyRow>, StoreError> {
    let sql =
        format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = $1 AND namespace = $2");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(secret_hash)
        .bind(namespace)
        .fetch_optional(db)
        .await?)
}

/// Records that a key was used, at most once a minute per key.
pub async fn touch_key(db: &PgPool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE api_keys SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Lists the namespace's keys, oldest first.
pub async fn list_keys(db: &PgPool, namespace: &str) -> Result<Vec<KeyRow>, StoreError> {
    let sql =
        format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE namespace = $1 ORDER BY created_at, id");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(namespace)
        .fetch_all(db)
        .await?)
}

/// Revokes a key; returns it as it now is, or `None` when there is no such key. Revoking a
/// revoked key changes nothing.
pub async fn revoke_key(
    db: &PgPool,
    namespace: &str,
    id: Uuid,
) -> Result<Option<KeyRow>, StoreError> {
    let sql = format!(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
         WHERE id = $1 AND namespace = $2 RETURNING {KEY_COLUMNS}"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(namespace)
        .fetch_optional(db)
        .await?)
}

/// An event of the audit trail.
#[derive(Debug)]
pub struct AuditEvent<'a> {
    /// The key that acted (none for the command line, or with authentication off).
    pub key_id: Option<Uuid>,
    /// That key's tenant.
    pub tenant: &'a str,
    /// What it did: `key.create`, `key.revoke`, `run.cancel`, `job.cancel`, `tenant.quota`,
    /// `dead_letters.purge`.
    pub action: &'a str,
    /// What it did it to: a key's, run's or job's id, a tenant's name.
    pub target: Option<String>,
    /// More about it (never a secret or a payload).
    pub detail: Option<Value>,
}

/// Records an event of the audit trail.
pub async fn audit(db: &PgPool, namespace: &str, event: AuditEvent<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (id, namespace, key_id, tenant, action, target, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(Uuid::now_v7())
    .bind(namespace)
    .bind(event.key_id)
    .bind(event.tenant)
    .bind(event.action)
    .bind(event.target)
    .bind(event.detail.map(Json))
    .execute(db)
    .await?;
    Ok(())
}

/// An event of the audit trail as read back.
#[derive(Debug, sqlx::FromRow)]
pub struct AuditRow {
    /// Its id (time-ordered).
    pub id: Uuid,
    /// The key that acted.
    pub key_id: Option<Uuid>,
    /// That key's tenant.
    pub tenant: String,
    /// What it did.
    pub action: String,
    /// What it did it to.
    pub target: Option<String>,
    /// More about it.
    pub detail: Option<Json<Value>>,
    /// When.
    pub at: DateTime<Utc>,
}

/// Returns the namespace's audit events, newest first, older than `before` if given.
pub async fn list_audit(
    db: &PgPool,
    namespace: &str,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<AuditRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, key_id, tenant, action, target, detail, at FROM audit_events
         WHERE namespace = $1 AND ($2::uuid IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(namespace)
    .bind(before)
    .bind(limit)
    .fetch_all(db)
    .await?)
}
