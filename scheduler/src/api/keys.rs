//! `/v1/keys` and `/v1/audit` (scope `admin`): making, listing and revoking API keys, and the
//! audit trail of what keys did.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{ApiError, AppState, JsonBody, QueryParams};
use crate::auth::{self, Principal, Scope};
use crate::store::{self, KeyRow};

/// The longest description a key may carry.
const MAX_DESCRIPTION_LEN: usize = 1000;

/// The body of `POST /v1/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"tenant": "team-a", "scopes": ["runs:read", "runs:write"], "description": "the nightly import"}))]
pub struct NewKeyRequest {
    /// The tenant whose objects the key reaches.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    tenant: String,
    /// What the key may do; at least one.
    #[schema(value_type = Vec<Scope>, min_items = 1)]
    scopes: Vec<String>,
    /// What the key is for, shown in listings.
    #[schema(max_length = 1000)]
    description: Option<String>,
}

/// A new key, with its secret: this answer is the only place the secret appears.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewKey {
    /// The key's id.
    id: Uuid,
    /// The secret to send as `Authorization: Bearer <key>`.
    key: String,
    /// Its tenant.
    tenant: String,
    /// Its scopes.
    scopes: Vec<Scope>,
    /// Its description.
    #[schema(required = true)]
    description: Option<String>,
}

/// An API key, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    /// The key's id.
    id: Uuid,
    /// Its tenant.
    tenant: String,
    /// Its scopes.
    #[schema(value_type = Vec<Scope>)]
    scopes: Vec<String>,
    /// Its description.
    #[schema(required = true)]
    description: Option<String>,
    /// When it was made.
    created_at: DateTime<Utc>,
    /// When it was last used (to the minute).
    #[schema(required = true)]
    last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    #[schema(required = true)]
    revoked_at: Option<DateTime<Utc>>,
}

/// The namespace's API keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// The keys, oldest first.
    keys: Vec<KeyView>,
}

/// Makes a key; its secret is in this answer and nowhere else.
#[utoipa::path(post, path = "/v1/keys", operation_id = "createKey", tag = "admin", request_body = NewKeyRequest,
    responses((status = 201, description = "The new key", body = NewKey)))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(request): JsonBody<NewKeyRequest>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    principal.require(Scope::Admin)?;
    auth::check_tenant(&request.tenant).map_err(ApiError::bad_request)?;
    let scopes = auth::parse_scopes(&request.scopes).map_err(ApiError::bad_request)?;
    if let Some(description) = &request.description
        && (description.chars().count() > MAX_DESCRIPTION_LEN
            || description.chars().any(|c| c == '\0'))
    {
        return Err(ApiError::bad_request(format!(
            "description must be at most {MAX_DESCRIPTION_LEN} characters, without NUL"
        )));
    }
    let secret = auth::create_key(
        &state.db,
        state.config.namespace.as_str(),
        &request.tenant,
        &scopes,
        request.description.as_deref(),
        principal.key_id,
    )
    .await?;
    let names: Vec<&str> = scopes.iter().map(|scope| scope.as_str()).collect();
    record(
        &state,
        &principal,
        "key.create",
        Some(secret.id.to_string()),
        Some(json!({"tenant": request.tenant, "scopes": names})),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(NewKey {
            id: secret.id,
            key: secret.secret,
            tenant: request.tenant,
            scopes,
            description: request.description,
        }),
    ))
}

/// A key as listings show it: never its secret, which is not stored.
fn key_view(row: KeyRow) -> KeyView {
    KeyView {
        id: row.id,
        tenant: row.tenant,
        scopes: row.scopes,
        description: row.description,
        created_at: row.created_at,
        last_used_at: row.last_used_at,
        revoked_at: row.revoked_at,
    }
}

/// Every key of the namespace, oldest first, without secrets.
#[utoipa::path(get, path = "/v1/keys", operation_id = "listKeys", tag = "admin",
    responses((status = 200, description = "The keys", body = KeyList)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<KeyList>, ApiError> {
    principal.require(Scope::Admin)?;
    let rows = store::list_keys(&state.db, state.config.namespace.as_str()).await?;
    let keys = rows.into_iter().map(key_view).collect();
    Ok(Json(KeyList { keys }))
}

/// Revokes a key; every scheduler refuses it within a second.
#[utoipa::path(delete, path = "/v1/keys/{id}", operation_id = "revokeKey", tag = "admin",
    params(("id" = Uuid, Path, description = "The key's id")),
    responses((status = 200, description = "The revoked key", body = KeyView)))]
pub async fn revoke(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    principal.require(Scope::Admin)?;
    let not_found = || ApiError::not_found(format!("no API key with id {id:?}"));
    let key_id: Uuid = id.parse().map_err(|_| not_found())?;
    let row = store::revoke_key(&state.db, state.config.namespace.as_str(), key_id)
        .await?
        .ok_or_else(not_found)?;
    record(
        &state,
        &principal,
        "key.revoke",
        Some(key_id.to_string()),
        None,
    )
    .await;
    Ok(Json(key_view(row)))
}

/// The query of `GET /v1/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The most events on the page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next_cursor` of the page before.
    #[param(value_type = Option<Uuid>)]
    cursor: Option<String>,
}

/// A page of the audit trail, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// The events.
    events: Vec<AuditEventView>,
    /// The cursor of the next page; null on the last page.
    #[schema(required = true)]
    next_cursor: Option<Uuid>,
}

/// Something a key did.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventView {
    /// The event's id.
    id: Uuid,
    /// When.
    at: DateTime<Utc>,
    /// The key that did it; null with authentication off or for `create-key`.
    #[schema(required = true)]
    key_id: Option<Uuid>,
    /// The key's tenant.
    tenant: String,
    /// What was done: `key.create`, `key.revoke`, `tenant.quota`, `run.cancel`, `job.cancel`,
    /// `dead_letters.purge`.
    action: String,
    /// What it was done to.
    #[schema(required = true)]
    target: Option<String>,
    /// More about it.
    #[schema(value_type = Option<Object>, required = true)]
    detail: Option<Value>,
}

/// What keys did, newest first, with cursor pagination.
#[utoipa::path(get, path = "/v1/audit", operation_id = "listAuditEvents", tag = "admin", params(AuditQuery),
    responses((status = 200, description = "A page of the audit trail", body = AuditPage)))]
pub async fn audit(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    principal.require(Scope::Admin)?;
    let (limit, before) = super::page(query.limit, query.cursor.as_deref(), 100)?;
    let rows = store::list_audit(&state.db, state.config.namespace.as_str(), before, limit).await?;
    let next_cursor = super::next_cursor(rows.len(), limit, rows.last().map(|row| row.id));
    let events = rows
        .into_iter()
        .map(|row| AuditEventView {
            id: row.id,
            at: row.at,
            key_id: row.key_id,
            tenant: row.tenant,
            action: row.action,
            target: row.target,
            detail: row.detail.map(|detail| detail.0),
        })
        .collect();
    Ok(Json(AuditPage {
        events,
        next_cursor,
    }))
}

/// Records what a caller did in the audit trail. The action already happened, so a failure to
/// record it is logged rather than answered.
pub async fn record(
    state: &AppState,
    principal: &Principal,
    action: &str,
    target: Option<String>,
    detail: Option<Value>,
) {
    let event = store::AuditEvent {
        key_id: principal.key_id,
        tenant: &principal.tenant,
        action,
        target,
        detail,
    };
    if let Err(error) = store::audit(&state.db, state.config.namespace.as_str(), event).await {
        tracing::warn!(%error, action, "recording an audit event");
    }
}
