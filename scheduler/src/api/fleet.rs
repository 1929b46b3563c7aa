//! `/v1/workers` and `/v1/queues`: what the fleet looks like right now, from the workers'
//! heartbeats in Redis, the broker's queue counts and the durable record.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use taskfleet_common::names::DEFAULT_QUEUE;
use taskfleet_common::records::{HEARTBEAT_STALE_AFTER, WorkerHeartbeat};
use utoipa::ToSchema;

use super::{ApiError, AppState};
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
    name: String,
    /// Messages ready in the broker.
    ready: u32,
    /// Tasks delivered to live workers and not yet reported.
    in_flight: usize,
    /// Consumers of the queue.
    consumers: u32,
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
    let mut names: BTreeSet<String> =
        store::queues_with_queued_tasks(&state.db, state.config.namespace.as_str())
            .await?
            .into_iter()
            .collect();
    names.insert(DEFAULT_QUEUE.to_owned());
    let mut in_flight: BTreeMap<String, usize> = BTreeMap::new();
    for worker in live_workers(&state).await? {
        let heartbeat = worker.heartbeat;
        names.extend(heartbeat.queues);
        for (queue, held) in heartbeat.held {
            *in_flight.entry(queue).or_default() += held;
        }
    }
    let mut queues = Vec::new();
    for name in names {
        let counts = state.broker.queue_counts(&name).await.map_err(|error| {
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
    Ok(Json(QueueList { queues }))
}
