//! The supervisor's end of a worker's pipes: JSON-RPC 2.0 calls, `generate` subscriptions and
//! heartbeat notifications, one JSON object per line.
//!
//! It speaks the wire format of the jsonrpsee server the worker runs ([`crate::rpc`]), and is
//! built for the path every streamed token takes:
//!
//! - one reader task reads the worker's stdout and parses each line once, straight into the
//!   event it carries, which goes to its stream's channel without another task in between;
//! - a call writes its line from the calling task (the line and its newline in one write);
//! - timeouts are tokio timers, with no timer thread to wake;
//! - a stream that saw its final event is done: the worker has closed it, so nothing is sent
//!   back. A stream dropped before its final event unsubscribes, which cancels the request.
//!
//! A line that is not JSON-RPC ends the link: a peer that breaks the framing is not to be trusted
//! with the next line. So does the end of the worker's stdout. Every call waiting then fails,
//! every stream ends, and [`WorkerLink::on_disconnect`] resolves.
use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jsonrpsee::types::ErrorObjectOwned;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::HEARTBEAT_METHOD;
use crate::framing::{LineReader, write_whole_line};
use crate::types::{GenerateEvent, GenerateRequest, Handshake, Heartbeat, ModelInfo, ShutdownAck, Stats, Unloaded};

/// Method name of the `generate` subscription's notifications.
pub const GENERATE_EVENT_METHOD: &str = "generate_event";
const GENERATE_UNSUBSCRIBE_METHOD: &str = "generate_unsubscribe";
/// Heartbeats kept for a reader that is behind; more are dropped (the next one says the same).
const HEARTBEAT_BUFFER: usize = 16;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The worker answered the call with an error.
    #[error("{0}")]
    Call(ErrorObjectOwned),
    /// The link is gone: the worker's stdout ended, or it wrote a line that is not JSON-RPC.
    #[error("the worker link is closed: {0}")]
    Closed(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer or event did not have the expected shape.
    #[error("unreadable answer: {0}")]
    Parse(String),
}

/// A connection to one worker. Clones share it.
#[derive(Clone)]
pub struct WorkerLink {
    inner: Arc<Inner>,
}

struct Inner {
    writer: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
    next_id: AtomicU64,
    routes: Mutex<Routes>,
    closed: CancellationToken,
    request_timeout: Duration,
}

#[derive(Default)]
struct Routes {
    /// Calls waiting for their answer, by id.
    calls: HashMap<u64, Waiter>,
    /// Open `generate` streams, by subscription id.
    streams: HashMap<SubKey, mpsc::UnboundedSender<Result<GenerateEvent, LinkError>>>,
    heartbeats: Option<mpsc::Sender<Heartbeat>>,
    /// Why the link closed, once it has.
    closed: Option<String>,
    /// The link closed on a line that broke the protocol (or a failed read), not at the end of
    /// the worker's stdout.
    broken: bool,
}

/// Parses a call's result and hands it to the caller.
type Deliver = Box<dyn FnOnce(Result<&RawValue, LinkError>) + Send>;

enum Waiter {
    /// A method call.
    Call(Deliver),
    /// A `generate` call: its stream is routed from the moment the answer is read, before any of
    /// its events.
    Subscribe {
        answer: oneshot::Sender<Result<SubKey, LinkError>>,
        events: mpsc::UnboundedSender<Result<GenerateEvent, LinkError>>,
    },
}

