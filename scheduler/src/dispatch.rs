//! Dispatch: publishes committed tasks to RabbitMQ and marks them dispatched once confirmed.
//!
//! Task rows are the outbox. Whoever commits tasks hands them to the [`Dispatcher`] after the
//! commit; a relay loop re-publishes rows that stayed undispatched (a crash between commit and
//! publish, a broker error), so no committed task is ever left behind. A task published twice is
//! harmless: the attempt number fences its completion.
//!
//! Tasks under a rate limit are reserved their start before they are published (`rate`).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::protocol::{self, PROTOCOL_VERSION, TaskMessage};
use taskfleet_common::{RunId, TaskId, TraceId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{Broker, Outgoing};
use crate::costs::TaskCosts;
use crate::store;

mod mark;
mod rate;

use mark::mark_loop;
use rate::Limiter;
pub use rate::RateLimiting;

/// The most tasks published in one round of confirms.
const MAX_BATCH: usize = 1024;
/// Tasks of a batch share a message only once there are this many messages' worth of them, so
/// that a few tasks still go to as many workers as there are tasks.
const SPREAD: usize = 16;
/// The largest body a message of several tasks grows to; a task larger than this travels
/// alone.
const MAX_BUNDLE_BYTES: usize = 256 * 1024;
/// A task ready to publish, with the id under which it is marked dispatched.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The task row.
    pub task_id: Uuid,
    /// The message.
    pub outgoing: Outgoing,
    /// Whether the message carries a step's rate limit (`TaskMessage::rate_limit`).
    pub rate_limited: bool,
}

/// The task a [`Dispatch`] sends: its run, its id and step, and the group its starts count in
/// when its step has a rate limit.
#[derive(Debug, Clone, Copy)]
pub struct TaskRef<'a> {
    /// The run.
    pub run_id: Uuid,
    /// The run's trace.
    pub trace_id: Option<TraceId>,
    /// The task.
    pub task_id: Uuid,
    /// Its step.
    pub step_id: &'a str,
    /// The group of the step's rate limit (`NewTask::rate_group`).
    pub rate_group: Option<&'a str>,
}

impl Dispatch {
    /// Builds the dispatch of one attempt of a step of `definition`. Returns `None` if the
    /// definition has no such step (which validation rules out).
    pub fn new(
        definition: &WorkflowDefinition,
        task: TaskRef<'_>,
        attempt: u32,
        input: Value,
    ) -> Option<Self> {
        let TaskRef {
            run_id,
            trace_id,
            task_id,
            step_id,
            rate_group,
        } = task;
        let step = definition.step(step_id)?;
        let rate_limit = rate::step_gate(step.rate_limit.as_ref(), rate_group);
        let message = TaskMessage {
            version: PROTOCOL_VERSION,
            task_id: TaskId(task_id),
            run_id: RunId(run_id),
            step_id: step_id.to_owned(),
            attempt,
            step: step.kind()?,
            input,
            timeout_s: step.timeout_s,
            ends_run: definition.steps.len() == 1 && !definition.plans_with_programs(),
            trace_id,
            rate_limit,
            exclusive: step.concurrency.is_some(),
        };
        Some(Self {
            task_id,
            outgoing: Outgoing {
                queue: step.queue().to_owned(),
                priority: step.priority(),
                body: protocol::encode(&message),
            },
            rate_limited: message.rate_limit.is_some(),
        })
    }
}

/// The sending side of the dispatch loop.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<Vec<Dispatch>>,
    /// The admission loop its users wake for tasks that wait for a concurrency permit (see
    /// [`Self::admit`]).
    admission: Option<crate::admission::Admission>,
}

impl Dispatcher {
    /// Returns this dispatcher with the admission loop its users wake.
    pub fn with_admission(self, admission: crate::admission::Admission) -> Self {
        Self {
            admission: Some(admission),
            ..self
        }
    }

