//! One OpenAI request over HTTP/1.1 and what it measured. Each request has a connection of its
//! own (mlx_lm.server closes the connection after every response, so both servers pay the same).
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where requests go: `http://HOST:PORT` with an optional path prefix.
#[derive(Debug, Clone)]
pub struct Target {
    host: String,
    port: u16,
    /// Prefix of every path, without a trailing slash (a trailing `/v1` is dropped: the
    /// routes add it).
    prefix: String,
    api_key: Option<String>,
}

impl Target {
    pub fn parse(url: &str, api_key: Option<String>) -> Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("--url `{url}` is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s) => bail!("--url `{url}`: only http is supported, not {s}"),
            None => bail!("--url `{url}`: expected http://HOST:PORT"),
        }
        let host = uri.host().filter(|h| !h.is_empty()).with_context(|| format!("--url `{url}` has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(80);
        let path = uri.path().trim_end_matches('/');
        let prefix = path.strip_suffix("/v1").unwrap_or(path).to_string();
        if uri.query().is_some() {
            bail!("--url `{url}`: a query string is not supported");
        }
        Ok(Target { host, port, prefix, api_key })
    }

    pub fn host_port(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{}{path}", self.host, self.port, self.prefix)
    }
}

/// The OpenAI route a workload calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `/v1/completions` with a text prompt.
    Completions,
    /// `/v1/chat/completions` with messages (the server applies the chat template).
    Chat,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }
}

