//! Run-finished notifications: wakes the API's long-polling clients when a run ends, whichever
//! scheduler recorded the end.
//!
//! A scheduler that finishes runs announces their ids locally and on a Redis pub/sub channel;
//! every scheduler relays what it hears on that channel to its local waiters. A lost
//! notification only delays a waiter until its own deadline, when it reads the database again.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use taskfleet_common::{Namespace, RunId};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Announces finished runs and lets requests wait for them.
#[derive(Clone)]
pub struct Notifier {
    local: broadcast::Sender<Uuid>,
    redis: ConnectionManager,
    namespace: Namespace,
    channel: String,
}

/// How long workers are told to drop a stopped run's tasks when they are delivered.
const STOPPED_FLAG_TTL_S: u64 = 7 * 24 * 3600;

impl Notifier {
    /// Returns a notifier for the runs of `namespace`.
    pub fn new(redis: ConnectionManager, namespace: Namespace) -> Self {
        let (local, _) = broadcast::channel(4096);
        Self {
            local,
            redis,
            channel: namespace.run_finished_channel(),
            namespace,
        }
    }

    /// Tells workers that these runs ended (cancelled, or failed): their tasks still queued are
    /// dropped when delivered, and their running tasks are stopped. Best effort: the durable
    /// record already says the runs ended, so a task that runs on regardless is ignored.
    pub async fn stop_runs(&self, run_ids: &[Uuid]) {
        if run_ids.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for id in run_ids {
            pipe.cmd("SET")
                .arg(self.namespace.cancelled_key(RunId(*id)))
                .arg(1)
                .arg("EX")
                .arg(STOPPED_FLAG_TTL_S)
                .ignore()
                .cmd("PUBLISH")
                .arg(self.namespace.cancel_channel())
                .arg(id.to_string())
                .ignore();
        }
        let mut redis = self.redis.clone();
        if let Err(error) = pipe.query_async::<()>(&mut redis).await {
            tracing::warn!(%error, "telling workers to stop runs");
        }
    }

    /// Announces that these runs finished.
    pub async fn announce(&self, run_ids: &[Uuid]) {
        if run_ids.is_empty() {
            return;
        }
        for id in run_ids {
            // No receiver is fine: nobody is waiting.
            let _ = self.local.send(*id);
        }
        let mut pipe = redis::pipe();
        for id in run_ids {
            pipe.publish(&self.channel, id.to_string()).ignore();
        }
        let mut redis = self.redis.clone();
        if let Err(error) = pipe.query_async::<()>(&mut redis).await {
            tracing::warn!(%error, "announcing finished runs on redis");
        }
    }

    /// Returns a receiver of finished run ids. Subscribe before reading the run's status, so
    /// that an end recorded in between is not missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.local.subscribe()
    }

    /// Waits until `run_id` is announced or `timeout` passes. Returns early, too, when the
    /// receiver fell behind, since the announcement may have been among those dropped.
    pub async fn wait(receiver: &mut broadcast::Receiver<Uuid>, run_id: Uuid, timeout: Duration) {
        let wait = async {
            loop {
                match receiver.recv().await {
                    Ok(id) if id == run_id => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    /// Relays the Redis channel to local waiters until shutdown, resubscribing after errors.
    pub async fn listen(self, client: redis::Client, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if let Err(error) = pubsub.subscribe(&self.channel).await {
                        tracing::warn!(%error, "subscribing to run notifications");
                    } else {
                        let mut messages = pubsub.on_message();
                        loop {
                            let message = tokio::select! {
                                message = messages.next() => message,
                                () = shutdown.cancelled() => return,
                            };
                            let Some(message) = message else { break };
                            let id = message
                                .get_payload::<String>()
                                .ok()
                                .and_then(|text| text.parse::<Uuid>().ok());
                            if let Some(id) = id {
                                let _ = self.local.send(id);
                            }
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "connecting to redis for run notifications"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}
