//! Records a batch of completions and plans what follows: the successes that end runs of a
//! single step in one statement, the rest in one transaction that locks their runs in id order,
//! records (or schedules retries), counts items into their `for_each` steps, plans the next
//! steps through [`crate::planning`] and finishes runs.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};
use sqlx::Connection as _;
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::error::CANCELLED;
use taskfleet_common::{RunStatus, StepError, TaskStatus};
use uuid::Uuid;

use super::{AdvanceError, CompletionLoop};
use crate::admission::{self, Wake};
use crate::notify::FinishedView;
use crate::planning::{self, Halted, Materialized, PlanningLoad, ProgramRunner, StepState};
use crate::retry;
use crate::store::{self, Completion, FinishedRun, LockedRun, StoreError};
use crate::views::run_view;
use taskfleet_common::jq::ProgramCache;

impl CompletionLoop {
    /// Separates the failed attempts that get another try (under their step's `retry`) from
    /// the completions that are final.
    async fn split_retries(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        runs: &[RunToPlan],
        completions: &[Completion],
    ) -> Result<(Vec<store::Retry>, Vec<Completion>), StoreError> {
        let failed: Vec<Uuid> = completions
            .iter()
            .filter(|c| c.status == TaskStatus::Failed)
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
                .filter(|task| {
                    task.attempt == completion.attempt && completion.status == TaskStatus::Failed
                })
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
    pub(super) async fn advance(&mut self, completions: &[Completion]) -> Result<(), AdvanceError> {
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
        let ends_run = |c: &Completion| c.ends_run && c.status == TaskStatus::Succeeded;
        let ending: Vec<&Completion> = completions.iter().filter(|c| ends_run(c)).collect();
        if ending.is_empty() {
            return Ok(Cow::Borrowed(completions));
        }
        // The runs someone waits for here come back whole, so the waiters need not read them.
        let wanted = self.notifier.watched(ending.iter().map(|c| c.run_id));
        let done = store::finish_single_steps(self.db.get().await?, &ending, &wanted).await?;
        crate::ended::runs(&done.ended);
        let views = done
            .rows
            .into_iter()
            .map(|(run, task)| {
                let id = run.id;
                let kind = run.kind;
                let view = run_view(run, vec![task], &HashSet::new());
                (id, FinishedView { kind, view })
            })
            .collect();
        self.notifier
            .announce_with_views(&done.finished, views)
            .await;
        // Their tasks' permits are free once the statement committed.
        self.dispatcher
            .admit(done.freed.into_iter().map(Wake::now).collect());
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
        let (runs, recorded) = if completions.iter().all(|c| c.status != TaskStatus::Failed) {
            let (locked, recorded) = store::lock_and_record(&mut tx, &run_ids, completions).await?;
            (RunToPlan::parse_all(locked), recorded)
        } else {
            let runs = RunToPlan::parse_all(store::lock_runs(&mut tx, &run_ids).await?);
            let (retries, finals) = Self::split_retries(&mut tx, &runs, completions).await?;
            store::schedule_retries(&mut tx, &retries).await?;
            // An attempt stopped by its run's cancellation was recorded as cancelled with the
            // run; its completion still brings what the step printed up to its end.
            let stopped: Vec<&Completion> = finals
                .iter()
                .filter(|c| c.logs.is_some() && error_type(c) == Some(CANCELLED))
                .collect();
            store::keep_logs_of_cancelled(&mut tx, &stopped).await?;
            (runs, store::record_completions(&mut tx, &finals).await?)
        };
        let freed: Vec<Wake> = recorded
            .iter()
            .filter_map(|task| task.concurrency_group.clone().map(Wake::now))
            .collect();
        let mut states = steps_recorded(&recorded);
        let max_value_bytes = self.programs.max_value_bytes();
        let advanced = fan_in(&mut tx, recorded, max_value_bytes).await?;
        let runs: Vec<RunToPlan> = runs
            .into_iter()
            .filter(|run| advanced.contains(&run.id) && run.status == RunStatus::Running)
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
                .insert(row.step_id, step_state(row.status, row.output, row.error));
        }
        // Planning may run user jq programs: those runs are planned off the async threads,
        // unless every program is quick and the values it reads are small.
        let in_place = plans_in_place(self.programs.cache(), &runs, &states);
        let programs = if in_place {
            self.programs.in_place()
        } else {
            self.programs.clone()
        };
        let (materialized, finished) = planning::run_planning(in_place, move || {
            let threads = if in_place { 1 } else { programs.parallelism() };
            plan_runs(&programs, runs, states, threads)
        })
        .await?;
        let finished_ids: HashSet<Uuid> = finished.iter().map(|run| run.id).collect();
        // A run that ended in this batch dispatches nothing more: its new tasks are written
        // cancelled, and `finish_runs` cancels the ones still queued from before.
        store::insert_tasks(&mut tx, &self.namespace, &materialized.tasks).await?;
        let ended = store::finish_runs(&mut tx, &finished).await?;
        tx.commit().await.map_err(StoreError::from)?;
        crate::ended::runs(&ended);
        self.dispatcher.send(materialized.dispatches);
        // Permits freed by the tasks recorded, and the groups of new tasks that wait for one.
        let mut wakes = freed;
        wakes.extend(admission::waiting(&materialized.tasks));
        self.dispatcher.admit(wakes);
        // A failed run's steps still running elsewhere are stopped.
        let failed: Vec<Uuid> = finished
            .iter()
            .filter(|run| run.status == RunStatus::Failed)
            .map(|run| run.id)
            .collect();
        self.notifier.stop_runs(&failed).await;
        let finished_ids: Vec<Uuid> = finished_ids.into_iter().collect();
        self.notifier.announce(&finished_ids).await;
        Ok(())
    }
}

