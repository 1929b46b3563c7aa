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
}

/// Runs every program on the calling thread, without limits: for tests of planning, whose
/// programs are known.
impl ProgramRunner for ProgramCache {
    fn cache(&self) -> &ProgramCache {
        self
    }

    fn run(&self, program: &Program, input: Value) -> Result<Value, ProgramFailure> {
        program
            .run(input)
            .map_err(|error| ProgramFailure::Failed(error.to_string()))
    }
}

/// The scheduler's runner: quick programs on small inputs in place, the others in sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxedPrograms {
    cache: ProgramCache,
    sandbox: JqSandbox,
    time_limit: Duration,
    stop: CancellationToken,
}

impl SandboxedPrograms {
    /// Runs programs in `sandbox` for at most `time_limit` each, until `stop` is cancelled.
    pub fn new(sandbox: JqSandbox, time_limit: Duration, stop: CancellationToken) -> Self {
        Self {
            cache: ProgramCache::default(),
            sandbox,
            time_limit,
            stop,
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

    fn run(&self, program: &Program, input: Value) -> Result<Value, ProgramFailure> {
        if program.is_quick() && value::size_at_most(&input, jq::QUICK_INPUT_SIZE) {
            return ProgramRunner::run(&self.cache, program, input);
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
                error => ProgramFailure::Failed(error.to_string()),
            })
    }
}
