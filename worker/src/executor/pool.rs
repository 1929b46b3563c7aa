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

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::error::WORKER_LOST;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

use super::process::{self, Call, EXECUTOR_FLAG, ExecutorReply, ExecutorRequest};
use super::python::{PythonOutput, PythonSettings, PythonTarget, StepContext};
use super::timeout_error;

/// How long an executor may take to connect and start its interpreter.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a retired executor may take to exit before it is killed.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between attempts to start an executor that keeps failing to start.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// How long a caller polls for its call's outcome before it waits asleep: a small step is
/// answered within this, sooner than a sleeping thread is woken on a virtual machine. Polling
/// yields to the caller's other tasks between attempts, and only goes on while no other call
/// waits for an executor: a pool with calls queued is busy, and a polling thread would take a
/// core from the executors.
const REPLY_POLL: Duration = Duration::from_micros(100);

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

    /// Runs one call on the next free executor and returns its outcome. With a `limit`, a call
    /// that runs longer fails with `timeout` when the limit passes (waiting for a free executor
    /// does not count). Dropping the returned future gives the call up: it is skipped if it has
    /// not started, and its step is interrupted (then its executor killed) if it has.
    ///
    /// The call travels from the caller's own task: no other task of the worker is woken on
    /// its way there and back.
    pub async fn call(
        &self,
        target: PythonTarget,
        input: Value,
        ctx: StepContext,
        limit: Option<Duration>,
    ) -> PythonOutput {
        self.call_timed(target, input, ctx, limit).await.0
    }

    /// [`Self::call`], and how long the call took from the moment an executor took it (`None`
    /// if none did).
    pub async fn call_timed(
        &self,
        target: PythonTarget,
        input: Value,
        ctx: StepContext,
        limit: Option<Duration>,
    ) -> (PythonOutput, Option<Duration>) {
        let mut call = Call { target, input, ctx };
        loop {
            let acquired = {
                let _waiting = Waiting::count(&self.inner.waiting);
                self.inner.available.acquire().await
            };
            let Ok(permit) = acquired else {
                return (lost("the python executors have stopped".to_owned()), None);
            };
            permit.forget();
            let Some(mut executor) = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop()
            else {
                continue;
            };
            // One that died while idle is replaced, and the call waits for another.
            if let Ok(Some(status)) = executor.child.try_wait() {
                tracing::warn!(
                    pid = executor.pid,
                    status = describe_exit(Ok(status)),
                    "a python executor exited while idle; starting another"
                );
                Arc::clone(&self.inner).replace(executor);
                continue;
            }
            let mut held = Held {
                inner: &self.inner,
                executor: Some(executor),
                running: None,
            };
            let taken = std::time::Instant::now();
            match held.run(call, limit).await {
                Ok(output) => return (output, Some(taken.elapsed())),
                // Not sent: the executor is gone and the call never started.
                Err(unsent) => call = unsent,
            }
        }
    }
}

