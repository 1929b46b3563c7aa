//! `/v1/tenants` (scope `admin`): each tenant's quotas on submissions.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{ApiError, AppState, JsonBody};
use crate::auth::{self, Principal, Scope};
use crate::store::{self, Owner, QuotaRow};

/// The largest quota accepted, of either kind.
const MAX_QUOTA: i32 = 1_000_000;

/// The body of `PUT /v1/tenants/{name}`: each quota, or `null` (or absent) for no limit.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"submissions_per_s": 500, "runs_in_flight": 10000}))]
pub struct QuotaRequest {
    /// Runs and jobs the tenant may submit per second, across the schedulers.
    #[serde(default)]
    #[schema(value_type = Option<i32>, minimum = 1, maximum = 1_000_000)]
    submissions_per_s: Value,
    /// Runs and jobs of the tenant that may be unfinished at once.
    #[serde(default)]
    #[schema(value_type = Option<i32>, minimum = 1, maximum = 1_000_000)]
    runs_in_flight: Value,
}

/// A tenant's quotas.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TenantQuota {
    /// The tenant.
    tenant: String,
    /// Runs and jobs it may submit per second; null for no limit.
    #[schema(required = true)]
    submissions_per_s: Option<i32>,
    /// Runs and jobs of it that may be unfinished at once; null for no limit.
    #[schema(required = true)]
    runs_in_flight: Option<i32>,
    /// When the quotas were last set (in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<DateTime<Utc>>,
}

/// The tenants that have quotas.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantList {
    /// The tenants, by name.
    tenants: Vec<TenantQuota>,
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

fn quota_view(tenant: String, quota: QuotaRow, updated_at: Option<DateTime<Utc>>) -> TenantQuota {
    TenantQuota {
        tenant,
        submissions_per_s: quota.submissions_per_s,
        runs_in_flight: quota.runs_in_flight,
        updated_at,
    }
}

/// Sets a tenant's quotas; every scheduler applies them within a second.
#[utoipa::path(put, path = "/v1/tenants/{name}", operation_id = "setTenantQuotas", tag = "admin",
    params(("name" = String, Path, description = "The tenant", pattern = "^[A-Za-z0-9_.-]{1,64}$")),
    request_body = QuotaRequest,
    responses((status = 200, description = "The tenant's quotas", body = TenantQuota)))]
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant): Path<String>,
    JsonBody(request): JsonBody<QuotaRequest>,
) -> Result<Json<TenantQuota>, ApiError> {
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
    let view = quota_view(tenant.clone(), row, None);
    super::keys::record(
        &state,
        &principal,
        "tenant.quota",
        Some(tenant),
        serde_json::to_value(&view).ok(),
    )
    .await;
    Ok(Json(view))
}

/// The tenants that have quotas, by name.
#[utoipa::path(get, path = "/v1/tenants", operation_id = "listTenants", tag = "admin",
    responses((status = 200, description = "The tenants' quotas", body = TenantList)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<TenantList>, ApiError> {
    principal.require(Scope::Admin)?;
    let rows = store::list_quotas(&state.db, state.config.namespace.as_str()).await?;
    let tenants = rows
        .into_iter()
        .map(|row| quota_view(row.tenant, row.quota, Some(row.updated_at)))
        .collect();
    Ok(Json(TenantList { tenants }))
}
