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
use serde_json::{Value, json};

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
    finished: bool,
}

impl Meta {
    pub fn new(req: &ValidRequest, id: &str, arrived: Instant) -> Meta {
        Meta { id: id.to_string(), route: req.route, model: req.model.clone(), arrived, last_token: None, finished: false }
    }

    pub fn on_tokens(&mut self, n: usize) {
        let now = Instant::now();
        match self.last_token {
            None => crate::metrics::time_to_first_token(&self.model, now.duration_since(self.arrived).as_secs_f64()),
            Some(t) if n > 0 => {
                let gap = now.duration_since(t).as_secs_f64() / n as f64;
                for _ in 0..n {
                    crate::metrics::inter_token(&self.model, gap);
                }
            }
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
        let role = state.chunk(json!({"role": "assistant", "content": ""}), None, Value::Null);
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
        let mut chunk = self.chunk_value(json!({"content": text}), None, logprobs);
        if self.token_ids {
            chunk["choices"][0]["token_ids"] = json!(tokens.iter().flat_map(|t| t.token_ids.iter()).collect::<Vec<_>>());
        }
        self.out.push_back(Event::default().data(chunk.to_string()));
    }

    fn push_final(&mut self, f: FinalEvent) {
        if !f.text.is_empty() {
            let chunk = self.chunk(json!({"content": f.text}), None, Value::Null);
            self.out.push_back(chunk);
        }
        self.meta.on_final(&f);
        let chunk = self.chunk(json!({}), Some(openai::finish_reason(f.finish_reason)), Value::Null);
        self.out.push_back(chunk);
        if self.include_usage {
            let mut usage = self.base();
            usage["choices"] = json!([]);
            usage["usage"] = openai::usage(&f.usage);
            self.out.push_back(Event::default().data(usage.to_string()));
        }
        self.out.push_back(Event::default().data("[DONE]"));
        self.meta.finish(200);
        self.done = true;
    }

    fn base(&self) -> Value {
        let (id, object) = match self.meta.route {
            Route::Chat => (format!("chatcmpl-{}", self.meta.id), "chat.completion.chunk"),
            Route::Completions => (format!("cmpl-{}", self.meta.id), "text_completion"),
        };
        json!({"id": id, "object": object, "created": self.created, "model": self.meta.model})
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>, logprobs: Value) -> Event {
        Event::default().data(self.chunk_value(delta, finish_reason, logprobs).to_string())
    }

    fn chunk_value(&self, delta: Value, finish_reason: Option<&str>, logprobs: Value) -> Value {
        let mut c = self.base();
        let choice = match self.meta.route {
            Route::Chat => json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}),
            Route::Completions => json!({
                "index": 0,
                "text": delta.get("content").cloned().unwrap_or(json!("")),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        c["choices"] = json!([choice]);
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }
}