impl WorkerLink {
    /// Connects to a worker's pipes and starts reading its lines (on the current tokio runtime).
    /// Every call fails with [`LinkError::Timeout`] when its answer does not come within
    /// `request_timeout`.
    pub fn new<W, R>(stdin: W, stdout: LineReader<R>, request_timeout: Duration) -> WorkerLink
    where
        W: AsyncWrite + Send + 'static,
        R: AsyncRead + Unpin + Send + 'static,
    {
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(Box::pin(stdin)),
            next_id: AtomicU64::new(1),
            routes: Mutex::new(Routes::default()),
            closed: CancellationToken::new(),
            request_timeout,
        });
        tokio::spawn(read(inner.clone(), stdout));
        WorkerLink { inner }
    }

    pub fn is_connected(&self) -> bool {
        !self.inner.closed.is_cancelled()
    }

    /// Resolves when the link closes.
    pub async fn on_disconnect(&self) {
        self.inner.closed.cancelled().await
    }

    /// Once closed on a line that broke the protocol (or a failed read), what was wrong; `None`
    /// while open and after the worker's stdout simply ended.
    pub fn broken(&self) -> Option<String> {
        let routes = self.inner.lock();
        if routes.broken { routes.closed.clone() } else { None }
    }

    /// The worker's heartbeats from now on. A later call takes them from an earlier receiver.
    pub fn heartbeats(&self) -> mpsc::Receiver<Heartbeat> {
        let (tx, rx) = mpsc::channel(HEARTBEAT_BUFFER);
        let mut routes = self.inner.lock();
        if routes.closed.is_none() {
            routes.heartbeats = Some(tx);
        }
        rx
    }

    pub async fn handshake(&self) -> Result<Handshake, LinkError> {
        self.call("handshake", &Empty {}).await
    }

    pub async fn load_model(&self, model: &str, path: &str) -> Result<ModelInfo, LinkError> {
        #[derive(Serialize)]
        struct P<'a> {
            model: &'a str,
            path: &'a str,
        }
        self.call("load_model", &P { model, path }).await
    }

    pub async fn unload_model(&self, model: &str) -> Result<Unloaded, LinkError> {
        #[derive(Serialize)]
        struct P<'a> {
            model: &'a str,
        }
        self.call("unload_model", &P { model }).await
    }

    pub async fn list_models(&self) -> Result<Vec<ModelInfo>, LinkError> {
        self.call("list_models", &Empty {}).await
    }

    pub async fn cancel(&self, id: &str) -> Result<bool, LinkError> {
        #[derive(Serialize)]
        struct P<'a> {
            id: &'a str,
        }
        self.call("cancel", &P { id }).await
    }

    pub async fn stats(&self) -> Result<Stats, LinkError> {
        self.call("stats", &Empty {}).await
    }

    pub async fn shutdown(&self, deadline_ms: u64) -> Result<ShutdownAck, LinkError> {
        #[derive(Serialize)]
        struct P {
            deadline_ms: u64,
        }
        self.call("shutdown", &P { deadline_ms }).await
    }

    /// Starts a generation. A refused request is a [`LinkError::Call`]; an admitted one is a
    /// stream of its events, which ends after the final one.
    pub async fn generate(&self, request: &GenerateRequest) -> Result<EventStream, LinkError> {
        #[derive(Serialize)]
        struct P<'a> {
            request: &'a GenerateRequest,
        }
        let (answer, answered) = oneshot::channel();
        let (events, rx) = mpsc::unbounded_channel();
        let id = self.register(Waiter::Subscribe { answer, events })?;
        let subscription = self.exchange(id, "generate", &P { request }, answered).await?;
        Ok(EventStream { rx, subscription, link: self.clone(), finished: false })
    }

    async fn call<P: Serialize, T: DeserializeOwned + Send + 'static>(
        &self,
        method: &str,
        params: &P,
    ) -> Result<T, LinkError> {
        let (answer, answered) = oneshot::channel();
        let id = self.register(Waiter::Call(Box::new(move |result| {
            let _ = answer.send(
                result.and_then(|raw| serde_json::from_str(raw.get()).map_err(|e| LinkError::Parse(e.to_string()))),
            );
        })))?;
        self.exchange(id, method, params, answered).await
    }

    fn register(&self, waiter: Waiter) -> Result<u64, LinkError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut routes = self.inner.lock();
        if let Some(reason) = &routes.closed {
            return Err(LinkError::Closed(reason.clone()));
        }
        routes.calls.insert(id, waiter);
        Ok(id)
    }

    /// Writes call `id` and waits for its answer, both within the request timeout.
    async fn exchange<P: Serialize, T>(
        &self,
        id: u64,
        method: &str,
        params: &P,
        answered: oneshot::Receiver<Result<T, LinkError>>,
    ) -> Result<T, LinkError> {
        let line = request_line(id, method, params);
        let exchange = async {
            self.write(&line).await?;
            answered.await.unwrap_or_else(|_| Err(self.closed_error()))
        };
        let result = match tokio::time::timeout(self.inner.request_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(LinkError::Timeout(self.inner.request_timeout)),
        };
        if result.is_err() {
            self.inner.lock().calls.remove(&id);
        }
        result
    }

    async fn write(&self, line: &[u8]) -> Result<(), LinkError> {
        let mut w = self.inner.writer.lock().await;
        write_whole_line(&mut *w, line).await.map_err(|e| LinkError::Closed(format!("writing to the worker: {e}")))
    }

    fn closed_error(&self) -> LinkError {
        LinkError::Closed(self.inner.lock().closed.clone().unwrap_or_else(|| "the worker went away".into()))
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the link: every waiting call fails, every stream ends.
    fn close(&self, reason: String, broken: bool) {
        let (calls, streams) = {
            let mut routes = self.lock();
            if routes.closed.is_some() {
                return;
            }
            routes.closed = Some(reason.clone());
            routes.broken = broken;
            routes.heartbeats = None;
            (std::mem::take(&mut routes.calls), std::mem::take(&mut routes.streams))
        };
        drop(streams);
        for (_, waiter) in calls {
            match waiter {
                Waiter::Call(f) => f(Err(LinkError::Closed(reason.clone()))),
                Waiter::Subscribe { answer, .. } => {
                    let _ = answer.send(Err(LinkError::Closed(reason.clone())));
                }
            }
        }
        self.closed.cancel();
    }
}

