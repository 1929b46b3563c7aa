//! `/v1/workers` and `/v1/queues`: what the fleet looks like right now, from the workers'
//! heartbeats in Redis, the broker's queue counts and the durable record.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use serde::Serialize;
use taskfleet_common::names::DEFAULT_QUEUE;
use taskfleet_common::records::{HEARTBEAT_STALE_AFTER, WorkerHeartbeat};
use utoipa::ToSchema;

use super::{ApiError, AppState, ErrorBody};
use crate::auth::{Principal, Scope};
use crate::store;

/// A live worker: its id and its last heartbeat.
struct LiveWorker {
    id: String,
    heartbeat: WorkerHeartbeat,
}

impl LiveWorker {
    fn view(self) -> WorkerView {
        let last_heartbeat = self.heartbeat.last_heartbeat();
        let heartbeat = self.heartbeat;
        WorkerView {
            id: self.id,
            host: heartbeat.host,
            queues: heartbeat.queues,
            concurrency: heartbeat.concurrency,
            running: heartbeat.running,
            last_heartbeat,
        }
    }
}

/// A live worker.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerView {
    /// The worker's id.
    id: String,
    /// The host it runs on.
    host: String,
    /// The queues it consumes.
    queues: Vec<String>,
    /// How many tasks it runs at once.
    concurrency: usize,
    /// How many it ran at its last heartbeat.
    running: usize,
    /// When it last reported.
    #[schema(required = true)]
    last_heartbeat: Option<DateTime<Utc>>,
}

/// The live workers.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    /// The workers.
    workers: Vec<WorkerView>,
}

/// A task queue as it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    /// The queue's name.
    pub(crate) name: String,
    /// Messages ready in the broker.
    pub(crate) ready: u32,
    /// Tasks delivered to live workers and not yet reported.
    pub(crate) in_flight: usize,
    /// Consumers of the queue.
    pub(crate) consumers: u32,
}

/// The task queues.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    /// The queues, by name.
    queues: Vec<QueueView>,
}

/// Reads the live workers' heartbeat records. A record that is not a worker's heartbeat (no
/// worker writes one without the fields every worker writes) is left out, and logged.
async fn live_workers(state: &AppState) -> Result<Vec<LiveWorker>, ApiError> {
    let namespace = &state.config.namespace;
    let mut redis = state.redis.clone();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let stale_after_ms = i64::try_from(HEARTBEAT_STALE_AFTER.as_millis()).unwrap_or(i64::MAX);
    let oldest = now_ms.saturating_sub(stale_after_ms);
    let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(namespace.workers_key())
        .arg(oldest)
        .arg("+inf")
        .query_async(&mut redis)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "reading worker heartbeats");
            ApiError::unavailable("redis is unavailable; try again")
        })?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("HGETALL").arg(namespace.worker_key(id));
    }
    let records: Vec<BTreeMap<String, String>> =
        pipe.query_async(&mut redis).await.map_err(|error| {
            tracing::warn!(%error, "reading worker records");
            ApiError::unavailable("redis is unavailable; try again")
        })?;
    Ok(ids
        .into_iter()
        .zip(records)
        // A worker that stopped has removed its record; its set entry may linger a moment.
        .filter(|(_, fields)| !fields.is_empty())
        .filter_map(|(id, fields)| match WorkerHeartbeat::from_fields(&fields) {
            Ok(heartbeat) => Some(LiveWorker { id, heartbeat }),
            Err(error) => {
                tracing::warn!(worker_id = id, %error, "skipping a worker record that does not read");
                None
            }
        })
        .collect())
}

/// The live workers, with their queues, concurrency, tasks running and last heartbeat.
#[utoipa::path(get, path = "/v1/workers", operation_id = "listWorkers", tag = "fleet",
    responses((status = 200, description = "The live workers", body = WorkerList)))]
pub async fn workers(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<WorkerList>, ApiError> {
    principal.require(Scope::Admin)?;
    let workers = live_workers(&state)
        .await?
        .into_iter()
        .map(LiveWorker::view)
        .collect();
    Ok(Json(WorkerList { workers }))
}

/// Per task queue, the messages ready in the broker (one task each, unless
/// many tasks were dispatched at once and share messages), the tasks in flight (held by the
/// live workers, delivered and not yet reported, as of their last heartbeats) and the
/// consumers.
#[utoipa::path(get, path = "/v1/queues", operation_id = "listQueues", tag = "fleet",
    responses((status = 200, description = "The task queues", body = QueueList)))]
