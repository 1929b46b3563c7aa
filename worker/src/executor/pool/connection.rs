//! The worker's end of an executor's calls connection: replies read whole, however they arrive,
//! polled for a short while before the caller sleeps on the runtime's readiness. It reads
//! frames only; what they mean is the pool's business.

use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::executor::process::frame::take_frame;

/// An executor's calls connection. Calls are written to `stream`; replies, frames of a
/// little-endian `u32` length and then the body (see [`crate::executor::process`]), are read
/// through `direct`, a second handle to the same socket.
///
/// Reading through `direct` rather than through the runtime's readiness lets a caller that polls
/// for its reply see it as soon as it is written, without waiting for the thread that holds the
/// runtime's I/O driver to be woken.
pub(super) struct CallsConnection {
    /// Where calls are written, and whose readiness a caller waits on once it stops polling.
    pub(super) stream: UnixStream,
    /// The same socket, non-blocking like `stream`.
    direct: std::os::unix::net::UnixStream,
    /// Bytes read and not yet returned as a frame.
    buffer: Vec<u8>,
    /// Where each read lands before it joins `buffer`; kept, so polling does not clear a fresh
    /// one on every attempt.
    scratch: Box<[u8]>,
}

impl CallsConnection {
    /// Wraps the calls connection of a newly connected executor.
    pub(super) fn new(stream: UnixStream) -> std::io::Result<Self> {
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
    pub(super) async fn next_frame(
        &mut self,
        poll: Duration,
        stop_polling: impl Fn() -> bool,
    ) -> std::io::Result<Vec<u8>> {
        let polled_until = Instant::now() + poll;
        loop {
            if let Some(frame) = take_frame(&mut self.buffer)? {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let prefix = u32::try_from(crate::executor::process::frame::MAX_FRAME + 1)
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
