//! The HTTP API (`docs/api.md`): routes, shared state and the JSON body extractor.
//!
//! Handlers parse and validate, plan through [`crate::planning`], and read or write through
//! [`crate::store`] and [`crate::accept`]; they hold no SQL.

mod dead_letters;
mod error;
mod fleet;
pub(crate) mod keys;
pub mod openapi;
mod queues;
mod quotas;
mod runs;
mod schedules;
mod tenants;
pub mod trace;
mod workflows;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::{Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody};
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
    /// Hands committed tasks to the publisher (tasks written outside the acceptor: re-runs).
    pub dispatcher: crate::dispatch::Dispatcher,
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
    /// The metrics `/metrics` serves; `None` with `TASKFLEET_METRICS=off`.
    pub metrics: Option<crate::metrics::Served>,
    /// Wakes this scheduler's firing loop of schedules when one is set.
    pub schedule_wake: Arc<tokio::sync::Notify>,
}

/// Returns whose objects a caller reaches: its tenant's, in this scheduler's namespace.
pub fn owner<'a>(state: &'a AppState, principal: &'a Principal) -> store::Owner<'a> {
    store::Owner {
        namespace: state.config.namespace.as_str(),
        tenant: &principal.tenant,
    }
}

/// The `/v1` routes, with what the OpenAPI document says of each: the one list both the
/// router and [`openapi::document`] are made from (with [`health_routes`]).
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(workflows::list))
        .routes(routes!(workflows::show, workflows::register))
        .routes(routes!(runs::create, runs::list))
        .routes(routes!(runs::create_batch))
        .routes(routes!(runs::show))
        .routes(routes!(runs::cancel))
        .routes(routes!(runs::create_job, runs::list_jobs))
        .routes(routes!(runs::show_job))
        .routes(routes!(runs::cancel_job))
        .routes(routes!(runs::retry))
        .routes(routes!(runs::retry_job))
        .routes(routes!(schedules::list))
        .routes(routes!(schedules::show, schedules::put, schedules::delete))
        .routes(routes!(stats))
        .routes(routes!(fleet::workers))
        .routes(routes!(fleet::queues))
        .routes(routes!(queues::show, queues::put))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::purge))
        .routes(routes!(keys::create, keys::list))
        .routes(routes!(keys::revoke))
        .routes(routes!(keys::audit))
        .routes(routes!(tenants::list))
        .routes(routes!(tenants::put))
        .routes(routes!(openapi::openapi_json))
}

/// The health checks and the metrics, which need no key.
fn health_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(fleet::metrics))
}

/// Returns the API's router.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let (v1, _) = routes().split_for_parts();
    let (health, _) = health_routes().split_for_parts();
    let v1 = v1.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::authenticate,
    ));
    health
        .merge(v1)
        .fallback(not_found)
        // Inside the request's observation, so that a panic's 500 is logged and counted too.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                axum::response::IntoResponse::into_response(ApiError::internal(
                    &"a request handler panicked",
                ))
            },
        ))
        .layer(axum::middleware::from_fn(trace::observe_request))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
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
        // Every body the API takes is an object; serde would also read a struct from an
        // array of its fields in order, which no client means.
        if bytes.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request(
                "request body is not valid: it must be a JSON object",
            ));
        }
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

/// The answer of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    status: &'static str,
}

/// Whether the scheduler's process answers.
#[utoipa::path(get, path = "/healthz", operation_id = "getHealth", tag = "health",
    responses((status = 200, description = "The scheduler answers", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The answer of `/readyz`: whether each service is reachable.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// PostgreSQL answers.
    postgres: bool,
    /// Redis answers.
    redis: bool,
    /// The broker connection is up.
    rabbitmq: bool,
}

/// Whether the scheduler can serve: PostgreSQL, Redis and RabbitMQ are reachable.
#[utoipa::path(get, path = "/readyz", operation_id = "getReadiness", tag = "health",
    responses(
        (status = 200, description = "Every service is reachable", body = Readiness),
        (status = 503, description = "A service is not reachable", body = Readiness),
    ))]
async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> (StatusCode, Json<Readiness>) {
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
        Json(Readiness {
            postgres: database,
            redis: redis_ok,
            rabbitmq: broker,
        }),
    )
}

/// The answer of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stats {
    /// The scheduler's namespace.
    namespace: String,
    /// The tenant counted; null for an `admin` key, whose counts are of every tenant.
    #[schema(required = true)]
    tenant: Option<String>,
    /// Runs and jobs by status.
    runs: std::collections::BTreeMap<String, i64>,
    /// Tasks by status.
    tasks: std::collections::BTreeMap<String, i64>,
}

/// The caller's tenant's counts of runs and tasks by status; an `admin` key's are of every
/// tenant.
#[utoipa::path(get, path = "/v1/stats", operation_id = "getStats", tag = "fleet",
    responses((status = 200, description = "The counts", body = Stats)))]
async fn stats(
    axum::extract::State(state): axum::extract::State<AppState>,
    principal: Principal,
) -> Result<Json<Stats>, ApiError> {
    principal.require(Scope::RunsRead)?;
    let tenant = (!principal.has(Scope::Admin)).then(|| principal.tenant.clone());
    let (runs, tasks) = store::stats(
        &state.db,
        state.config.namespace.as_str(),
        tenant.as_deref(),
    )
    .await?;
    Ok(Json(Stats {
        namespace: state.config.namespace.as_str().to_owned(),
        tenant,
        runs: runs.into_iter().collect(),
        tasks: tasks.into_iter().collect(),
    }))
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
