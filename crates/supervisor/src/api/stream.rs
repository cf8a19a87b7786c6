//! SSE streaming in the OpenAI chunk format, and the per-request metrics both answers share.
//!
//! The stream reads its feed (the pool's bounded channel, or a shared generation). When the
//! reader falls behind, the tokens that piled up are merged into one chunk, so a slow reader
//! costs one chunk per read, never a blocked worker. A client that goes away drops the stream,
//! which drops the feed, which cancels the request on its worker (a shared generation: once no
//! request reads it any more).
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use mlx_serving_protocol::{FinalEvent, GenerateEvent, TokenEvent};
use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::openai::{self, Route, ValidRequest};
use super::shared::Feed;
use crate::pool::PoolEvent;

/// What a request records for metrics as it goes.
pub struct Meta {
    pub id: String,
    route: Route,
    model: String,
    arrived: Instant,
    last_token: Option<Instant>,
    latency: Option<crate::metrics::TokenLatency>,
    finished: bool,
}

impl Meta {
    pub fn new(req: &ValidRequest, id: &str, arrived: Instant) -> Meta {
        Meta { id: id.to_string(), route: req.route, model: req.model.clone(), arrived, last_token: None, latency: None, finished: false }
    }

    pub fn on_tokens(&mut self, n: usize) {
        let now = Instant::now();
        let latency = self.latency.get_or_insert_with(|| crate::metrics::TokenLatency::new(&self.model));
        match self.last_token {
            None => latency.first_token(now.duration_since(self.arrived).as_secs_f64()),
            Some(t) if n > 0 => latency.gaps(now.duration_since(t).as_secs_f64() / n as f64, n),
            Some(_) => {}
        }
        self.last_token = Some(now);
    }

    pub fn on_final(&mut self, f: &FinalEvent) {
        crate::metrics::tokens(&self.model, f.usage.prompt_tokens, f.usage.completion_tokens);
    }

    pub fn finish(&mut self, status: u16) {
        self.finished = true;
        crate::metrics::request_done(self.route.name(), &self.model, status);
        crate::metrics::request_seconds(self.route.name(), &self.model, self.arrived.elapsed().as_secs_f64());
    }
}

impl Drop for Meta {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away before the end: the request is cancelled.
            crate::metrics::cancelled(&self.model);
            crate::metrics::request_done(self.route.name(), &self.model, 499);
        }
    }
}

struct State {
    meta: Meta,
    rx: Feed,
    /// An event read ahead while merging tokens.
    held: Option<GenerateEvent>,
    out: VecDeque<Event>,
    /// `chatcmpl-…` or `cmpl-…`: the same on every chunk of the stream.
    chunk_id: String,
    created: u64,
    include_usage: bool,
    logprobs: bool,
    token_ids: bool,
    done: bool,
}

pub fn sse(
    meta: Meta,
    req: &ValidRequest,
    rx: Feed,
    first: Option<GenerateEvent>,
    keep_alive_s: u64,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
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
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok(e), s));
            }
            if s.done {
                return None;
            }
            s.next().await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(keep_alive_s.max(1))).text("keep-alive"))
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
                    self.out.push_back(Event::default().data(err.body().to_string()));
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
                            self.out.push_back(Event::default().data(err.body().to_string()));
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
        let ids: Option<Vec<u32>> = self.token_ids.then(|| tokens.iter().flat_map(|t| t.token_ids.iter().copied()).collect());
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
        self.out.push_back(Event::default().data("[DONE]"));
        self.meta.finish(200);
        self.done = true;
    }

    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&str>) -> Event {
        self.chunk_with(delta, finish_reason, &Value::Null, None)
    }

    /// One chunk with one choice, serialised straight from borrowed parts.
    fn chunk_with(&self, delta: Delta<'_>, finish_reason: Option<&str>, logprobs: &Value, token_ids: Option<&[u32]>) -> Event {
        let choice = match self.meta.route {
            Route::Chat => Choice { index: 0, delta: Some(delta), text: None, logprobs, finish_reason, token_ids },
            Route::Completions => {
                Choice { index: 0, delta: None, text: Some(delta.content.unwrap_or("")), logprobs, finish_reason, token_ids }
            }
        };
        self.envelope(&[choice], None)
    }

    /// A chunk of this stream with `choices`; `usage` on the last one. When the client asked for
    /// usage, every other chunk carries `"usage": null`.
    fn envelope(&self, choices: &[Choice<'_>], usage: Option<Value>) -> Event {
        let chunk = Chunk {
            id: &self.chunk_id,
            object: self.meta.route.chunk_object(),
            created: self.created,
            model: &self.meta.model,
            choices,
            usage: self.include_usage.then_some(usage),
        };
        Event::default().data(serde_json::to_string(&chunk).unwrap_or_default())
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
