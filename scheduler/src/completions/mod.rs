//! Consumes completion events from workers in batches and advances their runs: one transaction
//! per batch records the results (fenced by attempt), plans the next steps and finishes runs;
//! then the new tasks are published and the batch is acknowledged.
//!
//! An attempt a worker deferred (its late start was over a rate limit) is not recorded: its
//! task goes back to the timer, due after the delay the worker gave, and nothing is planned.
//!
//! Runs touched by a batch are locked in id order, so two schedulers consuming the same queue
//! never plan the same run at once. A completion the database refuses (rather than a database
//! that is down) never blocks the others: the batch is retried one completion at a time, and a
//! completion refused on its own is recorded as a failed step.

mod advance;
mod read;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use futures_util::{FutureExt, Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use serde_json::json;
use taskfleet_common::TaskStatus;
use taskfleet_common::error::INVALID_OUTPUT;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::costs::TaskCosts;
use crate::dispatch::Dispatcher;
use crate::notify::Notifier;
use crate::planning::{Halted, PlanningError, SandboxedPrograms};
use crate::store::{self, Completion, HeldConnection, StoreError};

use read::Read;

/// The most completions handled in one transaction; also the consumer's prefetch (in messages,
/// each of which may carry several completions).
pub const MAX_BATCH: usize = 512;

/// Describes why a batch of completions was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Planning panicked; a bug, logged and treated like a refused statement.
    #[error("planning failed: {0}")]
    Planning(String),
    /// Planning halted (the shutdown, or no jq sandbox); the batch stays unrecorded.
    #[error(transparent)]
    Halted(#[from] Halted),
}

impl From<PlanningError> for AdvanceError {
    fn from(error: PlanningError) -> Self {
        match error {
            PlanningError::Halted(halted) => Self::Halted(halted),
            PlanningError::Panicked(message) => Self::Planning(message),
        }
    }
}

impl AdvanceError {
    /// Whether the batch should wait and be tried again: the database, or the sandboxes that
    /// run planning's programs, are out of reach for now.
    fn is_unavailable(&self) -> bool {
        match self {
            Self::Store(error) => error.is_unavailable(),
            Self::Halted(Halted::SandboxUnavailable(_)) => true,
            Self::Planning(_) | Self::Halted(Halted::ShuttingDown) => false,
        }
    }
}

/// What the completion loop needs.
pub struct CompletionLoop {
    /// The namespace whose completions these are; the tasks they plan are written in it.
    pub namespace: String,
    /// The database, through a connection the loop keeps.
    pub db: HeldConnection,
    /// Where new tasks go after the commit.
    pub dispatcher: Dispatcher,
    /// Who hears about finished runs.
    pub notifier: Notifier,
    /// Compiled jq programs, and where planning runs them.
    pub programs: SandboxedPrograms,
    /// Where unreadable completions go.
    pub broker: Arc<Broker>,
    /// What each queue's tasks cost, learned here for the dispatcher.
    pub costs: TaskCosts,
}

impl CompletionLoop {
    /// Records completions in batches until the stream of deliveries ends (at shutdown).
    pub async fn run(
        mut self,
        deliveries: impl Stream<Item = Delivery>,
        shutdown: CancellationToken,
    ) {
        let mut deliveries = std::pin::pin!(deliveries);
        loop {
            let first = tokio::select! {
                next = deliveries.next() => next,
                () = shutdown.cancelled() => return,
            };
            let Some(first) = first else { return };
            let mut read = Read::default();
            read.add(&first);
            let mut batch = vec![first];
            while read.len() < MAX_BATCH {
                match deliveries.next().now_or_never() {
                    Some(Some(delivery)) => {
                        read.add(&delivery);
                        batch.push(delivery);
                    }
                    _ => break,
                }
            }
            if !self.handle(read, &shutdown).await {
                // Shutting down with the batch unrecorded: the broker redelivers it.
                return;
            }
            // A batch read across a reconnect also holds deliveries of the lost connection;
            // those cannot be acknowledged, the broker hands them out again and the fencing
            // ignores them the second time.
            if let Some(last) = batch.last()
                && let Err(error) = last.ack(BasicAckOptions { multiple: true }).await
            {
                tracing::warn!(%error, "acknowledging completions");
            }
        }
    }