    /// Wakes the admission loop, if this dispatcher has one, for the groups of tasks that wait
    /// for a concurrency permit or of permits freed: called after the commit that wrote them.
    pub fn admit(&self, wakes: Vec<crate::admission::Wake>) {
        if let Some(admission) = &self.admission {
            admission.wake(wakes);
        }
    }

    /// Hands committed tasks to the dispatch loop.
    pub fn send(&self, dispatches: Vec<Dispatch>) {
        if dispatches.is_empty() {
            return;
        }
        if self.tx.send(dispatches).is_err() {
            // The loop has stopped (shutdown); the relay of the next start publishes them.
            tracing::debug!("dispatch loop stopped; tasks left to the relay");
        }
    }
}

/// Starts the dispatch loop and returns its sender and the loop itself, to be spawned. The loop
/// runs until every [`Dispatcher`] is dropped and it has published what they sent. Up to
/// `tasks_per_message` tasks share one broker message (see [`pack`]), fewer for a queue whose
/// tasks take longer (see [`TaskCosts::per_message`]).
///
/// A confirmed task is marked dispatched half the relay's age (`relay_after`) after its
/// confirm, and only if it is still queued by then: most tasks finish sooner, and a task that
/// finished needs no mark, its row leaves the outbox with its completion. Half leaves the mark
/// as much time again to be written before the relay would take the task.
///
/// Tasks under a rate limit (their step's, their queue's) are reserved their start in Redis
/// (`limits`) first, and wait for it (see `rate`).
pub fn dispatcher(
    broker: Arc<Broker>,
    db: sqlx::PgPool,
    limits: RateLimiting,
    tasks_per_message: NonZeroUsize,
    relay_after: Duration,
    costs: TaskCosts,
) -> (Dispatcher, impl Future<Output = ()>) {
    // Unbounded on purpose: every item was already committed and must not be refused; the
    // accept path is bounded upstream by its own channel.
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Dispatcher {
            tx,
            admission: None,
        },
        dispatch_loop(
            broker,
            db,
            limits,
            rx,
            move |queue: &str| costs.per_message(queue, tasks_per_message.get()),
            relay_after / 2,
        ),
    )
}

async fn dispatch_loop(
    broker: Arc<Broker>,
    db: sqlx::PgPool,
    limits: RateLimiting,
    mut rx: mpsc::UnboundedReceiver<Vec<Dispatch>>,
    tasks_per_message: impl Fn(&str) -> usize,
    mark_after: Duration,
) {
    let (marks, confirmed) = mpsc::unbounded_channel();
    let stopping = CancellationToken::new();
    let marker = tokio::spawn(mark_loop(
        db.clone(),
        confirmed,
        mark_after,
        stopping.clone(),
    ));
    let mut limiter = Limiter::start(limits, db, stopping.clone());
    loop {
        let (mut batch, reserved) = tokio::select! {
            received = rx.recv() => match received {
                Some(batch) => (batch, Vec::new()),
                None => break,
            },
            reserved = limiter.ready() => (Vec::new(), reserved),
        };
        if !batch.is_empty() {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            // What no rate limit holds goes first: it never waits for Redis or the database.
            let (free, gated) = limiter.split(batch).await;
            if gated.is_empty() {
                batch = free;
            } else {
                publish_and_mark(&broker, &free, &tasks_per_message, &marks).await;
                batch = limiter.gate(gated).await;
            }
        }
        // Starts whose reserved slot has come are not reserved again.
        batch.extend(reserved);
        publish_and_mark(&broker, &batch, &tasks_per_message, &marks).await;
    }
    // Stopping: the starts held for their slot (at most `rate::HORIZON` away) go at their slot.
    while limiter.holds_any() {
        let reserved = limiter.ready().await;
        publish_and_mark(&broker, &reserved, &tasks_per_message, &marks).await;
    }
    limiter.written().await;
    // What is left to mark is marked now.
    stopping.cancel();
    drop(marks);
    if let Err(error) = marker.await {
        tracing::error!(%error, "the dispatch marker failed");
    }
}

