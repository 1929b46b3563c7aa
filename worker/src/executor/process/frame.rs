//! The frames a worker and its executor processes exchange: what each side sends
//! ([`ExecutorRequest`], [`ExecutorReply`]) and how a frame is laid out, a little-endian `u32`
//! length followed by that many bytes of JSON. Both ends are always the same binary, so the
//! format has no version. This module encodes and decodes; it does no I/O of its own beyond
//! reading one frame from a blocking stream.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::executor::python::{PythonOutput, PythonSettings, PythonTarget, StepContext};

/// The largest frame either side accepts: 512 MiB.
pub(crate) const MAX_FRAME: usize = 512 * 1024 * 1024;

/// A frame from the worker to an executor.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ExecutorRequest {
    /// The first frame: how to set up the interpreter.
    Start(PythonSettings),
    /// Run one step call; the executor answers [`ExecutorReply::Done`] with the same id.
    Run {
        /// Chosen by the worker, echoed in the reply.
        id: u64,
        /// The call.
        call: Call,
        /// Whether to poll for the next call once this one is done (see [`super::CALL_POLL`]).
        #[serde(default)]
        poll_after: bool,
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

/// [`ExecutorRequest::Run`] made from a borrowed call, so the caller keeps it if sending fails.
#[derive(Serialize)]
enum RunRef<'a> {
    Run {
        id: u64,
        call: &'a Call,
        poll_after: bool,
    },
}

/// Encodes an [`ExecutorRequest::Run`] frame.
pub(crate) fn encode_run(id: u64, call: &Call, poll_after: bool) -> Vec<u8> {
    encode(&RunRef::Run {
        id,
        call,
        poll_after,
    })
}

/// A frame from an executor to the worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ExecutorReply {
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
        /// The id of its [`ExecutorRequest::Run`].
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

/// Takes a whole frame's body off the front of `buffer`, if one is there.
pub(crate) fn take_frame(buffer: &mut Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    let Some(prefix) = buffer.first_chunk::<4>() else {
        return Ok(None);
    };
    let end = frame_length(*prefix)? + 4;
    if buffer.len() < end {
        return Ok(None);
    }
    let body = buffer[4..end].to_vec();
    buffer.drain(..end);
    Ok(Some(body))
}

/// Reads one frame, blocking; `None` at the end of the stream.
pub(crate) fn read_frame<T: DeserializeOwned>(
    stream: &mut impl Read,
) -> std::io::Result<Option<T>> {
    let mut prefix = [0; 4];
    match stream.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let mut body = vec![0; frame_length(prefix)?];
    stream.read_exact(&mut body)?;
    decode(&body).map(Some)
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
                trace_id: None,
            },
        };
        let frame = encode_run(7, &call, true);
        let length = frame_length(frame[..4].try_into().expect("a prefix")).expect("a length");
        assert_eq!(length, frame.len() - 4);
        let ExecutorRequest::Run {
            id,
            call: decoded,
            poll_after,
        } = decode(&frame[4..]).expect("decodes")
        else {
            panic!("not a run request");
        };
        assert_eq!(id, 7);
        assert!(poll_after);
        assert_eq!(decoded.input, call.input);
        assert_eq!(decoded.target, call.target);
    }

    #[test]
    fn oversized_frames_are_refused() {
        let prefix = u32::try_from(MAX_FRAME + 1).expect("fits").to_le_bytes();
        assert!(frame_length(prefix).is_err());
    }
}
