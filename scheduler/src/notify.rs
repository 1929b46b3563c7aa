//! Run-finished notifications: wakes the API's long-polling clients when a run ends, whichever
//! scheduler recorded the end.
//!
//! A scheduler that finishes runs announces their ids locally and on a Redis pub/sub channel;
//! every scheduler relays what it hears on that channel to its local waiters. A lost
//! notification only delays a waiter until its own deadline, when it reads the database again.
//! A scheduler that finishes a run someone waits for on it may hand the waiters the run's
//! final view with the announcement, so they answer without reading it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use taskfleet_common::records::stop_flag;
use taskfleet_common::sync::lock;
use taskfleet_common::{Namespace, RunId, RunKind};
use taskfleet_io::pubsub;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Announces finished runs and lets requests wait for them.
#[derive(Clone)]
pub struct Notifier {
    local: broadcast::Sender<Announcement>,
    /// How many local requests wait for each run.
    watched: Arc<Mutex<HashMap<Uuid, usize>>>,
    redis: ConnectionManager,
    namespace: Namespace,
    channel: String,
}

/// A run that finished, as local waiters hear of it.
#[derive(Clone, Debug)]
struct Announcement {
    id: Uuid,
    view: Option<Arc<FinishedView>>,
}

/// The final view of a finished run, as the API shows it.
#[derive(Debug)]
pub struct FinishedView {
    /// A workflow's run or a job.
    pub kind: RunKind,
    /// The view.
    pub view: crate::views::RunView,
}

/// A local request's wait for one run; subscribed before the request reads the run, so an end
/// recorded in between is not missed. The run counts as watched until this is dropped.
pub struct Watch {
    receiver: broadcast::Receiver<Announcement>,
    id: Uuid,
    watched: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = lock(&self.watched);
        if let Some(count) = watched.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                watched.remove(&self.id);
            }
        }
    }
}

/// How long workers are told to drop a stopped run's tasks when they are delivered.
const STOPPED_FLAG_TTL_S: u64 = 7 * 24 * 3600;

impl Notifier {
    /// Returns a notifier for the runs of `namespace`.
    pub fn new(redis: ConnectionManager, namespace: Namespace) -> Self {
        let (local, _) = broadcast::channel(4096);
        Self {
            local,
            watched: Arc::default(),
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
        // The flag and the announcement carry the moment of the stop: a re-run's tasks, made
        // after it, go on (`records::stop_flag`).
        let stopped_at = stop_flag::now_ms();
        let mut pipe = redis::pipe();
        for id in run_ids {
            pipe.cmd("EVAL")
                .arg(stop_flag::SET_SCRIPT)
                .arg(1)
                .arg(self.namespace.cancelled_key(RunId(*id)))
                .arg(stopped_at)
                .arg(STOPPED_FLAG_TTL_S)
                .ignore()
                .cmd("PUBLISH")
                .arg(self.namespace.cancel_channel())
                .arg(format!("{id} {stopped_at}"))
                .ignore();
        }
        let mut redis = self.redis.clone();
        if let Err(error) = pipe.query_async::<()>(&mut redis).await {
            tracing::warn!(%error, "telling workers to stop runs");
        }
    }

    /// Announces that these runs finished.
    pub async fn announce(&self, run_ids: &[Uuid]) {
        self.announce_with_views(run_ids, HashMap::new()).await;
    }

    /// Announces that these runs finished, handing local waiters the final views given.
    pub async fn announce_with_views(
        &self,
        run_ids: &[Uuid],
        mut views: HashMap<Uuid, FinishedView>,
    ) {
        if run_ids.is_empty() {
            return;
        }
        for id in run_ids {
            let view = views.remove(id).map(Arc::new);
            // No receiver is fine: nobody is waiting.
            let _ = self.local.send(Announcement { id: *id, view });
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

    /// Starts a local wait for `run_id`. Call it before reading the run's status, so that an
    /// end recorded in between is not missed.
    pub fn watch(&self, run_id: Uuid) -> Watch {
        let receiver = self.local.subscribe();
        *lock(&self.watched).entry(run_id).or_default() += 1;
        Watch {
            receiver,
            id: run_id,
            watched: self.watched.clone(),
        }
    }

    /// Returns those of `run_ids` that a local request waits for.
    pub fn watched(&self, run_ids: impl IntoIterator<Item = Uuid>) -> Vec<Uuid> {
        let watched = lock(&self.watched);
        if watched.is_empty() {
            return Vec::new();
        }
        run_ids
            .into_iter()
            .filter(|id| watched.contains_key(id))
            .collect()
    }

    /// Waits until the watched run is announced or `timeout` passes; returns the run's final
    /// view if the announcement carried one. Returns early, too, when the watch fell behind,
    /// since the announcement may have been among those dropped.
    pub async fn wait(watch: &mut Watch, timeout: Duration) -> Option<Arc<FinishedView>> {
        let wait = async {
            loop {
                match watch.receiver.recv().await {
                    Ok(announcement) if announcement.id == watch.id => return announcement.view,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return None,
                    Err(broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Relays the Redis channel to local waiters until shutdown, subscribing again after a lost
    /// connection (see [`pubsub::listen`]).
    pub async fn listen(self, client: redis::Client, shutdown: CancellationToken) {
        pubsub::listen(&client, &self.channel, &shutdown, |payload| {
            if let Ok(id) = payload.parse::<Uuid>() {
                // No receiver is fine: nobody is waiting.
                let _ = self.local.send(Announcement { id, view: None });
            }
        })
        .await;
    }
}