/// Publishes a batch and hands what the broker confirmed to the mark loop.
async fn publish_and_mark(
    broker: &Broker,
    batch: &[Dispatch],
    tasks_per_message: impl Fn(&str) -> usize,
    marks: &mpsc::UnboundedSender<(tokio::time::Instant, Vec<Uuid>)>,
) {
    if batch.is_empty() {
        return;
    }
    let confirmed = publish_batch(broker, batch, tasks_per_message).await;
    if !confirmed.is_empty() {
        let _ = marks.send((tokio::time::Instant::now(), confirmed));
    }
}

/// Packs a batch into broker messages. Tasks for the same queue and priority share messages of
/// up to `most(queue)` tasks (and [`MAX_BUNDLE_BYTES`]) once the batch holds [`SPREAD`]
/// messages' worth of them, so a large batch costs the broker one message per bundle instead
/// of one per task, while a few tasks travel alone and spread over every worker. Returns each
/// message with the tasks it carries, in the batch's order within each queue and priority, the
/// highest priority first: a batch publishes its urgent tasks before the others.
fn pack(batch: &[Dispatch], most: impl Fn(&str) -> usize) -> Vec<(Outgoing, Vec<Uuid>)> {
    let mut groups: Vec<((&str, u8), Vec<&Dispatch>)> = Vec::new();
    for dispatch in batch {
        let key = (dispatch.outgoing.queue.as_str(), dispatch.outgoing.priority);
        match groups.iter_mut().find(|(group, _)| *group == key) {
            Some((_, members)) => members.push(dispatch),
            None => groups.push((key, vec![dispatch])),
        }
    }
    // Stable: groups of one priority keep the order of their first task.
    groups.sort_by_key(|((_, priority), _)| std::cmp::Reverse(*priority));
    let mut messages = Vec::new();
    for ((queue, priority), members) in groups {
        let per_message = (members.len() / SPREAD).clamp(1, most(queue).max(1));
        let mut bodies: Vec<&[u8]> = Vec::new();
        let mut ids = Vec::new();
        let mut bytes = 0;
        let mut flush = |bodies: &mut Vec<&[u8]>, ids: &mut Vec<Uuid>| {
            if bodies.is_empty() {
                return;
            }
            messages.push((
                Outgoing {
                    queue: queue.to_owned(),
                    priority,
                    body: protocol::bundle(bodies),
                },
                std::mem::take(ids),
            ));
            bodies.clear();
        };
        for dispatch in members {
            let body = dispatch.outgoing.body.as_slice();
            if bodies.len() >= per_message || (bytes + body.len() > MAX_BUNDLE_BYTES) {
                flush(&mut bodies, &mut ids);
                bytes = 0;
            }
            bytes += body.len();
            bodies.push(body);
            ids.push(dispatch.task_id);
        }
        flush(&mut bodies, &mut ids);
    }
    messages
}

/// Publishes a batch and returns the tasks the broker confirmed.
async fn publish_batch(
    broker: &Broker,
    batch: &[Dispatch],
    tasks_per_message: impl Fn(&str) -> usize,
) -> Vec<Uuid> {
    let (outgoing, carried): (Vec<Outgoing>, Vec<Vec<Uuid>>) =
        pack(batch, tasks_per_message).into_iter().unzip();
    let acked = match broker.publish(&outgoing).await {
        Ok(acked) => acked,
        Err(error) => {
            tracing::warn!(%error, tasks = batch.len(), "publishing tasks failed; the relay will retry");
            return Vec::new();
        }
    };
    let mut confirmed = Vec::with_capacity(batch.len());
    let mut counted: Vec<(&str, u64)> = Vec::new();
    for ((ids, ack), message) in carried.into_iter().zip(acked).zip(&outgoing) {
        if ack {
            match counted
                .iter_mut()
                .find(|(queue, _)| *queue == message.queue)
            {
                Some((_, count)) => *count += ids.len() as u64,
                None => counted.push((&message.queue, ids.len() as u64)),
            }
            confirmed.extend(ids);
        }
    }
    crate::metrics::dispatched(counted);
    if confirmed.len() < batch.len() {
        tracing::warn!(
            refused = batch.len() - confirmed.len(),
            "broker refused some tasks; the relay will retry"
        );
    }
    confirmed
}

