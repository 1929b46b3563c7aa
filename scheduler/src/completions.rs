//! Consumes completion events from workers in batches and advances their runs: one transaction
//! per batch records the results (fenced by attempt), plans the next steps and finishes runs;
//! then the new tasks are published and the batch is acknowledged.
//!
//! Runs touched by a batch are locked in id order, so two schedulers consuming the same queue
//! never plan the same run at once. A completion the database refuses (rather than a database
//! that is down) never blocks the others: the batch is retried one completion at a time, and a
//! completion refused on its own is recorded as a failed step.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::{FutureExt, Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Connection as _;
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::error::INVALID_OUTPUT;
use taskfleet_common::protocol::{self, CompletionMessage, Outcome, Ran};
use taskfleet_common::{RunId, StepError, StepStatus, TaskId};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::views::run_view;
use crate::broker::Broker;
use crate::costs::TaskCosts;
use crate::dispatch::{Dispatch, Dispatcher};
use crate::engine::{Materialized, finished_run};
use crate::notify::{FinishedView, Notifier};
use crate::planner::{self, StepState};
use crate::programs::{ProgramRunner, SandboxedPrograms};
use crate::retry;
use crate::store::{self, Completion, FinishedRun, HeldConnection, LockedRun, StoreError};
use taskfleet_common::jq::{self, ProgramCache};
use taskfleet_common::value;

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
    /// Planning stopped for the shutdown; the batch stays unrecorded.
    #[error(transparent)]
    Stopped(#[from] planner::Stopped),
}

impl AdvanceError {
    fn is_unavailable(&self) -> bool {
        matches!(self, Self::Store(error) if error.is_unavailable())
    }
}

/// What the completion loop needs.
pub struct CompletionLoop {
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
            status: "failed",
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

