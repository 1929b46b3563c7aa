//! Registered workflow definitions: registering a version (a new one only when the definition
//! changed) and reading them back. A run keeps its own copy of the definition it started with,
//! so a new version never changes a run already started.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::types::Json;

use super::{Owner, StoreError};

/// A registered workflow version.
#[derive(Debug, sqlx::FromRow)]
pub struct WorkflowRow {
    /// Its name.
    pub name: String,
    /// Its version, from 1.
    pub version: i32,
    /// The definition.
    pub definition: Json<Value>,
    /// When this version was registered.
    pub created_at: DateTime<Utc>,
}

/// Registers `definition` under `name` and returns its version: the latest version if the
/// definition is unchanged, else a new one.
pub async fn put_workflow(
    db: &PgPool,
    owner: Owner<'_>,
    name: &str,
    definition: &Value,
) -> Result<(i32, bool), StoreError> {
    let mut tx = db.begin().await?;
    // Serialises concurrent registrations of one name, so versions never collide.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext('workflow:' || $1 || ':' || $3 || ':' || $2))",
    )
    .bind(owner.namespace)
    .bind(name)
    .bind(owner.tenant)
    .execute(&mut *tx)
    .await?;
    let latest: Option<(i32, Json<Value>)> = sqlx::query_as(
        "SELECT version, definition FROM workflows
         WHERE namespace = $1 AND tenant = $3 AND name = $2
         ORDER BY version DESC LIMIT 1",
    )
    .bind(owner.namespace)
    .bind(name)
    .bind(owner.tenant)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((version, Json(existing))) = &latest
        && existing == definition
    {
        return Ok((*version, false));
    }
    let version = latest.map_or(1, |(version, _)| version + 1);
    sqlx::query(
        "INSERT INTO workflows (namespace, name, version, definition, tenant)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(owner.namespace)
    .bind(name)
    .bind(version)
    .bind(Json(definition))
    .bind(owner.tenant)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((version, true))
}

/// Returns one version of a workflow (the latest if `version` is `None`).
pub async fn get_workflow(
    db: impl sqlx::PgExecutor<'_>,
    owner: Owner<'_>,
    name: &str,
    version: Option<i32>,
) -> Result<Option<WorkflowRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT name, version, definition, created_at FROM workflows
         WHERE namespace = $1 AND tenant = $4 AND name = $2
           AND ($3::integer IS NULL OR version = $3)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(owner.namespace)
    .bind(name)
    .bind(version)
    .bind(owner.tenant)
    .fetch_optional(db)
    .await?)
}

/// Returns the latest version of every workflow, by name.
pub async fn list_workflows(db: &PgPool, owner: Owner<'_>) -> Result<Vec<WorkflowRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT ON (name) name, version, definition, created_at FROM workflows
         WHERE namespace = $1 AND tenant = $2 ORDER BY name, version DESC",
    )
    .bind(owner.namespace)
    .bind(owner.tenant)
    .fetch_all(db)
    .await?)
}
