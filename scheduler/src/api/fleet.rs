//! `/v1/workers` and `/v1/queues`: what the fleet looks like right now, from the workers'
//! heartbeats in Redis, the broker's queue counts and the durable record.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use taskfleet_common::names::DEFAULT_QUEUE;
use taskfleet_common::records::{HEARTBEAT_STALE_AFTER, WorkerHeartbeat};

use super::{ApiError, AppState};
use crate::auth::{Principal, Scope};
use crate::store;

/// A live worker: its id and its last heartbeat.
struct LiveWorker {
    id: String,
    heartbeat: WorkerHeartbeat,
}

impl LiveWorker {
    /// The worker as `/v1/workers` shows it.
    fn view(&self) -> Value {
        let heartbeat = &self.heartbeat;
        json!({
            "id": self.id,
            "host": heartbeat.host,
            "queues": heartbeat.queues,
            "concurrency": heartbeat.concurrency,
            "running": heartbeat.running,
            "last_heartbeat": heartbeat.last_heartbeat(),
        })
    }
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

/// `GET /v1/workers`: the live workers, with their queues, concurrency, tasks running and
/// last heartbeat.
pub async fn workers(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::Admin)?;
    let workers: Vec<Value> = live_workers(&state)
        .await?
        .iter()
        .map(LiveWorker::view)
        .collect();
    Ok(Json(json!({ "workers": workers })))
}

/// `GET /v1/queues`: per task queue, the messages ready in the broker (one task each, unless
/// many tasks were dispatched at once and share messages), the tasks in flight (held by the
/// live workers, delivered and not yet reported, as of their last heartbeats) and the
/// consumers.
pub async fn queues(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
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
        queues.push(json!({
            "name": name,
            "ready": ready,
            "in_flight": in_flight.get(&name).copied().unwrap_or(0),
            "consumers": consumers,
        }));
    }
    Ok(Json(json!({ "queues": queues })))
}