    /// Records completions, retrying with backoff while the database is unreachable. Returns
    /// `None` if shutdown came first, else the outcome; a refusal is returned after one try.
    async fn record_with_retries(
        &mut self,
        completions: &[Completion],
        shutdown: &CancellationToken,
    ) -> Option<Result<(), AdvanceError>> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.advance(completions).await {
                // The batch is left unacknowledged; the broker hands it out again.
                Err(AdvanceError::Stopped(_)) => return None,
                Err(error) if error.is_unavailable() => {
                    tracing::warn!(%error, ?delay, "database unavailable; retrying completions");
                    // The held connection may be the broken part: the next try takes another.
                    self.db.discard();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                outcome => return Some(outcome),
            }
        }
    }

    /// Separates the failed attempts that get another try (under their step's `retry`) from
    /// the completions that are final.
    async fn split_retries(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        runs: &[RunToPlan],
        completions: &[Completion],
    ) -> Result<(Vec<store::Retry>, Vec<Completion>), StoreError> {
        let failed: Vec<Uuid> = completions
            .iter()
            .filter(|c| c.status == "failed")
            .map(|c| c.task_id)
            .collect();
        if failed.is_empty() {
            return Ok((Vec::new(), completions.to_vec()));
        }
        let current: HashMap<Uuid, store::CurrentAttempt> = store::current_attempts(tx, &failed)
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect();
        let definitions: HashMap<Uuid, &WorkflowDefinition> =
            runs.iter().map(|run| (run.id, &run.definition)).collect();
        let mut retries = Vec::new();
        let mut finals = Vec::new();
        for completion in completions {
            let retry = current
                .get(&completion.task_id)
                .filter(|task| task.attempt == completion.attempt && completion.status == "failed")
                .and_then(|task| {
                    let step = definitions.get(&completion.run_id)?.step(&task.step_id)?;
                    let policy = step.retry.as_ref()?;
                    let error: StepError =
                        serde_json::from_value(completion.error.clone()?).ok()?;
                    let attempt = u32::try_from(task.attempt).ok()?;
                    retry::should_retry(Some(policy), attempt, &error).then(|| store::Retry {
                        task_id: completion.task_id,
                        attempt: task.attempt,
                        error: completion.error.clone().unwrap_or(Value::Null),
                        worker_id: completion.worker_id.clone(),
                        started_at: completion.started_at,
                        delay: retry::backoff(policy, attempt),
                        logs: completion.logs.clone(),
                    })
                });
            match retry {
                Some(retry) => retries.push(retry),
                None => finals.push(completion.clone()),
            }
        }
        Ok((retries, finals))
    }

    /// Records one batch and plans what follows: first the successes that end runs of a single
    /// step (see [`store::finish_single_steps`]), in one statement, then the rest in one
    /// transaction.
    async fn advance(&mut self, completions: &[Completion]) -> Result<(), AdvanceError> {
        let completions = self.finish_single_steps(completions).await?;
        if completions.is_empty() {
            return Ok(());
        }
        self.advance_in_transaction(&completions).await
    }

    /// Finishes the runs of a single step that a success of the batch ends, and announces them;
    /// returns the completions left to record.
    async fn finish_single_steps<'a>(
        &mut self,
        completions: &'a [Completion],
    ) -> Result<Cow<'a, [Completion]>, AdvanceError> {
        let ends_run = |c: &Completion| c.ends_run && c.status == "succeeded";
        let ending: Vec<&Completion> = completions.iter().filter(|c| ends_run(c)).collect();
        if ending.is_empty() {
            return Ok(Cow::Borrowed(completions));
        }
        // The runs someone waits for here come back whole, so the waiters need not read them.
        let wanted = self.notifier.watched(ending.iter().map(|c| c.run_id));
        let done = store::finish_single_steps(self.db.get().await?, &ending, &wanted).await?;
        let views = done
            .rows
            .into_iter()
            .map(|(run, task)| {
                let id = run.id;
                let kind = run.kind.clone();
                let view = run_view(run, vec![task], &HashSet::new());
                (id, FinishedView { kind, view })
            })
            .collect();
        self.notifier
            .announce_with_views(&done.finished, views)
            .await;
        let handled = done.locked;
        if handled.is_empty() {
            return Ok(Cow::Borrowed(completions));
        }
        let handled: HashSet<Uuid> = handled.into_iter().collect();
        Ok(completions
            .iter()
            .filter(|c| !(ends_run(c) && handled.contains(&c.run_id)))
            .cloned()
            .collect())
    }

    /// Records completions and plans what follows, in one transaction.
    async fn advance_in_transaction(
        &mut self,
        completions: &[Completion],
    ) -> Result<(), AdvanceError> {
        let mut tx = self
            .db
            .get()
            .await?
            .begin()
            .await
            .map_err(StoreError::from)?;
        let mut run_ids: Vec<Uuid> = completions.iter().map(|c| c.run_id).collect();
        run_ids.sort_unstable();
        run_ids.dedup();
        // Lock first: another scheduler advancing the same run waits here, then sees our rows.
        // A batch without failures records in the same statement, each task once its run is
        // locked; a failure may be retried, which its run's definition decides.
        let (runs, recorded) = if completions.iter().all(|c| c.status != "failed") {
            let (locked, recorded) = store::lock_and_record(&mut tx, &run_ids, completions).await?;
            (RunToPlan::parse_all(locked), recorded)
        } else {
            let runs = RunToPlan::parse_all(store::lock_runs(&mut tx, &run_ids).await?);
            let (retries, finals) = Self::split_retries(&mut tx, &runs, completions).await?;
            store::schedule_retries(&mut tx, &retries).await?;
            (runs, store::record_completions(&mut tx, &finals).await?)
        };
        let mut states = steps_recorded(&recorded);
        let advanced = fan_in(&mut tx, recorded).await?;
        let runs: Vec<RunToPlan> = runs
            .into_iter()
            .filter(|run| advanced.contains(&run.id) && run.status == "running")
            .collect();
        // A run whose every step was just recorded needs no read: the batch knows its states.
        // The others are read whole (their rows include what was just recorded).
        let unknown: Vec<Uuid> = runs
            .iter()
            .filter(|run| {
                let known = states.get(&run.id);
                !run.definition
                    .steps
                    .iter()
                    .all(|step| known.is_some_and(|known| known.contains_key(&step.id)))
            })
            .map(|run| run.id)
            .collect();
        for row in store::task_states(&mut tx, &unknown).await? {
            states
                .entry(row.run_id)
                .or_default()
                .insert(row.step_id, step_state(&row.status, row.output, row.error));
        }
        // Planning may run user jq programs: those runs are planned off the async threads,
        // unless every program is quick and the values it reads are small.
        let programs = self.programs.clone();
        let (materialized, finished) = if plans_in_place(programs.cache(), &runs, &states) {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                plan_runs(&programs, runs, states)
            }))
            .map_err(|_| AdvanceError::Planning("planning panicked".to_owned()))??
        } else {
            tokio::task::spawn_blocking(move || plan_runs(&programs, runs, states))
                .await
                .map_err(|error| AdvanceError::Planning(error.to_string()))??
        };
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
        tx.commit().await.map_err(StoreError::from)?;
        let dispatches: Vec<Dispatch> = materialized
            .dispatches
            .into_iter()
            .filter(|dispatch| !cancelled.contains(&dispatch.task_id))
            .collect();
        self.dispatcher.send(dispatches);
        // A failed run's steps still running elsewhere are stopped.
        let failed: Vec<Uuid> = finished
            .iter()
            .filter(|run| run.status == "failed")
            .map(|run| run.id)
            .collect();
        self.notifier.stop_runs(&failed).await;
        let finished_ids: Vec<Uuid> = finished_ids.into_iter().collect();
        self.notifier.announce(&finished_ids).await;
        Ok(())
    }
}

