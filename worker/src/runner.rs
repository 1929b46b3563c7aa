//! The worker's main loop: takes deliveries from the task queues, leases each task in Redis,
//! runs it on its executor and hands its completion to the report loop (see [`crate::report`]),
//! which publishes it (confirmed by the broker), writes the result to Redis and only then
//! acknowledges the delivery.
//!
//! A delivery carries one task, or a bundle of several that the scheduler dispatched at once.
//! The prefetch equals the concurrency, so the worker holds at most that many deliveries, and at
//! most that many tasks run at once; a delivery is acknowledged only when all its tasks are
//! reported.
//!
//! Every task message ends in a completion, so no run waits forever on a task: one this worker
//! cannot read fails with `invalid_task` (a message that names no task at all is moved to the
//! dead-letters queue),
//! and an input or output that cannot be stored or sent (see `taskfleet_common::value`) fails
//! the task instead of reaching the scheduler.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::{CANCELLED, INVALID_OUTPUT, INVALID_TASK, WORKER_LOST};
use taskfleet_common::protocol::{
    self, CompletionMessage, DecodeError, Outcome, PROTOCOL_VERSION, Ran, TaskMessage,
};
use taskfleet_common::records::{self, Lease, StoredResult, WorkerHeartbeat};
use taskfleet_common::{Namespace, RunId, StepError, TaskId, value};
use taskfleet_io::pubsub;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::executor::dataflow::DataflowExecutor;
use crate::executor::pool::PythonPool;
use crate::executor::python::{PythonTarget, StepContext};
use crate::report::{self, BrokerSlot, PendingDelivery, Report, ReportTargets, Reporter};

/// What a step came to on its executor.
#[derive(Debug)]
pub struct Executed {
    /// Its output, or why it failed.
    pub result: Result<serde_json::Value, StepError>,
    /// What it printed or logged (Python steps).
    pub logs: Option<String>,
    /// How long it ran, from the moment its executor took it (not counting a wait for a free
    /// Python executor); `None` if no executor took it.
    pub ran: Option<Duration>,
}

/// The executors of every step kind.
#[derive(Clone)]
pub struct Executors {
    /// jq programs.
    pub dataflow: DataflowExecutor,
    /// Python functions and code.
    pub python: PythonPool,
}

impl Executors {
    /// Runs `task` on the executor of its kind, failing it with `timeout` past `limit`.
    /// Dropping the future stops a Python step.
    pub async fn execute(&self, task: &TaskMessage, limit: Option<Duration>) -> Executed {
        let target = match &task.step {
            StepKind::Dataflow { .. } => {
                let started = std::time::Instant::now();
                // The executor keeps the limit itself: past it, the program's sandbox is killed.
                let result = self.dataflow.run(task, limit).await;
                return Executed {
                    result,
                    logs: None,
                    ran: Some(started.elapsed()),
                };
            }
            StepKind::Python { module, function } => PythonTarget::Function {
                module: module.clone(),
                function: function.clone(),
            },
            StepKind::PythonCode { source } => PythonTarget::Code {
                source: source.clone(),
            },
        };
        let context = StepContext {
            run_id: task.run_id.to_string(),
            task_id: task.task_id.to_string(),
            step_id: task.step_id.clone(),
            attempt: task.attempt,
        };
        let (output, ran) = self
            .python
            .call_timed(target, task.input.clone(), context, limit)
            .await;
        Executed {
            result: output.result,
            logs: (!output.logs.is_empty()).then_some(output.logs),
            ran,
        }
    }
}

/// How many times an attempt may lose its worker (be delivered again without having finished)
/// before it fails with `worker_lost`.
const MAX_LOST_WORKERS: u32 = 3;
/// The header of a task message that counts its deliveries (absent: 1). The count travels in
/// the message itself, durable with it in RabbitMQ, so it survives restarts of every process
/// and of Redis.
const DELIVERIES_HEADER: &str = "x-taskfleet-deliveries";

