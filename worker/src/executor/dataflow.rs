//! The dataflow executor: runs jq programs with jaq, compiled once per program text and cached.
//! Programs run on tokio's blocking pool, except a quick program ([`Program::is_quick`], whose
//! run is linear in its input) on an input of at most [`QUICK_INPUT_SIZE`],
//! which runs in place: it takes a few microseconds, less than the two thread wake-ups of a
//! crossing to the blocking pool and back.

use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::DATAFLOW_ERROR;
use taskfleet_common::jq::{Program, ProgramCache, QUICK_INPUT_SIZE, RunError};
use taskfleet_common::protocol::TaskMessage;
use taskfleet_common::value;

use super::Executor;

/// Runs `dataflow` steps.
#[derive(Clone, Default)]
pub struct DataflowExecutor {
    programs: ProgramCache,
}

impl Executor for DataflowExecutor {
    async fn execute(&self, task: &TaskMessage) -> Result<Value, StepError> {
        let StepKind::Dataflow { program } = &task.step else {
            return Err(StepError::new(
                DATAFLOW_ERROR,
                "the dataflow executor got a step of another kind",
            ));
        };
        let program = self
            .programs
            .get(program)
            .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))?;
        let input = task.input.clone();
        let ran = if program.is_quick() && value::size_at_most(&input, QUICK_INPUT_SIZE) {
            run_in_place(&program, input)
        } else {
            tokio::task::spawn_blocking(move || program.run(input))
                .await
                .map_err(|error| format!("jq program panicked: {error}"))
        };
        ran.map_err(|error| StepError::new(DATAFLOW_ERROR, error))?
            .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))
    }
}

/// Runs a quick program on the calling thread; a panic fails the step as it would on the
/// blocking pool, instead of the task that awaits it.
fn run_in_place(program: &Program, input: Value) -> Result<Result<Value, RunError>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.run(input)))
        .map_err(|_| "jq program panicked".to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use taskfleet_common::protocol::PROTOCOL_VERSION;
    use taskfleet_common::{RunId, TaskId};

    use super::*;

    fn task(program: &str, input: Value) -> TaskMessage {
        TaskMessage {
            version: PROTOCOL_VERSION,
            task_id: TaskId::new(),
            run_id: RunId::new(),
            step_id: "step".to_owned(),
            attempt: 1,
            step: StepKind::Dataflow {
                program: program.to_owned(),
            },
            input,
            timeout_s: None,
            ends_run: false,
        }
    }

    #[tokio::test]
    async fn every_program_gives_what_it_gives_when_run_directly() {
        let executor = DataflowExecutor::default();
        let large = json!({"items": vec![1; QUICK_INPUT_SIZE]});
        for (program, input) in [
            (".", json!({"a": 1})),
            ("{b: .a, c: \"\\(.a)\"}", json!({"a": 1})),
            (".items | length", large),
            ("map(. * 2)", json!([1, 2])),
            (".a.b", json!({"a": 1})),
            ("error(\"no\")", json!(null)),
        ] {
            let expected = Program::compile(program)
                .expect("compiles")
                .run(input.clone())
                .map_err(|error| error.to_string());
            let executed = executor
                .execute(&task(program, input))
                .await
                .map_err(|error| error.message);
            assert_eq!(executed, expected, "{program}");
        }
    }

    #[test]
    fn a_quick_program_on_a_small_input_runs_without_the_blocking_pool() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (release, released) = std::sync::mpsc::channel::<()>();
            let occupied = tokio::task::spawn_blocking(move || released.recv());
            let executor = DataflowExecutor::default();
            let limit = Duration::from_secs(2);
            let small = task("{b: .a}", json!({"a": 1}));
            let quick = executor.execute(&small);
            assert_eq!(
                tokio::time::timeout(limit, quick).await.ok(),
                Some(Ok(json!({"b": 1}))),
                "a quick program waited for the blocking pool"
            );
            let large = json!({"a": vec![1; QUICK_INPUT_SIZE]});
            let other = [task("{b: .a}", large), task("map(.)", json!([1]))];
            for task in &other {
                let waited =
                    tokio::time::timeout(Duration::from_millis(200), executor.execute(task));
                assert!(waited.await.is_err(), "ran off the blocking pool");
            }
            release.send(()).expect("the blocking thread waits");
            let _ = occupied.await;
        });
    }
}
