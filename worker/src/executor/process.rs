//! The Python executor process, and the frames it exchanges with the worker that started it.
//!
//! A worker runs its Python steps in executor processes (see [`super::pool`]): each is the
//! worker's own binary started with [`EXECUTOR_FLAG`] and the path of a Unix socket on which the
//! worker listens. The executor connects twice (calls, then control), receives its
//! [`PythonSettings`] on the calls connection, starts its interpreter and then serves one call at
//! a time: the interpreter thread reads each call and writes its outcome back itself, so a call
//! crosses no other thread of the executor; the main thread reads `Stop` requests from the
//! control connection. A frame is a little-endian `u32` length followed by that many bytes of
//! JSON.
//!
//! The executor ignores SIGINT and SIGTERM: it leaves when the worker closes the connection (or
//! dies), at once, even in the middle of a step.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::python::{
    IncomingCall, PythonOutput, PythonSettings, PythonTarget, StepContext,
    ignore_termination_signals, serve_calls,
};

/// The hidden command-line flag that makes `taskfleet-worker` an executor process; its value is
/// the socket to connect to.
pub const EXECUTOR_FLAG: &str = "--python-executor";

/// The largest frame either side accepts: 512 MiB.
pub(crate) const MAX_FRAME: usize = 512 * 1024 * 1024;

/// A frame from the worker to an executor.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// The first frame: how to set up the interpreter.
    Start(PythonSettings),
    /// Run one step call; the executor answers [`Reply::Done`] with the same id.
    Run {
        /// Chosen by the worker, echoed in the reply.
        id: u64,
        /// The call.
        call: Call,
    },
    /// Give up the call with this id: skip it or interrupt it. Its `Done` still follows.
    Stop {
        /// The call's id.
        id: u64,
    },
}

/// One step call.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Call {
    /// What to call.
    pub target: PythonTarget,
    /// The step's input.
    pub input: Value,
    /// The attempt's identity.
    pub ctx: StepContext,
}

/// [`Request::Run`] made from a borrowed call, so the caller keeps it if sending fails.
#[derive(Serialize)]
enum RunRef<'a> {
    Run { id: u64, call: &'a Call },
}

/// Encodes a [`Request::Run`] frame.
pub(crate) fn encode_run(id: u64, call: &Call) -> Vec<u8> {
    encode(&RunRef::Run { id, call })
}

/// A frame from an executor to the worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// The interpreter is ready.
    Ready {
        /// The executor's process id.
        pid: u32,
    },
    /// The interpreter could not be set up; the executor exits after sending this.
    StartFailed {
        /// Why, for the worker's operator.
        message: String,
    },
    /// A call ended.
    Done {
        /// The id of its [`Request::Run`].
        id: u64,
        /// Its output or error, and what it printed or logged.
        output: PythonOutput,
    },
}

/// Encodes a frame: length prefix and JSON.
pub(crate) fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut frame = vec![0; 4];
    // Serialising these types into a Vec cannot fail: every map key is a string.
    if let Err(error) = serde_json::to_writer(&mut frame, message) {
        tracing::error!(%error, "encoding an executor frame");
    }
    let length = u32::try_from(frame.len() - 4).unwrap_or(u32::MAX);
    frame[..4].copy_from_slice(&length.to_le_bytes());
    frame
}

/// Reads the length prefix of a frame and checks it.
pub(crate) fn frame_length(prefix: [u8; 4]) -> std::io::Result<usize> {
    let length = usize::try_from(u32::from_le_bytes(prefix)).unwrap_or(usize::MAX);
    if length > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("an executor frame of {length} bytes is over the limit of {MAX_FRAME}"),
        ));
    }
    Ok(length)
}

/// Decodes a frame's body.
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(body)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
}

/// How long an executor that finished a call polls for the next one before it sleeps: waking a
/// sleeping thread costs tens of microseconds on a virtual machine, more than a small step.
/// Polling yields the CPU between attempts, so busy processes lose nothing to it, and an idle
/// executor sleeps once the window has passed.
const CALL_POLL: Duration = Duration::from_micros(100);

/// Polls `stream` for up to `window` without sleeping (yielding the CPU between attempts), and
/// reads what came into `prefix`; returns how many bytes it read (`Some(0)`: the stream ended;
/// `None`: nothing came).
fn poll_read(
    stream: &mut UnixStream,
    prefix: &mut [u8; 4],
    window: Duration,
) -> std::io::Result<Option<usize>> {
    stream.set_nonblocking(true)?;
    let deadline = Instant::now() + window;
    let read = loop {
        match stream.read(prefix) {
            Ok(n) => break Ok(Some(n)),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                if Instant::now() >= deadline {
                    break Ok(None);
                }
                std::thread::yield_now();
            }
            Err(error) => break Err(error),
        }
    };
    stream.set_nonblocking(false)?;
    read
}

/// Reads one call frame, first polling for up to `window`; `None` at the end of the stream.
fn read_call(stream: &mut UnixStream, window: Duration) -> std::io::Result<Option<Request>> {
    let mut prefix = [0; 4];
    let filled = if window.is_zero() {
        0
    } else {
        match poll_read(stream, &mut prefix, window)? {
            Some(0) => return Ok(None),
            Some(n) => n,
            None => 0,
        }
    };
    read_rest(stream, prefix, filled)
}

