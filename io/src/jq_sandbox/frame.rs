//! The frames a sandbox process and its caller exchange over their socket: a 4-byte big-endian
//! length, then a JSON body. A sandbox answers each request with one reply, and sends one
//! `Ready` reply of its own when it has started, before any request.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A program to run, as the caller writes it.
#[derive(Debug, Serialize)]
pub(crate) struct RequestRef<'a> {
    /// The jq source.
    pub program: &'a str,
    /// The value it runs on.
    pub input: &'a Value,
    /// The most outputs it may yield.
    pub output_limit: usize,
}

/// A program to run, as the sandbox reads it.
#[derive(Debug, Deserialize)]
pub(crate) struct Request {
    /// The jq source.
    pub program: String,
    /// The value it runs on.
    pub input: Value,
    /// The most outputs it may yield.
    pub output_limit: usize,
}

/// What a sandbox answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// The sandbox runs under its memory limit and waits for requests.
    Ready,
    /// The program's outputs, in order.
    Outputs(Vec<Value>),
    /// Why the program did not compile or failed, as `taskfleet_common::jq` words it.
    Failed(String),
}

/// Writes one frame holding `body`.
pub(crate) fn write_frame(writer: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let length = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    writer.write_all(&length.to_be_bytes())?;
    writer.write_all(body)?;
    writer.flush()
}

/// Reads one frame's body, or `None` at the end of the stream before a frame starts. A frame
/// longer than `limit` bytes is refused.
pub(crate) fn read_frame(reader: &mut impl Read, limit: usize) -> io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 4];
    match reader.read_exact(&mut length) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > limit {
        return Err(too_long(length, limit));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Some(body))
}

/// The error of a frame longer than its reader accepts.
pub(crate) fn too_long(length: usize, limit: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a frame of {length} bytes is longer than the limit of {limit}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_the_stream_may_end_between_them() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, b"{}").expect("written");
        write_frame(&mut buffer, b"").expect("written");
        let mut reader = buffer.as_slice();
        assert_eq!(
            read_frame(&mut reader, 16).expect("read"),
            Some(b"{}".to_vec())
        );
        assert_eq!(read_frame(&mut reader, 16).expect("read"), Some(Vec::new()));
        assert_eq!(read_frame(&mut reader, 16).expect("read"), None);
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_its_body_is_read() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &[b'x'; 17]).expect("written");
        let error = read_frame(&mut buffer.as_slice(), 16).expect_err("too long");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_frame_cut_short_is_an_error() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, b"abcdef").expect("written");
        buffer.truncate(7);
        assert!(read_frame(&mut buffer.as_slice(), 16).is_err());
    }
}