/// What one request measured. Times are from the moment it was sent (connect included).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Seconds from the start of the run to sending.
    pub sent_at: f64,
    /// Until the first chunk with generated text (streaming only).
    pub ttft: Option<Duration>,
    /// Until the response ended.
    pub e2e: Duration,
    /// Gaps between consecutive chunks with text, after the first.
    pub chunk_gaps: Vec<Duration>,
    /// `usage.completion_tokens`, else the number of chunks with text.
    pub completion_tokens: u64,
    pub prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens` (0 when absent).
    pub cached_tokens: u64,
    /// Whether the server reported usage.
    pub usage_reported: bool,
    pub text: String,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    /// Connections refused or reset before any response that were tried again.
    pub retries: u32,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time per output token after the first: (e2e - ttft) / (tokens - 1).
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        (self.completion_tokens > 1 && self.ok()).then(|| (self.e2e - ttft) / (self.completion_tokens - 1) as u32)
    }
}

/// Connection attempts before a request counts as failed: mlx_lm.server listens with a backlog
/// of 5, so a burst of connections can be reset.
const MAX_ATTEMPTS: u32 = 50;

/// Sends `body` to `api`'s route and reads the whole response. Never fails: problems end up in
/// `Outcome::error`.
pub async fn send(target: &Target, api: Api, body: &Value, timeout: Duration, run_start: Instant) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome { sent_at: start.duration_since(run_start).as_secs_f64(), ..Outcome::default() };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let result = tokio::time::timeout(timeout, async {
        let response = request(target, api, body, &mut out.retries).await?;
        if response.status() != StatusCode::OK {
            return Err(http_error(response).await);
        }
        if stream { read_stream(response, start, &mut out).await } else { read_whole(response, &mut out).await }
    })
    .await;
    out.e2e = start.elapsed();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.error = Some(e),
        Err(_) => out.error = Some(format!("no complete response within {} s", timeout.as_secs_f64())),
    }
    out
}

async fn request(target: &Target, api: Api, body: &Value, retries: &mut u32) -> Result<Response<Incoming>, String> {
    let payload = Bytes::from(body.to_string());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = hyper::Request::post(format!("{}{}", target.prefix, api.path()))
            .header("host", format!("{}:{}", target.host, target.port))
            .header("content-type", "application/json")
            .header("content-length", payload.len());
        if let Some(key) = &target.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req.body(Full::new(payload.clone())).map_err(|e| e.to_string())?;
        match try_once(target, req).await {
            Ok(r) => return Ok(r),
            Err(_) if attempt < MAX_ATTEMPTS => {
                *retries += 1;
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt.min(10)))).await;
            }
            Err(e) => return Err(format!("{e} (after {attempt} attempts)")),
        }
    }
}

/// Connects and sends; an error here came before any response byte.
async fn try_once(target: &Target, req: hyper::Request<Full<Bytes>>) -> Result<Response<Incoming>, String> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connect to {}:{}: {e}", target.host, target.port))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| format!("sending the request: {e}"))
}

/// The message of an error response: OpenAI's `error.message`, mlx_lm.server's `error` string, or
/// the start of the body.
async fn http_error(response: Response<Incoming>) -> String {
    let status = response.status();
    let bytes = match response.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return format!("HTTP {status} (body unreadable: {e})"),
    };
    let message = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => error_message(&v).unwrap_or_else(|| v.to_string()),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    };
    format!("HTTP {}: {}", status.as_u16(), truncate(message.trim(), 300))
}

fn error_message(v: &Value) -> Option<String> {
    match v.get("error")? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => Some(
            o.get("message")
                .and_then(Value::as_str)
                .map_or_else(|| Value::Object(o.clone()).to_string(), str::to_string),
        ),
        other => Some(other.to_string()),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

async fn read_whole(response: Response<Incoming>, out: &mut Outcome) -> Result<(), String> {
    let bytes = response.into_body().collect().await.map_err(|e| format!("reading the response: {e}"))?.to_bytes();
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("the response is not JSON ({e})"))?;
    if let Some(m) = error_message(&v) {
        return Err(m);
    }
    let choice = &v["choices"][0];
    out.text = choice["message"]["content"].as_str().or_else(|| choice["text"].as_str()).unwrap_or("").to_string();
    out.finish_reason = choice["finish_reason"].as_str().map(str::to_string);
    if !usage(&v, out) {
        return Err("the response has no usage".into());
    }
    Ok(())
}

/// Reads server-sent events to `[DONE]` (or to the end of the body, which mlx_lm.server's
/// HTTP/1.0 responses use the same way).
async fn read_stream(response: Response<Incoming>, start: Instant, out: &mut Outcome) -> Result<(), String> {
    let mut body = response.into_body();
    let mut events = SseBuffer::default();
    let mut last_text: Option<Instant> = None;
    let mut chunks = 0u64;
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(format!("the stream broke after {chunks} chunks: {e}")),
            None => break,
        };
        let Ok(data) = frame.into_data() else { continue };
        let now = Instant::now();
        events.push(&data);
        while let Some(payload) = events.next_data() {
            if payload == "[DONE]" {
                return finish(out, chunks);
            }
            let v: Value = serde_json::from_str(&payload)
                .map_err(|e| format!("not JSON in the stream ({e}): {}", truncate(&payload, 200)))?;
            if let Some(m) = error_message(&v) {
                return Err(format!("error event after {chunks} chunks: {m}"));
            }
            usage(&v, out);
            let Some(choice) = v["choices"].get(0) else { continue };
            if let Some(r) = choice["finish_reason"].as_str() {
                out.finish_reason = Some(r.to_string());
            }
            let text = chunk_text(choice);
            if text.is_empty() {
                continue;
            }
            chunks += 1;
            out.text.push_str(&text);
            match last_text {
                None => out.ttft = Some(now - start),
                Some(t) => out.chunk_gaps.push(now - t),
            }
            last_text = Some(now);
        }
    }
    if out.finish_reason.is_some() {
        // A server may end the body without `[DONE]` after the last chunk.
        return finish(out, chunks);
    }
    Err(format!("the stream ended after {chunks} chunks without a finish_reason or [DONE]"))
}

fn finish(out: &mut Outcome, chunks: u64) -> Result<(), String> {
    if !out.usage_reported {
        out.completion_tokens = chunks;
    }
    Ok(())
}

/// The generated text of a streamed choice: the completion's `text`, or the chat delta's
/// `content` plus any reasoning text a server splits off.
fn chunk_text(choice: &Value) -> String {
    if let Some(t) = choice["text"].as_str() {
        return t.to_string();
    }
    let delta = &choice["delta"];
    ["reasoning_content", "reasoning", "content"].iter().filter_map(|k| delta[*k].as_str()).collect()
}

/// Takes `usage` when `v` carries it; whether it did.
fn usage(v: &Value, out: &mut Outcome) -> bool {
    let u = &v["usage"];
    let Some(completion) = u["completion_tokens"].as_u64() else { return false };
    out.usage_reported = true;
    out.completion_tokens = completion;
    out.prompt_tokens = u["prompt_tokens"].as_u64();
    out.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
    true
}

/// Splits a byte stream into server-sent events and yields their `data`. Bytes are kept until a
/// blank line ends an event, so a UTF-8 character or a line split across reads is whole.
#[derive(Default)]
pub struct SseBuffer {
    buf: Vec<u8>,
}

impl SseBuffer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The data of the next complete event (its `data:` lines joined by newlines); comments and
    /// events without data are skipped.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            let (end, sep) = find_event_end(&self.buf)?;
            let event: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
        }
    }
}

/// The end of the first event in `buf` and the length of the blank-line separator after it.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_on_blank_lines_wherever_the_reads_cut() {
        let stream =
            "data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":\"é\"}\r\n\r\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let bytes = stream.as_bytes();
        for cut in 1..bytes.len() {
            let mut sse = SseBuffer::default();
            let mut got = Vec::new();
            for part in [&bytes[..cut], &bytes[cut..]] {
                sse.push(part);
                while let Some(d) = sse.next_data() {
                    got.push(d);
                }
            }
            assert_eq!(got, ["{\"a\":1}", "{\"b\":\"é\"}", "x\ny", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn chunk_text_reads_both_routes_and_reasoning() {
        let v: Value = serde_json::json!({"text": "abc"});
        assert_eq!(chunk_text(&v), "abc");
        let v: Value = serde_json::json!({"delta": {"role": "assistant", "content": ""}});
        assert_eq!(chunk_text(&v), "");
        let v: Value = serde_json::json!({"delta": {"role": "assistant", "reasoning": "hm", "content": "ok"}});
        assert_eq!(chunk_text(&v), "hmok");
    }

    #[test]
    fn usage_is_taken_with_or_without_cached_tokens() {
        let mut out = Outcome::default();
        let v = serde_json::json!({"usage": {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 8}}});
        assert!(usage(&v, &mut out));
        assert_eq!((out.prompt_tokens, out.completion_tokens, out.cached_tokens), (Some(10), 4, 8));
        let mut out = Outcome::default();
        assert!(usage(&serde_json::json!({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}), &mut out));
        assert_eq!(out.cached_tokens, 0);
        assert!(!usage(&serde_json::json!({"choices": []}), &mut Outcome::default()));
    }

    #[test]
    fn error_bodies_of_both_servers_give_their_message() {
        assert_eq!(
            error_message(&serde_json::json!({"error": {"message": "bad `top_p`", "type": "x"}})).unwrap(),
            "bad `top_p`"
        );
        assert_eq!(error_message(&serde_json::json!({"error": "Invalid JSON"})).unwrap(), "Invalid JSON");
        assert!(error_message(&serde_json::json!({"choices": []})).is_none());
    }

    #[test]
    fn urls_are_checked_and_a_trailing_v1_is_dropped() {
        let t = Target::parse("http://127.0.0.1:8080/v1/", None).unwrap();
        assert_eq!(t.url(Api::Chat.path()), "http://127.0.0.1:8080/v1/chat/completions");
        let t = Target::parse("http://localhost:9/proxy", None).unwrap();
        assert_eq!(t.url(Api::Completions.path()), "http://localhost:9/proxy/v1/completions");
        for (url, needle) in [
            ("https://x:1", "only http"),
            ("127.0.0.1:8080", "expected http://HOST:PORT"),
            ("http://", "not a URL"),
            ("http://h:1/?a=b", "query"),
        ] {
            let e = format!("{:#}", Target::parse(url, None).unwrap_err());
            assert!(e.contains(needle), "{url}: {e}");
        }
    }

    #[test]
    fn tpot_spreads_the_time_after_the_first_token() {
        let out = Outcome {
            ttft: Some(Duration::from_millis(100)),
            e2e: Duration::from_millis(1100),
            completion_tokens: 11,
            ..Outcome::default()
        };
        assert_eq!(out.tpot(), Some(Duration::from_millis(100)));
        assert_eq!(Outcome { completion_tokens: 1, ..out.clone() }.tpot(), None);
    }
}