/// Reads one frame, blocking; `None` at the end of the stream.
fn read_frame<T: DeserializeOwned>(stream: &mut impl Read) -> std::io::Result<Option<T>> {
    read_rest(stream, [0; 4], 0)
}

/// Reads the rest of a frame whose first `filled` bytes are in `prefix`, blocking; `None` at
/// the end of the stream.
fn read_rest<T: DeserializeOwned>(
    stream: &mut impl Read,
    mut prefix: [u8; 4],
    filled: usize,
) -> std::io::Result<Option<T>> {
    match stream.read_exact(&mut prefix[filled..]) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let mut body = vec![0; frame_length(prefix)?];
    stream.read_exact(&mut body)?;
    decode(&body).map(Some)
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
    let mut calls = connect()?;
    let mut control = connect()?;
    let writer = Arc::new(Mutex::new(
        calls.try_clone().context("cloning the worker connection")?,
    ));
    let send = move |reply: &Reply| -> std::io::Result<()> {
        writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write_all(&encode(reply))
    };
    let Some(Request::Start(settings)) = read_frame(&mut calls)? else {
        anyhow::bail!("the worker did not send the executor's settings first");
    };
    let done = send.clone();
    // The first call is awaited asleep; later ones are polled for a while first (see
    // `CALL_POLL`). Polling sets the connection non-blocking, which its clone `writer` shares:
    // only the interpreter thread writes once the executor is ready, and never while it polls.
    let mut poll = Duration::ZERO;
    // Runs on the interpreter thread, without the GIL, between calls.
    let next_call = move || loop {
        let read = read_call(&mut calls, poll);
        poll = CALL_POLL;
        match read {
            Ok(Some(Request::Run { id, call })) => {
                let done = done.clone();
                return Some(IncomingCall {
                    id,
                    target: call.target,
                    input: call.input,
                    ctx: call.ctx,
                    done: Box::new(move |output| {
                        if let Err(error) = done(&Reply::Done { id, output }) {
                            tracing::warn!(%error, "sending a step's outcome to the worker");
                        }
                    }),
                });
            }
            Ok(Some(other)) => tracing::warn!(?other, "unexpected frame on the calls connection"),
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
            send(&Reply::StartFailed {
                message: message.clone(),
            })?;
            anyhow::bail!(message);
        }
    };
    send(&Reply::Ready {
        pid: std::process::id(),
    })?;
    while let Some(request) = read_frame(&mut control)? {
        match request {
            Request::Stop { id } => stopper.stop(id),
            other => tracing::warn!(?other, "unexpected frame on the control connection"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn run_frames_decode_as_requests() {
        let call = Call {
            target: PythonTarget::Code {
                source: "def main(input):\n    return input\n".to_owned(),
            },
            input: json!({"n": [1, 2.5, "x", null, u64::MAX]}),
            ctx: StepContext {
                run_id: "r".to_owned(),
                task_id: "t".to_owned(),
                step_id: "s".to_owned(),
                attempt: 1,
            },
        };
        let frame = encode_run(7, &call);
        let length = frame_length(frame[..4].try_into().expect("a prefix")).expect("a length");
        assert_eq!(length, frame.len() - 4);
        let Request::Run { id, call: decoded } = decode(&frame[4..]).expect("decodes") else {
            panic!("not a run request");
        };
        assert_eq!(id, 7);
        assert_eq!(decoded.input, call.input);
        assert_eq!(decoded.target, call.target);
    }

    #[test]
    fn calls_are_read_whether_they_come_within_the_polling_window_or_after_it() {
        let (mut ours, mut theirs) = UnixStream::pair().expect("a socket pair");
        let stop = || encode(&Request::Stop { id: 3 });
        theirs.write_all(&stop()).expect("writes");
        let read = read_call(&mut ours, CALL_POLL).expect("reads");
        assert!(matches!(read, Some(Request::Stop { id: 3 })), "{read:?}");
        // Sent long after the window: read asleep, and the connection is blocking again.
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // Split inside the length prefix, which polling may have read part of.
            let frame = stop();
            theirs.write_all(&frame[..2]).expect("writes");
            std::thread::sleep(Duration::from_millis(5));
            theirs.write_all(&frame[2..]).expect("writes");
            theirs
        });
        let read = read_call(&mut ours, CALL_POLL).expect("reads");
        assert!(matches!(read, Some(Request::Stop { id: 3 })), "{read:?}");
        let mut theirs = late.join().expect("the writer ends");
        // Half a length prefix within the window, the rest after it.
        let frame = stop();
        theirs.write_all(&frame[..2]).expect("writes");
        let rest = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            theirs.write_all(&frame[2..]).expect("writes");
        });
        let read = read_call(&mut ours, CALL_POLL).expect("reads");
        assert!(matches!(read, Some(Request::Stop { id: 3 })), "{read:?}");
        rest.join().expect("the writer ends");
        assert!(read_call(&mut ours, CALL_POLL).expect("reads").is_none());
    }

    #[test]
    fn oversized_frames_are_refused() {
        let prefix = u32::try_from(MAX_FRAME + 1).expect("fits").to_le_bytes();
        assert!(frame_length(prefix).is_err());
    }
}
