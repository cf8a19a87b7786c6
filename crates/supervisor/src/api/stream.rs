//! SSE streaming in the OpenAI chunk format, and the per-request metrics both answers share.
//!
//! The stream reads its feed (the pool's bounded channel, or a shared generation). When the
//! reader falls behind, the tokens that piled up are merged into one chunk, so a slow reader
//! costs one chunk per read, never a blocked worker. A client that goes away drops the stream,
//! which drops the feed, which cancels the request on its worker (a shared generation: once no
//! request reads it any more).
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use mlx_serving_protocol::{FinalEvent, GenerateEvent, TokenEvent};
use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::openai::{self, Route, ValidRequest};
use super::shared::Feed;
use crate::metrics::RequestMetrics;
use crate::pool::PoolEvent;

/// What a request a worker took records for metrics as it goes.
pub struct Meta {
    pub id: String,
    route: Route,
    arrived: Instant,
    last_token: Option<Instant>,
    metrics: Arc<RequestMetrics>,
    finished: bool,
}

impl Meta {
    /// Also records the time the request waited for a worker.
    pub fn new(req: &ValidRequest, id: &str, arrived: Instant) -> Meta {
        let metrics = RequestMetrics::of(req.route.name(), &req.model);
        metrics.queue_wait(arrived.elapsed().as_secs_f64());
        Meta { id: id.to_string(), route: req.route, arrived, last_token: None, metrics, finished: false }
    }

    pub fn model(&self) -> &str {
        self.metrics.model()
    }

    pub fn on_tokens(&mut self, n: usize) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.first_token(now.duration_since(self.arrived).as_secs_f64()),
            Some(t) if n > 0 => self.metrics.gaps(now.duration_since(t).as_secs_f64() / n as f64, n),
            Some(_) => {}
        }
        self.last_token = Some(now);
    }

    pub fn on_final(&mut self, f: &FinalEvent) {
        self.metrics.tokens(f.usage.prompt_tokens, f.usage.completion_tokens);
    }

    pub fn finish(&mut self, status: u16) {
        self.finished = true;
        self.metrics.done(status, self.arrived.elapsed().as_secs_f64());
    }
}

impl Drop for Meta {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away before the end: the request is cancelled.
            self.metrics.cancelled();
        }
    }
}

struct State {
    meta: Meta,
    rx: Feed,
    /// An event read ahead while merging tokens.
    held: Option<GenerateEvent>,
    /// Frames ready to go out, each `data: …\n\n`.
    out: VecDeque<Bytes>,
    /// `chatcmpl-…` or `cmpl-…`: the same on every chunk of the stream.
    chunk_id: String,
    created: u64,
    include_usage: bool,
    logprobs: bool,
    token_ids: bool,
    done: bool,
}

/// The SSE response: `text/event-stream`, one `data: {chunk}` frame per chunk, `data: [DONE]`
/// at the end, and a `: keep-alive` comment after `keep_alive_s` without a frame (a long
/// prefill). The frames are written straight from the chunks, which never hold a newline
/// (compact JSON).
pub fn sse(meta: Meta, req: &ValidRequest, rx: Feed, first: Option<GenerateEvent>, keep_alive_s: u64) -> Response {
    let route = meta.route;
    let mut state = State {
        created: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        chunk_id: route.response_id(&meta.id),
        include_usage: req.include_usage,
        logprobs: req.logprobs,
        token_ids: req.return_token_ids,
        meta,
        rx,
        held: first,
        out: VecDeque::new(),
        done: false,
    };
    if route == Route::Chat {
        let role = state.chunk(Delta { role: Some("assistant"), content: Some("") }, None);
        state.out.push_back(role);
    }
    let interval = Duration::from_secs(keep_alive_s.max(1));
    // The timer is set once per interval, not per frame: when it fires after recent frames, it
    // is moved to one interval after the last of them.
    let quiet = Box::pin(tokio::time::sleep(interval));
    let stream = futures_util::stream::unfold(
        (state, quiet, tokio::time::Instant::now()),
        move |(mut s, mut quiet, mut sent)| async move {
            loop {
                if let Some(frame) = s.out.pop_front() {
                    sent = tokio::time::Instant::now();
                    return Some((Ok::<_, Infallible>(frame), (s, quiet, sent)));
                }
                if s.done {
                    return None;
                }
                tokio::select! {
                    biased;
                    () = s.next() => {}
                    () = quiet.as_mut() => {
                        let due = sent + interval;
                        if tokio::time::Instant::now() >= due {
                            s.out.push_back(Bytes::from_static(b": keep-alive\n\n"));
                            quiet.as_mut().reset(tokio::time::Instant::now() + interval);
                        } else {
                            quiet.as_mut().reset(due);
                        }
                    }
                }
            }
        },
    );
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
        .into_response()
}