impl Inner {
    /// Puts an executor back for the next call, or retires it first if it has served its time.
    fn give_back(self: &Arc<Self>, executor: ExecutorProcess) {
        if let Some(reason) = executor.should_retire(&self.settings) {
            tracing::info!(
                pid = executor.pid,
                calls = executor.calls,
                reason,
                "retiring a python executor"
            );
            tokio::spawn(executor.retire());
            self.start_replacement();
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(executor);
        self.available.add_permits(1);
    }

    /// Kills an executor that is lost and starts another in its place.
    fn replace(self: Arc<Self>, executor: ExecutorProcess) {
        tokio::spawn(executor.kill());
        self.start_replacement();
    }

    /// Starts a new executor in the background, retrying with backoff while it fails to start,
    /// and adds it to the pool; gives up if the pool is dropped meanwhile.
    fn start_replacement(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                let Some(inner) = pool.upgrade() else { return };
                match ExecutorProcess::start(&inner).await {
                    Ok(executor) => {
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

/// Counts a call among those waiting for an executor while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outcome of a call whose executor went away.
fn lost(message: String) -> PythonOutput {
    PythonOutput {
        result: Err(StepError::new(WORKER_LOST, message)),
        logs: String::new(),
    }
}

/// An executor taken from the pool for one call. Dropped, it goes back to the pool; dropped
/// with its call still running (a timeout, or the caller gave the call up), a background task
/// stops the call and then gives the executor back, or kills and replaces it if the step does
/// not stop within the kill grace period.
struct Held<'a> {
    inner: &'a Arc<Inner>,
    executor: Option<ExecutorProcess>,
    /// The id of the call sent and not yet answered.
    running: Option<u64>,
}

impl Held<'_> {
    /// Runs one call to its end or its time limit; `Err` gives the call back if it could not be
    /// sent (the executor is gone).
    async fn run(&mut self, call: Call, limit: Option<Duration>) -> Result<PythonOutput, Call> {
        let Some(executor) = self.executor.as_mut() else {
            return Err(call);
        };
        executor.calls += 1;
        let id = executor.calls;
        // The executor polls for its next call only if no other call waits for one now (see
        // `process::CALL_POLL`).
        let poll_after = self.inner.waiting.load(Ordering::Relaxed) == 0;
        // Set before sending: a caller that gives up half-way through the frame leaves the
        // executor to the stop-or-kill path, never back in the pool with half a frame sent.
        self.running = Some(id);
        if let Err(error) = executor
            .calls_connection
            .stream
            .write_all(&process::encode_run(id, &call, poll_after))
            .await
        {
            tracing::warn!(pid = executor.pid, %error, "sending a call to a python executor failed");
            if let Some(executor) = self.executor.take() {
                Arc::clone(self.inner).replace(executor);
            }
            return Err(call);
        }
        let expired = async {
            match limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            ended = executor.until_done(id, Some(&self.inner.waiting)) => ended,
            // Left running: dropping `self` stops it.
            () = expired => {
                return Ok(PythonOutput {
                    result: Err(timeout_error(limit.unwrap_or_default())),
                    logs: String::new(),
                });
            }
        };
        self.running = None;
        match ended {
            Ok(output) => Ok(output),
            Err(error) => {
                let status = executor.exit_status().await;
                let pid = executor.pid;
                tracing::warn!(pid, %error, status, "a python executor died during a call");
                if let Some(executor) = self.executor.take() {
                    Arc::clone(self.inner).replace(executor);
                }
                Ok(lost(format!(
                    "the python executor process running this step ({pid}) died: {status}"
                )))
            }
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let Some(mut executor) = self.executor.take() else {
            return;
        };
        let inner = Arc::clone(self.inner);
        let Some(id) = self.running else {
            inner.give_back(executor);
            return;
        };
        let grace = inner.settings.kill_grace;
        tokio::spawn(async move {
            if executor.stop(id, grace).await {
                inner.give_back(executor);
            } else {
                inner.replace(executor);
            }
        });
    }
}

/// One executor process and its connection.
struct ExecutorProcess {
    child: Child,
    pid: u32,
    /// Calls and their outcomes.
    calls_connection: CallsConnection,
    /// `Stop` requests, written to the control connection.
    control: UnixStream,
    /// Calls served so far.
    calls: u64,
}

impl ExecutorProcess {
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
        let calls_connection = CallsConnection::new(calls)
            .context("setting up a python executor's calls connection")?;
        let mut executor = Self {
            child,
            pid,
            calls_connection,
            control,
            calls: 0,
        };
        executor
            .send(&ExecutorRequest::Start(inner.settings.python.clone()))
            .await
            .context("sending a python executor its settings")?;
        let reply = tokio::time::timeout(START_TIMEOUT, executor.next_reply(None))
            .await
            .map_err(|_| {
                anyhow::anyhow!("the python executor {pid} did not start within {START_TIMEOUT:?}")
            })?;
        match reply {
            Ok(ExecutorReply::Ready { pid }) => {
                tracing::debug!(pid, "python executor ready");
                Ok(executor)
            }
            Ok(ExecutorReply::StartFailed { message }) => Err(anyhow::anyhow!(message)),
            Ok(ExecutorReply::Done { .. }) => Err(anyhow::anyhow!(
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

    async fn send(&mut self, request: &ExecutorRequest) -> std::io::Result<()> {
        self.calls_connection
            .stream
            .write_all(&process::encode(request))
            .await
    }

    /// Reads the next reply; an error at the end of the stream or on an unreadable frame.
    /// Cancel safe.
    /// With `waiting`, polls for it first while no call waits for an executor (see
    /// [`REPLY_POLL`]).
    async fn next_reply(
        &mut self,
        waiting: Option<&AtomicUsize>,
    ) -> std::io::Result<ExecutorReply> {
        let poll = if waiting.is_some() {
            REPLY_POLL
        } else {
            Duration::ZERO
        };
        let others_wait = || waiting.is_some_and(|waiting| waiting.load(Ordering::Relaxed) > 0);
        let frame = self.calls_connection.next_frame(poll, others_wait).await?;
        process::decode(&frame)
    }

    /// Waits for the outcome of call `id`; cancel safe. An error when the executor is gone.
    async fn until_done(
        &mut self,
        id: u64,
        waiting: Option<&AtomicUsize>,
    ) -> std::io::Result<PythonOutput> {
        loop {
            match self.next_reply(waiting).await {
                Ok(ExecutorReply::Done { id: done, output }) if done == id => return Ok(output),
                Ok(other) => {
                    tracing::warn!(
                        pid = self.pid,
                        ?other,
                        "unexpected frame from a python executor"
                    )
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Interrupts call `id` and waits for it to end within the grace period; false if it did
    /// not (the executor is then lost).
    async fn stop(&mut self, id: u64, kill_grace: Duration) -> bool {
        if self
            .control
            .write_all(&process::encode(&ExecutorRequest::Stop { id }))
            .await
            .is_err()
        {
            return false;
        }
        match tokio::time::timeout(kill_grace, self.until_done(id, None)).await {
            Ok(ended) => ended.is_ok(),
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    ?kill_grace,
                    "a python step did not stop when interrupted; killing its executor"
                );
                false
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
            calls_connection,
            control,
            pid,
            ..
        } = self;
        drop((calls_connection, control));
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

/// An executor's calls connection. Calls are written to `stream`; replies, frames of a
/// little-endian `u32` length and then the body (see [`super::process`]), are read through
/// `direct`, a second handle to the same socket.
///
/// Reading through `direct` rather than through the runtime's readiness lets a caller that polls
/// for its reply see it as soon as it is written, without waiting for the thread that holds the
/// runtime's I/O driver to be woken.
struct CallsConnection {
    stream: UnixStream,
    /// The same socket, non-blocking like `stream`.
    direct: std::os::unix::net::UnixStream,
    /// Bytes read and not yet returned as a frame.
    buffer: Vec<u8>,
    /// Where each read lands before it joins `buffer`; kept, so polling does not clear a fresh
    /// one on every attempt.
    scratch: Box<[u8]>,
}

impl CallsConnection {
    fn new(stream: UnixStream) -> std::io::Result<Self> {
        use std::os::fd::AsFd;
        let direct = stream.as_fd().try_clone_to_owned()?.into();
        Ok(Self {
            stream,
            direct,
            buffer: Vec::new(),
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        })
    }

    /// The next frame's body: polled for up to `poll` (yielding between attempts) unless
    /// `stop_polling` says so, then awaited asleep. An error at the end of the stream or on an
    /// oversized frame. Cancel safe: what was read stays in the buffer.
    async fn next_frame(
        &mut self,
        poll: Duration,
        stop_polling: impl Fn() -> bool,
    ) -> std::io::Result<Vec<u8>> {
        let polled_until = Instant::now() + poll;
        loop {
            if let Some(frame) = process::take_frame(&mut self.buffer)? {
                return Ok(frame);
            }
            let read = if Instant::now() < polled_until && !stop_polling() {
                match read_into(&self.direct, &mut self.scratch, &mut self.buffer) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    read => read,
                }
            } else {
                self.stream.readable().await?;
                // A `WouldBlock` here clears readiness left from an earlier event.
                let Self {
                    stream,
                    direct,
                    buffer,
                    scratch,
                } = self;
                match stream.try_io(Interest::READABLE, || read_into(direct, scratch, buffer)) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                    read => read,
                }
            };
            match read {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the connection closed",
                    ));
                }
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }
}

/// Reads what `stream` holds, through `scratch`, onto the end of `buffer`.
fn read_into(
    mut stream: &std::os::unix::net::UnixStream,
    scratch: &mut [u8],
    buffer: &mut Vec<u8>,
) -> std::io::Result<usize> {
    use std::io::Read;
    let read = stream.read(scratch)?;
    buffer.extend_from_slice(&scratch[..read]);
    Ok(read)
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

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut frame = u32::try_from(body.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        frame.extend_from_slice(body);
        frame
    }

    #[tokio::test]
    async fn replies_are_read_whole_however_they_arrive() {
        use tokio::io::AsyncWriteExt;
        let (ours, mut theirs) = UnixStream::pair().expect("a pair");
        let mut replies = CallsConnection::new(ours).expect("set up");
        // Two frames in one write, read within the polling window.
        let mut both = frame(b"first");
        both.extend(frame(b"second"));
        theirs.write_all(&both).await.expect("writes");
        let poll = Duration::from_secs(1);
        assert_eq!(
            replies.next_frame(poll, || false).await.expect("reads"),
            b"first"
        );
        assert_eq!(
            replies.next_frame(poll, || false).await.expect("reads"),
            b"second"
        );
        // A frame split across writes, the second after the window: read asleep.
        let large = vec![7; 100 * 1024];
        let large_frame = frame(&large);
        let (head, tail) = large_frame.split_at(3);
        theirs.write_all(head).await.expect("writes");
        let later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            theirs.write_all(tail).await.expect("writes");
            theirs
        };
        let (read, theirs) = tokio::join!(replies.next_frame(Duration::ZERO, || false), later);
        assert_eq!(read.expect("reads"), large);
        // The end of the stream is an error, not a frame.
        drop(theirs);
        let ended = replies
            .next_frame(poll, || false)
            .await
            .expect_err("closed");
        assert_eq!(ended.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_oversized_reply_is_refused() {
        use tokio::io::AsyncWriteExt;
        let (ours, mut theirs) = UnixStream::pair().expect("a pair");
        let mut replies = CallsConnection::new(ours).expect("set up");
        let prefix = u32::try_from(process::MAX_FRAME + 1)
            .expect("fits")
            .to_le_bytes();
        theirs.write_all(&prefix).await.expect("writes");
        let refused = replies
            .next_frame(Duration::from_secs(1), || false)
            .await
            .expect_err("refused");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData);
    }
}