/// Whether planning `runs` is quick work on values: they run no program, or only quick ones
/// on run inputs and step outputs (`states`) of at most [`jq::QUICK_INPUT_SIZE`] in all.
fn plans_in_place(
    programs: &ProgramCache,
    runs: &[RunToPlan],
    states: &HashMap<Uuid, BTreeMap<String, StepState>>,
) -> bool {
    let values = runs
        .iter()
        .filter(|run| run.definition.plans_with_programs())
        .flat_map(|run| {
            let outputs = states
                .get(&run.id)
                .into_iter()
                .flat_map(BTreeMap::values)
                .filter_map(|state| state.output.as_ref());
            std::iter::once(&run.input).chain(outputs)
        });
    runs.iter()
        .all(|run| run.definition.plans_with_quick_programs(programs))
        && value::sizes_at_most(values, jq::QUICK_INPUT_SIZE)
}

/// The states of the steps (not items) a batch recorded, by run.
fn steps_recorded(recorded: &[store::Recorded]) -> HashMap<Uuid, BTreeMap<String, StepState>> {
    let mut states: HashMap<Uuid, BTreeMap<String, StepState>> = HashMap::new();
    for task in recorded.iter().filter(|task| task.item < 0) {
        states.entry(task.run_id).or_default().insert(
            task.step_id.clone(),
            step_state(&task.status, task.output.clone(), task.error.clone()),
        );
    }
    states
}

