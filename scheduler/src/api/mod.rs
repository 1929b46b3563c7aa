//! The HTTP API (`docs/api.md`): routes, shared state and the JSON body extractor.
//!
//! Handlers parse and validate, plan through [`crate::planning`], and read or write through
//! [`crate::store`] and [`crate::accept`]; they hold no SQL.

mod error;
mod fleet;
pub(crate) mod keys;
mod quotas;
mod runs;
mod tenants;
mod workflows;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

pub use error::ApiError;
pub use quotas::Quotas;

use crate::accept::Acceptor;
use crate::auth::{self, Authenticator, Principal, Scope};
use crate::broker::Broker;
use crate::config::Config;
use crate::notify::Notifier;
use crate::planning::SandboxedPrograms;
use crate::store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// The database.
    pub db: sqlx::PgPool,
    /// Redis, for leases and readiness.
    pub redis: redis::aio::ConnectionManager,
    /// The broker, for readiness.
    pub broker: Arc<Broker>,
    /// Where accepted runs are written.
    pub acceptor: Acceptor,
    /// Run-finished notifications for long polls.
    pub notifier: Notifier,
    /// Compiled jq programs, and where planning runs them.
    pub programs: SandboxedPrograms,
    /// Cancelled when the scheduler stops; long polls then answer at once.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Finds the caller of each `/v1` request.
    pub authenticator: Authenticator,
    /// Checks submissions against their tenant's quotas.
    pub quotas: Quotas,
}

/// Returns whose objects a caller reaches: its tenant's, in this scheduler's namespace.
pub fn owner<'a>(state: &'a AppState, principal: &'a Principal) -> store::Owner<'a> {
    store::Owner {
        namespace: state.config.namespace.as_str(),
        tenant: &principal.tenant,
    }
}

/// Returns the API's router.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/workflows", get(workflows::list))
        .route(
            "/v1/workflows/{name}",
            get(workflows::show).put(workflows::register),
        )
        .route("/v1/runs", post(runs::create).get(runs::list))
        .route("/v1/runs:batch", post(runs::create_batch))
        .route("/v1/runs/{id}", get(runs::show))
        .route("/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/v1/tasks", post(runs::create_job).get(runs::list_jobs))
        .route("/v1/tasks/{id}", get(runs::show_job))
        .route("/v1/tasks/{id}/cancel", post(runs::cancel_job))
        .route("/v1/stats", get(stats))
        .route("/v1/workers", get(fleet::workers))
        .route("/v1/queues", get(fleet::queues))
        .route("/v1/keys", post(keys::create).get(keys::list))
        .route("/v1/keys/{id}", delete(keys::revoke))
        .route("/v1/audit", get(keys::audit))
        .route("/v1/tenants", get(tenants::list))
        .route("/v1/tenants/{name}", axum::routing::put(tenants::put))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(v1)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(state)
}

/// A JSON request body whose failures are answered as the API's errors: 413 over the size limit,
/// 400 naming what does not parse (including unknown fields).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // A body declared as anything but JSON is refused, rather than read as JSON anyway: a
        // form or text sent by mistake gets an answer that says so. A body declared as
        // nothing is read as JSON.
        if let Some(content_type) = request.headers().get(axum::http::header::CONTENT_TYPE) {
            let text = content_type.to_str().unwrap_or_default();
            if !is_json(text) {
                return Err(ApiError::unsupported_media_type(text));
            }
        }
        let limit = state.config.max_body_bytes;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(limit)
                } else {
                    ApiError::bad_request(format!("reading the request body: {rejection}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| ApiError::bad_request(format!("request body is not valid: {error}")))
    }
}

/// Whether a `Content-Type` names JSON: `application/json` or a `+json` type, with any
/// parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    let database = store::ping(&state.db).await.is_ok();
    let mut redis = state.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok();
    let broker = state.broker.is_connected();
    let status = if database && redis_ok && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"postgres": database, "redis": redis_ok, "rabbitmq": broker})),
    )
}

/// `GET /v1/stats`: the caller's tenant's counts; an `admin` key's are of every tenant.
async fn stats(
    axum::extract::State(state): axum::extract::State<AppState>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let tenant = (!principal.has(Scope::Admin)).then_some(principal.tenant.as_str());
    let (runs, tasks) = store::stats(&state.db, state.config.namespace.as_str(), tenant).await?;
    let to_object = |counts: Vec<(String, i64)>| {
        counts
            .into_iter()
            .map(|(status, count)| (status, json!(count)))
            .collect::<serde_json::Map<_, _>>()
    };
    Ok(Json(json!({
        "namespace": state.config.namespace.as_str(),
        "tenant": tenant,
        "runs": to_object(runs),
        "tasks": to_object(tasks),
    })))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// Returns a listing's page size (`default` when not given, else 1 to 1000) and the id it
/// goes on from (its `cursor`), or the 400 naming the bad one.
pub fn page(
    limit: Option<i64>,
    cursor: Option<&str>,
    default: i64,
) -> Result<(i64, Option<uuid::Uuid>), ApiError> {
    const MAX_LIMIT: i64 = 1000;
    let limit = limit.unwrap_or(default);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let before = cursor
        .map(|cursor| {
            cursor
                .parse::<uuid::Uuid>()
                .map_err(|_| ApiError::bad_request(format!("cursor {cursor:?} is not valid")))
        })
        .transpose()?;
    Ok((limit, before))
}

/// Returns the cursor of the page after one of `limit` rows whose last id is `last`: none
/// when the page is not full.
pub fn next_cursor(rows: usize, limit: i64, last: Option<uuid::Uuid>) -> Option<uuid::Uuid> {
    (i64::try_from(rows).ok() == Some(limit))
        .then_some(last)
        .flatten()
}

/// Query parameters whose failures are answered as the API's 400.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| QueryParams(query.0))
            .map_err(|rejection| {
                ApiError::bad_request(format!(
                    "query string is not valid: {}",
                    rejection.body_text()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_told_from_others() {
        for json in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
        ] {
            assert!(is_json(json), "{json}");
        }
        for other in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
            "text/json+xml",
        ] {
            assert!(!is_json(other), "{other}");
        }
    }
}