/// What to do with a delivery the broker marked redelivered (its previous holder lost its
/// connection without acknowledging it).
enum Redelivery {
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

/// What every task handler shares.
struct Shared {
    /// The current connection; replaced after a reconnect.
    broker: Arc<BrokerSlot>,
    /// Where finished tasks go.
    reporter: Reporter,
    /// One permit per task that may run at once.
    slots: Semaphore,
    redis: ConnectionManager,
    namespace: Namespace,
    worker_id: String,
    executors: Executors,
    lease_ttl: Duration,
    /// The tasks running now, whose leases the renewal loop keeps alive, with their run and
    /// the token that stops them when their run is cancelled.
    running: Mutex<HashMap<TaskId, (RunId, CancellationToken)>>,
    /// Attempts this worker put back in their queue with a new count whose original delivery
    /// it has not yet seen acknowledged; dropping the sender says it has.
    requeueing: Mutex<HashMap<(TaskId, u32), watch::Receiver<()>>>,
    /// The tasks this worker holds, by task queue: delivered and not yet reported.
    held: HeldTasks,
}

/// Counts the tasks a worker holds in each task queue, from delivery to report (running, or
/// waiting for a slot in their bundle), for its heartbeat.
#[derive(Default)]
struct HeldTasks(Mutex<HashMap<Arc<str>, usize>>);

impl HeldTasks {
    /// Counts one task of `queue` until the returned guard is dropped.
    fn hold<'a>(&'a self, queue: &Arc<str>) -> HeldTask<'a> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(queue.clone())
            .or_default() += 1;
        HeldTask {
            tasks: self,
            queue: queue.clone(),
        }
    }

    /// The counts now, by queue.
    fn counts(&self) -> BTreeMap<String, usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(queue, count)| (queue.to_string(), *count))
            .collect()
    }
}

/// One task counted by [`HeldTasks`].
struct HeldTask<'a> {
    tasks: &'a HeldTasks,
    queue: Arc<str>,
}

impl Drop for HeldTask<'_> {
    fn drop(&mut self) {
        let mut held = self
            .tasks
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.queue) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.queue);
            }
        }
    }
}