#[derive(Serialize)]
struct Empty {}

fn request_line<P: Serialize>(id: u64, method: &str, params: &P) -> Vec<u8> {
    #[derive(Serialize)]
    struct Request<'a, P> {
        jsonrpc: &'static str,
        id: u64,
        method: &'a str,
        params: &'a P,
    }
    let mut line = Vec::with_capacity(256);
    // Serialising our own types into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut line, &Request { jsonrpc: "2.0", id, method, params });
    line.push(b'\n');
    line
}

/// The events of one `generate` call. Dropping it before its final event cancels the request
/// on the worker.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Result<GenerateEvent, LinkError>>,
    subscription: SubKey,
    link: WorkerLink,
    finished: bool,
}

impl EventStream {
    /// The next event; `None` after the final one, or when the link closed before it.
    pub async fn next(&mut self) -> Option<Result<GenerateEvent, LinkError>> {
        if self.finished {
            return None;
        }
        let event = self.rx.recv().await;
        if matches!(event, Some(Ok(GenerateEvent::Final(_)))) {
            self.finished = true;
        }
        event
    }
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream")
            .field("subscription", &self.subscription)
            .field("finished", &self.finished)
            .finish()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let open = self.link.inner.lock().streams.remove(&self.subscription).is_some();
        if open {
            unsubscribe(&self.link.inner, &self.subscription);
        }
    }
}

/// Tells the worker to end a stream (which cancels its request), without waiting for the answer.
fn unsubscribe(inner: &Arc<Inner>, subscription: &SubKey) {
    if inner.closed.is_cancelled() {
        return;
    }
    let link = WorkerLink { inner: inner.clone() };
    let line =
        request_line(inner.next_id.fetch_add(1, Ordering::Relaxed), GENERATE_UNSUBSCRIBE_METHOD, &[subscription]);
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = tokio::time::timeout(link.inner.request_timeout, link.write(&line)).await;
        });
    }
}

