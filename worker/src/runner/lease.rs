//! Leases and the heartbeat: a task's lease in Redis, taken when it starts (with the check that
//! its run was not cancelled), the running tasks whose leases are renewed, and the loop that
//! renews them and writes the worker's heartbeat every third of the lease time. The records
//! are `taskfleet_common::records`'; a lease is dropped by the report loop once its task is
//! reported, not here.

use std::sync::Arc;
use std::time::Duration;

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

    /// Takes the lease on a task of a step with a concurrency limit
    /// ([`TaskMessage::exclusive`]) unless another delivery of the same attempt (or of a later
    /// one) holds it, in the same round trip as checking that its run was not cancelled. A
    /// lease of an earlier attempt is taken over. Best effort as [`Self::take_lease`]: without
    /// Redis the task runs.
    pub(super) async fn take_exclusive_lease(
        &self,
        task: &TaskMessage,
        started_at: chrono::DateTime<Utc>,
    ) -> ExclusiveLease {
        let lease = Lease {
            worker_id: self.worker_id.clone(),
            attempt: task.attempt,
            started_at,
        };
        let mut redis = self.redis.clone();
        let result = EXCLUSIVE_LEASE
            .key(self.namespace.cancelled_key(task.run_id))
            .key(self.namespace.lease_key(task.task_id))
            .arg(lease.to_json())
            .arg(task.attempt)
            .arg(self.lease_ttl.as_millis() as u64)
            .invoke_async::<(Option<String>, i64)>(&mut redis)
            .await;
        match result {
            Ok((flag, _)) if stop_flag::read_stops(flag.as_deref(), task.task_id) => {
                ExclusiveLease::Cancelled
            }
            Ok((_, held_ms)) if held_ms >= 0 => {
                ExclusiveLease::Held(Duration::from_millis(held_ms.unsigned_abs()))
            }
            Ok(_) => ExclusiveLease::Taken,
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, %error, "taking the exclusive lease");
                ExclusiveLease::Taken
            }
        }
    }

    /// Counts `task_id` out of the running tasks: its lease is no longer renewed.
    pub(super) fn release(&self, task_id: TaskId) {
        lock(&self.running).remove(&task_id);
    }
}

/// What taking an exclusive lease came to.
pub(super) enum ExclusiveLease {
    /// The lease is this delivery's: run the task.
    Taken,
    /// The task's run was cancelled.
    Cancelled,
    /// Another delivery of the attempt holds the lease, which lives this much longer: the task
    /// runs there, or its lease expires with its lost worker and it may run here after.
    Held(Duration),
}

/// Takes a lease unless a delivery of the same or a later attempt holds it; returns the run's
/// stop flag and -1 when taken, or the flag and the held lease's time to live in
/// milliseconds. KEYS: the run's stop flag, the task's lease; ARGV: the lease, its attempt, its
/// time to live in milliseconds.
static EXCLUSIVE_LEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local flag = redis.call('GET', KEYS[1])
local held = redis.call('GET', KEYS[2])
if held then
  local ok, lease = pcall(cjson.decode, held)
  local attempt = ok and type(lease) == 'table' and tonumber(lease['attempt'])
  if attempt and attempt >= tonumber(ARGV[2]) then
    return {flag, math.max(redis.call('PTTL', KEYS[2]), 0)}
  end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return {flag, -1}
",
    )
});

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
