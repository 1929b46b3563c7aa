//! Deliveries that come back from a lost worker: a task that already finished reports its
//! stored outcome again; otherwise the count of its deliveries travels in the
//! `x-taskfleet-deliveries` header of a copy put back in its queue (a bundle goes back as single
//! tasks), and the fourth delivery fails the attempt with `worker_lost`. Reading the tasks of a
//! delivery and running them is `delivery`'s.

use std::ops::Range;

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use taskfleet_common::TaskId;
use taskfleet_common::protocol::{Outcome, TaskMessage};
use taskfleet_common::records::StoredResult;
use taskfleet_common::sync::lock;
use tokio::sync::watch;

use super::Shared;
use super::delivery::TaskIdentity;

/// How many times an attempt may lose its worker (be delivered again without having finished)
/// before it fails with `worker_lost`.
const MAX_LOST_WORKERS: u32 = 3;
/// The header of a task message that counts its deliveries (absent: 1). The count travels in
/// the message itself, durable with it in RabbitMQ, so it survives restarts of every process
/// and of Redis.
const DELIVERIES_HEADER: &str = "x-taskfleet-deliveries";

/// What to do with a delivery the broker marked redelivered (its previous holder lost its
/// connection without acknowledging it).
pub(super) enum Redelivery {
    /// Run it.
    Run,
    /// It had already finished: report this outcome again.
    Finished(Outcome),
    /// A copy carrying the count of deliveries went back to the queue; this one is done.
    Requeued,
    /// It was delivered this many times without finishing: fail it with `worker_lost`.
    WorkerLost(u32),
}

/// A task to put back in its queue with a count: its attempt's identity (when readable, so
/// that a copy coming back to this worker can wait for its original's acknowledgement) and its
/// body.
type Copy<'a> = (Option<(TaskId, u32)>, &'a [u8]);

/// The count header of a delivery, if it has one.
fn count_header(delivery: &Delivery) -> Option<&AMQPValue> {
    delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(DELIVERIES_HEADER)
}

/// How many times the task of a delivery was delivered before it, from its count header (1
/// without one).
fn delivered_before(delivery: &Delivery) -> u32 {
    count_header(delivery)
        .and_then(AMQPValue::as_long_long_int)
        .and_then(|count| u32::try_from(count).ok())
        .unwrap_or(1)
}

/// Whether a delivery is a copy this fleet put back in its queue with a count of deliveries.
pub(super) fn is_copy(delivery: &Delivery) -> bool {
    count_header(delivery).is_some()
}

impl Shared {
    /// Decides what to do with a task that was delivered before (redelivered by the broker, or a
    /// copy with a count): report its outcome if it already finished; run a copy that is not
    /// itself redelivered, or a task of a bundle (whose count its bundle's split already
    /// raised); fail it with `worker_lost` if it was delivered more than [`MAX_LOST_WORKERS`]
    /// times beyond the first; otherwise put a copy carrying the new count back in its queue and
    /// acknowledge this delivery (see [`Self::requeue_copies`]). If the copy cannot be published,
    /// this delivery runs.
    pub(super) async fn redelivered(
        &self,
        task: &TaskMessage,
        body: &[u8],
        delivery: &Delivery,
        bundled: bool,
    ) -> Redelivery {
        if let Some(outcome) = self.finished_outcome(task).await {
            tracing::info!(task_id = %task.task_id, attempt = task.attempt, "a redelivered task had already finished; reporting its outcome again");
            return Redelivery::Finished(outcome);
        }
        if !delivery.redelivered || bundled {
            return Redelivery::Run;
        }
        let deliveries = delivered_before(delivery).saturating_add(1);
        if deliveries > MAX_LOST_WORKERS {
            return Redelivery::WorkerLost(deliveries);
        }
        let copy = [(Some((task.task_id, task.attempt)), body)];
        if self.requeue_copies(delivery, &copy, deliveries).await {
            tracing::info!(task_id = %task.task_id, deliveries, "a task came back from a lost worker; queued again with its count");
            Redelivery::Requeued
        } else {
            Redelivery::Run
        }
    }