/// Whether planning `runs` is quick work on values: they run no program, or only quick ones
/// on run inputs and step outputs (`states`) of at most [`taskfleet_common::jq::QUICK_INPUT_SIZE`] in all.
fn plans_in_place(
    programs: &ProgramCache,
    runs: &[RunToPlan],
    states: &HashMap<Uuid, BTreeMap<String, StepState>>,
) -> bool {
    planning::plans_in_place(
        programs,
        runs.iter().map(|run| {
            let outputs = states
                .get(&run.id)
                .into_iter()
                .flat_map(BTreeMap::values)
                .filter_map(|state| state.output.as_ref());
            PlanningLoad {
                definition: &run.definition,
                values: std::iter::once(&run.input).chain(outputs).collect(),
            }
        }),
    )
}

/// The states of the steps (not items) a batch recorded, by run.
fn steps_recorded(recorded: &[store::Recorded]) -> HashMap<Uuid, BTreeMap<String, StepState>> {
    let mut states: HashMap<Uuid, BTreeMap<String, StepState>> = HashMap::new();
    for task in recorded.iter().filter(|task| task.item < 0) {
        states.entry(task.run_id).or_default().insert(
            task.step_id.clone(),
            step_state(task.status, task.output.clone(), task.error.clone()),
        );
    }
    states
}

/// Carries recorded item completions into their `for_each` steps: counts succeeded items, joins
/// steps whose items all succeeded (failing those whose joined output is over
/// `max_value_bytes`) and fails steps one of whose items failed. Returns the runs whose
/// planning may move on: those with a step that finished.
async fn fan_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    recorded: Vec<store::Recorded>,
    max_value_bytes: usize,
) -> Result<HashSet<Uuid>, StoreError> {
    let mut finished_steps = HashSet::new();
    let mut counts: HashMap<(Uuid, String), i32> = HashMap::new();
    let mut failures = Vec::new();
    for task in recorded {
        if task.item < 0 {
            finished_steps.insert(task.run_id);
        } else if task.status == TaskStatus::Succeeded {
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
    store::join_items(tx, &complete, max_value_bytes).await?;
    finished_steps.extend(complete.into_iter().map(|(run, _)| run));
    Ok(finished_steps)
}

/// A locked run with its definition parsed.
struct RunToPlan {
    id: Uuid,
    definition: WorkflowDefinition,
    input: Value,
    status: RunStatus,
    trace_id: Option<taskfleet_common::TraceId>,
    tenant: String,
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
                trace_id: run.trace_id.as_deref().and_then(|id| id.parse().ok()),
                tenant: run.tenant,
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
    threads: usize,
) -> Result<(Materialized, Vec<FinishedRun>), Halted> {
    let empty = BTreeMap::new();
    let planned = planning::plan_each(threads, runs, |run| {
        planning::plan_run(
            programs,
            planning::RunRef {
                id: run.id,
                trace_id: run.trace_id,
                tenant: &run.tenant,
            },
            &run.definition,
            &run.input,
            states.get(&run.id).unwrap_or(&empty),
        )
    })?;
    let mut materialized = Materialized::default();
    let mut finished = Vec::new();
    for run in planned {
        materialized.extend(run.rows);
        finished.extend(run.end);
    }
    Ok((materialized, finished))
}

/// The error type a completion reports, if it failed.
fn error_type(completion: &Completion) -> Option<&str> {
    completion.error.as_ref()?.get("type")?.as_str()
}

/// Returns the planner's view of a stored task.
pub fn step_state(
    status: TaskStatus,
    output: Option<crate::store::Payload>,
    error: Option<crate::store::Payload>,
) -> StepState {
    planning::stored_state(
        status,
        output.map(|output| output.0),
        error.map(|error| error.0),
    )
}

#[cfg(test)]
mod tests {
    use taskfleet_common::StepStatus;
    use taskfleet_common::jq;

    use super::*;

    fn run(steps: Value, input: Value) -> RunToPlan {
        RunToPlan {
            id: Uuid::now_v7(),
            definition: serde_json::from_value(json!({ "steps": steps })).expect("a definition"),
            input,
            status: RunStatus::Running,
            trace_id: None,
            tenant: "t".to_owned(),
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