/// Runs a worker until `shutdown` is cancelled, then drains within the grace period.
///
/// A lost RabbitMQ connection (a broker restart, a network cut) is re-established in place:
/// the worker reconnects with backoff, declares its queues again and resumes consuming. Tasks
/// running when the connection dropped run to their end and report on the new connection; their
/// deliveries died with the old one, so RabbitMQ hands them out again, and the second
/// completion of the same attempt is ignored by the scheduler's fencing.
pub async fn run(
    config: Config,
    executors: Executors,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let prefetch = u16::try_from(config.concurrency.get()).unwrap_or(u16::MAX);
    let connect = || {
        Broker::connect(
            &config.amqp_url,
            &config.namespace,
            &config.queues,
            prefetch,
            &shutdown,
        )
    };
    let Some(broker) = connect().await else {
        return Ok(());
    };
    let redis_client =
        redis::Client::open(config.redis_url.as_str()).context("parsing the redis url")?;
    let redis = redis_client
        .get_connection_manager()
        .await
        .context("connecting to redis")?;
    let broker = Arc::new(BrokerSlot::new(broker));
    let report_stop = CancellationToken::new();
    let (reporter, report_loop) = report::reporter(
        ReportTargets {
            broker: broker.clone(),
            redis: redis.clone(),
            namespace: config.namespace.clone(),
        },
        report_stop.clone(),
    );
    let reports = tokio::spawn(report_loop);
    let shared = Arc::new(Shared {
        broker,
        reporter,
        slots: Semaphore::new(config.concurrency.get()),
        redis,
        namespace: config.namespace.clone(),
        worker_id: config.worker_id.clone(),
        executors,
        lease_ttl: config.lease_ttl,
        running: Mutex::new(HashMap::new()),
        requeueing: Mutex::new(HashMap::new()),
        held: HeldTasks::default(),
    });
    let background = CancellationToken::new();
    let background_tasks = TaskTracker::new();
    background_tasks.spawn(heartbeat_loop(
        shared.clone(),
        config.clone(),
        background.clone(),
    ));
    background_tasks.spawn(cancel_listener(
        shared.clone(),
        redis_client,
        background.clone(),
    ));
    let tasks = TaskTracker::new();
    loop {
        let broker = shared.broker.current();
        let lost = match consume(&broker, &config).await {
            Ok((tags, mut deliveries)) => {
                tracing::info!(
                    worker_id = %config.worker_id,
                    queues = ?config.queues,
                    concurrency = config.concurrency.get(),
                    namespace = %config.namespace,
                    "worker consuming"
                );
                let lost = loop {
                    let next = tokio::select! {
                        next = deliveries.next() => next,
                        () = shutdown.cancelled() => break None,
                    };
                    match next {
                        Some(Ok(delivery)) => {
                            tasks.spawn(handle(shared.clone(), delivery));
                        }
                        Some(Err(error)) => break Some(error.to_string()),
                        None => break Some("the broker ended the task consumers".to_owned()),
                    }
                };
                if lost.is_none() {
                    for tag in &tags {
                        broker.cancel(tag).await;
                    }
                }
                lost
            }
            Err(error) => Some(error.to_string()),
        };
        let Some(lost) = lost else { break };
        tracing::warn!(
            error = lost,
            in_flight = tasks.len(),
            "lost the rabbitmq connection; reconnecting"
        );
        broker.close().await;
        match connect().await {
            Some(broker) => shared.broker.replace(broker),
            None => break,
        }
    }
    tracing::info!(in_flight = tasks.len(), "worker draining");
    tasks.close();
    if tokio::time::timeout(config.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tasks.len(),
            "grace period over; unfinished tasks go back to their queues"
        );
    }
    // What finished is reported before the connection closes; the rest goes back to its queues.
    report_stop.cancel();
    if let Err(error) = reports.await {
        tracing::error!(%error, "the report loop failed");
    }
    background.cancel();
    background_tasks.close();
    background_tasks.wait().await;
    shared.broker.current().close().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Starts consuming every task queue of the worker; returns the consumer tags and the merged
/// stream of deliveries.
async fn consume(
    broker: &Broker,
    config: &Config,
) -> Result<
    (
        Vec<String>,
        futures_util::stream::SelectAll<lapin::Consumer>,
    ),
    lapin::Error,
> {
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for queue in &config.queues {
        let tag = format!("{}.{queue}", config.worker_id);
        consumers.push(broker.consume(queue, &tag).await?);
        tags.push(tag);
    }
    Ok((tags, futures_util::stream::select_all(consumers)))
}

/// Reads the tasks a delivery carries (one, or a bundle of several) and runs them; the delivery
/// is acknowledged once every one of them is reported. A bundle that comes back from a lost
/// worker is first put back as single tasks (see [`Shared::split_redelivered`]), so that a task
/// that takes its worker down is counted, and fails, alone.
async fn handle(shared: Arc<Shared>, delivery: Delivery) {
    let ranges = match protocol::unbundle(&delivery.data) {
        Ok(bodies) => ranges_within(&delivery.data, &bodies),
        Err(error) => {
            let pending = PendingDelivery::new(delivery, 1);
            let body = pending.delivery().data.clone();
            shared.dead_letter(&body, &error, &pending).await;
            return;
        }
    };
    if ranges.len() > 1
        && delivery.redelivered
        && shared.split_redelivered(&delivery, &ranges).await
    {
        return;
    }
    let bundled = ranges.len() > 1;
    let queue = shared
        .namespace
        .task_queue_name(delivery.routing_key.as_str())
        .map(Arc::<str>::from);
    let pending = PendingDelivery::new(delivery, ranges.len());
    let tasks = ranges
        .into_iter()
        .map(|range| handle_task(&shared, &pending, range, bundled, queue.as_ref()));
    futures_util::future::join_all(tasks).await;
}

