//! Leases and the heartbeat: a task's lease in Redis, taken when it starts (with the check that
//! its run was not cancelled), the running tasks whose leases are renewed, and the loop that
//! renews them and writes the worker's heartbeat every third of the lease time. The records
//! are `taskfleet_common::records`'; a lease is dropped by the report loop once its task is
//! reported, not here.

use std::sync::Arc;

use chrono::Utc;
use taskfleet_common::TaskId;
use taskfleet_common::protocol::TaskMessage;
use taskfleet_common::records::{self, Lease, WorkerHeartbeat, stop_flag};
use taskfleet_common::sync::lock;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::config::Config;

impl Shared {
    /// Counts `task` among the running ones, whose leases the renewal loop keeps alive; the
    /// token it returns stops the task when its run is cancelled.
    pub(super) fn register(&self, task: &TaskMessage) -> CancellationToken {
        let token = CancellationToken::new();
        lock(&self.running).insert(task.task_id, (task.run_id, token.clone()));
        token
    }

    /// Takes (or takes over) the lease on a task, in the same round trip as checking that its
    /// run was not cancelled; returns false if the run was cancelled. Best effort: without
    /// Redis the task still runs, and fencing by attempt keeps its completion safe.
    pub(super) async fn take_lease(
        &self,
        task: &TaskMessage,
        started_at: chrono::DateTime<Utc>,
    ) -> bool {
        let lease = Lease {
            worker_id: self.worker_id.clone(),
            attempt: task.attempt,
            started_at,
        };
        let mut redis = self.redis.clone();
        let result = redis::pipe()
            .cmd("GET")
            .arg(self.namespace.cancelled_key(task.run_id))
            .cmd("SET")
            .arg(self.namespace.lease_key(task.task_id))
            .arg(lease.to_json())
            .arg("PX")
            .arg(self.lease_ttl.as_millis() as u64)
            .ignore()
            .query_async::<(Option<String>,)>(&mut redis)
            .await;
        match result {
            // A stop before a re-run of the run does not stop the re-run's tasks.
            Ok((flag,)) => !stop_flag::read_stops(flag.as_deref(), task.task_id),
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, %error, "taking the lease");
                true
            }
        }
    }

    /// Counts `task_id` out of the running tasks: its lease is no longer renewed.
    pub(super) fn release(&self, task_id: TaskId) {
        lock(&self.running).remove(&task_id);
    }
}

/// Every third of the lease time: renews the leases of running tasks and records the worker's
/// heartbeat. On the way out, removes the worker's record.
pub(super) async fn heartbeat_loop(
    shared: Arc<Shared>,
    config: Config,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(records::renewal_period(shared.lease_ttl));
    let worker_key = shared.namespace.worker_key(&shared.worker_id);
    let workers_key = shared.namespace.workers_key();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => break,
        }
        let running: Vec<TaskId> = lock(&shared.running).keys().copied().collect();
        let ttl_ms = shared.lease_ttl.as_millis() as u64;
        let now_ms = Utc::now().timestamp_millis();
        let mut pipe = redis::pipe();
        for task_id in &running {
            pipe.cmd("PEXPIRE")
                .arg(shared.namespace.lease_key(*task_id))
                .arg(ttl_ms)
                .ignore();
        }
        let heartbeat = WorkerHeartbeat {
            host: config.host.clone(),
            queues: config.queues.clone(),
            concurrency: config.concurrency.get(),
            running: running.len(),
            held: shared.held.counts(),
            last_heartbeat_ms: now_ms,
        };
        pipe.cmd("HSET")
            .arg(&worker_key)
            .arg(&heartbeat.to_fields()[..])
            .ignore()
            .cmd("PEXPIRE")
            .arg(&worker_key)
            .arg(ttl_ms)
            .ignore()
            .cmd("ZADD")
            .arg(&workers_key)
            .arg(now_ms)
            .arg(&shared.worker_id)
            .ignore();
        let mut redis = shared.redis.clone();
        if let Err(error) = pipe.query_async::<()>(&mut redis).await {
            tracing::warn!(%error, "renewing leases and heartbeat");
        }
    }
    let mut redis = shared.redis.clone();
    let removed = redis::pipe()
        .cmd("DEL")
        .arg(&worker_key)
        .ignore()
        .cmd("ZREM")
        .arg(&workers_key)
        .arg(&shared.worker_id)
        .ignore()
        .query_async::<()>(&mut redis)
        .await;
    if let Err(error) = removed {
        tracing::debug!(%error, "removing the worker record");
    }
}
