//! Reporting finished tasks: their completions travel to the scheduler in as few broker messages
//! as the moment allows, and a delivery is acknowledged once every task it carried is reported.
//!
//! The report loop takes every completion waiting, publishes them as one message (a bundle when
//! there are several, see `taskfleet_common::protocol`) and goes straight back for more while
//! that message waits for its confirm. At most [`MESSAGES_IN_FLIGHT`] messages wait for their
//! confirms at once; while they do, completions gather for the next one. So an idle worker
//! reports each task at once, and a busy one shares messages among many, even when its tasks
//! finish one at a time (Python steps on a few executors). Once the broker confirms a message,
//! the results go to Redis in one round trip and the deliveries whose tasks are all reported are
//! acknowledged. A message that cannot be published is published on the next connection once
//! the worker has reconnected (waiting up to [`REPORT_AFTER_RECONNECT`]); failing that, its
//! deliveries go back to their queues, and a task that comes back after its report finds its
//! stored result.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use redis::aio::ConnectionManager;
use taskfleet_common::Namespace;
use taskfleet_common::protocol::{self, CompletionMessage, Outcome};
use taskfleet_common::records::{RESULT_TTL, StoredResult};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;

/// How long a finished task waits for a new RabbitMQ connection to report on, after its own was
/// lost.
pub const REPORT_AFTER_RECONNECT: Duration = Duration::from_secs(30);
/// The most completions one message carries.
const MAX_PER_MESSAGE: usize = 128;
/// The body size past which a message takes no more completions.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The most messages of completions waiting for their confirms at once.
const MESSAGES_IN_FLIGHT: usize = 2;

/// The worker's current RabbitMQ connection, replaced after a reconnect.
pub struct BrokerSlot(RwLock<Arc<Broker>>);

impl BrokerSlot {
    /// Holds `broker` as the current connection.
    pub fn new(broker: Broker) -> Self {
        Self(RwLock::new(Arc::new(broker)))
    }

    /// The current connection.
    pub fn current(&self) -> Arc<Broker> {
        taskfleet_common::sync::read(&self.0).clone()
    }