/// Returns where each of `parts` (slices of `body`) lies within `body`.
fn ranges_within(body: &[u8], parts: &[&[u8]]) -> Vec<Range<usize>> {
    let base = body.as_ptr() as usize;
    parts
        .iter()
        .map(|part| {
            let start = (part.as_ptr() as usize).saturating_sub(base);
            start..start + part.len()
        })
        .collect()
}

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
fn is_copy(delivery: &Delivery) -> bool {
    count_header(delivery).is_some()
}

/// Reads, runs and reports one task of a delivery (`body` is where it lies in the delivery's
/// body, `queue` the task queue it came from), counted among the tasks held meanwhile. A task
/// is failed without running when its input cannot travel, and a success is turned into a
/// failure when its output cannot.
async fn handle_task(
    shared: &Shared,
    pending: &Arc<PendingDelivery>,
    body: Range<usize>,
    bundled: bool,
    queue: Option<&Arc<str>>,
) {
    // Counted from delivery to report, whichever way this ends.
    let _held = queue.map(|queue| shared.held.hold(queue));
    let delivery = pending.delivery();
    let body = &delivery.data[body];
    let task: TaskMessage = match protocol::decode(body) {
        Ok(task) => task,
        Err(error) => {
            shared.refuse(body, &error, pending).await;
            return;
        }
    };
    shared.until_requeued(&task, delivery).await;
    let started_at = Utc::now();
    let checked = value::check(&task.input);
    let redelivery = match &checked {
        Ok(()) if delivery.redelivered || is_copy(delivery) => {
            shared.redelivered(&task, body, delivery, bundled).await
        }
        _ => Redelivery::Run,
    };
    let (outcome, logs, ran) = match (checked, redelivery) {
        (_, Redelivery::Requeued) => return,
        (_, Redelivery::Finished(outcome)) => (outcome, None, None),
        (_, Redelivery::WorkerLost(deliveries)) => {
            let error = StepError::new(
                WORKER_LOST,
                format!(
                    "the task lost its worker {} times (delivered {deliveries} times without finishing)",
                    deliveries - 1
                ),
            );
            (Outcome::Failed { error }, None, None)
        }
        (Ok(()), Redelivery::Run) => {
            // Closed only when the worker stops, and then nothing is waiting here.
            let _slot = shared.slots.acquire().await;
            shared.execute(&task, started_at).await
        }
        (Err(error), Redelivery::Run) => {
            let error = StepError::new(INVALID_TASK, format!("step input cannot be used: {error}"));
            (Outcome::Failed { error }, None, None)
        }
    };
    let ran = ran.zip(queue).map(|(ran, queue)| Ran {
        queue: queue.to_string(),
        micros: u64::try_from(ran.as_micros()).unwrap_or(u64::MAX),
    });
    let finished_at = Utc::now();
    tracing::debug!(
        task_id = %task.task_id,
        step = %task.step_id,
        attempt = task.attempt,
        succeeded = matches!(outcome, Outcome::Succeeded { .. }),
        "task finished"
    );
    let completion = CompletionMessage {
        version: PROTOCOL_VERSION,
        task_id: task.task_id,
        run_id: task.run_id,
        attempt: task.attempt,
        worker_id: shared.worker_id.clone(),
        outcome,
        started_at,
        finished_at,
        logs,
        ends_run: task.ends_run,
        ran,
    };
    shared.reporter.send(Report {
        completion,
        delivery: pending.clone(),
    });
}

