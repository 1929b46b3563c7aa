//! Dispatch: publishes committed tasks to RabbitMQ and marks them dispatched once confirmed.
//!
//! Task rows are the outbox. Whoever commits tasks hands them to the [`Dispatcher`] after the
//! commit; a relay loop re-publishes rows that stayed undispatched (a crash between commit and
//! publish, a broker error), so no committed task is ever left behind. A task published twice is
//! harmless: the attempt number fences its completion.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::protocol::{self, PROTOCOL_VERSION, TaskMessage};
use taskfleet_common::{RunId, TaskId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{Broker, Outgoing};
use crate::store;

/// The most tasks published in one round of confirms.
const MAX_BATCH: usize = 1024;

/// A task ready to publish, with the id under which it is marked dispatched.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The task row.
    pub task_id: Uuid,
    /// The message.
    pub outgoing: Outgoing,
}

impl Dispatch {
    /// Builds the dispatch of one attempt of a step of `definition`. Returns `None` if the
    /// definition has no such step (which validation rules out).
    pub fn new(
        definition: &WorkflowDefinition,
        run_id: Uuid,
        task_id: Uuid,
        step_id: &str,
        attempt: u32,
        input: Value,
    ) -> Option<Self> {
        let step = definition.step(step_id)?;
        let message = TaskMessage {
            version: PROTOCOL_VERSION,
            task_id: TaskId(task_id),
            run_id: RunId(run_id),
            step_id: step_id.to_owned(),
            attempt,
            step: step.kind()?,
            input,
            timeout_s: step.timeout_s,
        };
        Some(Self {
            task_id,
            outgoing: Outgoing {
                queue: step.queue().to_owned(),
                priority: step.priority(),
                body: protocol::encode(&message),
            },
        })
    }
}

/// The sending side of the dispatch loop.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<Vec<Dispatch>>,
}

impl Dispatcher {
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
/// runs until every [`Dispatcher`] is dropped and it has published what they sent.
pub fn dispatcher(broker: Arc<Broker>, db: sqlx::PgPool) -> (Dispatcher, impl Future<Output = ()>) {
    // Unbounded on purpose: every item was already committed and must not be refused; the
    // accept path is bounded upstream by its own channel.
    let (tx, rx) = mpsc::unbounded_channel();
    (Dispatcher { tx }, dispatch_loop(broker, db, rx))
}

async fn dispatch_loop(
    broker: Arc<Broker>,
    db: sqlx::PgPool,
    mut rx: mpsc::UnboundedReceiver<Vec<Dispatch>>,
) {
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        publish_batch(&broker, &db, &batch).await;
    }
}

async fn publish_batch(broker: &Broker, db: &sqlx::PgPool, batch: &[Dispatch]) {
    let outgoing: Vec<Outgoing> = batch.iter().map(|d| d.outgoing.clone()).collect();
    let acked = match broker.publish(&outgoing).await {
        Ok(acked) => acked,
        Err(error) => {
            tracing::warn!(%error, tasks = batch.len(), "publishing tasks failed; the relay will retry");
            return;
        }
    };
    let confirmed: Vec<Uuid> = batch
        .iter()
        .zip(acked)
        .filter_map(|(dispatch, ack)| ack.then_some(dispatch.task_id))
        .collect();
    if confirmed.len() < batch.len() {
        tracing::warn!(
            refused = batch.len() - confirmed.len(),
            "broker refused some tasks; the relay will retry"
        );
    }
    if let Err(error) = store::mark_dispatched(db, &confirmed).await {
        // They are published; the relay may publish them again, which fencing makes harmless.
        tracing::warn!(%error, "marking tasks dispatched failed");
    }
}

/// Re-publishes tasks of `namespace` that were committed but never confirmed, every `period`.
pub async fn relay_loop(
    dispatcher: Dispatcher,
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
                dispatcher.send(to_dispatches(rows));
            }
            Err(error) => tracing::warn!(%error, "reading the outbox failed"),
        }
    }
}

/// Dispatches tasks of `namespace` whose retry is due, checking every `period`.
pub async fn timer_loop(
    dispatcher: Dispatcher,
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
                dispatcher.send(to_dispatches(rows));
            }
            Err(error) => tracing::warn!(%error, "reading due retries failed"),
        }
    }
}

/// Builds the messages of tasks read back from the database.
fn to_dispatches(rows: Vec<store::UndispatchedTask>) -> Vec<Dispatch> {
    rows.into_iter()
        .filter_map(|row| {
            let definition: WorkflowDefinition = serde_json::from_value(row.definition.0).ok()?;
            Dispatch::new(
                &definition,
                row.run_id,
                row.id,
                &row.step_id,
                u32::try_from(row.attempt).ok()?,
                row.input.map_or(Value::Null, |input| input.0),
            )
        })
        .collect()
}