/// One SSE frame: `data: ` + what `write` writes + a blank line.
fn frame(write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = Vec::with_capacity(320);
    buf.extend_from_slice(b"data: ");
    write(&mut buf);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

impl State {
    /// Reads what is available and queues the chunks it makes.
    async fn next(&mut self) {
        let event = match self.held.take() {
            Some(e) => e,
            None => match self.rx.recv().await {
                Some(Ok(PoolEvent::Event(e))) => e,
                Some(Ok(PoolEvent::Started)) => return,
                Some(Err(e)) => {
                    let err = ApiError::from_pool(e, self.meta.route.prompt_param());
                    self.out.push_back(frame(|b| b.extend_from_slice(err.body().to_string().as_bytes())));
                    self.meta.finish(err.status.as_u16());
                    self.done = true;
                    return;
                }
                None => {
                    self.done = true;
                    return;
                }
            },
        };
        match event {
            GenerateEvent::Token(first) => {
                // Merge whatever else is already waiting.
                let mut tokens = vec![first];
                loop {
                    match self.rx.try_recv() {
                        Some(Ok(PoolEvent::Event(GenerateEvent::Token(t)))) => tokens.push(t),
                        Some(Ok(PoolEvent::Event(other))) => {
                            self.held = Some(other);
                            break;
                        }
                        Some(Ok(PoolEvent::Started)) => {}
                        Some(Err(e)) => {
                            self.push_tokens(tokens);
                            let err = ApiError::from_pool(e, self.meta.route.prompt_param());
                            self.out.push_back(frame(|b| b.extend_from_slice(err.body().to_string().as_bytes())));
                            self.meta.finish(err.status.as_u16());
                            self.done = true;
                            return;
                        }
                        None => break,
                    }
                }
                self.push_tokens(tokens);
            }
            GenerateEvent::Final(f) => self.push_final(f),
        }
    }

    fn push_tokens(&mut self, tokens: Vec<TokenEvent>) {
        let n: usize = tokens.iter().map(|t| t.token_ids.len()).sum();
        self.meta.on_tokens(n);
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let logprobs = if self.logprobs { openai::logprobs(self.meta.route, &tokens) } else { Value::Null };
        let ids: Option<Vec<u32>> =
            self.token_ids.then(|| tokens.iter().flat_map(|t| t.token_ids.iter().copied()).collect());
        let delta = Delta { role: None, content: Some(&text) };
        let chunk = self.chunk_with(delta, None, &logprobs, ids.as_deref());
        self.out.push_back(chunk);
    }

    fn push_final(&mut self, f: FinalEvent) {
        if !f.text.is_empty() {
            let chunk = self.chunk(Delta { role: None, content: Some(&f.text) }, None);
            self.out.push_back(chunk);
        }
        self.meta.on_final(&f);
        let chunk = self.chunk(Delta::default(), Some(openai::finish_reason(f.finish_reason)));
        self.out.push_back(chunk);
        if self.include_usage {
            let usage = self.envelope(&[], Some(openai::usage(&f.usage)));
            self.out.push_back(usage);
        }
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.meta.finish(200);
        self.done = true;
    }

    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&str>) -> Bytes {
        self.chunk_with(delta, finish_reason, &Value::Null, None)
    }

    /// One chunk with one choice, serialised straight from borrowed parts.
    fn chunk_with(
        &self,
        delta: Delta<'_>,
        finish_reason: Option<&str>,
        logprobs: &Value,
        token_ids: Option<&[u32]>,
    ) -> Bytes {
        let choice = match self.meta.route {
            Route::Chat => Choice { index: 0, delta: Some(delta), text: None, logprobs, finish_reason, token_ids },
            Route::Completions => Choice {
                index: 0,
                delta: None,
                text: Some(delta.content.unwrap_or("")),
                logprobs,
                finish_reason,
                token_ids,
            },
        };
        self.envelope(&[choice], None)
    }

    /// A chunk of this stream with `choices`; `usage` on the last one. When the client asked for
    /// usage, every other chunk carries `"usage": null`.
    fn envelope(&self, choices: &[Choice<'_>], usage: Option<Value>) -> Bytes {
        let chunk = Chunk {
            id: &self.chunk_id,
            object: self.meta.route.chunk_object(),
            created: self.created,
            model: self.meta.model(),
            choices,
            usage: self.include_usage.then_some(usage),
        };
        // Serialising our own types cannot fail.
        frame(|b| {
            let _ = serde_json::to_writer(b, &chunk);
        })
    }
}

/// A streamed chunk in OpenAI's format.
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice<'a>],
    /// `null` on every chunk when the client asked for usage (`stream_options.include_usage`),
    /// the usage on the last one; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Value>>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    /// Chat.
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta<'a>>,
    /// Completions.
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    logprobs: &'a Value,
    finish_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
}