/// The identity of a task, read from a message that does not decode as a whole (a protocol
/// version or a step kind this build does not know, an input nested too deep to read). Every
/// other field is skipped; `serde_json` skips values without a depth limit.
#[derive(Deserialize)]
struct TaskIdentity {
    task_id: TaskId,
    run_id: RunId,
    attempt: u32,
    #[serde(default)]
    step_id: Option<String>,
}

impl Shared {
    /// Fails a task this worker cannot read (`body`, one task of `pending`), so that its run
    /// does not wait for it forever. A message without even a task's identity is moved to the
    /// dead-letters queue instead: redelivering it would loop forever.
    async fn refuse(&self, body: &[u8], error: &DecodeError, pending: &Arc<PendingDelivery>) {
        let Ok(identity) = serde_json::from_slice::<TaskIdentity>(body) else {
            self.dead_letter(body, error, pending).await;
            return;
        };
        tracing::error!(
            task_id = %identity.task_id,
            run_id = %identity.run_id,
            step = identity.step_id.as_deref().unwrap_or_default(),
            attempt = identity.attempt,
            %error,
            "failing a task this worker cannot read"
        );
        let now = Utc::now();
        let completion = CompletionMessage {
            version: PROTOCOL_VERSION,
            task_id: identity.task_id,
            run_id: identity.run_id,
            attempt: identity.attempt,
            worker_id: self.worker_id.clone(),
            outcome: Outcome::Failed {
                error: StepError::new(
                    INVALID_TASK,
                    format!("the worker cannot read this task: {error}"),
                ),
            },
            started_at: now,
            finished_at: now,
            logs: None,
            ends_run: false,
            ran: None,
        };
        self.reporter.send(Report {
            completion,
            delivery: pending.clone(),
        });
    }

