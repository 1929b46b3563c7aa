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

/// Reads the live workers' heartbeat records.
async fn live_workers(state: &AppState) -> Result<Vec<Value>, ApiError> {
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
        .filter(|(_, record)| !record.is_empty())
        .map(|(id, record)| {
            let number = |field: &str| {
                record
                    .get(field)
                    .and_then(|value| value.parse::<i64>().ok())
            };
            let queues: Vec<&str> = record
                .get("queues")
                .map(|queues| queues.split(',').filter(|q| !q.is_empty()).collect())
                .unwrap_or_default();
            let heartbeat = number("last_heartbeat_ms")
                .and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis);
            json!({
                "id": id,
                "host": record.get("host"),
                "queues": queues,
                "concurrency": number("concurrency"),
                "running": number("running"),
                "last_heartbeat": heartbeat,
            })
        })
        .collect())
}

/// `GET /v1/workers`: the live workers, with their queues, concurrency, tasks running and
/// last heartbeat.
pub async fn workers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "workers": live_workers(&state).await? })))
}

/// `GET /v1/queues`: per task queue, the messages ready in the broker (one task each, unless
/// many tasks were dispatched at once and share messages), those in flight (the queue's
/// unfinished tasks less the ready messages: held by workers) and the consumers.
pub async fn queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let queued: BTreeMap<String, i64> =
        store::queued_by_queue(&state.db, state.config.namespace.as_str())
            .await?
            .into_iter()
            .collect();
    let mut names: BTreeSet<String> = queued.keys().cloned().collect();
    names.insert(DEFAULT_QUEUE.to_owned());
    for worker in live_workers(&state).await? {
        for queue in worker["queues"].as_array().into_iter().flatten() {
            if let Some(queue) = queue.as_str() {
                names.insert(queue.to_owned());
            }
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
        let unfinished = queued.get(&name).copied().unwrap_or(0);
        queues.push(json!({
            "name": name,
            "ready": ready,
            "in_flight": (unfinished - i64::from(ready)).max(0),
            "consumers": consumers,
        }));
    }
    Ok(Json(json!({ "queues": queues })))
}
