//! `/v1/tenants` (scope `admin`): each tenant's quotas on submissions.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, JsonBody};
use crate::auth::{self, Principal, Scope};
use crate::store::{self, Owner, QuotaRow};

/// The largest quota accepted, of either kind.
const MAX_QUOTA: i32 = 1_000_000;

/// The body of `PUT /v1/tenants/{name}`: each quota, or `null` (or absent) for no limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    #[serde(default)]
    submissions_per_s: Value,
    #[serde(default)]
    runs_in_flight: Value,
}

/// Returns a quota checked to be a whole number from 1 to [`MAX_QUOTA`] (or `null`: none), or
/// the 400 naming the field.
fn quota(field: &str, value: &Value) -> Result<Option<i32>, ApiError> {
    if value.is_null() {
        return Ok(None);
    }
    value
        .as_i64()
        .and_then(|number| i32::try_from(number).ok())
        .filter(|number| (1..=MAX_QUOTA).contains(number))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{field} must be a whole number from 1 to {MAX_QUOTA}, or null for no limit; got {value}"
            ))
        })
}

fn quota_view(tenant: &str, quota: QuotaRow) -> Value {
    json!({
        "tenant": tenant,
        "submissions_per_s": quota.submissions_per_s,
        "runs_in_flight": quota.runs_in_flight,
    })
}

/// `PUT /v1/tenants/{name}`: sets a tenant's quotas; every scheduler applies them within a
/// second.
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant): Path<String>,
    JsonBody(request): JsonBody<QuotaRequest>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::Admin)?;
    auth::check_tenant(&tenant).map_err(ApiError::bad_request)?;
    let row = QuotaRow {
        submissions_per_s: quota("submissions_per_s", &request.submissions_per_s)?,
        runs_in_flight: quota("runs_in_flight", &request.runs_in_flight)?,
    };
    let owner = Owner {
        namespace: state.config.namespace.as_str(),
        tenant: &tenant,
    };
    store::put_quota(&state.db, owner, row).await?;
    let view = quota_view(&tenant, row);
    super::keys::record(
        &state,
        &principal,
        "tenant.quota",
        Some(tenant.clone()),
        Some(view.clone()),
    )
    .await;
    Ok(Json(view))
}

/// `GET /v1/tenants`: the tenants that have quotas, by name.
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::Admin)?;
    let rows = store::list_quotas(&state.db, state.config.namespace.as_str()).await?;
    let tenants: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let mut view = quota_view(&row.tenant, row.quota);
            view["updated_at"] = json!(row.updated_at);
            view
        })
        .collect();
    Ok(Json(json!({ "tenants": tenants })))
}