    /// Moves a message that names no task (`body`, one task of `pending`, or all of it) to the
    /// dead-letters queue, with why and where it came from; drops it if even that fails.
    async fn dead_letter(&self, body: &[u8], error: &DecodeError, pending: &PendingDelivery) {
        let source = pending.delivery().routing_key.as_str().to_owned();
        match self
            .broker
            .current()
            .dead_letter(body, &error.to_string(), &source)
            .await
        {
            Ok(()) => {
                tracing::error!(%error, queue = source, "a task message names no task; moved to the dead letters");
            }
            Err(publish_error) => {
                tracing::error!(%error, %publish_error, "dropping a task message that names no task");
            }
        }
        pending.done_one().await;
    }
    /// Runs `task` under a lease and returns how it ended, what it logged and, if it ran to
    /// its end on an executor, how long it ran there; an output that cannot be stored or sent
    /// fails the task.
    ///
    /// A jq step runs while its lease is being taken: it has no effect beyond its output, which
    /// is dropped if the lease finds its run cancelled. Any other step starts only once the
    /// lease is taken.
    async fn execute(
        &self,
        task: &TaskMessage,
        started_at: chrono::DateTime<Utc>,
    ) -> (Outcome, Option<String>, Option<Duration>) {
        let cancelled = self.register(task);
        let limit = task
            .timeout_s
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok());
        let lease = self.take_lease(task, started_at);
        let executed = if matches!(task.step, StepKind::Dataflow { .. }) {
            // A cancelled run stops its step at once, as it would if cancelled while it ran.
            let lease = async {
                let granted = lease.await;
                if !granted {
                    cancelled.cancel();
                }
                granted
            };
            let (lease, executed) = tokio::join!(lease, self.cancellable(task, limit, &cancelled));
            lease.then_some(executed)
        } else if lease.await {
            Some(self.cancellable(task, limit, &cancelled).await)
        } else {
            None
        };
        self.release(task.task_id);
        let Some(executed) = executed else {
            let error = StepError::new(CANCELLED, "the run was cancelled before this task started");
            return (Outcome::Failed { error }, None, None);
        };
        let Some(Executed { result, logs, ran }) = executed else {
            let error = StepError::new(CANCELLED, "the run was cancelled while this task ran");
            return (Outcome::Failed { error }, None, None);
        };
        let outcome = match result {
            Ok(output) => match value::check(&output) {
                Ok(()) => Outcome::Succeeded { output },
                Err(error) => Outcome::Failed {
                    error: StepError::new(
                        INVALID_OUTPUT,
                        format!("step output cannot be stored: {error}"),
                    ),
                },
            },
            Err(error) => Outcome::Failed { error },
        };
        (outcome, logs, ran)
    }

    /// Runs the task's step until it ends or runs out of time; `None` if its run is cancelled
    /// first. Dropping the execution stops a Python step.
    async fn cancellable(
        &self,
        task: &TaskMessage,
        limit: Option<Duration>,
        cancelled: &CancellationToken,
    ) -> Option<Executed> {
        tokio::select! {
            executed = self.executors.execute(task, limit) => Some(executed),
            () = cancelled.cancelled() => None,
        }
    }

    /// Counts `task` among the running ones, whose leases the renewal loop keeps alive; the
    /// token it returns stops the task when its run is cancelled.
    fn register(&self, task: &TaskMessage) -> CancellationToken {
        let token = CancellationToken::new();
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(task.task_id, (task.run_id, token.clone()));
        token
    }

    /// Takes (or takes over) the lease on a task, in the same round trip as checking that its
    /// run was not cancelled and counting the deliveries of this attempt; returns false if the
    /// run was cancelled. Best effort: without Redis the task still runs, and fencing by
    /// attempt keeps its completion safe.
    async fn take_lease(&self, task: &TaskMessage, started_at: chrono::DateTime<Utc>) -> bool {
        let lease = Lease {
            worker_id: self.worker_id.clone(),
            attempt: task.attempt,
            started_at,
        };
        let mut redis = self.redis.clone();
        let result = redis::pipe()
            .cmd("EXISTS")
            .arg(self.namespace.cancelled_key(task.run_id))
            .cmd("SET")
            .arg(self.namespace.lease_key(task.task_id))
            .arg(lease.to_json())
            .arg("PX")
            .arg(self.lease_ttl.as_millis() as u64)
            .ignore()
            .query_async::<(bool,)>(&mut redis)
            .await;
        match result {
            Ok((cancelled,)) => !cancelled,
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, %error, "taking the lease");
                true
            }
        }
    }

    /// Decides what to do with a task that was delivered before (redelivered by the broker, or a
    /// copy with a count): report its outcome if it already finished; run a copy that is not
    /// itself redelivered, or a task of a bundle (whose count its bundle's split already
    /// raised); fail it with `worker_lost` if it was delivered more than [`MAX_LOST_WORKERS`]
    /// times beyond the first; otherwise put a copy carrying the new count back in its queue and
    /// acknowledge this delivery (see [`Self::requeue_copies`]). If the copy cannot be published,
    /// this delivery runs.
    async fn redelivered(
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
    async fn split_redelivered(&self, delivery: &Delivery, ranges: &[Range<usize>]) -> bool {
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
            let mut requeueing = self
                .requeueing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            let mut requeueing = self
                .requeueing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
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
    async fn until_requeued(&self, task: &TaskMessage, delivery: &Delivery) {
        if !is_copy(delivery) {
            return;
        }
        let waiting = self
            .requeueing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    fn release(&self, task_id: TaskId) {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&task_id);
    }
}

/// Listens for cancelled runs and stops this worker's running tasks of them, subscribing again
/// after a lost connection (see [`pubsub::listen`]), until shutdown.
async fn cancel_listener(shared: Arc<Shared>, client: redis::Client, shutdown: CancellationToken) {
    let channel = shared.namespace.cancel_channel();
    pubsub::listen(&client, &channel, &shutdown, |payload| {
        if let Ok(run_id) = payload.parse::<RunId>() {
            shared.cancel_run(run_id);
        }
    })
    .await;
}

impl Shared {
    /// Stops the running tasks of a cancelled run.
    fn cancel_run(&self, run_id: RunId) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (task_id, (task_run, token)) in running.iter() {
            if *task_run == run_id {
                tracing::info!(%task_id, %run_id, "stopping a task of a cancelled run");
                token.cancel();
            }
        }
    }
}

