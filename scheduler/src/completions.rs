//! Consumes completion events from workers in batches and advances their runs: one transaction
//! per batch records the results (fenced by attempt), plans the next steps and finishes runs;
//! then the new tasks are published and the batch is acknowledged.
//!
//! Runs touched by a batch are locked in id order, so two schedulers consuming the same queue
//! never plan the same run at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::Value;
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::protocol::{self, CompletionMessage, Outcome};
use taskfleet_common::{StepError, StepStatus};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dispatch::{Dispatch, Dispatcher};
use crate::engine::{Materialized, finished_run};
use crate::notify::Notifier;
use crate::planner::{self, ProgramCache, StepState};
use crate::store::{self, Completion, StoreError};

/// The most completions handled in one transaction; also the consumer's prefetch.
pub const MAX_BATCH: usize = 512;

/// What the completion loop needs.
pub struct CompletionLoop {
    /// The database.
    pub db: sqlx::PgPool,
    /// Where new tasks go after the commit.
    pub dispatcher: Dispatcher,
    /// Who hears about finished runs.
    pub notifier: Notifier,
    /// Compiled jq programs.
    pub programs: ProgramCache,
}

impl CompletionLoop {
    /// Consumes until shutdown or until the consumer ends.
    pub async fn run(self, mut consumer: Consumer, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                next = consumer.next() => next,
                () = shutdown.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut results = vec![first];
            while results.len() < MAX_BATCH {
                match consumer.next().now_or_never() {
                    Some(Some(result)) => results.push(result),
                    _ => break,
                }
            }
            let deliveries: Vec<Delivery> = results
                .into_iter()
                .filter_map(|result| {
                    result
                        .map_err(|error| tracing::warn!(%error, "completion consumer error"))
                        .ok()
                })
                .collect();
            if deliveries.is_empty() {
                continue;
            }
            self.handle(deliveries).await;
        }
    }

    async fn handle(&self, deliveries: Vec<Delivery>) {
        let mut completions = Vec::with_capacity(deliveries.len());
        for delivery in &deliveries {
            match protocol::decode::<CompletionMessage>(&delivery.data) {
                Ok(message) => completions.push(message),
                // A message no scheduler can read would be redelivered forever; drop it loudly.
                Err(error) => tracing::error!(%error, "dropping undecodable completion"),
            }
        }
        let mut delay = Duration::from_millis(100);
        loop {
            match self.advance(&completions).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, completions = completions.len(), ?delay, "recording completions failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    if delay == Duration::from_secs(5) && !error.is_unavailable() {
                        // A statement the database keeps refusing would block every run; hand
                        // the batch back to the broker and go on.
                        if let Some(last) = deliveries.last() {
                            let options = BasicNackOptions {
                                multiple: true,
                                requeue: true,
                            };
                            if let Err(error) = last.nack(options).await {
                                tracing::warn!(%error, "returning completions to the broker");
                            }
                        }
                        return;
                    }
                }
            }
        }
        if let Some(last) = deliveries.last()
            && let Err(error) = last.ack(BasicAckOptions { multiple: true }).await
        {
            tracing::warn!(%error, "acknowledging completions");
        }
    }

    /// Records one batch and plans what follows, in one transaction.
    async fn advance(&self, messages: &[CompletionMessage]) -> Result<(), StoreError> {
        let completions: Vec<Completion> = messages.iter().map(to_completion).collect();
        let mut tx = self.db.begin().await?;
        let mut run_ids: Vec<Uuid> = messages.iter().map(|m| m.run_id.0).collect();
        run_ids.sort_unstable();
        run_ids.dedup();
        // Lock first: another scheduler advancing the same run waits here, then sees our rows.
        let runs = store::lock_runs(&mut tx, &run_ids).await?;
        let recorded: HashSet<Uuid> = store::record_completions(&mut tx, &completions)
            .await?
            .into_iter()
            .collect();
        let runs: Vec<_> = runs
            .into_iter()
            .filter(|run| recorded.contains(&run.id) && run.status == "running")
            .collect();
        let run_ids: Vec<Uuid> = runs.iter().map(|run| run.id).collect();
        let mut states: HashMap<Uuid, BTreeMap<String, StepState>> = HashMap::new();
        for row in store::task_states(&mut tx, &run_ids).await? {
            states
                .entry(row.run_id)
                .or_default()
                .insert(row.step_id, step_state(&row.status, row.output, row.error));
        }
        let mut materialized = Materialized::default();
        let mut finished = Vec::new();
        for run in runs {
            let definition: WorkflowDefinition = match serde_json::from_value(run.definition.0) {
                Ok(definition) => definition,
                Err(error) => {
                    tracing::error!(run_id = %run.id, %error, "stored definition does not parse");
                    continue;
                }
            };
            let advance = planner::advance(
                &self.programs,
                &definition,
                &run.input.0,
                states.get(&run.id).unwrap_or(&BTreeMap::new()),
            );
            materialized.add(&definition, run.id, advance.planned);
            if let Some(end) = advance.end {
                finished.push(finished_run(run.id, end));
            }
        }
        let finished_ids: HashSet<Uuid> = finished.iter().map(|run| run.id).collect();
        // A run that ended in this batch dispatches nothing more: its queued tasks are
        // cancelled by `finish_runs`.
        let cancelled: HashSet<Uuid> = materialized
            .tasks
            .iter()
            .filter(|task| finished_ids.contains(&task.run_id))
            .map(|task| task.id)
            .collect();
        store::insert_tasks(&mut tx, &materialized.tasks).await?;
        store::finish_runs(&mut tx, &finished).await?;
        tx.commit().await?;
        let dispatches: Vec<Dispatch> = materialized
            .dispatches
            .into_iter()
            .filter(|dispatch| !cancelled.contains(&dispatch.task_id))
            .collect();
        self.dispatcher.send(dispatches);
        let finished_ids: Vec<Uuid> = finished_ids.into_iter().collect();
        self.notifier.announce(&finished_ids).await;
        Ok(())
    }
}

fn to_completion(message: &CompletionMessage) -> Completion {
    let (status, output, error) = match &message.outcome {
        Outcome::Succeeded { output } => ("succeeded", Some(output.clone()), None),
        Outcome::Failed { error } => (
            "failed",
            None,
            Some(serde_json::to_value(error).unwrap_or(Value::Null)),
        ),
    };
    Completion {
        task_id: message.task_id.0,
        attempt: i32::try_from(message.attempt).unwrap_or(i32::MAX),
        status,
        output,
        error,
        worker_id: message.worker_id.clone(),
        started_at: message.started_at,
        finished_at: message.finished_at,
    }
}

/// Returns the planner's view of a stored task.
pub fn step_state(
    status: &str,
    output: Option<sqlx::types::Json<Value>>,
    error: Option<sqlx::types::Json<Value>>,
) -> StepState {
    StepState {
        status: match status {
            "queued" => StepStatus::Pending,
            other => StepStatus::parse(other).unwrap_or(StepStatus::Pending),
        },
        output: output.map(|output| output.0),
        error: error.and_then(|error| serde_json::from_value::<StepError>(error.0).ok()),
    }
}
