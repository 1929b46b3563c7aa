//! Planning: from a run's definition, input and step states to the rows that carry out what
//! comes next. One path serves both the submission of new runs (their first steps) and the
//! completion loop (the steps that follow).
//!
//! - [`planner`] decides (pure logic on values);
//! - [`programs`] runs the jq programs the decisions need (in place when quick, else in a
//!   sandbox process);
//! - [`rows`] turns decisions into task rows and dispatches;
//! - [`submission`] plans new runs, submitted or started by a schedule's tick;
//! - this module joins them ([`plan_run`]) and chooses where planning runs ([`run_planning`]):
//!   on the calling async thread when it is quick work on values, else on the blocking pool.
//!
//! Nothing here touches the database or the broker: callers write the rows and publish.

pub mod planner;
pub mod programs;
pub mod rows;
pub mod submission;

use std::collections::BTreeMap;

use serde_json::Value;
use taskfleet_common::definition::WorkflowDefinition;
use taskfleet_common::jq::{self, ProgramCache};
use taskfleet_common::sync::lock;
use taskfleet_common::value;

use crate::store::FinishedRun;
pub use planner::{Halted, StepState};
pub use programs::{ProgramRunner, SandboxedPrograms};
pub use rows::{Materialized, RunRef, finished_run};
pub use submission::{NewRunParts, plan_new_run};

/// What planning a run came to.
#[derive(Debug, Default)]
pub struct PlannedRun {
    /// Rows to insert and messages to publish after the commit.
    pub rows: Materialized,
    /// The run's end, if planning ended it.
    pub end: Option<FinishedRun>,
}

/// Plans the next steps of `run` and turns the decisions into rows. A run that ends while it
/// is planned (a step failed at once, or every step is done) dispatches nothing more: its newly
/// planned tasks are written cancelled.
pub fn plan_run(
    programs: &dyn ProgramRunner,
    run: RunRef<'_>,
    definition: &WorkflowDefinition,
    input: &Value,
    states: &BTreeMap<String, StepState>,
) -> Result<PlannedRun, Halted> {
    let advance = planner::advance(programs, definition, input, states)?;
    let mut rows = Materialized::default();
    rows.add(definition, run, advance.planned);
    let end = advance.end.map(|end| finished_run(run.id, end));
    if end.is_some() {
        rows.cancel_dispatches();
    }
    Ok(PlannedRun { rows, end })
}

/// Returns the state of a step as stored: its task's status, output and error.
pub fn stored_state(
    status: taskfleet_common::TaskStatus,
    output: Option<Value>,
    error: Option<Value>,
) -> StepState {
    StepState {
        status: status.step_status(),
        output,
        error: error.and_then(|error| serde_json::from_value(error).ok()),
    }
}

/// What a run's planning reads: its definition and the values its programs run on.
pub struct PlanningLoad<'a> {
    /// The run's definition.
    pub definition: &'a WorkflowDefinition,
    /// The run input and the outputs of its finished steps.
    pub values: Vec<&'a Value>,
}

/// Whether planning these runs is quick work on values, to be done in place: they run no
/// program, or only quick ones already compiled (`Program::is_quick`) with no `for_each`, and
/// the values those programs may read come to at most [`jq::QUICK_INPUT_SIZE`] in all.
pub fn plans_in_place<'a>(
    programs: &ProgramCache,
    runs: impl IntoIterator<Item = PlanningLoad<'a>>,
) -> bool {
    let mut read = Vec::new();
    for run in runs {
        if !run.definition.plans_with_quick_programs(programs) {
            return false;
        }
        if run.definition.plans_with_programs() {
            read.extend(run.values);
        }
    }
    value::sizes_at_most(read, jq::QUICK_INPUT_SIZE)
}

/// Stack of the threads [`plan_each`] starts: compiling a program recurses on it (see
/// `taskfleet_common::jq`), as on the runtime's own threads.
const PLANNING_STACK: usize = 32 * 1024 * 1024;

/// Plans each of `items` with `plan`, on up to `threads` threads at once (the calling thread
/// among them), and returns the results in the order of `items`. A run whose programs wait in
/// a sandbox holds up only its own thread, so a batch with a program that runs to its time
/// limit takes that limit once per `threads` such runs rather than once per run. Stops at the
/// first [`Halted`].
pub fn plan_each<T: Send, R: Send>(
    threads: usize,
    items: Vec<T>,
    plan: impl Fn(T) -> Result<R, Halted> + Sync,
) -> Result<Vec<R>, Halted> {
    let count = items.len();
    let threads = threads.clamp(1, count.max(1));
    if threads == 1 {
        return items.into_iter().map(plan).collect();
    }
    let next = std::sync::Mutex::new(items.into_iter().enumerate());
    let results = std::sync::Mutex::new((0..count).map(|_| None).collect::<Vec<Option<R>>>());
    let halted: std::sync::Mutex<Option<Halted>> = std::sync::Mutex::new(None);
    let work = || {
        while lock(&halted).is_none() {
            let Some((index, item)) = lock(&next).next() else {
                return;
            };
            match plan(item) {
                Ok(result) => lock(&results)[index] = Some(result),
                Err(halt) => *lock(&halted) = Some(halt),
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            // A thread that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name("planning".to_owned())
                .stack_size(PLANNING_STACK)
                .spawn_scoped(scope, work);
        }
        work();
    });
    if let Some(halt) = taskfleet_common::sync::into_inner(halted) {
        return Err(halt);
    }
    let results = taskfleet_common::sync::into_inner(results);
    Ok(results.into_iter().flatten().collect())
}