/// Every third of the lease time: renews the leases of running tasks and records the worker's
/// heartbeat. On the way out, removes the worker's record.
async fn heartbeat_loop(shared: Arc<Shared>, config: Config, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(records::renewal_period(shared.lease_ttl));
    let worker_key = shared.namespace.worker_key(&shared.worker_id);
    let workers_key = shared.namespace.workers_key();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => break,
        }
        let running: Vec<TaskId> = shared
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_tasks_are_counted_per_queue_until_their_guards_drop() {
        let held = HeldTasks::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let first = held.hold(&a);
        let second = held.hold(&a);
        let other = held.hold(&b);
        let counts = |expected: &[(&str, usize)]| {
            let expected: BTreeMap<String, usize> = expected
                .iter()
                .map(|(queue, count)| ((*queue).to_owned(), *count))
                .collect();
            assert_eq!(held.counts(), expected);
        };
        counts(&[("a", 2), ("b", 1)]);
        drop((first, other));
        counts(&[("a", 1)]);
        drop(second);
        counts(&[]);
    }

    /// Returns a task message body with `version`, `step` and `input` as given.
    fn body(task_id: TaskId, run_id: RunId, version: u32, step: &str, input: &str) -> Vec<u8> {
        format!(
            r#"{{"version":{version},"task_id":"{task_id}","run_id":"{run_id}","step_id":"s","attempt":3,"step":{step},"input":{input}}}"#
        )
        .into_bytes()
    }

    fn check(body: &[u8], expected: Option<(TaskId, RunId, u32)>) {
        let identity = serde_json::from_slice::<TaskIdentity>(body)
            .ok()
            .map(|identity| (identity.task_id, identity.run_id, identity.attempt));
        assert_eq!(identity, expected, "{}", String::from_utf8_lossy(body));
    }

    #[test]
    fn identity_is_read_from_tasks_that_do_not_decode() {
        let (task_id, run_id) = (TaskId::new(), RunId::new());
        let expected = Some((task_id, run_id, 3));
        let dataflow = r#"{"kind":"dataflow","program":"."}"#;
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));

        let readable = body(task_id, run_id, PROTOCOL_VERSION, dataflow, "1");
        assert!(protocol::decode::<TaskMessage>(&readable).is_ok());
        check(&readable, expected);

        let newer = body(task_id, run_id, 2, dataflow, "1");
        let error = protocol::decode::<TaskMessage>(&newer).expect_err("version 2 is refused");
        assert_eq!(
            error.to_string(),
            "message has protocol version 2, this build reads version 1"
        );
        check(&newer, expected);

        let unknown_kind = body(task_id, run_id, 1, r#"{"kind":"rust"}"#, "1");
        assert!(protocol::decode::<TaskMessage>(&unknown_kind).is_err());
        check(&unknown_kind, expected);

        let too_deep = body(task_id, run_id, 1, dataflow, &deep);
        assert!(protocol::decode::<TaskMessage>(&too_deep).is_err());
        check(&too_deep, expected);
    }

    #[test]
    fn messages_without_an_identity_have_none() {
        check(b"not json", None);
        check(b"[]", None);
        check(br#"{"version":1,"attempt":1}"#, None);
        let no_attempt = format!(
            r#"{{"task_id":"{}","run_id":"{}"}}"#,
            TaskId::new(),
            RunId::new()
        );
        check(no_attempt.as_bytes(), None);
        let bad_id = format!(
            r#"{{"task_id":"x","run_id":"{}","attempt":1}}"#,
            RunId::new()
        );
        check(bad_id.as_bytes(), None);
    }
}