/// Re-publishes tasks of `namespace` that were committed but never confirmed, every `period`.
pub async fn relay_loop(
    dispatcher: Dispatcher,
    broker: Arc<Broker>,
    db: sqlx::PgPool,
    namespace: String,
    older_than: Duration,
    period: Duration,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => break,
        }
        match store::claim_undispatched(&db, &namespace, older_than, MAX_BATCH as i64).await {
            Ok(rows) if rows.is_empty() => {}
            Ok(rows) => {
                tracing::info!(tasks = rows.len(), "relaying undispatched tasks");
                send_claimed(&dispatcher, &broker, rows).await;
            }
            Err(error) => tracing::warn!(%error, "reading the outbox failed"),
        }
    }
}

/// Dispatches tasks of `namespace` whose retry is due, checking every `period`.
pub async fn timer_loop(
    dispatcher: Dispatcher,
    broker: Arc<Broker>,
    db: sqlx::PgPool,
    namespace: String,
    period: Duration,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => break,
        }
        match store::claim_due(&db, &namespace, MAX_BATCH as i64).await {
            Ok(rows) if rows.is_empty() => {}
            Ok(rows) => {
                tracing::debug!(tasks = rows.len(), "dispatching due retries");
                send_claimed(&dispatcher, &broker, rows).await;
            }
            Err(error) => tracing::warn!(%error, "reading due retries failed"),
        }
    }
}

/// Sends tasks read back from the database. A task whose input is sealed with a key this
/// scheduler lacks is left for another scheduler (one that has the key, during a rotation) or
/// for a later relay, and logged: it stays in the outbox, which `taskfleet_outbox_pending`
/// shows. A task that no key could send (its input altered, or its run's definition
/// unreadable) is reported failed instead, with an `invalid_task` error, through the
/// completions queue as a worker reports. Either way, the tasks claimed with it go on.
async fn send_claimed(
    dispatcher: &Dispatcher,
    broker: &Broker,
    rows: Vec<store::UndispatchedTask>,
) {
    use taskfleet_common::seal::SealError;
    let mut dispatches = Vec::with_capacity(rows.len());
    let mut unsendable = Vec::new();
    for mut row in rows {
        let attempt = u32::try_from(row.attempt).unwrap_or(1);
        let input = match row.open_input() {
            Ok(input) => input,
            Err(error @ (SealError::NoKeys(_) | SealError::UnknownKey(_))) => {
                tracing::warn!(task_id = %row.id, run_id = %row.run_id, %error, "leaving a task whose input this scheduler cannot open to a scheduler that can");
                continue;
            }
            Err(error) => {
                unsendable.push((
                    row,
                    attempt,
                    format!("the task's input cannot be opened: {error}"),
                ));
                continue;
            }
        };
        let built = serde_json::from_value::<WorkflowDefinition>(row.definition.0.clone())
            .map_err(|error| format!("the run's definition does not read: {error}"))
            .and_then(|definition| {
                let task = TaskRef {
                    run_id: row.run_id,
                    trace_id: row.trace_id(),
                    task_id: row.id,
                    step_id: &row.step_id,
                    rate_group: row.rate_group.as_deref(),
                };
                Dispatch::new(&definition, task, attempt, input)
                    .ok_or_else(|| format!("the run's definition has no step {:?}", row.step_id))
            });
        match built {
            Ok(dispatch) => dispatches.push(dispatch),
            Err(reason) => unsendable.push((row, attempt, reason)),
        }
    }
    dispatcher.send(dispatches);
    for (row, attempt, reason) in unsendable {
        tracing::error!(task_id = %row.id, run_id = %row.run_id, reason, "failing a task that cannot be sent");
        report_unsendable(broker, row.id, row.run_id, attempt, reason).await;
    }
}