/// Reads the worker's lines until its stdout ends or a line breaks the protocol.
async fn read<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut lines: LineReader<R>) {
    let (reason, broken) = loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                if let Err(e) = dispatch(&inner, &line) {
                    break (e, true);
                }
            }
            Ok(None) => break ("the worker's stdout ended".to_string(), false),
            Err(e) => break (format!("reading the worker's stdout: {e}"), true),
        }
    };
    inner.close(reason, broken);
}

/// Routes one line: an answer to its call, an event to its stream, a heartbeat to the watcher.
/// An error is a line that is not JSON-RPC.
fn dispatch(inner: &Arc<Inner>, line: &str) -> Result<(), String> {
    let message = match serde_json::from_str::<Message>(line) {
        Ok(m) => m,
        // An event that is not a `GenerateEvent`, or an ordering the fast path does not read.
        Err(_) => slow_path(line)?,
    };
    match message {
        Message::Event { subscription, event } => {
            let mut routes = inner.lock();
            let last = matches!(event, Ok(GenerateEvent::Final(_)));
            let delivered = routes.streams.get(&subscription).is_some_and(|tx| tx.send(event).is_ok());
            // The worker closes a stream after its final event; so does the link. (A stream
            // dropped after an unreadable event unsubscribes.)
            if last || !delivered {
                routes.streams.remove(&subscription);
            }
        }
        Message::Heartbeat(hb) => {
            if let Some(tx) = &inner.lock().heartbeats {
                let _ = tx.try_send(hb);
            }
        }
        Message::Answer { id, result } => {
            let waiter = inner.lock().calls.remove(&id);
            match waiter {
                Some(Waiter::Call(f)) => f(result),
                Some(Waiter::Subscribe { answer, events }) => {
                    let subscription = result.and_then(|raw| {
                        serde_json::from_str::<SubKey>(raw.get())
                            .map_err(|e| LinkError::Parse(format!("subscription id: {e}")))
                    });
                    if let Ok(s) = &subscription {
                        inner.lock().streams.insert(s.clone(), events);
                    }
                    // A caller that gave up (timed out) leaves a generation nobody reads.
                    if let Err(Ok(s)) = answer.send(subscription) {
                        inner.lock().streams.remove(&s);
                        unsubscribe(inner, &s);
                    }
                }
                // An answer to a call that timed out, or to an unsubscribe nobody waits for.
                None => {}
            }
        }
        Message::Other => {}
    }
    Ok(())
}

/// One line from the worker, as the link uses it.
enum Message<'a> {
    Event {
        subscription: SubKey,
        event: Result<GenerateEvent, LinkError>,
    },
    Heartbeat(Heartbeat),
    Answer {
        id: u64,
        result: Result<&'a RawValue, LinkError>,
    },
    /// A notification the link does not know: skipped.
    Other,
}

/// The fast path: `{"jsonrpc":"2.0","method":M,"params":P}` with the method before its
/// parameters (as jsonrpsee and the heartbeat task write it), parsed in one pass into the event.
/// Anything else fails here and goes to [`slow_path`].
impl<'de: 'a, 'a> Deserialize<'de> for Message<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON-RPC notification")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // Keys and the method are matched as they are read, never kept.
                let mut method = None;
                let mut message = None;
                while let Some(key) = map.next_key::<Field>()? {
                    match key {
                        Field::Method => method = Some(map.next_value::<Method>()?),
                        Field::Params => {
                            message = Some(match method {
                                Some(Method::GenerateEvent) => {
                                    let p: EventParams = map.next_value()?;
                                    Message::Event { subscription: p.subscription, event: Ok(p.result) }
                                }
                                Some(Method::Heartbeat) => Message::Heartbeat(map.next_value()?),
                                Some(Method::Other) => {
                                    map.next_value::<IgnoredAny>()?;
                                    Message::Other
                                }
                                None => return Err(de::Error::custom("params before method")),
                            })
                        }
                        Field::Jsonrpc => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                message.ok_or_else(|| de::Error::custom("no params"))
            }
        }
        d.deserialize_map(V)
    }
}