/// Why planning gave no result.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    /// Planning halted (see [`Halted`]).
    #[error(transparent)]
    Halted(#[from] Halted),
    /// Planning panicked: a bug.
    #[error("planning failed: {0}")]
    Panicked(String),
}

/// Runs `work` (planning that may run programs) in place when `in_place`, else on the blocking
/// pool, where a program that is not quick may keep its thread up to its time limit. A panic
/// becomes [`PlanningError::Panicked`] either way.
pub async fn run_planning<T: Send + 'static>(
    in_place: bool,
    work: impl FnOnce() -> Result<T, Halted> + Send + 'static,
) -> Result<T, PlanningError> {
    let outcome = if in_place {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .map_err(|_| PlanningError::Panicked("planning panicked".to_owned()))?
    } else {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|error| PlanningError::Panicked(error.to_string()))?
    };
    Ok(outcome?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use taskfleet_common::TaskStatus;

    use uuid::Uuid;

    use super::*;

    fn definition(steps: Value) -> WorkflowDefinition {
        serde_json::from_value(json!({ "steps": steps })).expect("a definition")
    }

    #[test]
    fn a_run_that_ends_while_planned_dispatches_nothing() {
        let definition = definition(json!([
            {"id": "a", "dataflow": "."},
            {"id": "b", "dataflow": ".", "input": "error(\"no\")"}
        ]));
        let run = RunRef {
            id: Uuid::now_v7(),
            trace_id: None,
            tenant: "t",
        };
        let planned = plan_run(
            &ProgramCache::default(),
            run,
            &definition,
            &json!(1),
            &BTreeMap::new(),
        )
        .expect("planned");
        assert!(planned.end.is_some(), "step b failed, so the run did");
        assert!(planned.rows.dispatches.is_empty());
        let statuses: Vec<TaskStatus> = planned.rows.tasks.iter().map(|t| t.status).collect();
        assert_eq!(statuses, [TaskStatus::Cancelled, TaskStatus::Failed]);
    }

    #[test]
    fn planning_on_several_threads_keeps_the_order_and_stops_at_a_stop() {
        for threads in [1, 2, 8] {
            let planned = plan_each(threads, (0..100).collect(), |n: u32| Ok(n * 2));
            assert_eq!(planned, Ok((0..100).map(|n| n * 2).collect::<Vec<u32>>()));
            let stopped = plan_each(threads, (0..100).collect(), |n: u32| {
                if n == 50 {
                    Err(Halted::ShuttingDown)
                } else {
                    Ok(n)
                }
            });
            assert_eq!(stopped, Err(Halted::ShuttingDown));
        }
        let empty: Vec<u32> = Vec::new();
        assert_eq!(plan_each(4, empty, Ok), Ok(Vec::new()));
    }

    #[test]
    fn only_quick_compiled_programs_on_small_values_plan_in_place() {
        let programs = ProgramCache::default();
        let quick = definition(json!([{"id": "a", "dataflow": ".", "input": ".input.n"}]));
        let plain = definition(json!([{"id": "a", "dataflow": "."}]));
        let small = json!({"n": 1});
        let half = json!("x".repeat(jq::QUICK_INPUT_SIZE / 2));
        let load = |definition, values| PlanningLoad { definition, values };
        assert!(
            !plans_in_place(&programs, [load(&quick, vec![&small])]),
            "not compiled yet"
        );
        programs.get(".input.n").expect("compiles");
        assert!(plans_in_place(&programs, [load(&quick, vec![&small])]));
        assert!(plans_in_place(&programs, [load(&quick, vec![&half])]));
        assert!(
            !plans_in_place(
                &programs,
                [load(&quick, vec![&half]), load(&quick, vec![&half])]
            ),
            "values are counted together"
        );
        assert!(
            plans_in_place(
                &programs,
                [load(&quick, vec![&half]), load(&plain, vec![&half, &half])]
            ),
            "a run without programs reads no value"
        );
        programs.get("map(.)").expect("compiles");
        let slow = definition(json!([{"id": "a", "dataflow": ".", "when": "map(.)"}]));
        assert!(!plans_in_place(&programs, [load(&slow, vec![&small])]));
    }
}