/// Carries recorded item completions into their `for_each` steps: counts succeeded items, joins
/// steps whose items all succeeded and fails steps one of whose items failed. Returns the runs
/// whose planning may move on: those with a step that finished.
async fn fan_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    recorded: Vec<store::Recorded>,
) -> Result<HashSet<Uuid>, StoreError> {
    let mut finished_steps = HashSet::new();
    let mut counts: HashMap<(Uuid, String), i32> = HashMap::new();
    let mut failures = Vec::new();
    for task in recorded {
        if task.item < 0 {
            finished_steps.insert(task.run_id);
        } else if task.status == "succeeded" {
            *counts.entry((task.run_id, task.step_id)).or_default() += 1;
        } else {
            let mut error = task.error.map_or(Value::Null, |error| error.0);
            if let Some(message) = error.get("message").and_then(Value::as_str) {
                error["message"] = json!(format!("item {}: {message}", task.item));
            }
            error["item"] = json!(task.item);
            failures.push((task.run_id, task.step_id, error));
            finished_steps.insert(task.run_id);
        }
    }
    store::fail_items(tx, &failures).await?;
    let counts: Vec<(Uuid, String, i32)> = counts
        .into_iter()
        .map(|((run, step), added)| (run, step, added))
        .collect();
    let complete = store::count_items(tx, &counts).await?;
    store::join_items(tx, &complete).await?;
    finished_steps.extend(complete.into_iter().map(|(run, _)| run));
    Ok(finished_steps)
}

/// A locked run with its definition parsed.
struct RunToPlan {
    id: Uuid,
    definition: WorkflowDefinition,
    input: Value,
    status: String,
}

impl RunToPlan {
    fn parse_all(runs: Vec<LockedRun>) -> Vec<Self> {
        runs.into_iter().filter_map(Self::parse).collect()
    }

    fn parse(run: LockedRun) -> Option<Self> {
        match serde_json::from_value(run.definition.0) {
            Ok(definition) => Some(Self {
                id: run.id,
                definition,
                input: run.input.0,
                status: run.status,
            }),
            Err(error) => {
                tracing::error!(run_id = %run.id, %error, "stored definition does not parse");
                None
            }
        }
    }
}

/// Plans the next steps of each run; returns the rows to write and the runs that ended.
fn plan_runs(
    programs: &dyn ProgramRunner,
    runs: Vec<RunToPlan>,
    states: HashMap<Uuid, BTreeMap<String, StepState>>,
) -> Result<(Materialized, Vec<FinishedRun>), planner::Stopped> {
    let mut materialized = Materialized::default();
    let mut finished = Vec::new();
    let empty = BTreeMap::new();
    for run in runs {
        let advance = planner::advance(
            programs,
            &run.definition,
            &run.input,
            states.get(&run.id).unwrap_or(&empty),
        )?;
        materialized.add(&run.definition, run.id, advance.planned);
        if let Some(end) = advance.end {
            finished.push(finished_run(run.id, end));
        }
    }
    Ok((materialized, finished))
}

/// The completions read from a batch of messages, and the bodies that name no task.
#[derive(Default)]
struct Read {
    completions: Vec<Completion>,
    unreadable: Vec<Vec<u8>>,
    /// How long the steps that ran took, and on which queue.
    ran: Vec<Ran>,
}

impl Read {
    /// Reads every completion a message carries (one, or a bundle).
    fn add(&mut self, delivery: &Delivery) {
        let bodies = match protocol::unbundle(&delivery.data) {
            Ok(bodies) => bodies,
            Err(error) => {
                tracing::error!(%error, "a message of completions cannot be read; moving it to the dead letters");
                vec![delivery.data.as_slice()]
            }
        };
        for body in bodies {
            match read_completion(body) {
                Some((completion, ran)) => {
                    self.completions.push(completion);
                    self.ran.extend(ran);
                }
                None => self.unreadable.push(body.to_vec()),
            }
        }
    }

    /// How many messages it holds.
    fn len(&self) -> usize {
        self.completions.len() + self.unreadable.len()
    }
}

/// The identity of a completion, readable even when the rest of the message is not.
#[derive(Deserialize)]
struct CompletionIdentity {
    task_id: TaskId,
    run_id: RunId,
    attempt: u32,
}