/// The keys of a notification; any other key (an answer's `id`) fails the fast path.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Jsonrpc,
    Method,
    Params,
}

/// A notification's method, as far as the link tells them apart.
enum Method {
    GenerateEvent,
    Heartbeat,
    Other,
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Method;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a method name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Method, E> {
                Ok(match v {
                    GENERATE_EVENT_METHOD => Method::GenerateEvent,
                    HEARTBEAT_METHOD => Method::Heartbeat,
                    _ => Method::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Deserialize)]
struct EventParams {
    subscription: SubKey,
    result: GenerateEvent,
}

/// Any JSON-RPC message, fields in any order.
#[derive(Deserialize)]
struct Envelope<'a> {
    jsonrpc: Option<&'a str>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    error: Option<ErrorObjectOwned>,
}

#[derive(Deserialize)]
struct RawEventParams<'a> {
    subscription: SubKey,
    #[serde(borrow)]
    result: &'a RawValue,
}

fn slow_path(line: &str) -> Result<Message<'_>, String> {
    let e: Envelope = serde_json::from_str(line).map_err(|e| format!("a line that is not JSON-RPC ({e})"))?;
    if e.jsonrpc != Some("2.0") {
        return Err("a line without \"jsonrpc\": \"2.0\"".into());
    }
    if let Some(method) = e.method {
        return Ok(match method.as_ref() {
            GENERATE_EVENT_METHOD => {
                let params = e.params.ok_or("a generate_event without params")?;
                let p: RawEventParams =
                    serde_json::from_str(params.get()).map_err(|e| format!("generate_event params: {e}"))?;
                let event = serde_json::from_str(p.result.get()).map_err(|e| LinkError::Parse(format!("event: {e}")));
                Message::Event { subscription: p.subscription, event }
            }
            HEARTBEAT_METHOD => match e.params.map(|p| serde_json::from_str(p.get())) {
                Some(Ok(hb)) => Message::Heartbeat(hb),
                // A heartbeat that does not read is not one: its deadline runs on.
                _ => Message::Other,
            },
            _ => Message::Other,
        });
    }
    let id = e.id.as_ref().and_then(serde_json::Value::as_u64).ok_or("an answer without a numeric id")?;
    let result = match (e.result, e.error) {
        (Some(r), None) => Ok(r),
        (None, Some(err)) => Err(LinkError::Call(err)),
        _ => return Err(format!("answer {id} has neither or both of result and error")),
    };
    Ok(Message::Answer { id, result })
}

/// A subscription id as the worker wrote it: a number or a string, given back as it came (an
/// unsubscribe with the number as a string would not find it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SubKey {
    Num(u64),
    Str(String),
}