#[derive(Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::{TokenLimits, parse};
    use http_body_util::BodyExt;
    use mlx_serving_protocol::Usage;
    use tokio::sync::mpsc;

    async fn next_frame(body: &mut Body) -> Bytes {
        body.frame().await.expect("the stream goes on").expect("no error").into_data().expect("a data frame")
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_gets_keep_alive_comments_and_the_chunks_are_sse_frames() {
        let limits = TokenLimits { default_max_tokens: 16, max_tokens: 0 };
        let body = br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}"#;
        let req = parse(Route::Chat, body, &limits, "req-1").expect("a valid request");
        let (tx, rx) = mpsc::channel(8);
        let response = sse(Meta::new(&req, "req-1", Instant::now()), &req, Feed::Direct(rx), None, 15);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = response.into_body();
        let role = next_frame(&mut body).await;
        assert!(role.starts_with(b"data: {\"id\":\"chatcmpl-req-1\"") && role.ends_with(b"}\n\n"), "{role:?}");
        // Nothing for 15 s (a long prefill): a comment keeps the connection alive, once per 15 s.
        let start = tokio::time::Instant::now();
        assert_eq!(next_frame(&mut body).await, Bytes::from_static(b": keep-alive\n\n"));
        assert_eq!(start.elapsed(), Duration::from_secs(15));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let token = TokenEvent { token_ids: vec![7], text: "a\nb".into(), logprobs: None, top_logprobs: None };
        tx.send(Ok(PoolEvent::Event(GenerateEvent::Token(token)))).await.unwrap();
        let chunk = next_frame(&mut body).await;
        let text = std::str::from_utf8(&chunk).unwrap();
        assert!(text.starts_with("data: {") && text.ends_with("}\n\n") && text.matches('\n').count() == 2, "{text:?}");
        let json: Value = serde_json::from_str(text.trim_start_matches("data: ").trim_end()).unwrap();
        assert_eq!(json["choices"][0]["delta"]["content"], "a\nb");
        // The next comment comes 15 s after the token, not after the last comment.
        let token_at = tokio::time::Instant::now();
        assert_eq!(next_frame(&mut body).await, Bytes::from_static(b": keep-alive\n\n"));
        assert_eq!(token_at.elapsed(), Duration::from_secs(15));
        let last = FinalEvent {
            finish_reason: mlx_serving_protocol::FinishReason::Length,
            text: String::new(),
            usage: Usage { prompt_tokens: 1, completion_tokens: 1, cached_tokens: 0 },
            time_to_first_token_ms: None,
            total_ms: 1.0,
            error: None,
        };
        tx.send(Ok(PoolEvent::Event(GenerateEvent::Final(last)))).await.unwrap();
        let finish = next_frame(&mut body).await;
        assert!(std::str::from_utf8(&finish).unwrap().contains("\"finish_reason\":\"length\""));
        assert_eq!(next_frame(&mut body).await, Bytes::from_static(b"data: [DONE]\n\n"));
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn tokens_that_piled_up_behind_a_slow_reader_go_out_as_one_chunk() {
        let limits = TokenLimits { default_max_tokens: 16, max_tokens: 0 };
        let body = br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                        "return_token_ids": true}"#;
        let req = parse(Route::Chat, body, &limits, "req-2").expect("a valid request");
        let (tx, rx) = mpsc::channel(8);
        let mut body = sse(Meta::new(&req, "req-2", Instant::now()), &req, Feed::Direct(rx), None, 15).into_body();
        let role = next_frame(&mut body).await;
        assert!(std::str::from_utf8(&role).unwrap().contains("\"role\":\"assistant\""));
        // Five tokens arrive while the reader reads nothing, then a sixth after it read.
        for (id, text) in [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")] {
            let token = TokenEvent { token_ids: vec![id], text: text.into(), logprobs: None, top_logprobs: None };
            tx.send(Ok(PoolEvent::Event(GenerateEvent::Token(token)))).await.unwrap();
        }
        let chunk = |frame: Bytes| -> Value {
            let text = std::str::from_utf8(&frame).unwrap().to_string();
            serde_json::from_str(text.trim_start_matches("data: ").trim_end()).unwrap()
        };
        let merged = chunk(next_frame(&mut body).await);
        assert_eq!(merged["choices"][0]["delta"]["content"], "abcde");
        assert_eq!(merged["choices"][0]["token_ids"], serde_json::json!([1, 2, 3, 4, 5]));
        let token = TokenEvent { token_ids: vec![6], text: "f".into(), logprobs: None, top_logprobs: None };
        tx.send(Ok(PoolEvent::Event(GenerateEvent::Token(token)))).await.unwrap();
        let next = chunk(next_frame(&mut body).await);
        assert_eq!(
            (&next["choices"][0]["delta"]["content"], &next["choices"][0]["token_ids"]),
            (&"f".into(), &serde_json::json!([6]))
        );
    }
}