    /// Makes `broker` the current connection.
    pub fn replace(&self, broker: Broker) {
        *taskfleet_common::sync::write(&self.0) = Arc::new(broker);
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

/// A report with its completion encoded, as the report loop takes it.
struct Encoded {
    body: Vec<u8>,
    report: Report,
}

/// The sending side of the report loop.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Encoded>,
}

impl Reporter {
    /// Hands a finished task to the report loop, its completion encoded here, by the task
    /// itself, rather than by the one loop every completion passes through. If the loop has
    /// stopped (the worker is leaving), the delivery stays unacknowledged and goes back to its
    /// queue with the connection.
    pub fn send(&self, report: Report) {
        let body = protocol::encode(&report.completion);
        if self.tx.send(Encoded { body, report }).is_err() {
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
    rx: mpsc::UnboundedReceiver<Encoded>,
    targets: Arc<ReportTargets>,
    stop: CancellationToken,
) {
    let in_flight = TaskTracker::new();
    let size = |encoded: &Encoded| encoded.body.len();
    gather(rx, stop, MESSAGES_IN_FLIGHT, size, |batch, permit| {
        let (bodies, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|encoded| (encoded.body, encoded.report))
            .unzip();
        let body = protocol::bundle(&bodies);
        in_flight.spawn(publish(targets.clone(), body, batch, permit));
    })
    .await;
    in_flight.close();
    in_flight.wait().await;
}

/// Hands what arrives on `rx` to `send` in batches, each with a place in a window of `window`
/// batches; `send` keeps the place until its batch no longer counts (its message is confirmed).
/// A batch is everything waiting (up to [`MAX_PER_MESSAGE`] items and [`MAX_MESSAGE_BYTES`] of
/// them, as `size` counts an item's bytes) once a place is free, so items gather while the
/// window is full. Runs until `rx` closes, or `stop` is cancelled and nothing is waiting.
async fn gather<T>(
    mut rx: mpsc::UnboundedReceiver<T>,
    stop: CancellationToken,
    window: usize,
    size: impl Fn(&T) -> usize,
    mut send: impl FnMut(Vec<T>, Option<OwnedSemaphorePermit>),
) {
    let window = Arc::new(Semaphore::new(window));
    loop {
        let first = tokio::select! {
            item = rx.recv() => item,
            () = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { break };
        // The window is never closed, so a place always comes.
        let place = window.clone().acquire_owned().await.ok();
        let mut bytes = size(&first);
        let mut batch = vec![first];
        while batch.len() < MAX_PER_MESSAGE && bytes < MAX_MESSAGE_BYTES {
            let Ok(item) = rx.try_recv() else { break };
            bytes += size(&item);
            batch.push(item);
        }
        send(batch, place);
    }
}

/// Publishes one message of completions and waits for its confirm (on the next connection if
/// this one is lost), then stores the results and counts the tasks done; hands the deliveries
/// back if the message cannot be published. Its place in the window (see [`gather`]) is given
/// up once the broker has answered.
async fn publish(
    targets: Arc<ReportTargets>,
    body: Vec<u8>,
    batch: Vec<Report>,
    window: Option<OwnedSemaphorePermit>,
) {
    let broker = targets.broker.current();
    let mut published = broker.publish_completion(&body).await;
    if published.is_err()
        && !broker.is_connected()
        && let Some(next) = targets.broker.next_after(&broker).await
    {
        published = next.publish_completion(&body).await;
    }
    drop(window);
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

/// Writes the results for fast reads and drops the leases, in one round trip. A deferred
/// attempt took no lease and has no result: it is sent again, and must then run.
async fn store_results(targets: &ReportTargets, batch: &[Report]) {
    let mut pipe = redis::pipe();
    for report in batch {
        let completion = &report.completion;
        if matches!(completion.outcome, Outcome::Deferred { .. }) {
            continue;
        }
        let result = StoredResult {
            attempt: completion.attempt,
            outcome: completion.outcome.clone(),
            finished_at: completion.finished_at,
        };
        pipe.cmd("SET")
            .arg(targets.namespace.result_key(completion.task_id))
            .arg(result.to_json())
            .arg("EX")
            .arg(RESULT_TTL.as_secs())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Gathers the numbers sent on a channel; each batch keeps its place in the window until
    /// the test drops it.
    struct Gathering {
        tx: mpsc::UnboundedSender<u32>,
        batches: mpsc::UnboundedReceiver<(Vec<u32>, Option<OwnedSemaphorePermit>)>,
    }

    impl Gathering {
        fn start(window: usize) -> Self {
            let (tx, rx) = mpsc::unbounded_channel();
            let (batch_tx, batches) = mpsc::unbounded_channel();
            tokio::spawn(gather(
                rx,
                CancellationToken::new(),
                window,
                |_| 4,
                move |batch, place| {
                    let _ = batch_tx.send((batch, place));
                },
            ));
            Self { tx, batches }
        }

        fn send(&self, n: u32) {
            self.tx.send(n).expect("the loop runs");
        }

        async fn next(&mut self) -> (Vec<u32>, Option<OwnedSemaphorePermit>) {
            tokio::time::timeout(Duration::from_secs(5), self.batches.recv())
                .await
                .expect("a batch within 5 s")
                .expect("the loop runs")
        }

        async fn nothing_more(&mut self) {
            let waited = tokio::time::timeout(Duration::from_millis(50), self.batches.recv()).await;
            assert!(waited.is_err(), "no batch while the window is full");
        }
    }

    #[tokio::test]
    async fn items_go_at_once_while_the_window_has_room_and_gather_while_it_is_full() {
        let mut gathering = Gathering::start(2);
        gathering.send(1);
        let (first, first_place) = gathering.next().await;
        assert_eq!(first, vec![1]);
        gathering.send(2);
        let (second, second_place) = gathering.next().await;
        assert_eq!(second, vec![2]);

        for n in 3..=5 {
            gathering.send(n);
        }
        gathering.nothing_more().await;
        drop(first_place);
        let (third, _third_place) = gathering.next().await;
        assert_eq!(third, vec![3, 4, 5], "what waited goes as one batch");
        drop(second_place);
        gathering.send(6);
        assert_eq!(gathering.next().await.0, vec![6]);
    }

    #[tokio::test]
    async fn a_batch_takes_at_most_its_count_of_items() {
        let mut gathering = Gathering::start(1);
        gathering.send(0);
        let (_, place) = gathering.next().await;
        let waiting = u32::try_from(MAX_PER_MESSAGE).expect("a small count") + 3;
        for n in 1..=waiting {
            gathering.send(n);
        }
        tokio::task::yield_now().await;
        drop(place);
        let (full, place) = gathering.next().await;
        assert_eq!(full.len(), MAX_PER_MESSAGE);
        drop(place);
        assert_eq!(
            gathering.next().await.0,
            vec![waiting - 2, waiting - 1, waiting]
        );
    }
}
