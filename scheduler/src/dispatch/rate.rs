//! Rate limits at dispatch: the starts of tasks whose step has a `rate_limit`, or whose queue
//! has one (`queue_settings`), are reserved in Redis (`taskfleet_io::rate_limits`), one call
//! per batch, before they are published. A start reserved for now is published at once, with
//! its slot in the message (`RateGate::slot_ms`); one reserved within [`HORIZON`] is held here
//! and published at its slot; any other is sent back to the timer (`due_at`) to come back
//! [`HORIZON`] before its projected turn. Redis out of reach, every start is sent back for
//! [`UNCHECKED_DELAY`]: none is published unchecked.
//!
//! Nothing held here is lost by a crash: a task row stays in the outbox until the broker
//! confirms it, and the relay sends it again (reserving it again) after `relay_after`, which
//! is far longer than [`HORIZON`]. Tasks of neither kind pass through untouched.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use taskfleet_common::Namespace;
use taskfleet_common::definition::limits::queue_group;
use taskfleet_common::protocol::{self, RateGate, RateSpec, TaskMessage};
use taskfleet_io::rate_limits::{self, Limit, Reservation};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Dispatch;
use crate::store;

/// How far ahead a start is reserved and held in memory; well under the relay's age
/// (`relay_after`, 10 s by default), so that a held task is never relayed meanwhile.
pub const HORIZON: Duration = rate_limits::HORIZON;
/// How long a start waits, at least, when Redis cannot be asked: each waits a time of its own
/// between this and three times this (see [`unchecked_delay`]), so that tasks sent back
/// together do not all come back together.
pub const UNCHECKED_DELAY: Duration = Duration::from_secs(1);
/// The longest a reservation may take before Redis counts as out of reach.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the queues' rate limits are read again.
const QUEUE_SETTINGS_EVERY: Duration = Duration::from_secs(1);
/// The longest a starting scheduler waits for its first read of the queues' limits before it
/// dispatches without them.
const FIRST_READ_WITHIN: Duration = Duration::from_secs(2);
/// The least time a task sent back to the timer waits.
const LEAST_DELAY: Duration = Duration::from_millis(10);

/// Where rate limits are kept: Redis, under the fleet's namespace.
#[derive(Clone)]
pub struct RateLimiting {
    /// The connection reservations are made on.
    pub redis: ConnectionManager,
    /// The namespace of the limits' keys.
    pub namespace: Namespace,
}

/// Each queue's rate limit, by queue name.
type QueueLimits = Arc<HashMap<String, f64>>;

/// The dispatch loop's rate limiting: the queues' limits, and the starts held until their slot.
pub(super) struct Limiter {
    limits: RateLimiting,
    db: sqlx::PgPool,
    queues: watch::Receiver<QueueLimits>,
    /// Until the queues' limits are first read (or [`FIRST_READ_WITHIN`] has passed): when
    /// that wait ends. A task of a limited queue is not dispatched unchecked meanwhile.
    first_read_by: Option<Instant>,
    /// Reserved starts waiting for their slot, by slot (and order of arrival).
    held: BTreeMap<(Instant, u64), Dispatch>,
    arrivals: u64,
    /// The deferrals being written.
    writes: TaskTracker,
}

/// A start to reserve: its dispatch and its message.
struct Gated {
    dispatch: Dispatch,
    message: TaskMessage,
}

impl Limiter {
    /// Starts reading the queues' limits every [`QUEUE_SETTINGS_EVERY`] until `stopping`.
    pub(super) fn start(
        limits: RateLimiting,
        db: sqlx::PgPool,
        stopping: CancellationToken,
    ) -> Self {
        let (tx, queues) = watch::channel(QueueLimits::default());
        tokio::spawn(read_queue_limits(
            db.clone(),
            limits.namespace.as_str().to_owned(),
            tx,
            stopping,
        ));
        Self {
            limits,
            db,
            queues,
            first_read_by: Some(Instant::now() + FIRST_READ_WITHIN),
            held: BTreeMap::new(),
            arrivals: 0,
            writes: TaskTracker::new(),
        }
    }

    /// Whether starts wait here for their slot.
    pub(super) fn holds_any(&self) -> bool {
        !self.held.is_empty()
    }