/// Reports a task that cannot be sent as failed with an `invalid_task` error (best effort: a
/// report that does not reach the broker leaves the task to the next claim).
async fn report_unsendable(
    broker: &Broker,
    task_id: Uuid,
    run_id: Uuid,
    attempt: u32,
    reason: String,
) {
    let now = chrono::Utc::now();
    let completion = protocol::CompletionMessage {
        version: PROTOCOL_VERSION,
        task_id: TaskId(task_id),
        run_id: RunId(run_id),
        attempt,
        worker_id: "scheduler".to_owned(),
        outcome: protocol::Outcome::Failed {
            error: taskfleet_common::StepError::new(taskfleet_common::error::INVALID_TASK, reason),
        },
        started_at: now,
        finished_at: now,
        logs: None,
        ends_run: false,
        ran: None,
    };
    match broker.report(&protocol::encode(&completion)).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(%task_id, "the broker refused the report of an unsendable task")
        }
        Err(error) => tracing::warn!(%error, %task_id, "reporting an unsendable task"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_common::protocol::Ran;

    fn dispatch(queue: &str, priority: u8, n: usize) -> Dispatch {
        let message = TaskMessage {
            version: PROTOCOL_VERSION,
            task_id: TaskId::new(),
            run_id: RunId::new(),
            step_id: "s".to_owned(),
            attempt: 1,
            step: taskfleet_common::definition::StepKind::Dataflow {
                program: ".".to_owned(),
            },
            input: serde_json::json!(n),
            timeout_s: None,
            ends_run: false,
            trace_id: None,
            rate_limit: None,
            exclusive: false,
        };
        Dispatch {
            task_id: message.task_id.0,
            outgoing: Outgoing {
                queue: queue.to_owned(),
                priority,
                body: protocol::encode(&message),
            },
            rate_limited: false,
        }
    }

    /// Packs `batch` and returns, per message, its queue, priority and the inputs it carries.
    fn packed(batch: &[Dispatch], most: impl Fn(&str) -> usize) -> Vec<(String, u8, Vec<u64>)> {
        pack(batch, most)
            .into_iter()
            .map(|(outgoing, ids)| {
                let bodies = protocol::unbundle(&outgoing.body).expect("reads");
                assert_eq!(bodies.len(), ids.len());
                let inputs = bodies
                    .into_iter()
                    .zip(&ids)
                    .map(|(body, id)| {
                        let task: TaskMessage = protocol::decode(body).expect("decodes");
                        assert_eq!(task.task_id.0, *id);
                        task.input.as_u64().expect("a number")
                    })
                    .collect();
                (outgoing.queue, outgoing.priority, inputs)
            })
            .collect()
    }

    #[test]
    fn only_a_run_of_one_plain_step_is_ended_by_its_task() {
        let ends_run = |definition: serde_json::Value| {
            let definition: WorkflowDefinition =
                serde_json::from_value(definition).expect("parses");
            let step = definition.steps[0].id.clone();
            let task = TaskRef {
                run_id: Uuid::now_v7(),
                trace_id: None,
                task_id: Uuid::now_v7(),
                step_id: &step,
                rate_group: None,
            };
            let dispatch =
                Dispatch::new(&definition, task, 1, serde_json::json!(1)).expect("the step exists");
            protocol::decode::<TaskMessage>(&dispatch.outgoing.body)
                .expect("decodes")
                .ends_run
        };
        assert!(ends_run(
            serde_json::json!({"steps": [{"id": "a", "dataflow": "."}]})
        ));
        assert!(ends_run(
            serde_json::json!({"steps": [{"id": "a", "python": "m:f"}]})
        ));
        assert!(!ends_run(serde_json::json!({"steps": [
            {"id": "a", "dataflow": "."}, {"id": "b", "dataflow": ".", "after": ["a"]}]})));
        assert!(!ends_run(serde_json::json!({"steps": [
            {"id": "a", "dataflow": "."}, {"id": "b", "dataflow": "."}]})));
        for field in ["input", "for_each", "when"] {
            let mut step = serde_json::json!({"id": "a", "dataflow": "."});
            step[field] = serde_json::json!(".");
            assert!(!ends_run(serde_json::json!({"steps": [step]})), "{field}");
        }
    }

    #[test]
    fn a_few_tasks_travel_one_per_message() {
        let batch: Vec<Dispatch> = (0..SPREAD * 2 - 1).map(|n| dispatch("q", 0, n)).collect();
        let messages = packed(&batch, |_| 16);
        assert_eq!(messages.len(), batch.len());
        assert!(messages.iter().all(|(_, _, inputs)| inputs.len() == 1));
    }

    #[test]
    fn many_tasks_share_messages_per_queue_and_priority_in_order() {
        let mut batch: Vec<Dispatch> = (0..1000).map(|n| dispatch("a", 0, n)).collect();
        batch.extend((1000..1003).map(|n| dispatch("a", 5, n)));
        batch.extend((2000..2100).map(|n| dispatch("b", 0, n)));
        let messages = packed(&batch, |_| 16);
        let of = |queue: &str, priority: u8| -> Vec<Vec<u64>> {
            messages
                .iter()
                .filter(|(q, p, _)| q == queue && *p == priority)
                .map(|(_, _, inputs)| inputs.clone())
                .collect()
        };
        let a = of("a", 0);
        assert!(a.iter().all(|inputs| inputs.len() <= 16));
        assert_eq!(a.len(), 63);
        assert_eq!(a.concat(), (0..1000).collect::<Vec<u64>>());
        assert_eq!(of("a", 5), vec![vec![1000], vec![1001], vec![1002]]);
        assert_eq!(
            messages[..3]
                .iter()
                .map(|(_, priority, _)| *priority)
                .collect::<Vec<_>>(),
            vec![5, 5, 5],
            "the highest priority goes first"
        );
        let b = of("b", 0);
        assert!(
            b.iter()
                .all(|inputs| inputs.len() == 6 || inputs.len() == 4)
        );
        assert_eq!(b.concat(), (2000..2100).collect::<Vec<u64>>());
        assert!(
            packed(&batch, |_| 1)
                .iter()
                .all(|(_, _, inputs)| inputs.len() == 1)
        );
    }

    #[test]
    fn each_queue_shares_messages_as_far_as_its_own_tasks_allow() {
        let costs = TaskCosts::default();
        costs.learn(&[
            Ran {
                queue: "quick".into(),
                micros: 10,
            },
            Ran {
                queue: "slow".into(),
                micros: 40_000,
            },
        ]);
        let mut batch: Vec<Dispatch> = (0..1024).map(|n| dispatch("quick", 0, n)).collect();
        batch.extend((0..512).map(|n| dispatch("slow", 0, n)));
        batch.extend((0..512).map(|n| dispatch("unseen", 0, n)));
        let messages = packed(&batch, |queue| costs.per_message(queue, 64));
        let sizes = |queue: &str| -> Vec<usize> {
            messages
                .iter()
                .filter(|(q, _, _)| q == queue)
                .map(|(_, _, inputs)| inputs.len())
                .collect()
        };
        assert_eq!(sizes("quick"), vec![64; 16]);
        assert_eq!(sizes("slow"), vec![1; 512]);
        assert_eq!(sizes("unseen"), vec![16; 32]);
    }

    #[test]
    fn large_tasks_do_not_grow_a_message_past_its_limit() {
        let mut big = dispatch("q", 0, 0);
        big.outgoing.body.resize(MAX_BUNDLE_BYTES / 2 + 1, b' ');
        let batch: Vec<Dispatch> = (0..SPREAD * 4).map(|_| big.clone()).collect();
        for (outgoing, ids) in pack(&batch, |_| 16) {
            assert_eq!(ids.len(), 1);
            assert!(outgoing.body.len() <= MAX_BUNDLE_BYTES);
        }
    }
}
