//! The Python executor process, and the frames it exchanges with the worker that started it.
//!
//! A worker runs its Python steps in executor processes (see [`super::pool`]): each is the
//! worker's own binary started with [`EXECUTOR_FLAG`] and the path of a Unix socket on which the
//! worker listens. The executor connects twice (calls, then control), receives its
//! [`PythonSettings`](super::python::PythonSettings) on the calls connection, starts its
//! interpreter and then serves one call at a time: the interpreter thread reads each call and
//! writes its outcome back itself, so a call crosses no other thread of the executor; the main
//! thread reads `Stop` requests from the control connection. The frames themselves are
//! `frame`'s.
//!
//! The executor ignores SIGINT and SIGTERM: it leaves when the worker closes the connection (or
//! dies), at once, even in the middle of a step.

mod confine;
pub(crate) mod frame;
mod leftovers;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::python::{IncomingCall, ignore_termination_signals, serve_calls};
pub use confine::{Confinement, FileSystem};
use frame::{ExecutorReply, ExecutorRequest, decode, encode, read_frame, take_frame};

/// The hidden command-line flag that makes `taskfleet-worker` an executor process; its value is
/// the socket to connect to.
pub const EXECUTOR_FLAG: &str = "--python-executor";

/// How long an executor that finished a call polls for the next one before it sleeps, when the
/// call asked it to (`poll_after`): waking a sleeping thread costs tens of microseconds on a
/// virtual machine, more than a small step. The pool asks only when no other call was waiting
/// for an executor as it sent this one: with calls queued, the next comes as soon as the worker
/// has read this one's outcome, and the polling executors would take the CPU the worker needs
/// to send it. An idle executor sleeps once the window has passed.
const CALL_POLL: Duration = Duration::from_micros(100);

/// Whether the calls connection is non-blocking now. Its reader and its writer are two handles
/// of one socket, which share the setting; each changes it only when it must, so a call that
/// follows the last one within the polling window costs a read and a write, nothing more.
#[derive(Clone, Default)]
struct Mode(Arc<AtomicBool>);

