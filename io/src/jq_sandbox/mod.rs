//! Runs jq programs in sandbox processes, so that no program can stall, exhaust or crash the
//! process that asked for it.
//!
//! A jq program is code from whoever sent the definition: it may loop forever (`def f: f; f`),
//! allocate without bound (`[range(1e12)]`) or recurse until its stack overflows, and a thread
//! cannot be stopped nor an allocation refused without ending the process. So every program
//! that is not quick on a small input (see `taskfleet_common::jq::Program::is_quick`) runs in a
//! child process: the caller's own binary started with [`SANDBOX_FLAG`], which calls
//! [`serve`]. Each sandbox limits its own address space (`RLIMIT_AS`), and the caller kills it
//! (SIGKILL) when the program runs past its time limit or the caller gives up, then starts
//! another when one is next needed. A pool keeps up to [`SandboxSettings::processes`] of them
//! for reuse; calls beyond that wait for one, and the time limit counts from the moment a
//! sandbox takes the call.
//!
//! Calls are blocking (they belong on a blocking thread, as the scheduler's planning is);
//! [`JqSandbox::run_async`] wraps one for async callers and stops it when its future is
//! dropped.

mod frame;
mod serve;

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use taskfleet_common::sync::{lock, wait_timeout};
use tokio_util::sync::CancellationToken;

pub use serve::{serve, serve_if_started_as_one};

use frame::{Reply, RequestRef};

/// The flag that makes a scheduler or worker binary a sandbox process; its value is the memory
/// limit in bytes.
pub const SANDBOX_FLAG: &str = "--jq-sandbox";

/// How long a new sandbox may take to start and say it is ready.
const START_LIMIT: Duration = Duration::from_secs(10);

/// How often a waiting call looks whether its caller gave up.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// The most bytes of a dead sandbox's standard error read for its last words.
const LAST_WORDS_BYTES: u64 = 64 * 1024;

/// What a reply may hold beyond the sandbox's memory limit: what it held at rest.
const REPLY_SLACK_BYTES: usize = 64 * 1024 * 1024;

const MIB: u64 = 1024 * 1024;

/// How a pool of sandboxes is started.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// The executable to start with [`SANDBOX_FLAG`]: the calling binary itself.
    pub program: PathBuf,
    /// The most sandbox processes alive at once.
    pub processes: usize,
    /// The address space a program may take beyond what its sandbox holds at rest (its input
    /// and outputs included), in bytes.
    pub memory_bytes: u64,
}

/// Why a program run in a sandbox gave no outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The program did not compile, raised an error or yielded too many outputs; the message
    /// is the one `taskfleet_common::jq` gives.
    #[error("{0}")]
    Program(String),
    /// The program ran past its time limit and its sandbox was killed.
    #[error("jq program ran past its time limit of {}", describe_duration(*.0))]
    TimeLimit(Duration),
    /// The program took more memory than its limit (bytes) allows.
    #[error("jq program took more than its memory limit of {} MiB", .0 / MIB)]
    MemoryLimit(u64),
    /// The program recursed until its stack overflowed.
    #[error("jq program recursed too deeply (its stack overflowed)")]
    StackOverflow,
    /// The caller gave up before the program finished.
    #[error("jq program was stopped")]
    Stopped,
    /// No sandbox could be started, or one ended in a way none of the above explains.
    #[error("the jq sandbox failed: {0}")]
    Failed(String),
}

/// Says a duration in the unit it was most likely given in.
fn describe_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 && duration.as_secs() > 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

/// A pool of sandbox processes; cheap to clone (every clone shares the pool).
#[derive(Debug, Clone)]
pub struct JqSandbox {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    settings: SandboxSettings,
    state: Mutex<PoolState>,
    /// Signalled when a sandbox goes back to the pool or its place is freed.
    freed: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    idle: Vec<Sandbox>,
    /// Sandboxes alive or being started, idle ones included.
    live: usize,
}