pub async fn queues(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<QueueList>, ApiError> {
    principal.require(Scope::Admin)?;
    let names = store::queues_with_queued_tasks(&state.db, state.config.namespace.as_str())
        .await?
        .into_iter()
        .collect();
    let queues = queue_views(&state, names).await?;
    Ok(Json(QueueList { queues }))
}

/// How many queues' counts are looked up at once.
const QUEUE_LOOKUPS_AT_ONCE: usize = 16;

/// Returns the views of the queues named, of the default queue and of those the live workers
/// consume, as the broker counts them (queues it does not have are left out).
pub(crate) async fn queue_views(
    state: &AppState,
    mut names: BTreeSet<String>,
) -> Result<Vec<QueueView>, ApiError> {
    names.insert(DEFAULT_QUEUE.to_owned());
    let mut in_flight: BTreeMap<String, usize> = BTreeMap::new();
    for worker in live_workers(state).await? {
        let heartbeat = worker.heartbeat;
        names.extend(heartbeat.queues);
        for (queue, held) in heartbeat.held {
            *in_flight.entry(queue).or_default() += held;
        }
    }
    // Each look-up is a few round trips on a channel of its own: several go at once, in order.
    let counted: Vec<_> = futures_util::stream::iter(names)
        .map(|name| async move {
            let counts = state.broker.queue_counts(&name).await;
            (name, counts)
        })
        .buffered(QUEUE_LOOKUPS_AT_ONCE)
        .collect()
        .await;
    let mut queues = Vec::new();
    for (name, counts) in counted {
        let counts = counts.map_err(|error| {
            tracing::warn!(%error, "reading queue counts");
            ApiError::unavailable("rabbitmq is unavailable; try again")
        })?;
        let Some((ready, consumers)) = counts else {
            continue;
        };
        queues.push(QueueView {
            in_flight: in_flight.get(&name).copied().unwrap_or(0),
            name,
            ready,
            consumers,
        });
    }
    Ok(queues)
}

/// The scheduler's metrics in Prometheus's text format, for Prometheus to scrape; no key is
/// needed. The gauges of the queues and of the outbox are read at most every two seconds, and
/// the scrape is answered with what was last read if the broker or the database are slow.
#[utoipa::path(get, path = "/metrics", operation_id = "getMetrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus's text exposition format 0.0.4",
            content_type = "text/plain", body = String),
        (status = 404, description = "Metrics are off (`TASKFLEET_METRICS=off`)", body = ErrorBody),
    ))]
pub async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(served) = &state.metrics else {
        return ApiError::not_found("metrics are off (TASKFLEET_METRICS=off)").into_response();
    };
    if let Some(known) = served.refresh.due() {
        match tokio::time::timeout(GAUGES_TIMEOUT, read_gauges(&state, known)).await {
            Ok(Ok(gauges)) => served.refresh.set(&gauges),
            Ok(Err(error)) => tracing::warn!(?error, "reading the gauges of /metrics"),
            Err(_) => tracing::warn!("reading the gauges of /metrics took too long"),
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            taskfleet_io::metrics::CONTENT_TYPE,
        )],
        served.exposition.render(),
    )
        .into_response()
}

/// The longest a scrape waits for the gauges.
const GAUGES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads what the gauges show: the counts and backlog ages of the queues with tasks queued, of
/// those named before (`known`) and of those the workers consume, the outbox and the dead
/// letters.
async fn read_gauges(
    state: &AppState,
    known: Vec<String>,
) -> Result<crate::metrics::Gauges, ApiError> {
    let namespace = state.config.namespace.as_str();
    let oldest = store::queue_ages(&state.db, namespace).await?;
    let outbox_pending = store::outbox_pending(&state.db, namespace).await?;
    let mut names: BTreeSet<String> = known.into_iter().collect();
    names.extend(oldest.iter().map(|(queue, _)| queue.clone()));
    let queues = queue_views(state, names)
        .await?
        .into_iter()
        .map(|queue| (queue.name, queue.ready, queue.consumers))
        .collect();
    let dead_letters = state.broker.dead_letter_count().await.map_err(|error| {
        tracing::warn!(%error, "counting dead letters");
        ApiError::unavailable("rabbitmq is unavailable")
    })?;
    Ok(crate::metrics::Gauges {
        queues,
        oldest,
        outbox_pending,
        dead_letters,
    })
}