    /// Waits for the earliest held slot and returns every start whose slot has come; never
    /// returns while nothing is held. Cancel safe: nothing is taken before the wait ends.
    pub(super) async fn ready(&mut self) -> Vec<Dispatch> {
        let Some((&(first, _), _)) = self.held.first_key_value() else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(first).await;
        let now = Instant::now();
        let mut ready = Vec::new();
        while let Some(entry) = self.held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            ready.push(entry.remove());
        }
        ready
    }

    /// Splits `batch` into the dispatches no rate limit holds, to publish as they are, and the
    /// rate-limited ones, for [`Self::gate`]. The first time, waits for the queues' limits.
    pub(super) async fn split(&mut self, batch: Vec<Dispatch>) -> (Vec<Dispatch>, Vec<Dispatch>) {
        self.first_read().await;
        let queues = self.queues.borrow().clone();
        let is_gated = |dispatch: &Dispatch| {
            dispatch.rate_limited
                || (!queues.is_empty() && queues.contains_key(&dispatch.outgoing.queue))
        };
        if !batch.iter().any(is_gated) {
            return (batch, Vec::new());
        }
        let (gated, free) = batch.into_iter().partition(is_gated);
        (free, gated)
    }

    /// Returns what of `gated` (rate-limited dispatches) to publish now: those reserved for
    /// now, with their slot. The others are held until their slot, or sent back to the timer.
    pub(super) async fn gate(&mut self, gated: Vec<Dispatch>) -> Vec<Dispatch> {
        let queues = self.queues.borrow().clone();
        let mut now = Vec::new();
        let mut starts = Vec::with_capacity(gated.len());
        for dispatch in gated {
            match protocol::decode::<TaskMessage>(&dispatch.outgoing.body) {
                Ok(mut message) => {
                    let queue_limit = queues.get(&dispatch.outgoing.queue).copied();
                    with_queue_limit(&mut message, &dispatch.outgoing.queue, queue_limit);
                    starts.push(Gated { dispatch, message });
                }
                Err(error) => {
                    // Made by this process, so never; its worker checks a start without a slot.
                    tracing::error!(task_id = %dispatch.task_id, %error, "a rate-limited task does not decode; sending it unreserved");
                    now.push(dispatch);
                }
            }
        }
        let deferrals = self.reserve(starts, &mut now).await;
        if !deferrals.is_empty() {
            // Written aside, so that the dispatch loop never waits for the database.
            self.writes.spawn(defer(self.db.clone(), deferrals));
        }
        now
    }

    /// Waits for the deferrals being written.
    pub(super) async fn written(&self) {
        self.writes.close();
        self.writes.wait().await;
    }

    /// Waits, the first time only, for the first read of the queues' limits, up to
    /// [`FIRST_READ_WITHIN`] after the start.
    async fn first_read(&mut self) {
        let Some(by) = self.first_read_by.take() else {
            return;
        };
        if tokio::time::timeout_at(by, self.queues.changed())
            .await
            .is_err()
        {
            tracing::warn!("the queues' rate limits are not read yet; dispatching without them");
        }
    }

    /// Reserves the starts in one call; pushes those reserved for now onto `now`, holds those
    /// reserved later, and returns the deferrals of the rest.
    async fn reserve(
        &mut self,
        starts: Vec<Gated>,
        now: &mut Vec<Dispatch>,
    ) -> Vec<store::Deferral> {
        let keys: Vec<Vec<String>> = starts
            .iter()
            .map(|start| {
                start
                    .message
                    .rate_limit
                    .iter()
                    .flat_map(|gate| &gate.limits)
                    .map(|spec| self.limits.namespace.rate_key(&spec.group))
                    .collect()
            })
            .collect();
        let limits: Vec<Vec<Limit<'_>>> = starts
            .iter()
            .zip(&keys)
            .map(|(start, keys)| {
                start
                    .message
                    .rate_limit
                    .iter()
                    .flat_map(|gate| &gate.limits)
                    .zip(keys)
                    .map(|(spec, key)| Limit {
                        key,
                        per_second: spec.per_second,
                        burst: spec.burst,
                    })
                    .collect()
            })
            .collect();
        let mut redis = self.limits.redis.clone();
        let reserved = rate_limits::reserve(&mut redis, &limits, HORIZON, REDIS_TIMEOUT).await;
        let reservations = match reserved {
            Ok(reservations) => reservations,
            Err(error) => {
                tracing::warn!(%error, tasks = starts.len(), "rate limits cannot be checked; their tasks wait");
                return starts
                    .iter()
                    .map(|start| {
                        crate::metrics::rate_limited(&start.dispatch.outgoing.queue);
                        deferral(&start.message, unchecked_delay(start.dispatch.task_id))
                    })
                    .collect();
            }
        };
        let received = Instant::now();
        let mut deferrals = Vec::new();
        for (mut start, reservation) in starts.into_iter().zip(reservations.each) {
            match reservation {
                Reservation::Reserved { at_us } => {
                    if let Some(gate) = &mut start.message.rate_limit {
                        gate.slot_ms = Some(at_us.div_euclid(1000));
                    }
                    start.dispatch.outgoing.body = protocol::encode(&start.message);
                    let wait = micros(at_us - reservations.now_us);
                    if wait.is_zero() {
                        now.push(start.dispatch);
                    } else {
                        crate::metrics::rate_limited(&start.dispatch.outgoing.queue);
                        self.arrivals += 1;
                        self.held
                            .insert((received + wait, self.arrivals), start.dispatch);
                    }
                }
                Reservation::NotReserved { projected_us } => {
                    crate::metrics::rate_limited(&start.dispatch.outgoing.queue);
                    let turn = micros(projected_us - reservations.now_us);
                    let delay = turn.saturating_sub(HORIZON).max(LEAST_DELAY);
                    deferrals.push(deferral(&start.message, delay));
                }
            }
        }
        deferrals
    }
}

