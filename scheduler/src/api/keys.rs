//! `/v1/keys` and `/v1/audit` (scope `admin`): making, listing and revoking API keys, and the
//! audit trail of what keys did.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, JsonBody, QueryParams};
use crate::auth::{self, Principal, Scope};
use crate::store::{self, KeyRow};

/// The longest description a key may carry.
const MAX_DESCRIPTION_LEN: usize = 1000;

/// The body of `POST /v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    tenant: String,
    scopes: Vec<String>,
    description: Option<String>,
}

/// `POST /v1/keys`: makes a key; its secret is in this answer and nowhere else.
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(request): JsonBody<NewKeyRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
        Json(json!({
            "id": secret.id,
            "key": secret.secret,
            "tenant": request.tenant,
            "scopes": names,
            "description": request.description,
        })),
    ))
}

/// A key as listings show it: never its secret, which is not stored.
fn key_view(row: &KeyRow) -> Value {
    json!({
        "id": row.id,
        "tenant": row.tenant,
        "scopes": row.scopes,
        "description": row.description,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
    })
}

/// `GET /v1/keys`: every key of the namespace, oldest first, without secrets.
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::Admin)?;
    let rows = store::list_keys(&state.db, state.config.namespace.as_str()).await?;
    let keys: Vec<Value> = rows.iter().map(key_view).collect();
    Ok(Json(json!({ "keys": keys })))
}

/// `DELETE /v1/keys/{id}`: revokes a key; every scheduler refuses it within a second.
pub async fn revoke(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(key_view(&row)))
}

/// The query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/audit`: what keys did, newest first, with cursor pagination.
pub async fn audit(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::Admin)?;
    let (limit, before) = super::page(query.limit, query.cursor.as_deref(), 100)?;
    let rows = store::list_audit(&state.db, state.config.namespace.as_str(), before, limit).await?;
    let next_cursor = super::next_cursor(rows.len(), limit, rows.last().map(|row| row.id));
    let events: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            json!({
                "id": row.id,
                "at": row.at,
                "key_id": row.key_id,
                "tenant": row.tenant,
                "action": row.action,
                "target": row.target,
                "detail": row.detail.map(|detail| detail.0),
            })
        })
        .collect();
    Ok(Json(json!({"events": events, "next_cursor": next_cursor})))
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
