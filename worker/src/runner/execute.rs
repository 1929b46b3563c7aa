//! Running a task's step: the executors of every step kind, and a task run under its lease
//! until it ends, runs out of time or its run is cancelled. What to run and whether to run it
//! at all (a redelivery, an input that cannot travel) is decided before, in `delivery`; the
//! outcome goes back there to be reported.

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::{CANCELLED, INVALID_OUTPUT};
use taskfleet_common::protocol::{Outcome, TaskMessage};
use taskfleet_common::{StepError, value};
use taskfleet_io::jq_sandbox::{JqSandbox, SandboxSettings};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::lease::ExclusiveLease;
use crate::config::Config;
use crate::executor::cancelled_error;
use crate::executor::dataflow::DataflowExecutor;
use crate::executor::pool::{PoolSettings, PythonPool};
use crate::executor::python::{PythonSettings, PythonTarget, StepContext};

/// What a step came to on its executor.
#[derive(Debug)]
pub struct Executed {
    /// Its output, or why it failed.
    pub result: Result<serde_json::Value, StepError>,
    /// What it printed or logged (Python steps).
    pub logs: Option<String>,
    /// How long it ran, from the moment its executor took it (not counting a wait for a free
    /// Python executor); `None` if no executor took it.
    pub ran: Option<ExecutorTime>,
}

/// How long a step ran on its executor, and when it ended there.
#[derive(Debug, Clone, Copy)]
pub struct ExecutorTime {
    /// How long it ran.
    pub ran: Duration,
    /// When its executor gave its outcome.
    pub ended: std::time::SystemTime,
}

impl ExecutorTime {
    /// The time of a step that ran `ran` and ended now.
    fn until_now(ran: Duration) -> Self {
        Self {
            ran,
            ended: std::time::SystemTime::now(),
        }
    }
}

/// How a worker's executors start: its Python executor processes and its jq sandboxes are both
/// the worker's own binary.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    /// The Python executor pool.
    pub python: PoolSettings,
    /// The jq sandboxes.
    pub jq: SandboxSettings,
    /// How long a jq program may run when its step sets no `timeout_s`.
    pub jq_time_limit: Duration,
}

impl ExecutorSettings {
    /// The settings a worker configured by `config` starts its executors with; `program` is the
    /// worker's executable.
    pub fn new(config: &Config, program: PathBuf) -> Self {
        Self {
            python: PoolSettings {
                program: program.clone(),
                executors: config.python_executors,
                max_tasks: config.python_max_tasks,
                max_rss_bytes: config.python_max_rss_mb.map(|mib| mib * 1024 * 1024),
                kill_grace: config.python_kill_grace,
                python: PythonSettings {
                    max_log_chars: config.max_log_chars,
                    python_path: config.python_path.clone(),
                    virtual_env: config.virtual_env.clone(),
                    confinement: config.python_confinement.clone(),
                },
            },
            jq: SandboxSettings {
                program,
                processes: config.jq_sandboxes.get(),
                memory_bytes: config.jq_memory_bytes,
            },
            jq_time_limit: config.jq_time_limit,
        }
    }
}

/// The executors of every step kind: what runs a step, apart from the broker and Redis.
#[derive(Clone)]
pub struct Executors {
    /// jq programs.
    pub dataflow: DataflowExecutor,
    /// Python functions and code.
    pub python: PythonPool,
}

impl Executors {
    /// Starts the Python executor processes (all of them, before it returns; one that cannot
    /// start fails this with its reason); jq sandboxes start when first needed.
    pub async fn start(settings: ExecutorSettings) -> anyhow::Result<Self> {
        Ok(Self {
            dataflow: DataflowExecutor::new(JqSandbox::new(settings.jq), settings.jq_time_limit),
            python: PythonPool::start(settings.python).await?,
        })
    }

