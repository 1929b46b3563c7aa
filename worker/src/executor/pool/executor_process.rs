//! One executor process: started from the worker's binary and connected over a private socket,
//! handed its settings, sent calls, stopped, retired or killed, and its exit described. It does
//! not decide when to do any of these; the pool does.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use super::connection::CallsConnection;
use super::{Inner, PoolSettings, Restart};
use crate::executor::process::EXECUTOR_FLAG;
use crate::executor::process::frame::{self, ExecutorReply, ExecutorRequest};
use crate::executor::python::PythonOutput;

/// How long an executor may take to connect and start its interpreter.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a retired executor may take to exit before it is killed.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller polls for its call's outcome before it waits asleep: a small step is
/// answered within this, sooner than a sleeping thread is woken on a virtual machine. Polling
/// yields to the caller's other tasks between attempts, and only goes on while no other call
/// waits for an executor: a pool with calls queued is busy, and a polling thread would take a
/// core from the executors.
const REPLY_POLL: Duration = Duration::from_micros(100);

/// One executor process and its connection.
pub(super) struct ExecutorProcess {
    /// The process.
    pub(super) child: Child,
    /// Its process id.
    pub(super) pid: u32,
    /// Calls and their outcomes.
    pub(super) calls_connection: CallsConnection,
    /// `Stop` requests, written to the control connection.
    control: UnixStream,
    /// Calls served so far.
    pub(super) calls: u64,
    /// Its scratch directory, removed with it.
    _scratch: ScratchDir,
    /// Its process group, killed with it.
    _group: ProcessGroup,
}

/// An executor's process group: the executor and every process its steps started, which
/// are killed when the executor is done with, so that none outlives it.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(id) = i32::try_from(self.0)
            && id > 0
        {
            // The group may be gone already: nothing to do then.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(id),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// An executor's scratch directory, removed when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ExecutorProcess {
    /// Starts an executor process, hands it its settings and waits until its interpreter is
    /// ready.
    pub(super) async fn start(inner: &Inner) -> anyhow::Result<Self> {
        let number = inner.spawned.fetch_add(1, Ordering::Relaxed);
        let path = inner.sockets.path.join(format!("executor-{number}.sock"));
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        // A scratch directory of its own, its temporary directory, the one place it may write
        // to when Landlock confines it.
        let mut python = inner.settings.python.clone();
        let scratch = inner.sockets.path.join(format!("scratch-{number}"));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&scratch)
                .with_context(|| format!("creating {}", scratch.display()))?;
        }
        python.confinement.scratch = Some(scratch.clone());
        let mut command = Command::new(&inner.settings.program);
        // The worker's settings (its service URLs with their passwords, the encryption keys,
        // the span exporter's endpoint and headers) are not the steps' business: the executor
        // gets what it needs over its socket.
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("TASKFLEET_") || name_text.starts_with("OTEL_EXPORTER_OTLP_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            // A group of its own: the processes its steps start are killed with it.
            .process_group(0)
            .arg(EXECUTOR_FLAG)
            .arg(&path)
            .env("TMPDIR", &scratch)
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
            _scratch: ScratchDir(scratch),
            _group: ProcessGroup(pid),
        };
        executor
            .send(&ExecutorRequest::Start(python))
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
            .write_all(&frame::encode(request))
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
        let body = self.calls_connection.next_frame(poll, others_wait).await?;
        frame::decode(&body)
    }

    /// Waits for the outcome of call `id`; cancel safe. An error when the executor is gone.
    pub(super) async fn until_done(
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

    /// Interrupts call `id` and waits for it to end within the grace period; returns its
    /// outcome (what the step printed included), or `None` if it did not end (the executor is
    /// then lost).
    pub(super) async fn stop(&mut self, id: u64, kill_grace: Duration) -> Option<PythonOutput> {
        if self
            .control
            .write_all(&frame::encode(&ExecutorRequest::Stop { id }))
            .await
            .is_err()
        {
            return None;
        }
        match tokio::time::timeout(kill_grace, self.until_done(id, None)).await {
            Ok(ended) => ended.ok(),
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    ?kill_grace,
                    "a python step did not stop when interrupted; killing its executor"
                );
                None
            }
        }
    }

    /// Why this executor should make way for a fresh one, if it should.
    pub(super) fn should_retire(&self, settings: &PoolSettings) -> Option<(Restart, String)> {
        if let Some(max) = settings.max_tasks
            && self.calls >= max
        {
            let reason = format!("served {} calls, the limit is {max}", self.calls);
            return Some((Restart::MaxTasks, reason));
        }
        if let Some(max) = settings.max_rss_bytes
            && let Some(rss) = resident_bytes(self.pid)
            && rss > max
        {
            let reason = format!(
                "resident memory {} MiB is over the limit of {} MiB",
                rss / (1024 * 1024),
                max / (1024 * 1024)
            );
            return Some((Restart::MaxMemory, reason));
        }
        None
    }

    /// Closes the connection, which makes the executor exit, and waits for it; kills it if it
    /// takes too long.
    pub(super) async fn retire(self) {
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
    pub(super) async fn kill(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(pid = self.pid, %error, "killing a python executor");
        }
    }

    /// How the executor ended, waiting a moment for it to do so.
    pub(super) async fn exit_status(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
            Ok(status) => describe_exit(status),
            Err(_) => "it closed its connection but still runs".to_owned(),
        }
    }
}

/// Describes how a process ended, for messages.
pub(super) fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
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
pub(super) struct SocketDir {
    path: PathBuf,
}

impl SocketDir {
    /// Creates the directory, readable by this user only.
    pub(super) fn create() -> anyhow::Result<Self> {
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