impl Mode {
    fn set(&self, stream: &UnixStream, nonblocking: bool) -> std::io::Result<()> {
        if self.0.load(Ordering::Relaxed) != nonblocking {
            stream.set_nonblocking(nonblocking)?;
            self.0.store(nonblocking, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Reads calls from the calls connection: polled for a while (non-blocking reads, yielding the
/// CPU between attempts), then awaited asleep; each read takes whatever has arrived, a whole
/// frame at once when it is there.
struct CallReader {
    stream: UnixStream,
    mode: Mode,
    /// Bytes read and not yet returned as a frame.
    buffer: Vec<u8>,
    /// Where each read lands before it joins `buffer`.
    scratch: Box<[u8]>,
}

impl CallReader {
    fn new(stream: UnixStream, mode: Mode) -> Self {
        CallReader {
            stream,
            mode,
            buffer: Vec::new(),
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
        }
    }

    /// The next request, polled for up to `window` first; `None` at the end of the stream.
    fn next(&mut self, window: Duration) -> std::io::Result<Option<ExecutorRequest>> {
        let deadline = Instant::now() + window;
        loop {
            if let Some(body) = take_frame(&mut self.buffer)? {
                return decode(&body).map(Some);
            }
            let polling = !window.is_zero() && Instant::now() < deadline;
            self.mode.set(&self.stream, polling)?;
            match self.stream.read(&mut self.scratch) {
                Ok(0) => return Ok(None),
                Ok(read) => self.buffer.extend_from_slice(&self.scratch[..read]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::yield_now();
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }
}

/// Writes frames to the calls connection whole, whatever the reader left its mode: a write the
/// socket cannot take at once makes it blocking.
struct FrameWriter {
    stream: UnixStream,
    mode: Mode,
}

impl FrameWriter {
    fn write(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut written = 0;
        while written < frame.len() {
            match self.stream.write(&frame[written..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    self.mode.set(&self.stream, false)?;
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// Runs this process as a Python executor serving the worker listening on `socket`. Returns when
/// the worker closes the connection; an error if the executor could not start.
///
/// The executor makes two connections: calls and their outcomes travel on the first, read and
/// answered by the interpreter thread itself; `Stop` requests arrive on the second, read by
/// this (main) thread, which interrupts the running call.
pub fn serve(socket: &Path) -> anyhow::Result<()> {
    let connect = || {
        UnixStream::connect(socket)
            .with_context(|| format!("connecting to the worker at {}", socket.display()))
    };
    let calls = connect()?;
    let mut control = connect()?;
    let mode = Mode::default();
    let writer = Arc::new(Mutex::new(FrameWriter {
        stream: calls.try_clone().context("cloning the worker connection")?,
        mode: mode.clone(),
    }));
    let mut calls = CallReader::new(calls, mode);
    let send = move |reply: &ExecutorReply| -> std::io::Result<()> {
        taskfleet_common::sync::lock(&writer).write(&encode(reply))
    };
    let Some(ExecutorRequest::Start(settings)) = calls.next(Duration::ZERO)? else {
        anyhow::bail!("the worker did not send the executor's settings first");
    };
    // Before any thread starts: the limits and the file system rules hold for every thread.
    let confinement = settings.confinement.clone();
    match confinement.apply() {
        Ok(FileSystem::PartlyConfined | FileSystem::Unconfined) => {
            tracing::warn!(
                "this kernel cannot confine python executors' file system with Landlock (fully); they run with resource limits only"
            );
        }
        Ok(FileSystem::Open | FileSystem::Confined) => {}
        Err(error) => {
            let message = format!("confining the python executor: {error}");
            send(&ExecutorReply::StartFailed {
                message: message.clone(),
            })?;
            anyhow::bail!(message);
        }
    }
    if let Err(missing) = leftovers::adopt_orphans() {
        tracing::warn!("{missing}: processes a step starts may outlive it");
    }
    let done = send.clone();
    // The first call is awaited asleep; a later one is polled for a while first if the call
    // before it asked for that (see `CALL_POLL`). Once the executor is ready only the
    // interpreter thread reads and writes this connection.
    let mut poll = Duration::ZERO;
    // When the last call was handed to the interpreter.
    let mut last_call: Option<Instant> = None;
    // Runs on the interpreter thread, without the GIL, between calls.
    let next_call = move || loop {
        // Nothing a step started outlives it.
        if last_call
            .take()
            .is_some_and(|started| started.elapsed() >= leftovers::SHORTEST_SPAWNING_CALL)
        {
            let killed = leftovers::kill_children();
            if killed > 0 {
                tracing::info!(killed, "killed the processes a step left running");
            }
        }
        // Nothing a step left in the scratch directory reaches the next one.
        confinement.clear_scratch();
        match calls.next(poll) {
            Ok(Some(ExecutorRequest::Run {
                id,
                call,
                poll_after,
            })) => {
                poll = if poll_after {
                    CALL_POLL
                } else {
                    Duration::ZERO
                };
                last_call = Some(Instant::now());
                let done = done.clone();
                return Some(IncomingCall {
                    id,
                    target: call.target,
                    input: call.input,
                    ctx: call.ctx,
                    done: Box::new(move |output| {
                        if let Err(error) = done(&ExecutorReply::Done { id, output }) {
                            tracing::warn!(%error, "sending a step's outcome to the worker");
                        }
                    }),
                });
            }
            // Not the frame itself, which may hold a step's input.
            Ok(Some(_)) => tracing::warn!("unexpected frame on the calls connection"),
            // The worker is gone: so is this executor, even in the middle of nothing.
            Ok(None) => std::process::exit(0),
            Err(error) => {
                tracing::error!(%error, "reading a call from the worker");
                std::process::exit(1);
            }
        }
    };
    let stopper = match serve_calls(settings, next_call)
        .and_then(|stopper| ignore_termination_signals().map(|()| stopper))
    {
        Ok(stopper) => stopper,
        Err(error) => {
            let message = format!("starting the python interpreter: {error}");
            send(&ExecutorReply::StartFailed {
                message: message.clone(),
            })?;
            anyhow::bail!(message);
        }
    };
    send(&ExecutorReply::Ready {
        pid: std::process::id(),
    })?;
    while let Some(request) = read_frame(&mut control)? {
        match request {
            ExecutorRequest::Stop { id } => stopper.stop(id),
            _ => tracing::warn!("unexpected frame on the control connection"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_read_whether_they_come_within_the_polling_window_or_after_it() {
        let (ours, mut theirs) = UnixStream::pair().expect("a socket pair");
        let mut reader = CallReader::new(ours, Mode::default());
        let stop = |id| encode(&ExecutorRequest::Stop { id });
        let is_stop = |read: &Option<ExecutorRequest>, expected| matches!(read, Some(ExecutorRequest::Stop { id }) if *id == expected);
        // Two frames in one write, both read within the window.
        theirs
            .write_all(&[stop(1), stop(2)].concat())
            .expect("writes");
        let read = reader.next(CALL_POLL).expect("reads");
        assert!(is_stop(&read, 1), "{read:?}");
        let read = reader.next(CALL_POLL).expect("reads");
        assert!(is_stop(&read, 2), "{read:?}");
        // Sent long after the window: read asleep.
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // Split inside the length prefix.
            let frame = stop(3);
            theirs.write_all(&frame[..2]).expect("writes");
            std::thread::sleep(Duration::from_millis(5));
            theirs.write_all(&frame[2..]).expect("writes");
            theirs
        });
        let read = reader.next(CALL_POLL).expect("reads");
        assert!(is_stop(&read, 3), "{read:?}");
        let mut theirs = late.join().expect("the writer ends");
        // Half a length prefix within the window, the rest after it.
        let frame = stop(4);
        theirs.write_all(&frame[..2]).expect("writes");
        let rest = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            theirs.write_all(&frame[2..]).expect("writes");
        });
        let read = reader.next(CALL_POLL).expect("reads");
        assert!(is_stop(&read, 4), "{read:?}");
        rest.join().expect("the writer ends");
        assert!(reader.next(CALL_POLL).expect("reads").is_none());
    }

    #[test]
    fn an_outcome_larger_than_the_socket_takes_is_written_whole_after_polling() {
        let (ours, mut theirs) = UnixStream::pair().expect("a socket pair");
        let mode = Mode::default();
        let mut writer = FrameWriter {
            stream: ours.try_clone().expect("clones"),
            mode: mode.clone(),
        };
        let mut reader = CallReader::new(ours, mode);
        theirs
            .write_all(&encode(&ExecutorRequest::Stop { id: 1 }))
            .expect("writes");
        // A call read while polling leaves the connection non-blocking.
        assert!(reader.next(CALL_POLL).expect("reads").is_some());
        let output = ExecutorReply::StartFailed {
            message: "x".repeat(8 * 1024 * 1024),
        };
        let frame = encode(&output);
        let length = frame.len();
        let other_side = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let mut received = vec![0; length];
            theirs.read_exact(&mut received).expect("reads it all");
            received
        });
        writer.write(&frame).expect("writes it all");
        assert!(other_side.join().expect("the reader ends") == frame);
    }
}
