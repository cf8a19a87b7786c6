//! A minimal HTTP/1.1 client on one kept-alive TCP connection (as OpenAI clients keep theirs),
//! with blocking reads so the time of each read is the time its bytes arrived. It reads
//! chunked and length-delimited bodies and the server-sent events in them.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::clock::{Sample, now_ns};

pub struct Http {
    addr: SocketAddr,
    stream: TcpStream,
}

/// Where the body of a response is, as it arrives.
struct Body {
    chunked: bool,
    length: usize,
    /// Decoded body bytes.
    data: Vec<u8>,
    /// Offset in the raw bytes up to which chunks are decoded.
    raw_pos: usize,
    complete: bool,
}

impl Http {
    pub fn connect(addr: SocketAddr) -> Result<Http> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Http { addr, stream })
    }

    /// The status of `GET path` on a connection of its own.
    pub fn get_status(addr: SocketAddr, path: &str) -> Result<u16> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let head = String::from_utf8_lossy(&out);
        head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("a status line")
    }

    /// POSTs `body` to `path` with `x-request-id: id` and reads the whole response. With
    /// `sse`, each `data:` event's `choices[0].token_ids` (the `return_token_ids` extension)
    /// times its tokens, and `data: [DONE]` ends the sample.
    pub fn post(&mut self, path: &str, id: &str, body: &[u8], sse: bool) -> Result<Sample> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: {}\r\nx-request-id: {id}\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            if sse { "text/event-stream" } else { "application/json" },
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let mut sample = Sample { sent: now_ns(), ..Sample::default() };
        self.stream.write_all(&req)?;

        let mut raw: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut head_end = None;
        let mut body: Option<Body> = None;
        let mut events_pos = 0;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let n = self.stream.read(&mut chunk)?;
            let at = now_ns();
            if n == 0 {
                bail!("the server closed the connection");
            }
            raw.extend_from_slice(&chunk[..n]);
            if head_end.is_none() {
                let Some(end) = find(&raw, b"\r\n\r\n") else { continue };
                head_end = Some(end + 4);
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let status = head.split(' ').nth(1).unwrap_or("");
                if status != "200" {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&raw));
                }
                let chunked = head.contains("transfer-encoding: chunked");
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                body = Some(Body { chunked, length, data: Vec::new(), raw_pos: end + 4, complete: false });
            }
            let b = body.as_mut().context("a body")?;
            decode(b, &raw)?;
            if sse {
                while let Some(end) = find(&b.data[events_pos..], b"\n\n") {
                    let event = String::from_utf8_lossy(&b.data[events_pos..events_pos + end]).into_owned();
                    events_pos += end + 2;
                    for line in event.lines() {
                        let Some(data) = line.strip_prefix("data: ") else { continue };
                        if data == "[DONE]" {
                            sample.done = at;
                            continue;
                        }
                        let v: Value = serde_json::from_str(data).context("an SSE event")?;
                        if v.get("error").is_some() {
                            bail!("error event: {data}");
                        }
                        let n = v["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
                        sample.tokens.extend(std::iter::repeat_n(at, n));
                    }
                }
            }
            if b.complete {
                if !sse {
                    sample.done = at;
                    let v: Value = serde_json::from_slice(&b.data).context("a JSON body")?;
                    let n = v["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
                    sample.tokens.extend(std::iter::repeat_n(at, n));
                }
                if sample.done == 0 {
                    bail!("the stream ended without [DONE]");
                }
                return Ok(sample);
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Moves what is complete of the body from `raw` into `b.data`.
fn decode(b: &mut Body, raw: &[u8]) -> Result<()> {
    if !b.chunked {
        b.data.extend_from_slice(&raw[b.raw_pos..]);
        b.raw_pos = raw.len();
        b.complete = b.data.len() >= b.length;
        return Ok(());
    }
    while !b.complete {
        let rest = &raw[b.raw_pos..];
        let Some(line_end) = find(rest, b"\r\n") else { return Ok(()) };
        let size_text = std::str::from_utf8(&rest[..line_end])?;
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).context("a chunk size")?;
        let need = line_end + 2 + size + 2;
        if rest.len() < need {
            return Ok(());
        }
        b.data.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
        b.raw_pos += need;
        b.complete = size == 0;
    }
    Ok(())
}
