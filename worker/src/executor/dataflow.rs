//! The dataflow executor: runs jq programs with jaq, compiled once per program text and cached.
//!
//! A quick program ([`Program::is_quick`], whose run is linear in its input) on an input of at
//! most [`QUICK_INPUT_SIZE`] runs in place: it takes a few microseconds, less than any crossing
//! to another thread. Every other program runs in a sandbox process
//! ([`taskfleet_io::jq_sandbox`]) under the worker's memory limit, for at most the step's
//! `timeout_s` (failing with `timeout`, like any step) or, when the step sets none, the worker's
//! jq time limit (failing with `dataflow_error`); a program that loops, allocates without
//! bound or recurses too deep fails its step and leaves the worker as it was. A step that is
//! stopped (its run cancelled) stops its sandbox. When no sandbox can run the program at all (one
//! cannot start), the step fails with `worker_lost`, which its retry policy may take again.

use std::time::Duration;

use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::{DATAFLOW_ERROR, WORKER_LOST};
use taskfleet_common::jq::{self, Program, ProgramCache, QUICK_INPUT_SIZE, RunError};
use taskfleet_common::protocol::TaskMessage;
use taskfleet_common::value;
use taskfleet_io::jq_sandbox::{JqSandbox, SandboxError};

use super::timeout_error;

/// Runs `dataflow` steps.
#[derive(Debug, Clone)]
pub struct DataflowExecutor {
    programs: ProgramCache,
    sandbox: JqSandbox,
    time_limit: Duration,
}

impl DataflowExecutor {
    /// Runs programs that are not quick in `sandbox`, for at most `time_limit` when their step
    /// sets no `timeout_s`.
    pub fn new(sandbox: JqSandbox, time_limit: Duration) -> Self {
        Self {
            programs: ProgramCache::default(),
            sandbox,
            time_limit,
        }
    }

    /// Runs the step of `task`; `timeout` is its `timeout_s`, past which it fails with
    /// `timeout`. Dropping the future stops the program.
    pub async fn run(
        &self,
        task: &TaskMessage,
        timeout: Option<Duration>,
    ) -> Result<Value, StepError> {
        let StepKind::Dataflow { program } = &task.step else {
            return Err(StepError::new(
                DATAFLOW_ERROR,
                "the dataflow executor got a step of another kind",
            ));
        };
        let compiled = self
            .programs
            .get(program)
            .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))?;
        let input = task.input.clone();
        if compiled.is_quick() && value::size_at_most(&input, QUICK_INPUT_SIZE) {
            return run_in_place(&compiled, input)
                .map_err(|error| StepError::new(DATAFLOW_ERROR, error))?
                .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()));
        }
        let time_limit = timeout.unwrap_or(self.time_limit);
        let ran = self
            .sandbox
            .run_async(program.clone(), input, jq::DEFAULT_OUTPUT_LIMIT, time_limit)
            .await;
        match ran {
            Ok(outputs) => Ok(jq::single_value(outputs)),
            Err(SandboxError::TimeLimit(limit)) if timeout.is_some() => Err(timeout_error(limit)),
            // The worker could not run the program: its step may run again, here or elsewhere.
            Err(error @ SandboxError::Failed(_)) => {
                Err(StepError::new(WORKER_LOST, error.to_string()))
            }
            Err(error) => Err(StepError::new(DATAFLOW_ERROR, error.to_string())),
        }
    }
}

/// Runs a quick program on the calling thread; a panic fails the step instead of the task that
/// awaits it.
fn run_in_place(program: &Program, input: Value) -> Result<Result<Value, RunError>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.run(input)))
        .map_err(|_| "jq program panicked".to_owned())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;
    use taskfleet_common::protocol::PROTOCOL_VERSION;
    use taskfleet_common::{RunId, TaskId};
    use taskfleet_io::jq_sandbox::SandboxSettings;

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
            trace_id: None,
            rate_limit: None,
            exclusive: false,
        }
    }

    #[test]
    fn a_quick_program_on_a_small_input_runs_without_a_sandbox() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            // A sandbox that cannot start: only what runs in place can succeed.
            let executor = DataflowExecutor::new(
                JqSandbox::new(SandboxSettings {
                    program: PathBuf::from("/nonexistent/taskfleet-worker"),
                    processes: 1,
                    memory_bytes: 1 << 20,
                }),
                Duration::from_secs(1),
            );
            let small = task("{b: .a}", json!({"a": 1}));
            assert_eq!(executor.run(&small, None).await, Ok(json!({"b": 1})));
            let large = json!({"a": vec![1; QUICK_INPUT_SIZE]});
            for task in [task("{b: .a}", large), task("map(.)", json!([1]))] {
                let error = executor
                    .run(&task, None)
                    .await
                    .expect_err("needs a sandbox");
                assert!(
                    error.message.starts_with("the jq sandbox failed"),
                    "{error:?}"
                );
            }
        });
    }
}
