//! `/v1/workers` and `/v1/queues`: what the fleet looks like right now, from the workers'
//! heartbeats in Redis, the broker's queue counts and the durable record.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use taskfleet_common::names::DEFAULT_QUEUE;

use super::{ApiError, AppState};
use crate::store;

/// A worker whose last heartbeat is older than this many lease periods is not listed.
const STALE_AFTER_LEASES: i64 = 3;

/// A live worker's heartbeat record: its fields as the worker wrote them.
struct WorkerRecord {
    id: String,
    fields: BTreeMap<String, String>,
}

impl WorkerRecord {
    fn number(&self, field: &str) -> Option<i64> {
        self.fields
            .get(field)
            .and_then(|value| value.parse::<i64>().ok())
    }

    /// The task queues it consumes.
    fn queues(&self) -> Vec<&str> {
        self.fields
            .get("queues")
            .map(|queues| queues.split(',').filter(|q| !q.is_empty()).collect())
            .unwrap_or_default()
    }

    /// The tasks it holds (delivered, not yet reported) in each queue, as of its heartbeat.
    fn held(&self) -> BTreeMap<String, i64> {
        self.fields
            .get("held")
            .and_then(|held| serde_json::from_str(held).ok())
            .unwrap_or_default()
    }

    /// The worker as `/v1/workers` shows it.
    fn view(&self) -> Value {
        let heartbeat = self
            .number("last_heartbeat_ms")
            .and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis);
        json!({
            "id": self.id,
            "host": self.fields.get("host"),
            "queues": self.queues(),
            "concurrency": self.number("concurrency"),
            "running": self.number("running"),
            "last_heartbeat": heartbeat,
        })
    }
}

/// Reads the live workers' heartbeat records.
async fn live_workers(state: &AppState) -> Result<Vec<WorkerRecord>, ApiError> {
    let namespace = &state.config.namespace;
    let mut redis = state.redis.clone();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let oldest = now_ms - STALE_AFTER_LEASES * 30_000;
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
        .map(|(id, fields)| WorkerRecord { id, fields })
        .collect())
}

/// `GET /v1/workers`: the live workers, with their queues, concurrency, tasks running and
/// last heartbeat.
pub async fn workers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let workers: Vec<Value> = live_workers(&state)
        .await?
        .iter()
        .map(WorkerRecord::view)
        .collect();
    Ok(Json(json!({ "workers": workers })))
}

/// `GET /v1/queues`: per task queue, the messages ready in the broker (one task each, unless
/// many tasks were dispatched at once and share messages), the tasks in flight (held by the
/// live workers, delivered and not yet reported, as of their last heartbeats) and the
/// consumers.
pub async fn queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut names: BTreeSet<String> =
        store::queues_with_queued_tasks(&state.db, state.config.namespace.as_str())
            .await?
            .into_iter()
            .collect();
    names.insert(DEFAULT_QUEUE.to_owned());
    let mut in_flight: BTreeMap<String, i64> = BTreeMap::new();
    for worker in live_workers(&state).await? {
        names.extend(worker.queues().into_iter().map(str::to_owned));
        for (queue, held) in worker.held() {
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
