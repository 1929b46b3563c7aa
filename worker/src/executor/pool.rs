//! The supervised pool of Python executor processes a worker runs its Python steps in.
//!
//! Python runs one thread at a time per interpreter, so a worker that should use every core for
//! Python steps needs several interpreters, and a step blocked in C (a `time.sleep`, a socket
//! read, a C extension) can only be stopped by ending the process it runs in. The pool starts
//! `executors` processes (see [`super::process`]), each serving one call at a time, and a
//! supervising task per process that:
//!
//! - takes the next call from the pool's queue, sends it and waits for its outcome;
//! - at the call's time limit answers `timeout` at once, asks the executor to interrupt the step
//!   (an exception raised in its Python code) and, if the executor is not free again within the
//!   kill grace period, kills it with SIGKILL and starts a replacement;
//! - does the same when the caller gives up the call (its run was cancelled);
//! - answers `worker_lost` when the executor dies during a call (a crash, `os._exit`, the OOM
//!   killer), and replaces it; an executor that dies while idle is replaced before it is given
//!   a call, so no call is lost to it;
//! - retires its executor after `max_tasks` calls or when its resident memory is above
//!   `max_rss_bytes` after a call (whose outcome was already delivered), and starts a new one.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::error::WORKER_LOST;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use super::process::{self, Call, EXECUTOR_FLAG, Reply, Request};
use super::python::{PythonOutput, PythonSettings, PythonTarget, StepContext};
use super::timeout_error;

/// How long an executor may take to connect and start its interpreter.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a retired executor may take to exit before it is killed.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);
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

/// A handle to the pool; cloning it is cheap. The executors stop when the last handle is dropped.
#[derive(Clone)]
pub struct PythonPool {
    calls: mpsc::Sender<Job>,
}

impl std::fmt::Debug for PythonPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonPool").finish_non_exhaustive()
    }
}

/// One call waiting for an executor.
struct Job {
    call: Call,
    limit: Option<Duration>,
    reply: oneshot::Sender<PythonOutput>,
}

/// What the supervising tasks share.
struct Inner {
    settings: PoolSettings,
    /// The calls, taken by whichever supervisor is free first.
    calls: Mutex<mpsc::Receiver<Job>>,
    /// Where the executors' sockets are made; removed with the pool.
    sockets: SocketDir,
    /// Numbers the sockets.
    spawned: AtomicU64,
}

impl PythonPool {
    /// Starts every executor and waits until each has its interpreter ready; the first that
    /// fails to start fails the pool, with the executor's own explanation (a missing virtualenv,
    /// an unusable Python path).
    pub async fn start(settings: PoolSettings) -> anyhow::Result<Self> {
        let sockets = SocketDir::create()?;
        let (calls_tx, calls_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            settings,
            calls: Mutex::new(calls_rx),
            sockets,
            spawned: AtomicU64::new(0),
        });
        let started = futures_util::future::try_join_all(
            (0..inner.settings.executors.get()).map(|_| Executor::start(&inner)),
        )
        .await
        .context("starting the python executors")?;
        for executor in started {
            tokio::spawn(supervise(Arc::clone(&inner), executor));
        }
        Ok(Self { calls: calls_tx })
    }

    /// Runs one call on the next free executor and returns its outcome. With a `limit`, a call
    /// that runs longer fails with `timeout` when the limit passes (waiting for a free executor
    /// does not count). Dropping the returned future gives the call up: it is skipped if it has
    /// not started, and its step is interrupted (then its executor killed) if it has.
    pub async fn call(
        &self,
        target: PythonTarget,
        input: Value,
        ctx: StepContext,
        limit: Option<Duration>,
    ) -> PythonOutput {
        let (reply_tx, reply_rx) = oneshot::channel();
        let job = Job {
            call: Call { target, input, ctx },
            limit,
            reply: reply_tx,
        };
        if self.calls.send(job).await.is_err() {
            return lost("the python executors have stopped".to_owned());
        }
        reply_rx
            .await
            .unwrap_or_else(|_| lost("the python executors have stopped".to_owned()))
    }
}

/// The outcome of a call whose executor went away.
fn lost(message: String) -> PythonOutput {
    PythonOutput {
        result: Err(StepError::new(WORKER_LOST, message)),
        logs: String::new(),
    }
}