impl Serialize for SubKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SubKey::Num(n) => s.serialize_u64(*n),
            SubKey::Str(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for SubKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SubKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a subscription id (string or number)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SubKey, E> {
                Ok(SubKey::Str(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SubKey, E> {
                Ok(SubKey::Num(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::write_line;
    use crate::types::{FinishReason, TokenEvent};
    use serde_json::{Value, json};
    use tokio::io::DuplexStream;

    /// The worker's side of a link: what the link wrote, and a pipe to answer on.
    struct Peer {
        input: LineReader<DuplexStream>,
        output: DuplexStream,
    }

    impl Peer {
        async fn next(&mut self) -> Value {
            let line = self.input.next_line().await.expect("readable").expect("a line");
            serde_json::from_str(&line).expect("the link writes JSON")
        }

        async fn send(&mut self, v: Value) {
            write_line(&mut self.output, &v.to_string()).await.expect("the link reads");
        }

        async fn event(&mut self, subscription: impl Serialize, event: &GenerateEvent) {
            self.send(json!({"jsonrpc": "2.0", "method": "generate_event", "params": {"subscription": subscription, "result": event}}))
                .await;
        }
    }

    fn link(timeout: Duration) -> (WorkerLink, Peer) {
        let (to_worker, worker_in) = tokio::io::duplex(64 * 1024);
        let (output, from_worker) = tokio::io::duplex(64 * 1024);
        let link = WorkerLink::new(to_worker, LineReader::new(from_worker, 4096), timeout);
        (link, Peer { input: LineReader::new(worker_in, 1 << 20), output })
    }

    fn token(id: u32) -> GenerateEvent {
        GenerateEvent::Token(TokenEvent {
            token_ids: vec![id],
            text: format!("t{id}"),
            logprobs: None,
            top_logprobs: None,
        })
    }

    fn last() -> GenerateEvent {
        serde_json::from_value(json!({"type": "final", "finish_reason": "length", "text": "",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "total_ms": 1.0}))
        .expect("a final event")
    }

    fn request() -> GenerateRequest {
        GenerateRequest::new("r1", "m", crate::types::Prompt::Text("hi".into()), 2)
    }

    #[tokio::test]
    async fn calls_get_their_answers_and_errors_by_id() {
        let (link, mut peer) = link(Duration::from_secs(5));
        let worker = tokio::spawn(async move {
            let a = peer.next().await;
            let b = peer.next().await;
            assert_eq!(a["method"], "cancel");
            assert_eq!(a["params"], json!({"id": "x"}));
            assert_eq!(b["method"], "unload_model");
            // Answered out of order.
            peer.send(json!({"jsonrpc": "2.0", "id": b["id"], "error": {"code": -32004, "message": "model `m` is not loaded"}})).await;
            peer.send(json!({"jsonrpc": "2.0", "id": a["id"], "result": true})).await;
            peer
        });
        let (cancelled, unloaded) = tokio::join!(link.cancel("x"), link.unload_model("m"));
        assert!(cancelled.expect("answered"));
        match unloaded {
            Err(LinkError::Call(e)) => {
                assert_eq!(e.code(), -32004);
                assert_eq!(e.message(), "model `m` is not loaded");
            }
            other => panic!("expected the worker's error, got {other:?}"),
        }
        let _peer = worker.await.unwrap();
        assert!(link.is_connected());
    }

    #[tokio::test]
    async fn a_stream_gets_its_events_and_ends_after_the_final_one_without_unsubscribing() {
        let (link, mut peer) = link(Duration::from_secs(5));
        let worker = tokio::spawn(async move {
            let call = peer.next().await;
            assert_eq!(call["method"], "generate");
            assert_eq!(call["params"]["request"]["id"], "r1");
            peer.send(json!({"jsonrpc": "2.0", "id": call["id"], "result": "s-1"})).await;
            for i in 0..3 {
                peer.event("s-1", &token(i)).await;
            }
            // Events of another stream are not this one's.
            peer.event("s-2", &token(99)).await;
            peer.event("s-1", &last()).await;
            peer
        });
        let mut stream = link.generate(&request()).await.expect("subscribed");
        for i in 0..3 {
            assert_eq!(stream.next().await.unwrap().unwrap(), token(i));
        }
        assert!(
            matches!(stream.next().await, Some(Ok(GenerateEvent::Final(f))) if f.finish_reason == FinishReason::Length)
        );
        assert!(stream.next().await.is_none());
        drop(stream);
        let mut peer = worker.await.unwrap();
        // Nothing was written after the final event: the next line is the next call.
        let next = tokio::spawn(async move { peer.next().await });
        let _ = tokio::time::timeout(Duration::from_millis(200), link.stats()).await;
        assert_eq!(next.await.unwrap()["method"], "stats");
    }

    #[tokio::test]
    async fn dropping_a_stream_before_its_end_unsubscribes_it() {
        let (link, mut peer) = link(Duration::from_secs(5));
        let worker = tokio::spawn(async move {
            let call = peer.next().await;
            peer.send(json!({"jsonrpc": "2.0", "id": call["id"], "result": 7})).await;
            peer.event(7, &token(1)).await;
            peer.next().await
        });
        let mut stream = link.generate(&request()).await.expect("subscribed");
        assert_eq!(stream.next().await.unwrap().unwrap(), token(1));
        drop(stream);
        let unsubscribe = worker.await.unwrap();
        assert_eq!(unsubscribe["method"], "generate_unsubscribe");
        // The id goes back as it came: a number.
        assert_eq!(unsubscribe["params"], json!([7]));
    }

    #[tokio::test]
    async fn an_unreadable_event_is_an_error_on_its_stream_only() {
        let (link, mut peer) = link(Duration::from_secs(5));
        let worker = tokio::spawn(async move {
            let call = peer.next().await;
            peer.send(json!({"jsonrpc": "2.0", "id": call["id"], "result": "a"})).await;
            peer.send(json!({"jsonrpc": "2.0", "method": "generate_event", "params": {"subscription": "a", "result": {"type": "token"}}}))
                .await;
            peer
        });
        let mut stream = link.generate(&request()).await.expect("subscribed");
        assert!(matches!(stream.next().await, Some(Err(LinkError::Parse(_)))));
        let _peer = worker.await.unwrap();
        assert!(link.is_connected());
    }

    #[tokio::test]
    async fn heartbeats_reach_the_watcher() {
        let (link, mut peer) = link(Duration::from_secs(5));
        let mut beats = link.heartbeats();
        let hb = json!({"seq": 4, "uptime_ms": 10, "active_sequences": 1, "queue_depth": 0, "draining": false, "models": [],
            "progress": {"prefilled_tokens": 3, "decoded_tokens": 5, "steps": 9},
            "memory": {"active": 1, "peak": 2, "cache": 3, "rss": 4}});
        peer.send(json!({"jsonrpc": "2.0", "method": "heartbeat", "params": hb})).await;
        let got = beats.recv().await.expect("a heartbeat");
        assert_eq!((got.seq, got.progress.steps, got.memory.rss), (4, 9, 4));
    }

    #[tokio::test]
    async fn a_line_that_is_not_json_rpc_breaks_the_link_and_everything_waiting_on_it() {
        let (link, mut peer) = link(Duration::from_secs(5));
        let worker = tokio::spawn(async move {
            let call = peer.next().await;
            peer.send(json!({"jsonrpc": "2.0", "id": call["id"], "result": "s"})).await;
            peer.event("s", &token(1)).await;
            let _stats = peer.next().await;
            write_line(&mut peer.output, "this is not JSON").await.unwrap();
            peer
        });
        let mut stream = link.generate(&request()).await.expect("subscribed");
        assert_eq!(stream.next().await.unwrap().unwrap(), token(1));
        assert!(matches!(link.stats().await, Err(LinkError::Closed(_))));
        assert!(stream.next().await.is_none());
        link.on_disconnect().await;
        assert!(!link.is_connected());
        let broken = link.broken().expect("closed on a bad line");
        assert!(broken.contains("not JSON-RPC"), "{broken}");
        assert!(matches!(link.handshake().await, Err(LinkError::Closed(_))));
        drop(worker);
    }

    #[tokio::test]
    async fn the_end_of_stdout_closes_the_link_without_blame_and_a_silent_worker_times_out() {
        let (link, peer) = link(Duration::from_millis(100));
        assert!(matches!(link.stats().await, Err(LinkError::Timeout(_))));
        drop(peer);
        link.on_disconnect().await;
        assert!(link.broken().is_none());
        assert!(matches!(link.stats().await, Err(LinkError::Closed(_))));
    }
}