impl JqSandbox {
    /// Makes a pool; sandboxes start when calls first need them.
    pub fn new(settings: SandboxSettings) -> Self {
        Self {
            pool: Arc::new(Pool {
                settings: SandboxSettings {
                    processes: settings.processes.max(1),
                    ..settings
                },
                state: Mutex::new(PoolState::default()),
                freed: Condvar::new(),
            }),
        }
    }

    /// The settings it starts sandboxes with.
    pub fn settings(&self) -> &SandboxSettings {
        &self.pool.settings
    }

    /// Runs `program` on `input` in a sandbox and returns its outputs, at most `output_limit`
    /// of them. Blocks the calling thread: until a sandbox is free, then for at most
    /// `time_limit`; returns [`SandboxError::Stopped`] within about 50 ms of `stop` being
    /// cancelled.
    pub fn run(
        &self,
        program: &str,
        input: &Value,
        output_limit: usize,
        time_limit: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Value>, SandboxError> {
        let request = serde_json::to_vec(&RequestRef {
            program,
            input,
            output_limit,
        })
        .map_err(|error| SandboxError::Failed(format!("encoding the request: {error}")))?;
        let (mut sandbox, mut reused) = self.take(stop)?;
        let deadline = Instant::now() + time_limit;
        let mut retried = false;
        let reply = loop {
            let exchanged = sandbox.exchange(&request, deadline, stop);
            let interrupted = match exchanged {
                Ok(reply) => break reply,
                Err(interrupted) => interrupted,
            };
            let error = match interrupted {
                Interrupted::Deadline => {
                    sandbox.kill();
                    SandboxError::TimeLimit(time_limit)
                }
                Interrupted::Stop => {
                    sandbox.kill();
                    SandboxError::Stopped
                }
                Interrupted::Io(error) => sandbox.end(&error, self.pool.settings.memory_bytes),
            };
            self.give_back(None);
            // A sandbox that waited idle may have died meanwhile (the OOM killer picks large
            // processes): a death the program does not explain is tried once more on another.
            if reused && !retried && matches!(error, SandboxError::Failed(_)) {
                tracing::warn!(%error, "an idle jq sandbox had ended; running the program on another");
                retried = true;
                (sandbox, reused) = self.take(stop)?;
                continue;
            }
            return Err(error);
        };
        match serde_json::from_slice::<Reply>(&reply) {
            Ok(Reply::Outputs(outputs)) => {
                self.give_back(Some(sandbox));
                Ok(outputs)
            }
            Ok(Reply::Failed(message)) => {
                self.give_back(Some(sandbox));
                Err(SandboxError::Program(message))
            }
            Ok(Reply::Ready) | Err(_) => {
                sandbox.kill();
                self.give_back(None);
                Err(SandboxError::Failed(
                    "the sandbox answered something other than outputs".to_owned(),
                ))
            }
        }
    }

    /// Runs [`JqSandbox::run`] on the blocking pool; dropping the future stops the program.
    pub async fn run_async(
        &self,
        program: String,
        input: Value,
        output_limit: usize,
        time_limit: Duration,
    ) -> Result<Vec<Value>, SandboxError> {
        let stop = CancellationToken::new();
        let _stop_when_dropped = stop.clone().drop_guard();
        let sandbox = self.clone();
        tokio::task::spawn_blocking(move || {
            sandbox.run(&program, &input, output_limit, time_limit, &stop)
        })
        .await
        .unwrap_or_else(|error| Err(SandboxError::Failed(error.to_string())))
    }

    /// Takes an idle sandbox (and says so), or starts one if fewer than the most are alive, or
    /// waits; gives up as soon as `stop` is cancelled.
    fn take(&self, stop: &CancellationToken) -> Result<(Sandbox, bool), SandboxError> {
        let pool = &self.pool;
        let mut state = lock(&pool.state);
        loop {
            if stop.is_cancelled() {
                return Err(SandboxError::Stopped);
            }
            if let Some(sandbox) = state.idle.pop() {
                return Ok((sandbox, true));
            }
            if state.live < pool.settings.processes {
                state.live += 1;
                drop(state);
                return Sandbox::start(&pool.settings, stop)
                    .map(|sandbox| (sandbox, false))
                    .inspect_err(|_| self.give_back(None));
            }
            state = wait_timeout(&pool.freed, state, STOP_CHECK);
        }
    }

    /// Puts a sandbox back for the next call, or (`None`) frees the place of one that ended.
    fn give_back(&self, sandbox: Option<Sandbox>) {
        let mut state = lock(&self.pool.state);
        match sandbox {
            Some(sandbox) => state.idle.push(sandbox),
            None => state.live -= 1,
        }
        drop(state);
        self.pool.freed.notify_one();
    }
}

/// Why an exchange with a sandbox ended without a reply.
enum Interrupted {
    /// The time limit passed.
    Deadline,
    /// The caller gave up.
    Stop,
    /// The socket failed or closed: the sandbox died.
    Io(io::Error),
}

/// One sandbox process and the caller's end of its socket.
#[derive(Debug)]
struct Sandbox {
    child: Child,
    socket: UnixStream,
    stderr: Option<ChildStderr>,
    /// The longest reply accepted: a sandbox cannot hold a larger one under its limit.
    reply_limit: usize,
}

impl Sandbox {
    /// Starts a sandbox and waits for it to say it is ready.
    fn start(settings: &SandboxSettings, stop: &CancellationToken) -> Result<Self, SandboxError> {
        let failed = |what: &str, error: io::Error| {
            SandboxError::Failed(format!(
                "{what} {} {SANDBOX_FLAG}: {error}",
                settings.program.display()
            ))
        };
        let (ours, theirs) = UnixStream::pair().map_err(|error| failed("connecting", error))?;
        let theirs_out = theirs
            .try_clone()
            .map_err(|error| failed("connecting", error))?;
        let child = Command::new(&settings.program)
            .arg(SANDBOX_FLAG)
            .arg(settings.memory_bytes.to_string())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(OwnedFd::from(theirs_out)))
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| failed("starting", error))?;
        let mut sandbox = Sandbox {
            stderr: None,
            child,
            socket: ours,
            reply_limit: usize::try_from(settings.memory_bytes)
                .unwrap_or(usize::MAX)
                .saturating_add(REPLY_SLACK_BYTES),
        };
        sandbox.stderr = sandbox.child.stderr.take();
        match sandbox.receive(Instant::now() + START_LIMIT, stop) {
            Ok(reply) if matches!(serde_json::from_slice(&reply), Ok(Reply::Ready)) => Ok(sandbox),
            Ok(_) => {
                sandbox.kill();
                Err(SandboxError::Failed(
                    "a new sandbox answered something other than ready".to_owned(),
                ))
            }
            Err(Interrupted::Io(error)) => {
                let last_words = sandbox.reap();
                Err(SandboxError::Failed(format!(
                    "a new sandbox ended at its start ({error}): {last_words}"
                )))
            }
            Err(Interrupted::Stop) => {
                sandbox.kill();
                Err(SandboxError::Stopped)
            }
            Err(Interrupted::Deadline) => {
                sandbox.kill();
                Err(SandboxError::Failed(format!(
                    "a new sandbox did not start within {}",
                    describe_duration(START_LIMIT)
                )))
            }
        }
    }

    /// Sends a request and reads its reply, within `deadline` and until `stop`.
    fn exchange(
        &mut self,
        request: &[u8],
        deadline: Instant,
        stop: &CancellationToken,
    ) -> Result<Vec<u8>, Interrupted> {
        let length = u32::try_from(request.len()).map_err(|_| {
            Interrupted::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request over 4 GiB",
            ))
        })?;
        self.send(&length.to_be_bytes(), deadline, stop)?;
        self.send(request, deadline, stop)?;
        self.receive(deadline, stop)
    }

    /// Writes all of `bytes`, a slice of time at a time.
    fn send(
        &mut self,
        mut bytes: &[u8],
        deadline: Instant,
        stop: &CancellationToken,
    ) -> Result<(), Interrupted> {
        while !bytes.is_empty() {
            let slice = time_slice(deadline, stop)?;
            self.socket
                .set_write_timeout(Some(slice))
                .map_err(Interrupted::Io)?;
            match self.socket.write(bytes) {
                Ok(0) => return Err(Interrupted::Io(io::ErrorKind::WriteZero.into())),
                Ok(written) => bytes = &bytes[written..],
                Err(error) if waits(&error) => {}
                Err(error) => return Err(Interrupted::Io(error)),
            }
        }
        Ok(())
    }

    /// Reads one frame, a slice of time at a time.
    fn receive(
        &mut self,
        deadline: Instant,
        stop: &CancellationToken,
    ) -> Result<Vec<u8>, Interrupted> {
        let mut length = [0u8; 4];
        self.fill(&mut length, deadline, stop)?;
        let length = u32::from_be_bytes(length) as usize;
        if length > self.reply_limit {
            return Err(Interrupted::Io(frame::too_long(length, self.reply_limit)));
        }
        let mut body = vec![0u8; length];
        self.fill(&mut body, deadline, stop)?;
        Ok(body)
    }

    /// Fills `buffer` from the socket.
    fn fill(
        &mut self,
        buffer: &mut [u8],
        deadline: Instant,
        stop: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let mut filled = 0;
        while filled < buffer.len() {
            let slice = time_slice(deadline, stop)?;
            self.socket
                .set_read_timeout(Some(slice))
                .map_err(Interrupted::Io)?;
            match self.socket.read(&mut buffer[filled..]) {
                Ok(0) => return Err(Interrupted::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(read) => filled += read,
                Err(error) if waits(&error) => {}
                Err(error) => return Err(Interrupted::Io(error)),
            }
        }
        Ok(())
    }

    /// Kills the process and reaps it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Reaps a process whose socket failed (killing it if it is still there) and returns what
    /// it last wrote on standard error.
    fn reap(&mut self) -> String {
        let gone = Instant::now() + Duration::from_secs(1);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status.to_string(),
            _ => {
                self.kill();
                "killed".to_owned()
            }
        };
        let mut last_words = String::new();
        if let Some(stderr) = self.stderr.take() {
            let _ = stderr
                .take(LAST_WORDS_BYTES)
                .read_to_string(&mut last_words);
        }
        format!("{status}; {}", last_words.trim())
    }

    /// Tells why a sandbox whose socket failed during a call ended.
    fn end(&mut self, error: &io::Error, memory_bytes: u64) -> SandboxError {
        let last_words = self.reap();
        if last_words.contains("memory allocation of") {
            SandboxError::MemoryLimit(memory_bytes)
        } else if last_words.contains("has overflowed its stack") {
            SandboxError::StackOverflow
        } else {
            SandboxError::Failed(format!("the sandbox ended ({error}): {last_words}"))
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The time left before the deadline, at most one [`STOP_CHECK`].
fn time_slice(deadline: Instant, stop: &CancellationToken) -> Result<Duration, Interrupted> {
    if stop.is_cancelled() {
        return Err(Interrupted::Stop);
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Interrupted::Deadline);
    }
    Ok(left.min(STOP_CHECK))
}

/// Whether an error only says that a timed read or write found nothing to do yet.
fn waits(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_said_in_their_unit() {
        assert_eq!(describe_duration(Duration::from_secs(1)), "1 s");
        assert_eq!(describe_duration(Duration::from_millis(1500)), "1500 ms");
        assert_eq!(describe_duration(Duration::from_millis(250)), "250 ms");
    }

    #[test]
    fn errors_name_the_limit() {
        assert_eq!(
            SandboxError::MemoryLimit(256 * MIB).to_string(),
            "jq program took more than its memory limit of 256 MiB"
        );
        assert_eq!(
            SandboxError::TimeLimit(Duration::from_secs(1)).to_string(),
            "jq program ran past its time limit of 1 s"
        );
    }
}