/// Keeps one executor serving calls for as long as the pool lives, replacing it whenever it
/// dies, is killed or is retired.
async fn supervise(inner: Arc<Inner>, first: Executor) {
    let mut executor = Some(first);
    let mut failures: u32 = 0;
    // A call whose Run frame could not be sent: the executor died while idle; it goes to the
    // replacement.
    let mut carried: Option<Job> = None;
    loop {
        let mut current = match executor.take() {
            Some(current) => current,
            None => match Executor::start(&inner).await {
                Ok(started) => {
                    failures = 0;
                    started
                }
                Err(error) => {
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
                    continue;
                }
            },
        };
        let job = match carried.take() {
            Some(job) => job,
            None => {
                let next = async { inner.calls.lock().await.recv().await };
                tokio::select! {
                    job = next => match job {
                        Some(job) => job,
                        // Every pool handle is gone: dropping the executor stops it.
                        None => return,
                    },
                    status = current.child.wait() => {
                        tracing::warn!(pid = current.pid, status = describe_exit(status), "a python executor exited while idle; starting another");
                        continue;
                    }
                }
            }
        };
        match current.run(job, inner.settings.kill_grace).await {
            Ran::Kept => {
                if let Some(reason) = current.should_retire(&inner.settings) {
                    tracing::info!(
                        pid = current.pid,
                        calls = current.calls,
                        reason,
                        "retiring a python executor"
                    );
                    tokio::spawn(current.retire());
                } else {
                    executor = Some(current);
                }
            }
            Ran::Lost => current.kill().await,
            Ran::NotSent(job) => {
                carried = Some(job);
                current.kill().await;
            }
        }
    }
}

/// How a call left its executor.
enum Ran {
    /// Free for the next call.
    Kept,
    /// Dead, or killed because its step would not stop.
    Lost,
    /// The call could not be sent; the executor is gone and the call never started.
    NotSent(Job),
}

/// One executor process and its connection.
struct Executor {
    child: Child,
    pid: u32,
    /// Outcomes, read from the calls connection.
    frames: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    /// Calls, written to the calls connection.
    writer: OwnedWriteHalf,
    /// `Stop` requests, written to the control connection.
    control: UnixStream,
    /// Calls served so far.
    calls: u64,
}