    /// Puts a bundle that came back from a lost worker back in its queue as single tasks, each
    /// with the bundle's count of deliveries plus one, and acknowledges the bundle; returns
    /// false (and acknowledges nothing) if the copies could not all be published.
    pub(super) async fn split_redelivered(
        &self,
        delivery: &Delivery,
        ranges: &[Range<usize>],
    ) -> bool {
        let copies: Vec<Copy<'_>> = ranges
            .iter()
            .map(|range| {
                let body = &delivery.data[range.clone()];
                let identity = serde_json::from_slice::<TaskIdentity>(body)
                    .ok()
                    .map(|identity| (identity.task_id, identity.attempt));
                (identity, body)
            })
            .collect();
        let deliveries = delivered_before(delivery).saturating_add(1);
        let split = self.requeue_copies(delivery, &copies, deliveries).await;
        if split {
            tracing::info!(
                tasks = copies.len(),
                deliveries,
                "a bundle of tasks came back from a lost worker; queued again one by one"
            );
        }
        split
    }

    /// Publishes `copies` (each a task's identity, if readable, and its body) to the queue of
    /// `delivery` with `deliveries` as their count, each with the broker's confirm, then
    /// acknowledges `delivery`, so the count is durable with the messages. Returns false (and
    /// acknowledges nothing) if a copy could not be published.
    ///
    /// A copy may come straight back to this worker. Until the broker has processed the
    /// acknowledgement of the original, the copy waits (see [`Self::until_requeued`]): were it
    /// to take this worker down first, the original would come back too and run once more.
    async fn requeue_copies(
        &self,
        delivery: &Delivery,
        copies: &[Copy<'_>],
        deliveries: u32,
    ) -> bool {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            DELIVERIES_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(deliveries)),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        let queue = delivery.routing_key.as_str();
        let keys: Vec<(TaskId, u32)> = copies.iter().filter_map(|(key, _)| *key).collect();
        let (acknowledged, waiting) = watch::channel(());
        {
            let mut requeueing = lock(&self.requeueing);
            for key in &keys {
                requeueing.insert(*key, waiting.clone());
            }
        }
        let broker = self.broker.current();
        let mut published = true;
        for (_, body) in copies {
            if let Err(error) = broker.republish(queue, body, properties.clone()).await {
                tracing::warn!(%error, "putting a redelivered task back with its count failed; running it");
                published = false;
                break;
            }
        }
        if published {
            let acked = match delivery.ack(BasicAckOptions::default()).await {
                Ok(_) => broker.sync_consumer().await,
                Err(error) => Err(error),
            };
            if let Err(error) = acked {
                tracing::debug!(%error, "acknowledging a requeued task");
            }
        }
        {
            let mut requeueing = lock(&self.requeueing);
            for key in &keys {
                requeueing.remove(key);
            }
        }
        drop(acknowledged);
        published
    }

    /// Waits while `delivery` is a copy this worker is putting back in its queue and the
    /// acknowledgement of its original is not yet processed by the broker. Only copies carry
    /// the count header, so other tasks pass at once.
    pub(super) async fn until_requeued(&self, task: &TaskMessage, delivery: &Delivery) {
        if !is_copy(delivery) {
            return;
        }
        let waiting = lock(&self.requeueing)
            .get(&(task.task_id, task.attempt))
            .cloned();
        if let Some(mut waiting) = waiting {
            // Ends with an error when the sender is dropped, which is the only signal sent.
            let _ = waiting.changed().await;
        }
    }

    /// The outcome stored for this attempt of the task, if it already finished: a redelivered
    /// task whose report went out but whose acknowledgement was lost with a connection. Its
    /// outcome is reported again instead of running it again.
    async fn finished_outcome(&self, task: &TaskMessage) -> Option<Outcome> {
        let mut redis = self.redis.clone();
        let stored: Option<String> = redis::cmd("GET")
            .arg(self.namespace.result_key(task.task_id))
            .query_async(&mut redis)
            .await
            .inspect_err(|error| tracing::warn!(%error, "reading a redelivered task's result"))
            .ok()?;
        let stored = StoredResult::from_json(&stored?).ok()?;
        (stored.attempt == task.attempt).then_some(stored.outcome)
    }
}