/// How long a start that could not be checked waits: [`UNCHECKED_DELAY`] and a random part of
/// up to twice as much again.
fn unchecked_delay(task_id: uuid::Uuid) -> Duration {
    use std::hash::BuildHasher;
    // Each `RandomState` is keyed afresh, so the same task draws anew each time.
    let draw = std::collections::hash_map::RandomState::new().hash_one(task_id);
    UNCHECKED_DELAY + UNCHECKED_DELAY.mul_f64(2.0 * (draw % 1_000_000) as f64 / 1_000_000.0)
}

/// The rate gate of a step's own limit (`rate_limit`) when its task has a group.
pub(super) fn step_gate(
    rate_limit: Option<&taskfleet_common::definition::limits::RateLimit>,
    rate_group: Option<&str>,
) -> Option<RateGate> {
    rate_limit.zip(rate_group).map(|(rate, group)| RateGate {
        limits: vec![RateSpec {
            group: group.to_owned(),
            per_second: rate.per_second,
            burst: rate.burst(),
        }],
        slot_ms: None,
    })
}

/// Sends tasks back to the timer.
async fn defer(db: sqlx::PgPool, deferrals: Vec<store::Deferral>) {
    let deferred = match db.acquire().await {
        Ok(mut conn) => store::defer_tasks(&mut conn, &deferrals)
            .await
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = deferred {
        // Their rows stay undispatched: the relay sends them again, reserving again.
        tracing::warn!(%error, tasks = deferrals.len(), "sending rate-limited tasks back to the timer failed; the relay will retry");
    }
}

/// Adds its queue's rate limit, if it has one, to a message's limits.
fn with_queue_limit(message: &mut TaskMessage, queue: &str, per_second: Option<f64>) {
    let Some(per_second) = per_second else { return };
    let spec = RateSpec {
        group: queue_group(queue),
        per_second,
        burst: 1,
    };
    match &mut message.rate_limit {
        Some(gate) => {
            if !gate.limits.iter().any(|limit| limit.group == spec.group) {
                gate.limits.push(spec);
            }
        }
        None => {
            message.rate_limit = Some(RateGate {
                limits: vec![spec],
                slot_ms: None,
            });
        }
    }
}

/// The deferral of a message's attempt by `delay`.
fn deferral(message: &TaskMessage, delay: Duration) -> store::Deferral {
    store::Deferral {
        task_id: message.task_id.0,
        attempt: i32::try_from(message.attempt).unwrap_or(i32::MAX),
        delay,
    }
}

/// A span of microseconds as a duration, none when negative.
fn micros(span: i64) -> Duration {
    Duration::from_micros(u64::try_from(span).unwrap_or(0))
}

/// Reads the queues' rate limits every [`QUEUE_SETTINGS_EVERY`] into `tx`, until `stopping`.
async fn read_queue_limits(
    db: sqlx::PgPool,
    namespace: String,
    tx: watch::Sender<QueueLimits>,
    stopping: CancellationToken,
) {
    let mut interval = tokio::time::interval(QUEUE_SETTINGS_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read = false;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stopping.cancelled() => return,
        }
        match store::queue_settings(&db, &namespace).await {
            Ok(settings) => {
                let limits: HashMap<String, f64> = settings
                    .into_iter()
                    .filter_map(|row| Some((row.queue, row.rate_limit_per_s?)))
                    .collect();
                // The first read is always sent: the dispatch loop waits for it.
                let first = !read;
                read = true;
                tx.send_if_modified(|current| {
                    let changed = first || **current != limits;
                    if changed {
                        *current = Arc::new(limits);
                    }
                    changed
                });
            }
            Err(error) => tracing::warn!(%error, "reading the queues' rate limits failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_common::{RunId, TaskId};

    fn message(rate_limit: Option<RateGate>) -> TaskMessage {
        TaskMessage {
            version: protocol::PROTOCOL_VERSION,
            task_id: TaskId::new(),
            run_id: RunId::new(),
            step_id: "s".to_owned(),
            attempt: 3,
            step: taskfleet_common::definition::StepKind::Dataflow {
                program: ".".to_owned(),
            },
            input: serde_json::json!(1),
            timeout_s: None,
            ends_run: false,
            trace_id: None,
            rate_limit,
            exclusive: false,
        }
    }

    fn spec(group: &str, per_second: f64) -> RateSpec {
        RateSpec {
            group: group.to_owned(),
            per_second,
            burst: 1,
        }
    }

    #[test]
    fn a_queue_limit_joins_the_step_limit_once() {
        let mut plain = message(None);
        with_queue_limit(&mut plain, "q", None);
        assert_eq!(plain.rate_limit, None);
        with_queue_limit(&mut plain, "q", Some(2.0));
        let expected = RateGate {
            limits: vec![spec(&queue_group("q"), 2.0)],
            slot_ms: None,
        };
        assert_eq!(plain.rate_limit.as_ref(), Some(&expected));
        with_queue_limit(&mut plain, "q", Some(2.0));
        assert_eq!(plain.rate_limit.as_ref(), Some(&expected), "not twice");

        let mut limited = message(Some(RateGate {
            limits: vec![spec("g", 5.0)],
            slot_ms: None,
        }));
        with_queue_limit(&mut limited, "q", Some(2.0));
        let limits = limited.rate_limit.expect("limited").limits;
        assert_eq!(limits, vec![spec("g", 5.0), spec(&queue_group("q"), 2.0)]);
    }

    #[test]
    fn starts_that_could_not_be_checked_come_back_spread_over_two_seconds() {
        let task_id = uuid::Uuid::now_v7();
        let delays: Vec<Duration> = (0..200).map(|_| unchecked_delay(task_id)).collect();
        assert!(
            delays
                .iter()
                .all(|delay| (UNCHECKED_DELAY..UNCHECKED_DELAY * 3).contains(delay))
        );
        let early = delays
            .iter()
            .filter(|delay| **delay < UNCHECKED_DELAY * 2)
            .count();
        assert!(
            (50..150).contains(&early),
            "{early} of 200 in the first second"
        );
    }

    #[test]
    fn deferrals_keep_the_attempt_and_spans_never_go_negative() {
        let message = message(None);
        let deferral = deferral(&message, Duration::from_secs(2));
        assert_eq!(deferral.task_id, message.task_id.0);
        assert_eq!(deferral.attempt, 3);
        assert_eq!(micros(-5), Duration::ZERO);
        assert_eq!(micros(1_500), Duration::from_micros(1_500));
    }
}