/// Reads a completion body. One that cannot be read but names its task becomes a failure of
/// that attempt, so its run still ends; one that names nothing is logged and dropped. Returns
/// the completion and, if it says so, how long the step ran.
fn read_completion(body: &[u8]) -> Option<(Completion, Option<Ran>)> {
    match protocol::decode::<CompletionMessage>(body) {
        Ok(message) => Some((to_completion(&message), message.ran)),
        Err(error) => match serde_json::from_slice::<CompletionIdentity>(body) {
            Ok(identity) => {
                tracing::error!(task_id = %identity.task_id, %error, "failing the step of an unreadable completion");
                let now = Utc::now();
                let completion = Completion {
                    task_id: identity.task_id.0,
                    run_id: identity.run_id.0,
                    attempt: i32::try_from(identity.attempt).unwrap_or(i32::MAX),
                    status: "failed",
                    output: None,
                    error: Some(json!({
                        "type": INVALID_OUTPUT,
                        "message": format!("the scheduler cannot read this step's completion: {error}"),
                    })),
                    worker_id: String::new(),
                    started_at: now,
                    finished_at: now,
                    logs: None,
                    ends_run: false,
                };
                Some((completion, None))
            }
            Err(_) => {
                tracing::error!(%error, "a completion names no task; moving it to the dead letters");
                None
            }
        },
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
        run_id: message.run_id.0,
        attempt: i32::try_from(message.attempt).unwrap_or(i32::MAX),
        status,
        output,
        error,
        worker_id: message.worker_id.clone(),
        started_at: message.started_at,
        finished_at: message.finished_at,
        logs: message.logs.clone(),
        ends_run: message.ends_run,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(steps: Value, input: Value) -> RunToPlan {
        RunToPlan {
            id: Uuid::now_v7(),
            definition: serde_json::from_value(json!({ "steps": steps })).expect("a definition"),
            input,
            status: "running".to_owned(),
        }
    }

    fn done(output: Value) -> BTreeMap<String, StepState> {
        BTreeMap::from([(
            "a".to_owned(),
            StepState {
                status: StepStatus::Succeeded,
                output: Some(output),
                error: None,
            },
        )])
    }

    #[test]
    fn runs_plan_in_place_with_no_program_or_quick_ones_on_small_values() {
        let programs = ProgramCache::default();
        for source in [".steps.a.n", "map(.)"] {
            programs.get(source).expect("compiles");
        }
        let chain = |input: &str| {
            json!([
                {"id": "a", "dataflow": "."},
                {"id": "b", "dataflow": ".", "after": ["a"], "input": input}
            ])
        };
        let check = |runs: Vec<(RunToPlan, Value)>| {
            let states = runs
                .iter()
                .map(|(run, output)| (run.id, done(output.clone())))
                .collect();
            let runs: Vec<RunToPlan> = runs.into_iter().map(|(run, _)| run).collect();
            plans_in_place(&programs, &runs, &states)
        };
        let small = json!({"n": 1});
        let large = json!({"n": "x".repeat(jq::QUICK_INPUT_SIZE)});
        let no_program = || run(json!([{"id": "a", "dataflow": "."}]), json!({}));
        let quick = || run(chain(".steps.a.n"), json!({}));
        assert!(check(vec![(no_program(), large.clone())]));
        assert!(check(vec![
            (quick(), small.clone()),
            (no_program(), large.clone())
        ]));
        assert!(!check(vec![(quick(), large.clone())]), "a large output");
        let large_input = run(chain(".steps.a.n"), json!("x".repeat(jq::QUICK_INPUT_SIZE)));
        assert!(!check(vec![(large_input, small.clone())]), "a large input");
        let half = json!({"n": "x".repeat(jq::QUICK_INPUT_SIZE / 2)});
        assert!(check(vec![(quick(), half.clone())]));
        assert!(
            !check(vec![(quick(), half.clone()), (quick(), half)]),
            "large values together"
        );
        let slow = run(chain("map(.)"), json!({}));
        assert!(!check(vec![(slow, small.clone())]), "not quick");
        let uncompiled = run(chain(".steps.a.m"), json!({}));
        assert!(!check(vec![(uncompiled, small)]), "not compiled");
    }
}