impl Executor {
    /// Starts an executor process, hands it its settings and waits until its interpreter is
    /// ready.
    async fn start(inner: &Inner) -> anyhow::Result<Self> {
        let number = inner.spawned.fetch_add(1, Ordering::Relaxed);
        let path = inner.sockets.path.join(format!("executor-{number}.sock"));
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        let mut child = Command::new(&inner.settings.program)
            .arg(EXECUTOR_FLAG)
            .arg(&path)
            .stdin(Stdio::null())
            // What an executor writes outside a step's capture joins the worker's own log.
            .stdout(Stdio::from(std::io::stderr()))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} as a python executor",
                    inner.settings.program.display()
                )
            })?;
        let pid = child.id().unwrap_or_default();
        // The executor connects twice, calls first; the listener hands connections out in the
        // order they were made.
        let accept_both = async {
            let (calls, _) = listener.accept().await?;
            let (control, _) = listener.accept().await?;
            Ok::<_, std::io::Error>((calls, control))
        };
        let connected = tokio::select! {
            accepted = accept_both => accepted.context("accepting a python executor's connections"),
            status = child.wait() => Err(anyhow::anyhow!("the python executor {pid} exited before connecting: {}", describe_exit(status))),
            () = tokio::time::sleep(START_TIMEOUT) => Err(anyhow::anyhow!("the python executor {pid} did not connect within {START_TIMEOUT:?}")),
        };
        drop(listener);
        let _ = std::fs::remove_file(&path);
        let (calls, control) = connected?;
        let (reader, writer) = calls.into_split();
        let mut executor = Self {
            child,
            pid,
            frames: FramedRead::new(reader, codec()),
            writer,
            control,
            calls: 0,
        };
        executor
            .send(&Request::Start(inner.settings.python.clone()))
            .await
            .context("sending a python executor its settings")?;
        let reply = tokio::time::timeout(START_TIMEOUT, executor.next_reply())
            .await
            .map_err(|_| {
                anyhow::anyhow!("the python executor {pid} did not start within {START_TIMEOUT:?}")
            })?;
        match reply {
            Ok(Reply::Ready { pid }) => {
                tracing::debug!(pid, "python executor ready");
                Ok(executor)
            }
            Ok(Reply::StartFailed { message }) => Err(anyhow::anyhow!(message)),
            Ok(Reply::Done { .. }) => Err(anyhow::anyhow!(
                "the python executor {pid} answered a call before starting"
            )),
            Err(error) => {
                let status = executor.exit_status().await;
                Err(anyhow::anyhow!(
                    "the python executor {pid} stopped while starting ({error}): {status}"
                ))
            }
        }
    }

    async fn send(&mut self, request: &Request) -> std::io::Result<()> {
        self.writer.write_all(&process::encode(request)).await
    }

    /// Reads the next reply; an error at the end of the stream or on an unreadable frame.
    /// Cancel safe.
    async fn next_reply(&mut self) -> std::io::Result<Reply> {
        match self.frames.next().await {
            Some(frame) => process::decode(&frame?),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed",
            )),
        }
    }

    /// Runs one call to its end, its time limit, or the caller giving it up.
    async fn run(&mut self, job: Job, kill_grace: Duration) -> Ran {
        let Job {
            call,
            limit,
            mut reply,
        } = job;
        if reply.is_closed() {
            // Given up while waiting for an executor.
            return Ran::Kept;
        }
        self.calls += 1;
        let id = self.calls;
        if let Err(error) = self.writer.write_all(&process::encode_run(id, &call)).await {
            tracing::warn!(pid = self.pid, %error, "sending a call to a python executor failed");
            return Ran::NotSent(Job { call, limit, reply });
        }
        let deadline = limit.map(|limit| Instant::now() + limit);
        let expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            ended = self.until_done(id) => ended,
            () = reply.closed() => None,
            () = expired => {
                let _ = reply.send(PythonOutput {
                    result: Err(timeout_error(limit.unwrap_or_default())),
                    logs: String::new(),
                });
                return self.stop(id, kill_grace).await;
            }
        };
        match ended {
            Some(Ok(output)) => {
                let _ = reply.send(output);
                Ran::Kept
            }
            Some(Err(error)) => {
                let status = self.exit_status().await;
                tracing::warn!(pid = self.pid, %error, status, "a python executor died during a call");
                let _ = reply.send(lost(format!(
                    "the python executor process running this step ({}) died: {status}",
                    self.pid
                )));
                Ran::Lost
            }
            // The caller gave up (its run was cancelled).
            None => self.stop(id, kill_grace).await,
        }
    }

    /// Waits for the outcome of call `id`; cancel safe. An error when the executor is gone.
    async fn until_done(&mut self, id: u64) -> Option<std::io::Result<PythonOutput>> {
        loop {
            match self.next_reply().await {
                Ok(Reply::Done { id: done, output }) if done == id => return Some(Ok(output)),
                Ok(other) => {
                    tracing::warn!(
                        pid = self.pid,
                        ?other,
                        "unexpected frame from a python executor"
                    )
                }
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// Interrupts call `id` and waits for it to end within the grace period; past it, the
    /// executor is lost.
    async fn stop(&mut self, id: u64, kill_grace: Duration) -> Ran {
        if self
            .control
            .write_all(&process::encode(&Request::Stop { id }))
            .await
            .is_err()
        {
            return Ran::Lost;
        }
        match tokio::time::timeout(kill_grace, self.until_done(id)).await {
            Ok(Some(Ok(_))) => Ran::Kept,
            Ok(_) => Ran::Lost,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    ?kill_grace,
                    "a python step did not stop when interrupted; killing its executor"
                );
                Ran::Lost
            }
        }
    }

    /// Why this executor should make way for a fresh one, if it should.
    fn should_retire(&self, settings: &PoolSettings) -> Option<String> {
        if let Some(max) = settings.max_tasks
            && self.calls >= max
        {
            return Some(format!("served {} calls, the limit is {max}", self.calls));
        }
        if let Some(max) = settings.max_rss_bytes
            && let Some(rss) = resident_bytes(self.pid)
            && rss > max
        {
            return Some(format!(
                "resident memory {} MiB is over the limit of {} MiB",
                rss / (1024 * 1024),
                max / (1024 * 1024)
            ));
        }
        None
    }

    /// Closes the connection, which makes the executor exit, and waits for it; kills it if it
    /// takes too long.
    async fn retire(self) {
        let Self {
            mut child,
            frames,
            writer,
            control,
            pid,
            ..
        } = self;
        drop((frames, writer, control));
        match tokio::time::timeout(RETIRE_TIMEOUT, child.wait()).await {
            Ok(_) => tracing::debug!(pid, "python executor retired"),
            Err(_) => {
                let _ = child.kill().await;
            }
        }
    }

    /// Kills the executor (if it still runs) and reaps it.
    async fn kill(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(pid = self.pid, %error, "killing a python executor");
        }
    }

    /// How the executor ended, waiting a moment for it to do so.
    async fn exit_status(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
            Ok(status) => describe_exit(status),
            Err(_) => "it closed its connection but still runs".to_owned(),
        }
    }
}

/// Frames: a little-endian `u32` length, then the body (see [`super::process`]).
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .little_endian()
        .length_field_length(4)
        .max_frame_length(process::MAX_FRAME)
        .new_codec()
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => format!("ended by {status}"),
        },
        Err(error) => format!("its status could not be read: {error}"),
    }
}

/// The resident memory of a process, from `/proc/<pid>/status`; `None` where that cannot be read.
fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A private directory for the executors' sockets, removed when dropped.
struct SocketDir {
    path: PathBuf,
}

impl SocketDir {
    fn create() -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "taskfleet-worker-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_of_this_process_is_read() {
        let rss = resident_bytes(std::process::id()).expect("reading /proc");
        assert!(rss > 1024 * 1024, "{rss}");
        assert_eq!(resident_bytes(u32::MAX), None);
    }

    #[test]
    fn socket_dir_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = SocketDir::create().expect("creating");
        let path = dir.path.clone();
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(dir);
        assert!(!path.exists());
    }
}
