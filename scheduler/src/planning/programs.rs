//! Where the jq programs of planning (`input`, `when`, `for_each`) run, and under which limits.
//!
//! A quick program on a small input (`Program::is_quick`, at most
//! [`jq::QUICK_INPUT_SIZE`]) runs on the calling thread: its run is linear in its input, so it
//! takes microseconds. Every other program runs in a sandbox process
//! ([`taskfleet_io::jq_sandbox`]) under the scheduler's time and memory limits, so a program
//! that loops, allocates without bound or recurses too deep fails its step instead of
//! stalling or ending the scheduler. Such a call blocks its thread up to the time limit: the
//! planner that makes it runs on the blocking pool.

use std::time::Duration;

use serde_json::Value;
use taskfleet_common::jq::{self, Program, ProgramCache};
use taskfleet_common::value;
use taskfleet_io::jq_sandbox::{JqSandbox, SandboxError};
use tokio_util::sync::CancellationToken;

/// Why a program gave no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgramFailure {
    /// The program failed (an error it raised, or a limit it reached); the message says which.
    Failed(String),
    /// The scheduler is shutting down: nothing may be decided from this run.
    Stopped,
    /// No sandbox could run the program: nothing may be decided from this run yet.
    Unavailable(String),
}

/// Runs the programs planning needs, from any thread.
pub trait ProgramRunner: Sync {
    /// The compiled programs, by source.
    fn cache(&self) -> &ProgramCache;

    /// Runs `program` on `input` and returns its single value ([`jq::single_value`]).
    fn run(&self, program: &Program, input: Value) -> Result<Value, ProgramFailure>;

    /// How many runs may be planned at once to good effect: as many as programs may run at
    /// once.
    fn parallelism(&self) -> usize {
        1
    }

    /// The largest step input planning may make, in bytes of JSON (`TASKFLEET_MAX_VALUE_BYTES`).
    fn max_value_bytes(&self) -> usize {
        value::DEFAULT_MAX_BYTES
    }
}

/// Runs every program on the calling thread, without limits: for tests of planning, whose
/// programs are known.
#[cfg(test)]
impl ProgramRunner for ProgramCache {
    fn cache(&self) -> &ProgramCache {
        self
    }

    fn run(&self, program: &Program, input: Value) -> Result<Value, ProgramFailure> {
        run_in_place(program, input)
    }
}

/// Runs a program on the calling thread.
fn run_in_place(program: &Program, input: Value) -> Result<Value, ProgramFailure> {
    program
        .run(input)
        .map_err(|error| ProgramFailure::Failed(error.to_string()))
}

/// The scheduler's runner: quick programs on small inputs in place, the others in sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxedPrograms {
    cache: ProgramCache,
    sandbox: JqSandbox,
    time_limit: Duration,
    stop: CancellationToken,
    /// Whether every quick program runs in place, whatever the size of its input.
    quick_in_place: bool,
    /// The largest step input planning may make.
    max_value_bytes: usize,
}

impl SandboxedPrograms {
    /// Runs programs compiled into `cache` in `sandbox` for at most `time_limit` each, until
    /// `stop` is cancelled.
    pub fn new(
        cache: ProgramCache,
        sandbox: JqSandbox,
        time_limit: Duration,
        stop: CancellationToken,
    ) -> Self {
        Self {
            cache,
            sandbox,
            time_limit,
            stop,
            quick_in_place: false,
            max_value_bytes: value::DEFAULT_MAX_BYTES,
        }
    }

    /// Returns the runner with `max_value_bytes` as the largest step input planning may make.
    pub fn with_max_value_bytes(self, max_value_bytes: usize) -> Self {
        Self {
            max_value_bytes,
            ..self
        }
    }

    /// The runner of planning that happens in place, on an async thread, which no program may
    /// block: it was chosen because every program is quick and the values planning starts from
    /// are small ([`super::plans_in_place`]), and a quick program's output stays within a
    /// small multiple of its input, so the programs that read it (a `when` reading what an
    /// `input` program made) run in place as well, whatever their input's size.
    pub fn in_place(&self) -> Self {
        Self {
            quick_in_place: true,
            ..self.clone()
        }
    }
}

impl ProgramRunner for SandboxedPrograms {
    fn cache(&self) -> &ProgramCache {
        &self.cache
    }

    fn parallelism(&self) -> usize {
        self.sandbox.settings().processes
    }

    fn max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }

    fn run(&self, program: &Program, input: Value) -> Result<Value, ProgramFailure> {
        if program.is_quick()
            && (self.quick_in_place || value::size_at_most(&input, jq::QUICK_INPUT_SIZE))
        {
            return run_in_place(program, input);
        }
        self.sandbox
            .run(
                program.source(),
                &input,
                jq::DEFAULT_OUTPUT_LIMIT,
                self.time_limit,
                &self.stop,
            )
            .map(jq::single_value)
            .map_err(|error| match error {
                SandboxError::Stopped => ProgramFailure::Stopped,
                SandboxError::Failed(reason) => ProgramFailure::Unavailable(reason),
                error => ProgramFailure::Failed(error.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;
    use taskfleet_io::jq_sandbox::SandboxSettings;

    use super::*;

    /// A runner whose sandboxes can never start: only what runs in place succeeds.
    fn without_sandboxes() -> SandboxedPrograms {
        SandboxedPrograms::new(
            ProgramCache::default(),
            JqSandbox::new(SandboxSettings {
                program: PathBuf::from("/nonexistent/taskfleet-scheduler"),
                processes: 1,
                memory_bytes: 1 << 20,
            }),
            Duration::from_secs(1),
            CancellationToken::new(),
        )
    }

    #[test]
    fn quick_programs_run_in_place_and_others_wait_for_a_sandbox() {
        let programs = without_sandboxes();
        let quick = programs.cache().get(".a").expect("compiles");
        let slow = programs.cache().get("map(.)").expect("compiles");
        let small = json!({"a": 1});
        let large = json!({"a": "x".repeat(jq::QUICK_INPUT_SIZE)});
        assert_eq!(programs.run(&quick, small.clone()), Ok(json!(1)));
        // A sandbox that cannot start halts planning rather than failing the run's step.
        assert!(matches!(
            programs.run(&quick, large.clone()),
            Err(ProgramFailure::Unavailable(_))
        ));
        assert!(matches!(
            programs.run(&slow, json!([1])),
            Err(ProgramFailure::Unavailable(_))
        ));
        // Planning in place never waits for a sandbox for a quick program, whatever its input.
        let in_place = programs.in_place();
        assert_eq!(
            in_place.run(&quick, large),
            Ok(json!("x".repeat(jq::QUICK_INPUT_SIZE)))
        );
    }
}
