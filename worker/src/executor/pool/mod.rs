//! The supervised pool of Python executor processes a worker runs its Python steps in.
//!
//! Python runs one thread at a time per interpreter, so a worker that should use every core for
//! Python steps needs several interpreters, and a step blocked in C (a `time.sleep`, a socket
//! read, a C extension) can only be stopped by ending the process it runs in. The pool starts
//! `executors` processes (see [`super::process`]), each serving one call at a time. A call
//! takes an idle executor and travels from the caller's own task, so no other task of the
//! worker is woken on its way. The pool:
//!
//! - at a call's time limit answers `timeout` at once, asks the executor to interrupt the step
//!   (an exception raised in its Python code) and, if the executor is not free again within the
//!   kill grace period, kills it with SIGKILL and starts a replacement, in the background;
//! - does the same when the caller gives up the call (its run was cancelled);
//! - answers `worker_lost` when the executor dies during a call (a crash, `os._exit`, the OOM
//!   killer), and replaces it; an executor found dead when taken for a call is replaced and the
//!   call goes to another, so no call is lost to an executor that died while idle;
//! - retires an executor after `max_tasks` calls or when its resident memory is above
//!   `max_rss_bytes` after a call (whose outcome was already delivered), and starts a new one.
//!
//! This module holds the handle, its settings and the supervision of the executors (given back,
//! retired, killed and replaced); `call` the path of one call, `executor_process` one executor
//! process (started, stopped, retired, killed), and `connection` the reading of its replies.

mod call;
mod connection;
mod executor_process;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Semaphore;

use super::python::PythonSettings;
use executor_process::{ExecutorProcess, SocketDir};

/// The longest wait between attempts to start an executor that keeps failing to start.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// How a worker runs its pool of executors.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// The program started as an executor: the `taskfleet-worker` binary.
    pub program: PathBuf,
    /// How many executor processes run at once.
    pub executors: NonZeroUsize,
    /// Retire an executor after this many calls.
    pub max_tasks: Option<u64>,
    /// Retire an executor whose resident memory is above this after a call.
    pub max_rss_bytes: Option<u64>,
    /// How long an interrupted step has to end before its executor is killed.
    pub kill_grace: Duration,
    /// The interpreter settings of every executor.
    pub python: PythonSettings,
}

/// Why an executor was replaced (the label of the restarts metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// It exited or died (a crash, `os._exit`, the OOM killer), or its connection broke.
    Died,
    /// A step it ran did not stop within the kill grace period after its timeout or its
    /// run's cancellation, so it was killed.
    Stuck,
    /// It served `max_tasks` calls.
    MaxTasks,
    /// Its resident memory went over `max_rss_bytes`.
    MaxMemory,
}

impl Restart {
    /// Every reason.
    pub const ALL: [Self; 4] = [Self::Died, Self::Stuck, Self::MaxTasks, Self::MaxMemory];

    /// The reason's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Died => "died",
            Self::Stuck => "stuck",
            Self::MaxTasks => "max_tasks",
            Self::MaxMemory => "max_memory",
        }
    }
}

/// Where an executor stands (the label of the executors metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorState {
    /// Ready for a call.
    Idle,
    /// Running a call, or being stopped, retired or killed.
    Busy,
    /// A replacement starting.
    Starting,
}

impl ExecutorState {
    /// Every state.
    pub const ALL: [Self; 3] = [Self::Idle, Self::Busy, Self::Starting];

    /// The state's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Starting => "starting",
        }
    }
}

/// A handle to the pool; cloning it is cheap. The executors stop when the last handle is dropped.
#[derive(Clone)]
pub struct PythonPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PythonPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonPool").finish_non_exhaustive()
    }
}

/// What the pool's handles and its background tasks share.
struct Inner {
    settings: PoolSettings,
    /// Executors ready for a call.
    idle: std::sync::Mutex<Vec<ExecutorProcess>>,
    /// One permit per executor in `idle`.
    available: Semaphore,
    /// Calls waiting for an executor.
    waiting: AtomicUsize,
    /// Where the executors' sockets are made; removed with the pool.
    sockets: SocketDir,
    /// Numbers the sockets.
    spawned: AtomicU64,
    /// Replacements starting.
    starting: AtomicUsize,
}

impl PythonPool {
    /// Starts every executor and waits until each has its interpreter ready; the first that
    /// fails to start fails the pool, with the executor's own explanation (a missing virtualenv,
    /// an unusable Python path).
    pub async fn start(settings: PoolSettings) -> anyhow::Result<Self> {
        let executors = settings.executors.get();
        let inner = Arc::new(Inner {
            settings,
            idle: std::sync::Mutex::new(Vec::with_capacity(executors)),
            available: Semaphore::new(0),
            waiting: AtomicUsize::new(0),
            sockets: SocketDir::create()?,
            spawned: AtomicU64::new(0),
            starting: AtomicUsize::new(0),
        });
        let started = futures_util::future::try_join_all(
            (0..executors).map(|_| ExecutorProcess::start(&inner)),
        )
        .await
        .context("starting the python executors")?;
        for executor in started {
            inner.give_back(executor);
        }
        Ok(Self { inner })
    }

    /// How many executors stand in each state now.
    pub fn executor_states(&self) -> [(ExecutorState, usize); 3] {
        let idle = taskfleet_common::sync::lock(&self.inner.idle).len();
        let starting = self.inner.starting.load(Ordering::Relaxed);
        let busy = self
            .inner
            .settings
            .executors
            .get()
            .saturating_sub(idle + starting);
        [
            (ExecutorState::Idle, idle),
            (ExecutorState::Busy, busy),
            (ExecutorState::Starting, starting),
        ]
    }
}

impl Inner {
    /// Puts an executor back for the next call, or retires it first if it has served its time.
    fn give_back(self: &Arc<Self>, executor: ExecutorProcess) {
        if let Some((restart, reason)) = executor.should_retire(&self.settings) {
            tracing::info!(
                pid = executor.pid,
                calls = executor.calls,
                reason,
                "retiring a python executor"
            );
            tokio::spawn(executor.retire());
            self.start_replacement(restart);
            return;
        }
        taskfleet_common::sync::lock(&self.idle).push(executor);
        self.available.add_permits(1);
    }

    /// Kills an executor that is lost and starts another in its place.
    fn replace(self: Arc<Self>, executor: ExecutorProcess, reason: Restart) {
        tokio::spawn(executor.kill());
        self.start_replacement(reason);
    }

    /// Starts a new executor in the background, retrying with backoff while it fails to start,
    /// and adds it to the pool; gives up if the pool is dropped meanwhile.
    fn start_replacement(self: &Arc<Self>, reason: Restart) {
        crate::metrics::executor_restarted(reason);
        self.starting.fetch_add(1, Ordering::Relaxed);
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                let Some(inner) = pool.upgrade() else { return };
                match ExecutorProcess::start(&inner).await {
                    Ok(executor) => {
                        inner.starting.fetch_sub(1, Ordering::Relaxed);
                        inner.give_back(executor);
                        return;
                    }
                    Err(error) => {
                        drop(inner);
                        failures = failures.saturating_add(1);
                        let delay = Duration::from_millis(100)
                            .saturating_mul(2u32.saturating_pow(failures.min(10)))
                            .min(MAX_RESTART_DELAY);
                        tracing::error!(
                            error = format!("{error:#}"),
                            ?delay,
                            "starting a python executor failed; trying again"
                        );
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        });
    }
}
