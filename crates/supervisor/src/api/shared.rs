//! Generations shared by identical deterministic requests, and what a response reads its events
//! from.
//!
//! A deterministic request (greedy, or sampled with an explicit seed) produces the same output
//! whenever the model, the prompt and every parameter are the same, so identical ones that
//! arrive while one of them runs share its generation ([`Hub::generate`]): one pool request
//! whose events are kept in a [`Generation`], which every subscriber reads from the start at its
//! own pace. A subscriber that goes away leaves the others be; the pool request is dropped
//! (which cancels it on its worker) only when the last one leaves before the end. A complete
//! generation may then answer later requests from the response cache.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use mlx_serving_protocol::{FinishReason, GenerateEvent, GenerateRequest};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::cache::ResponseCache;
use crate::pool::{Pool, PoolEvent, Priority, Sink, StreamItem};

/// The key of a deterministic request: the worker request without its id, which holds every
/// field that can change the output. `None` for a request sampled without a seed.
pub fn key(request: &GenerateRequest) -> Option<String> {
    if request.sampling.temperature > 0.0 && request.sampling.seed.is_none() {
        return None;
    }
    let mut r = request.clone();
    r.id.clear();
    serde_json::to_string(&r).ok()
}

/// The events of one pool request, kept for every subscriber.
pub struct Generation {
    state: Mutex<State>,
    /// Woken when an event is added or the generation ends.
    grown: Notify,
    /// Cancelled when the last subscriber leaves before the end.
    cancel: CancellationToken,
    /// The priority the pool request was made with.
    priority: Priority,
}

struct State {
    events: Vec<StreamItem>,
    /// About how many bytes the events take.
    bytes: usize,
    done: bool,
    /// Subscribers reading it live.
    subscribers: usize,
    /// The last subscriber left before the end: nobody may join.
    abandoned: bool,
}

impl Generation {
    fn new(priority: Priority) -> Generation {
        Generation {
            state: Mutex::new(State { events: Vec::new(), bytes: 0, done: false, subscribers: 1, abandoned: false }),
            grown: Notify::new(),
            cancel: CancellationToken::new(),
            priority,
        }
    }