    /// Records a batch; returns false if shutdown came first.
    async fn handle(&mut self, read: Read, shutdown: &CancellationToken) -> bool {
        self.costs.learn(&read.ran);
        for body in &read.unreadable {
            self.broker
                .dead_letter(body, "a completion that names no task")
                .await;
        }
        if !self.defer_with_retries(&read.deferred, shutdown).await {
            return false;
        }
        let completions = read.completions;
        match self.record_with_retries(&completions, shutdown).await {
            Some(Ok(())) => true,
            None => false,
            Some(Err(error)) => {
                tracing::warn!(%error, completions = completions.len(), "recording completions together failed; recording each alone");
                for completion in completions {
                    if !self.record_alone(completion, shutdown).await {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Records one completion; if the database refuses it, records its step as failed instead.
    /// Returns false if shutdown came first.
    async fn record_alone(&mut self, completion: Completion, shutdown: &CancellationToken) -> bool {
        let error = match self
            .record_with_retries(std::slice::from_ref(&completion), shutdown)
            .await
        {
            None => return false,
            Some(Ok(())) => return true,
            Some(Err(error)) => error,
        };
        tracing::warn!(task_id = %completion.task_id, %error, "the result of a task cannot be recorded; failing the step");
        let failed = Completion {
            status: TaskStatus::Failed,
            output: None,
            error: Some(json!({
                "type": INVALID_OUTPUT,
                "message": format!("the step's result could not be recorded: {error}"),
            })),
            ..completion
        };
        match self
            .record_with_retries(std::slice::from_ref(&failed), shutdown)
            .await
        {
            None => false,
            Some(Ok(())) => true,
            Some(Err(error)) => {
                tracing::error!(task_id = %failed.task_id, %error, "dropping a completion that cannot be recorded");
                true
            }
        }
    }

    /// Sends deferred attempts back to the timer, retrying with backoff while the database is
    /// unreachable; returns false if shutdown came first. A refusal is logged and the
    /// deferrals dropped: their tasks are left as they were, undispatched or dispatched, to the
    /// relay.
    async fn defer_with_retries(
        &mut self,
        deferrals: &[store::Deferral],
        shutdown: &CancellationToken,
    ) -> bool {
        if deferrals.is_empty() {
            return true;
        }
        let mut unavailable = Unavailable::default();
        loop {
            let deferred = match self.db.get().await {
                Ok(conn) => store::defer_tasks(conn, deferrals).await,
                Err(error) => Err(error),
            };
            match deferred {
                Ok(()) => {
                    crate::metrics::deferred(deferrals.len() as u64);
                    return true;
                }
                Err(error) if error.is_unavailable() => {
                    let what = "cannot send deferred tasks back for now; retrying";
                    if !unavailable.wait(&mut self.db, &error, what, shutdown).await {
                        return false;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, tasks = deferrals.len(), "sending deferred tasks back failed; dropping the deferrals");
                    return true;
                }
            }
        }
    }

    /// Records completions, retrying with backoff while the database is unreachable. Returns
    /// `None` if shutdown came first, else the outcome; a refusal is returned after one try.
    async fn record_with_retries(
        &mut self,
        completions: &[Completion],
        shutdown: &CancellationToken,
    ) -> Option<Result<(), AdvanceError>> {
        let mut unavailable = Unavailable::default();
        loop {
            match self.advance(completions).await {
                // The batch is left unacknowledged; the broker hands it out again.
                Err(AdvanceError::Halted(Halted::ShuttingDown)) => return None,
                Err(error) if error.is_unavailable() => {
                    let what = "cannot record completions for now; retrying";
                    if !unavailable.wait(&mut self.db, &error, what, shutdown).await {
                        return None;
                    }
                }
                outcome => return Some(outcome),
            }
        }
    }
}

/// The waits between tries while the database is unreachable: exponential from 100 ms to 5 s,
/// without end.
struct Unavailable(backon::ExponentialBackoff);

impl Default for Unavailable {
    fn default() -> Self {
        Self(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times()
                .build(),
        )
    }
}

impl Unavailable {
    /// Logs `error` with `what`, gives up the held connection (it may be the broken part: the
    /// next try takes another) and waits the next delay; returns false if shutdown came first.
    async fn wait(
        &mut self,
        db: &mut HeldConnection,
        error: &(dyn std::fmt::Display + Sync),
        what: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let delay = self.0.next().unwrap_or(Duration::from_secs(5));
        tracing::warn!(%error, ?delay, "{what}");
        db.discard();
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.cancelled() => false,
        }
    }
}