    /// Runs `task` on the executor of its kind, failing it with `timeout` past `limit`, or with
    /// `cancelled` once `cancelled` is (its run was cancelled), the step stopped either way;
    /// a Python step's outcome keeps what it printed and logged up to its end.
    pub async fn execute(
        &self,
        task: &TaskMessage,
        limit: Option<Duration>,
        cancelled: &CancellationToken,
    ) -> Executed {
        let target = match &task.step {
            StepKind::Dataflow { .. } => {
                let started = std::time::Instant::now();
                // The executor keeps the limit itself: past it, or dropped, the program's
                // sandbox is killed.
                let result = tokio::select! {
                    result = self.dataflow.run(task, limit) => result,
                    () = cancelled.cancelled() => Err(cancelled_error()),
                };
                return Executed {
                    result,
                    logs: None,
                    ran: Some(ExecutorTime::until_now(started.elapsed())),
                };
            }
            StepKind::Python { module, function } => PythonTarget::Function {
                module: module.clone(),
                function: function.clone(),
            },
            StepKind::PythonCode { source } => PythonTarget::Code {
                source: source.clone(),
            },
        };
        let context = StepContext {
            run_id: task.run_id.to_string(),
            task_id: task.task_id.to_string(),
            step_id: task.step_id.clone(),
            attempt: task.attempt,
            trace_id: task.trace_id.map(|id| id.to_string()),
        };
        let (output, ran) = self
            .python
            .call_timed(target, task.input.clone(), context, limit, cancelled)
            .await;
        Executed {
            result: output.result,
            logs: (!output.logs.is_empty()).then_some(output.logs),
            ran: ran.map(ExecutorTime::until_now),
        }
    }
}

/// The least a task whose lease another delivery holds waits before it is sent again.
const HELD_LEASE_LEAST_WAIT: Duration = Duration::from_millis(100);

/// The outcome of a task whose run was cancelled before it started.
fn cancelled_before_start() -> (Outcome, Option<String>, Option<ExecutorTime>) {
    let error = StepError::new(CANCELLED, "the run was cancelled before this task started");
    (Outcome::Failed { error }, None, None)
}

impl Shared {
    /// Runs `task` under a lease and returns how it ended, what it logged and, if it ran to
    /// its end on an executor, how long it ran there; an output that cannot be stored or sent
    /// fails the task.
    ///
    /// A jq step runs while its lease is being taken: it has no effect beyond its output, which
    /// is dropped if the lease finds its run cancelled. Any other step starts only once the
    /// lease is taken.
    pub(super) async fn execute(
        &self,
        task: &TaskMessage,
        started_at: chrono::DateTime<Utc>,
    ) -> (Outcome, Option<String>, Option<ExecutorTime>) {
        // A step with a concurrency limit runs under a lease no other delivery holds, taken
        // before it starts whatever it runs.
        let exclusive = task.exclusive;
        if exclusive {
            match self.take_exclusive_lease(task, started_at).await {
                ExclusiveLease::Taken => {}
                ExclusiveLease::Cancelled => return cancelled_before_start(),
                ExclusiveLease::Held(ttl) => {
                    tracing::info!(task_id = %task.task_id, attempt = task.attempt, "another delivery of this task holds its lease; sending it back until the lease is free");
                    let outcome = Outcome::Deferred {
                        delay_ms: u64::try_from(ttl.max(HELD_LEASE_LEAST_WAIT).as_millis())
                            .unwrap_or(u64::MAX),
                        reason: "another delivery of this task holds its lease".to_owned(),
                    };
                    return (outcome, None, None);
                }
            }
        }
        let cancelled = self.register(task);
        let limit = task
            .timeout_s
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok());
        let lease = async {
            // An exclusive lease was taken above.
            exclusive || self.take_lease(task, started_at).await
        };
        let executed = if matches!(task.step, StepKind::Dataflow { .. }) {
            // A cancelled run stops its step at once, as it would if cancelled while it ran.
            let lease = async {
                let granted = lease.await;
                if !granted {
                    cancelled.cancel();
                }
                granted
            };
            let (lease, executed) =
                tokio::join!(lease, self.executors.execute(task, limit, &cancelled));
            lease.then_some(executed)
        } else if lease.await {
            Some(self.executors.execute(task, limit, &cancelled).await)
        } else {
            None
        };
        self.release(task.task_id);
        let Some(executed) = executed else {
            return cancelled_before_start();
        };
        let Executed { result, logs, ran } = executed;
        let outcome = match result {
            Ok(output) => match value::check(&output) {
                Err(error) => Outcome::Failed {
                    error: StepError::new(
                        INVALID_OUTPUT,
                        format!("step output cannot be stored: {error}"),
                    ),
                },
                Ok(()) => match value::check_size(&output, self.max_value_bytes) {
                    Ok(()) => Outcome::Succeeded { output },
                    Err(too_large) => Outcome::Failed {
                        error: StepError::new(
                            INVALID_OUTPUT,
                            format!("step output is {too_large}"),
                        ),
                    },
                },
            },
            Err(error) => Outcome::Failed { error },
        };
        (outcome, logs, ran)
    }
}
