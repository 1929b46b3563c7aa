//! Reporting finished tasks: their completions travel to the scheduler in as few broker messages
//! as the moment allows, and a delivery is acknowledged once every task it carried is reported.
//!
//! The report loop takes every completion waiting, publishes them as one message (a bundle when
//! there are several, see `taskfleet_common::protocol`) and goes straight back for more while
//! that message waits for its confirm, so an idle worker reports each task at once and a busy
//! one shares messages among many. Once the broker confirms a message, the results go to Redis
//! in one round trip and the deliveries whose tasks are all reported are acknowledged. A message
//! that cannot be published is published on the next connection once the worker has reconnected
//! (waiting up to [`REPORT_AFTER_RECONNECT`]); failing that, its deliveries go back to their
//! queues, and a task that comes back after its report finds its stored result.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use redis::aio::ConnectionManager;
use serde_json::json;
use taskfleet_common::Namespace;
use taskfleet_common::protocol::{self, CompletionMessage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;

/// How long a finished task waits for a new RabbitMQ connection to report on, after its own was
/// lost.
pub const REPORT_AFTER_RECONNECT: Duration = Duration::from_secs(30);
/// How long a task's result stays in Redis.
const RESULT_TTL_S: u64 = 24 * 3600;
/// The most completions one message carries.
const MAX_PER_MESSAGE: usize = 128;
/// The body size past which a message takes no more completions.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// The worker's current RabbitMQ connection, replaced after a reconnect.
pub struct BrokerSlot(RwLock<Arc<Broker>>);

impl BrokerSlot {
    /// Holds `broker` as the current connection.
    pub fn new(broker: Broker) -> Self {
        Self(RwLock::new(Arc::new(broker)))
    }

    /// The current connection.
    pub fn current(&self) -> Arc<Broker> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `broker` the current connection.
    pub fn replace(&self, broker: Broker) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(broker);
    }

    /// Waits for the worker to replace `lost` with a new connection; `None` if it has not within
    /// [`REPORT_AFTER_RECONNECT`].
    async fn next_after(&self, lost: &Arc<Broker>) -> Option<Arc<Broker>> {
        let deadline = tokio::time::Instant::now() + REPORT_AFTER_RECONNECT;
        while tokio::time::Instant::now() < deadline {
            let current = self.current();
            if !Arc::ptr_eq(&current, lost) {
                return Some(current);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

/// A delivery whose tasks are being run; acknowledged when the last of them is reported.
pub struct PendingDelivery {
    delivery: Delivery,
    /// Tasks of the delivery not yet reported.
    remaining: AtomicUsize,
    /// Set when the delivery went back to its queue; nothing acknowledges it after that.
    handed_back: AtomicBool,
}

impl PendingDelivery {
    /// Tracks `delivery`, which carries `tasks` tasks.
    pub fn new(delivery: Delivery, tasks: usize) -> Arc<Self> {
        Arc::new(Self {
            delivery,
            remaining: AtomicUsize::new(tasks.max(1)),
            handed_back: AtomicBool::new(false),
        })
    }

    /// The delivery itself.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Counts one of its tasks as done (reported, or needing no report); acknowledges the
    /// delivery when it was the last.
    pub async fn done_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1
            || self.handed_back.load(Ordering::Acquire)
        {
            return;
        }
        if let Err(error) = self.delivery.ack(BasicAckOptions::default()).await {
            // Its connection is gone: the broker hands the tasks out again, and each finds its
            // stored result.
            tracing::debug!(%error, "acknowledging a task message");
        }
    }

    /// Returns the delivery to its queue, once, whatever its other tasks do.
    async fn hand_back(&self) {
        if self.handed_back.swap(true, Ordering::AcqRel) {
            return;
        }
        let options = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if let Err(error) = self.delivery.nack(options).await {
            tracing::debug!(%error, "returning a task message");
        }
    }
}

/// A finished task to report.
pub struct Report {
    /// Its completion.
    pub completion: CompletionMessage,
    /// The delivery it came in.
    pub delivery: Arc<PendingDelivery>,
}

/// The sending side of the report loop.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Report>,
}

impl Reporter {
    /// Hands a finished task to the report loop. If the loop has stopped (the worker is
    /// leaving), the delivery stays unacknowledged and goes back to its queue with the
    /// connection.
    pub fn send(&self, report: Report) {
        if self.tx.send(report).is_err() {
            tracing::debug!("the report loop has stopped; the task goes back to its queue");
        }
    }
}

/// What the report loop writes to.
pub struct ReportTargets {
    /// The connection completions are published on.
    pub broker: Arc<BrokerSlot>,
    /// Where results are kept for fast reads.
    pub redis: ConnectionManager,
    /// The names of the result and lease keys.
    pub namespace: Namespace,
}

/// Returns the reporter and the report loop, to be spawned. The loop runs until `stop` is
/// cancelled, then reports what it already holds and waits for the messages in flight.
pub fn reporter(
    targets: ReportTargets,
    stop: CancellationToken,
) -> (Reporter, impl Future<Output = ()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Reporter { tx }, report_loop(rx, Arc::new(targets), stop))
}

async fn report_loop(
    mut rx: mpsc::UnboundedReceiver<Report>,
    targets: Arc<ReportTargets>,
    stop: CancellationToken,
) {
    let in_flight = TaskTracker::new();
    loop {
        let first = tokio::select! {
            report = rx.recv() => report,
            () = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        let mut bodies = vec![protocol::encode(&batch[0].completion)];
        let mut bytes = bodies[0].len();
        while batch.len() < MAX_PER_MESSAGE && bytes < MAX_MESSAGE_BYTES {
            let Ok(report) = rx.try_recv() else { break };
            let body = protocol::encode(&report.completion);
            bytes += body.len();
            bodies.push(body);
            batch.push(report);
        }
        let body = protocol::bundle(&bodies);
        in_flight.spawn(publish(targets.clone(), body, batch));
    }
    in_flight.close();
    in_flight.wait().await;
}

/// Publishes one message of completions and waits for its confirm (on the next connection if
/// this one is lost), then stores the results and counts the tasks done; hands the deliveries
/// back if the message cannot be published.
async fn publish(targets: Arc<ReportTargets>, body: Vec<u8>, batch: Vec<Report>) {
    let broker = targets.broker.current();
    let mut published = broker.publish_completion(&body).await;
    if published.is_err()
        && !broker.is_connected()
        && let Some(next) = targets.broker.next_after(&broker).await
    {
        published = next.publish_completion(&body).await;
    }
    if let Err(error) = published {
        tracing::error!(completions = batch.len(), %error, "reporting completions failed; their tasks go back to their queues");
        for report in &batch {
            report.delivery.hand_back().await;
        }
        return;
    }
    store_results(&targets, &batch).await;
    for report in batch {
        report.delivery.done_one().await;
    }
}

/// Writes the results for fast reads and drops the leases, in one round trip.
async fn store_results(targets: &ReportTargets, batch: &[Report]) {
    let mut pipe = redis::pipe();
    for report in batch {
        let completion = &report.completion;
        let result = json!({
            "attempt": completion.attempt,
            "outcome": completion.outcome,
            "finished_at": completion.finished_at,
        });
        pipe.cmd("SET")
            .arg(targets.namespace.result_key(completion.task_id))
            .arg(result.to_string())
            .arg("EX")
            .arg(RESULT_TTL_S)
            .ignore()
            .cmd("DEL")
            .arg(targets.namespace.lease_key(completion.task_id))
            .ignore();
    }
    let mut redis = targets.redis.clone();
    if let Err(error) = pipe.query_async::<()>(&mut redis).await {
        tracing::warn!(completions = batch.len(), %error, "writing results to redis");
    }
}
