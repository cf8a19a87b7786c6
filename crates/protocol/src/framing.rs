//! Lines in, lines out. Every message is one JSON object on one line; lines are bounded so a
//! peer cannot exhaust our memory with one endless line.
use std::io;

use jsonrpsee::core::client::{ReceivedMessage, TransportReceiverT, TransportSenderT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};

/// Default bound on one line, in bytes.
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The line was longer than the limit. It is skipped; the next line reads normally.
    #[error("line longer than the limit of {0} bytes")]
    TooLong(usize),
    /// The line was not UTF-8. It is skipped; the next line reads normally.
    #[error("line is not valid UTF-8")]
    NotUtf8,
    /// The stream ended in the middle of a line.
    #[error("stream ended inside a line ({0} bytes without a newline)")]
    Truncated(usize),
    #[error(transparent)]
    Io(io::Error),
}

impl LineError {
    /// Whether reading can go on with the next line.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, LineError::TooLong(_) | LineError::NotUtf8)
    }
}

/// Reads newline-terminated lines of at most `max` bytes. `Ok(None)` is a clean end of stream.
pub struct LineReader<R> {
    inner: R,
    buf: BytesMut,
    codec: LinesCodec,
    max: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> LineReader<R> {
        LineReader {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
            codec: LinesCodec::new_with_max_length(max),
            max,
            eof: false,
        }
    }

    pub async fn next_line(&mut self) -> Result<Option<String>, LineError> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(line)) => return Ok(Some(line)),
                Ok(None) => {}
                Err(e) => return Err(self.map_err(e)),
            }
            if self.eof {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let n = self.buf.len();
                self.buf.clear();
                self.codec = LinesCodec::new_with_max_length(self.max);
                return Err(LineError::Truncated(n));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(8 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await.map_err(LineError::Io)?;
            if n == 0 {
                self.eof = true;
            }
        }
    }

    fn map_err(&self, e: LinesCodecError) -> LineError {
        match e {
            LinesCodecError::MaxLineLengthExceeded => LineError::TooLong(self.max),
            LinesCodecError::Io(e) if e.kind() == io::ErrorKind::InvalidData => LineError::NotUtf8,
            LinesCodecError::Io(e) => LineError::Io(e),
        }
    }
}

/// Writes one message per line and flushes it. The message and its newline go out in one write,
/// so a reader on an unbuffered pipe gets the whole line at once.
pub async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, msg: &str) -> io::Result<()> {
    let mut line = Vec::with_capacity(msg.len() + 1);
    line.extend_from_slice(msg.as_bytes());
    line.push(b'\n');
    write_whole_line(w, &line).await
}

/// Writes a line that already ends in its newline, in one write, and flushes it.
pub async fn write_whole_line<W: AsyncWrite + Unpin>(w: &mut W, line: &[u8]) -> io::Result<()> {
    w.write_all(line).await?;
    w.flush().await
}

/// The sending half of a jsonrpsee client over a pipe (a worker's stdin).
pub struct PipeSender<W>(pub W);

/// The receiving half of a jsonrpsee client over a pipe (a worker's stdout). Any bad line ends
/// the connection: a peer that breaks the framing is not to be trusted with the next one.
pub struct PipeReceiver<R>(pub LineReader<R>);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the peer closed its end")]
    Closed,
    #[error(transparent)]
    Line(#[from] LineError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl<W: AsyncWrite + Unpin + Send + 'static> TransportSenderT for PipeSender<W> {
    type Error = TransportError;

    async fn send(&mut self, msg: String) -> Result<(), TransportError> {
        let mut line = msg.into_bytes();
        line.push(b'\n');
        Ok(write_whole_line(&mut self.0, &line).await?)
    }

    async fn close(&mut self) -> Result<(), TransportError> {
        Ok(self.0.shutdown().await?)
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> TransportReceiverT for PipeReceiver<R> {
    type Error = TransportError;

    async fn receive(&mut self) -> Result<ReceivedMessage, TransportError> {
        match self.0.next_line().await? {
            Some(line) => Ok(ReceivedMessage::Text(line)),
            None => Err(TransportError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_and_bad_lines_are_skipped_and_reading_goes_on() {
        let mut input = Vec::new();
        input.extend_from_slice(b"first\n");
        input.extend_from_slice(&[b'x'; 100]);
        input.extend_from_slice(b"\n\xff\xfe\nsecond\r\ntail");
        let mut r = LineReader::new(&input[..], 16);
        assert_eq!(r.next_line().await.unwrap().as_deref(), Some("first"));
        assert!(matches!(r.next_line().await, Err(LineError::TooLong(16))));
        assert!(matches!(r.next_line().await, Err(LineError::NotUtf8)));
        assert_eq!(r.next_line().await.unwrap().as_deref(), Some("second"));
        assert!(matches!(r.next_line().await, Err(LineError::Truncated(4))));
        assert!(r.next_line().await.unwrap().is_none());
    }
}
