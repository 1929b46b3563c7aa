//! `PUT /v1/queues/{name}` and `GET /v1/queues/{name}` (scope `admin`): a queue's settings,
//! today its rate limit across the fleet, for every task sent to it by any tenant.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use taskfleet_common::definition::limits;
use taskfleet_common::names;
use utoipa::ToSchema;

use super::{ApiError, AppState, JsonBody};
use crate::auth::{Principal, Scope};
use crate::store::{self, QueueSettings};

/// The body of `PUT /v1/queues/{name}`: the queue's settings.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"rate_limit_per_s": 50}))]
pub struct QueueSettingsRequest {
    /// Starts per second of the queue's tasks across the fleet (fractions allowed), or `null`
    /// (or absent) for no limit.
    #[serde(default)]
    #[schema(value_type = Option<f64>, exclusive_minimum = 0.0, maximum = 100000.0)]
    rate_limit_per_s: Value,
}

/// A queue's settings.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueueSettingsView {
    /// The queue.
    queue: String,
    /// Starts per second of its tasks across the fleet; null for no limit.
    #[schema(required = true)]
    rate_limit_per_s: Option<f64>,
    /// When the settings were last set; null for a queue never set.
    #[schema(required = true)]
    updated_at: Option<DateTime<Utc>>,
}

impl From<QueueSettings> for QueueSettingsView {
    fn from(row: QueueSettings) -> Self {
        Self {
            queue: row.queue,
            rate_limit_per_s: row.rate_limit_per_s,
            updated_at: Some(row.updated_at),
        }
    }
}

/// Returns the queue name checked, or the 400 naming what is wrong with it.
fn queue_name(name: &str) -> Result<(), ApiError> {
    names::check_queue_name(name).map_err(|error| ApiError::bad_request(error.to_string()))
}

/// Sets a queue's settings; every scheduler applies them within two seconds. A rate limit
/// holds the starts of the queue's tasks, of every tenant, to that many per second across the
/// fleet, on top of their steps' own `rate_limit`s.
#[utoipa::path(put, path = "/v1/queues/{name}", operation_id = "setQueueSettings", tag = "fleet",
    params(("name" = String, Path, description = "The task queue", pattern = "^[A-Za-z0-9_.-]{1,64}$")),
    request_body = QueueSettingsRequest,
    responses(
        (status = 422, description = "A setting is out of range; `details` names it", body = super::ErrorBody),
        (status = 200, description = "The queue's settings", body = QueueSettingsView)))]
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<QueueSettingsRequest>,
) -> Result<Json<QueueSettingsView>, ApiError> {
    principal.require(Scope::Admin)?;
    queue_name(&name)?;
    let rate = match &request.rate_limit_per_s {
        Value::Null => None,
        value => {
            let rate = value.as_f64();
            let problem = match rate {
                Some(rate) => limits::check_rate("rate_limit_per_s", rate),
                None => Some(format!(
                    "`rate_limit_per_s` must be a number of starts per second, or null; got {value}"
                )),
            };
            if let Some(message) = problem {
                return Err(ApiError::invalid(
                    message.clone(),
                    Some(json!([{"field": "rate_limit_per_s", "message": message}])),
                ));
            }
            rate
        }
    };
    let row =
        store::set_queue_settings(&state.db, state.config.namespace.as_str(), &name, rate).await?;
    let view = QueueSettingsView::from(row);
    super::keys::record(
        &state,
        &principal,
        "queue.settings",
        Some(name),
        serde_json::to_value(&view).ok(),
    )
    .await;
    Ok(Json(view))
}

/// A queue's settings; a queue never set has none (and `updated_at` null).
#[utoipa::path(get, path = "/v1/queues/{name}", operation_id = "getQueueSettings", tag = "fleet",
    params(("name" = String, Path, description = "The task queue", pattern = "^[A-Za-z0-9_.-]{1,64}$")),
    responses((status = 200, description = "The queue's settings", body = QueueSettingsView)))]
pub async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<QueueSettingsView>, ApiError> {
    principal.require(Scope::Admin)?;
    // A name no queue can have names no queue: 404, as for any other path.
    names::check_queue_name(&name)
        .map_err(|error| ApiError::not_found(format!("no queue: {error}")))?;
    let view = store::queue_settings(&state.db, state.config.namespace.as_str())
        .await?
        .into_iter()
        .find(|row| row.queue == name)
        .map_or_else(
            || QueueSettingsView {
                queue: name.clone(),
                rate_limit_per_s: None,
                updated_at: None,
            },
            QueueSettingsView::from,
        );
    Ok(Json(view))
}