    /// A generation that has ended with these events.
    #[cfg(test)]
    pub(crate) fn complete(events: Vec<StreamItem>) -> Arc<Generation> {
        let g = Generation::new(Priority::Default);
        {
            let mut s = g.lock();
            s.bytes = events.iter().map(item_bytes).sum();
            s.events = events;
            s.done = true;
            s.subscribers = 0;
        }
        Arc::new(g)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a live subscriber, unless the generation was abandoned.
    fn join(&self) -> bool {
        let mut s = self.lock();
        if s.abandoned {
            return false;
        }
        s.subscribers += 1;
        true
    }

    fn push(&self, item: StreamItem) {
        let mut s = self.lock();
        s.bytes += item_bytes(&item);
        s.events.push(item);
        drop(s);
        self.grown.notify_waiters();
    }

    /// Adds the last event, if any, and marks the end. When the generation completed (a final
    /// event with finish_reason `stop` or `length`), `store` gets its size in bytes before any
    /// subscriber can see the end, so a twin that arrives once a subscriber has it finds it
    /// stored. Returns whether it completed.
    fn end(&self, last: Option<StreamItem>, store: impl FnOnce(usize)) -> bool {
        let mut s = self.lock();
        if let Some(item) = last {
            s.bytes += item_bytes(&item);
            s.events.push(item);
        }
        s.done = true;
        let complete = matches!(
            s.events.last(),
            Some(Ok(PoolEvent::Event(GenerateEvent::Final(f)))) if matches!(f.finish_reason, FinishReason::Stop | FinishReason::Length)
        );
        if complete {
            store(s.bytes);
        }
        drop(s);
        self.grown.notify_waiters();
        complete
    }

    /// About how many bytes the events take in memory.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

fn item_bytes(item: &StreamItem) -> usize {
    const EVENT: usize = 64;
    match item {
        Ok(PoolEvent::Started) => EVENT,
        Ok(PoolEvent::Event(GenerateEvent::Token(t))) => {
            let top: usize = t.top_logprobs.iter().flatten().flatten().map(|a| a.text.len() + 32).sum();
            EVENT + t.text.len() + 4 * t.token_ids.len() + 4 * t.logprobs.as_ref().map_or(0, Vec::len) + top
        }
        Ok(PoolEvent::Event(GenerateEvent::Final(f))) => {
            2 * EVENT + f.text.len() + f.error.as_ref().map_or(0, |e| e.message.len())
        }
        Err(e) => EVENT + e.to_string().len(),
    }
}

/// What a response reads its events from.
pub enum Feed {
    /// The pool's stream of a request of its own.
    Direct(mpsc::Receiver<StreamItem>),
    /// A generation shared with identical requests, or a complete one from the cache.
    Shared(Subscriber),
}

impl Feed {
    /// The next event; `None` when the stream ended without a final event or error.
    pub async fn recv(&mut self) -> Option<StreamItem> {
        match self {
            Feed::Direct(rx) => rx.recv().await,
            Feed::Shared(s) => s.recv().await,
        }
    }

    /// The next event if one is there now.
    pub fn try_recv(&mut self) -> Option<StreamItem> {
        match self {
            Feed::Direct(rx) => rx.try_recv().ok(),
            Feed::Shared(s) => match s.next() {
                Next::Item(item) => Some(item),
                Next::Wait | Next::End => None,
            },
        }
    }
}

/// One reader of a [`Generation`], from its first event.
pub struct Subscriber {
    generation: Arc<Generation>,
    next: usize,
    /// Counted among the generation's live subscribers (not a replay from the cache).
    live: bool,
}

enum Next {
    Item(StreamItem),
    Wait,
    End,
}

impl Subscriber {
    fn live(generation: Arc<Generation>) -> Subscriber {
        Subscriber { generation, next: 0, live: true }
    }

    /// A reader of a complete generation.
    pub fn replay(generation: Arc<Generation>) -> Subscriber {
        Subscriber { generation, next: 0, live: false }
    }

    fn next(&mut self) -> Next {
        let s = self.generation.lock();
        match s.events.get(self.next) {
            Some(item) => {
                self.next += 1;
                Next::Item(item.clone())
            }
            None if s.done => Next::End,
            None => Next::Wait,
        }
    }

    /// The next event, waiting for it; `None` at the end.
    pub async fn recv(&mut self) -> Option<StreamItem> {
        loop {
            // Registered before looking, so an event added in between still wakes it.
            let generation = self.generation.clone();
            let grown = generation.grown.notified();
            tokio::pin!(grown);
            grown.as_mut().enable();
            match self.next() {
                Next::Item(item) => return Some(item),
                Next::End => return None,
                Next::Wait => grown.await,
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        let mut s = self.generation.lock();
        s.subscribers -= 1;
        if s.subscribers == 0 && !s.done {
            s.abandoned = true;
            drop(s);
            self.generation.cancel.cancel();
        }
    }
}

/// Starts requests on the pool, sharing generations between identical deterministic requests
/// (with `http.coalesce`) and answering from the response cache (with
/// `http.response_cache.enabled`).
pub struct Hub {
    pool: Arc<Pool>,
    coalesce: bool,
    cache: Option<ResponseCache>,
    /// Shared generations that have not ended, by key.
    running: Mutex<HashMap<String, Arc<Generation>>>,
    /// Requests that joined a running generation, since start.
    coalesced: AtomicU64,
}

/// Where a response's events come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A request of its own on the pool.
    Pool,
    /// An identical generation that was already running.
    Joined,
    /// The response cache.
    Cache,
}

impl Hub {
    pub fn new(pool: Arc<Pool>, coalesce: bool, cache: Option<ResponseCache>) -> Hub {
        Hub { pool, coalesce, cache, running: Mutex::new(HashMap::new()), coalesced: AtomicU64::new(0) }
    }

    /// Whether responses say whether they came from the cache.
    pub fn caching(&self) -> bool {
        self.cache.is_some()
    }

    pub fn cache(&self) -> Option<&ResponseCache> {
        self.cache.as_ref()
    }

    /// Requests that joined a generation already running, since start.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Relaxed)
    }

    /// Starts a request (or joins an identical one, or replays a cached answer). Dropping the
    /// feed cancels the request on its worker, unless other requests share it.
    pub fn generate(self: &Arc<Self>, request: GenerateRequest, priority: Priority) -> (Feed, Source) {
        let key = if self.coalesce || self.cache.is_some() { key(&request) } else { None };
        let Some(key) = key else {
            return (Feed::Direct(self.pool.generate_with(request, priority)), Source::Pool);
        };
        if let Some(cache) = &self.cache {
            let hit = cache.get(&key);
            crate::metrics::cache_lookup(hit.is_some());
            if let Some(generation) = hit {
                return (Feed::Shared(Subscriber::replay(generation)), Source::Cache);
            }
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        // A more urgent request does not wait behind a less urgent twin.
        if self.coalesce
            && let Some(generation) = running.get(&key)
            && generation.priority <= priority
            && generation.join()
        {
            let generation = generation.clone();
            drop(running);
            self.coalesced.fetch_add(1, Relaxed);
            crate::metrics::coalesced();
            return (Feed::Shared(Subscriber::live(generation)), Source::Joined);
        }
        let generation = Arc::new(Generation::new(priority));
        if self.coalesce {
            running.insert(key.clone(), generation.clone());
        }
        drop(running);
        let sink = GenerationSink { hub: self.clone(), key, generation: generation.clone(), ended: false };
        self.pool.generate_into(request, priority, sink);
        (Feed::Shared(Subscriber::live(generation)), Source::Pool)
    }
}

/// Moves the pool's events into a shared generation until the end, or until every subscriber
/// left (the pool then drops the request, which cancels it on its worker).
struct GenerationSink {
    hub: Arc<Hub>,
    key: String,
    generation: Arc<Generation>,
    ended: bool,
}

impl GenerationSink {
    /// Marks the generation's end, stores a complete one in the cache (before it leaves the
    /// running ones, so a twin arriving now finds it) and takes it off the running ones.
    fn end(&mut self, last: Option<StreamItem>) {
        self.ended = true;
        let (hub, key, generation) = (&self.hub, &self.key, &self.generation);
        generation.end(last, |bytes| {
            if let Some(cache) = &hub.cache {
                cache.insert(key.clone(), generation.clone(), bytes);
            }
        });
        let mut running = hub.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.get(key).is_some_and(|g| Arc::ptr_eq(g, generation)) {
            running.remove(key);
        }
    }
}

impl Sink for GenerationSink {
    async fn deliver(&mut self, item: StreamItem) -> bool {
        if self.ended || self.generation.cancel.is_cancelled() {
            return false;
        }
        if matches!(item, Err(_) | Ok(PoolEvent::Event(GenerateEvent::Final(_)))) {
            self.end(Some(item));
        } else {
            self.generation.push(item);
        }
        true
    }
}

impl Drop for GenerationSink {
    fn drop(&mut self) {
        if !self.ended {
            self.end(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_serving_protocol::{FinalEvent, Prompt, TokenEvent, Usage};

    fn token(id: u32) -> StreamItem {
        Ok(PoolEvent::Event(GenerateEvent::Token(TokenEvent {
            token_ids: vec![id],
            text: format!("t{id}"),
            logprobs: None,
            top_logprobs: None,
        })))
    }

    fn final_event(reason: FinishReason) -> StreamItem {
        Ok(PoolEvent::Event(GenerateEvent::Final(FinalEvent {
            finish_reason: reason,
            text: String::new(),
            usage: Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 0 },
            time_to_first_token_ms: None,
            total_ms: 1.0,
            error: None,
        })))
    }

    #[test]
    fn only_deterministic_requests_have_a_key_and_every_parameter_is_in_it() {
        let base = GenerateRequest::new("a", "m", Prompt::Text("hello".into()), 8);
        let k = key(&base).expect("greedy is deterministic");
        // The id is not part of it.
        assert_eq!(key(&GenerateRequest { id: "b".into(), ..base.clone() }), Some(k.clone()));
        let mut sampled = base.clone();
        sampled.sampling.temperature = 0.7;
        assert_eq!(key(&sampled), None, "sampled without a seed");
        sampled.sampling.seed = Some(5);
        let seeded = key(&sampled).expect("a seed makes it deterministic");
        assert_ne!(seeded, k);
        let mut other_seed = sampled.clone();
        other_seed.sampling.seed = Some(6);
        assert_ne!(key(&other_seed), Some(seeded));
        let variants: Vec<GenerateRequest> = vec![
            GenerateRequest { model: "m2".into(), ..base.clone() },
            GenerateRequest { prompt: Prompt::Text("hello!".into()), ..base.clone() },
            GenerateRequest { max_tokens: 9, ..base.clone() },
            GenerateRequest { stop: vec!["x".into()], ..base.clone() },
            GenerateRequest { stop_token_ids: vec![3], ..base.clone() },
            GenerateRequest { ignore_eos: true, ..base.clone() },
            GenerateRequest { logprobs: true, ..base.clone() },
            GenerateRequest { top_logprobs: 2, ..base.clone() },
            {
                let mut r = base.clone();
                r.sampling.repetition_penalty = 1.1;
                r
            },
            {
                let mut r = base.clone();
                r.sampling.top_k = 5;
                r
            },
        ];
        for v in variants {
            assert_ne!(key(&v), Some(k.clone()), "{v:?}");
        }
    }

    #[tokio::test]
    async fn subscribers_replay_from_the_start_then_follow_live() {
        let generation = Arc::new(Generation::new(Priority::Default));
        let mut first = Subscriber::live(generation.clone());
        generation.push(Ok(PoolEvent::Started));
        generation.push(token(1));
        assert!(matches!(first.recv().await, Some(Ok(PoolEvent::Started))));
        assert!(generation.join());
        let mut late = Subscriber::live(generation.clone());
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = late.recv().await {
                got.push(item);
            }
            got
        });
        generation.push(token(2));
        assert!(generation.end(Some(final_event(FinishReason::Length)), |_| {}));
        let got = waiting.await.unwrap();
        assert_eq!(got, vec![Ok(PoolEvent::Started), token(1), token(2), final_event(FinishReason::Length)]);
        assert_eq!(first.recv().await, Some(token(1)));
        let mut feed = Feed::Shared(first);
        assert_eq!(feed.try_recv(), Some(token(2)));
        assert_eq!(feed.try_recv(), Some(final_event(FinishReason::Length)));
        assert_eq!(feed.try_recv(), None);
        assert_eq!(feed.recv().await, None);
    }

    #[test]
    fn the_generation_is_cancelled_only_when_the_last_subscriber_leaves() {
        let generation = Arc::new(Generation::new(Priority::Default));
        let a = Subscriber::live(generation.clone());
        assert!(generation.join());
        let b = Subscriber::live(generation.clone());
        let replay = Subscriber::replay(generation.clone());
        drop(a);
        drop(replay);
        assert!(!generation.cancel.is_cancelled());
        drop(b);
        assert!(generation.cancel.is_cancelled());
        assert!(!generation.join(), "nobody joins an abandoned generation");
    }

    #[test]
    fn only_stop_and_length_complete_a_generation() {
        for (reason, complete) in [
            (FinishReason::Stop, true),
            (FinishReason::Length, true),
            (FinishReason::Cancelled, false),
            (FinishReason::Error, false),
        ] {
            let g = Generation::new(Priority::Default);
            g.push(token(1));
            let mut stored = None;
            assert_eq!(g.end(Some(final_event(reason)), |bytes| stored = Some(bytes)), complete, "{reason:?}");
            assert_eq!(stored, complete.then(|| g.bytes()), "{reason:?}");
        }
        let g = Generation::new(Priority::Default);
        assert!(!g.end(Some(Err(crate::PoolError::Overloaded)), |_| panic!("an error is not stored")));
        let g = Generation::new(Priority::Default);
        g.push(token(1));
        assert!(!g.end(None, |_| panic!("a stream that stopped short is not stored")));
    }
}
