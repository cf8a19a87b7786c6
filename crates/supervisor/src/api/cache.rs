//! The response cache: complete answers to deterministic requests, by key
//! (`shared::key`), bounded in bytes (least recently used evicted first) and in age (a time to
//! live from when the answer was stored).
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::shared::Generation;

/// Bytes counted per entry beyond its key and events.
const ENTRY_BYTES: usize = 128;

pub struct ResponseCache {
    max_bytes: usize,
    /// `None`: entries stay until evicted.
    ttl: Option<Duration>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Arc<str>, Entry>,
    /// Tick of last use to key, least recently used first.
    lru: BTreeMap<u64, Arc<str>>,
    /// (expiry, the entry's insertion tick, key) in insertion order, which is expiry order. An
    /// item whose key was replaced or evicted since is skipped.
    expiry: VecDeque<(Instant, u64, Arc<str>)>,
    bytes: usize,
    tick: u64,
}

struct Entry {
    generation: Arc<Generation>,
    bytes: usize,
    /// Tick of last use.
    used: u64,
    /// Tick of insertion.
    inserted: u64,
}

/// What the cache holds, for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
}

impl ResponseCache {
    /// A cache of at most `max_bytes`; entries expire `ttl` after they were stored (never when
    /// zero).
    pub fn new(max_bytes: usize, ttl: Duration) -> ResponseCache {
        ResponseCache { max_bytes, ttl: (!ttl.is_zero()).then_some(ttl), inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer stored under `key`, if it has not expired; marks it recently used.
    pub fn get(&self, key: &str) -> Option<Arc<Generation>> {
        let mut inner = self.lock();
        inner.expire(Instant::now());
        let tick = inner.next_tick();
        let Inner { entries, lru, .. } = &mut *inner;
        let k = entries.get_key_value(key)?.0.clone();
        let entry = entries.get_mut(key)?;
        lru.remove(&entry.used);
        entry.used = tick;
        lru.insert(tick, k);
        Some(entry.generation.clone())
    }

    /// Stores a complete answer whose events take `events_bytes`, evicting the least recently
    /// used ones to make room. An answer larger than the whole cache is not stored.
    pub fn insert(&self, key: String, generation: Arc<Generation>, events_bytes: usize) {
        let bytes = key.len() + events_bytes + ENTRY_BYTES;
        if bytes > self.max_bytes {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire(now);
        let key: Arc<str> = key.into();
        inner.remove(&key);
        let mut evicted = 0;
        while inner.bytes + bytes > self.max_bytes {
            let Some((_, oldest)) = inner.lru.pop_first() else { break };
            inner.remove(&oldest);
            evicted += 1;
        }
        if evicted > 0 {
            crate::metrics::cache_evicted("lru", evicted);
        }
        let tick = inner.next_tick();
        inner.lru.insert(tick, key.clone());
        if let Some(ttl) = self.ttl {
            inner.expiry.push_back((now + ttl, tick, key.clone()));
        }
        inner.entries.insert(key, Entry { generation, bytes, used: tick, inserted: tick });
        inner.bytes += bytes;
        crate::metrics::cache_size(inner.bytes, inner.entries.len());
    }

    pub fn stats(&self) -> CacheStats {
        let mut inner = self.lock();
        inner.expire(Instant::now());
        CacheStats { entries: inner.entries.len(), bytes: inner.bytes }
    }
}

impl Inner {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn remove(&mut self, key: &str) -> bool {
        let Some(entry) = self.entries.remove(key) else { return false };
        self.lru.remove(&entry.used);
        self.bytes -= entry.bytes;
        crate::metrics::cache_size(self.bytes, self.entries.len());
        true
    }

    /// Drops the entries whose time is up.
    fn expire(&mut self, now: Instant) {
        let mut expired = 0;
        while let Some((at, inserted, key)) = self.expiry.front() {
            if *at > now {
                break;
            }
            let current = self.entries.get(key).is_some_and(|e| e.inserted == *inserted);
            let key = key.clone();
            self.expiry.pop_front();
            if current && self.remove(&key) {
                expired += 1;
            }
        }
        if expired > 0 {
            crate::metrics::cache_evicted("ttl", expired);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::shared::Subscriber;
    use crate::pool::{PoolEvent, StreamItem};
    use mlx_serving_protocol::{FinalEvent, FinishReason, GenerateEvent, TokenEvent, Usage};

    /// A complete generation of `n` tokens, through the public path of a replay.
    fn answer(n: u32) -> Arc<Generation> {
        let items: Vec<StreamItem> = std::iter::once(Ok(PoolEvent::Started))
            .chain((0..n).map(|i| {
                Ok(PoolEvent::Event(GenerateEvent::Token(TokenEvent {
                    token_ids: vec![i],
                    text: "word ".into(),
                    logprobs: None,
                    top_logprobs: None,
                })))
            }))
            .chain(std::iter::once(Ok(PoolEvent::Event(GenerateEvent::Final(FinalEvent {
                finish_reason: FinishReason::Length,
                text: String::new(),
                usage: Usage { prompt_tokens: 1, completion_tokens: n as usize, cached_tokens: 0 },
                time_to_first_token_ms: None,
                total_ms: 1.0,
                error: None,
            })))))
            .collect();
        Generation::complete(items)
    }

    fn put(cache: &ResponseCache, key: &str, g: Arc<Generation>) {
        let bytes = g.bytes();
        cache.insert(key.into(), g, bytes);
    }

    async fn tokens_of(g: Arc<Generation>) -> usize {
        let mut s = Subscriber::replay(g);
        let mut n = 0;
        while let Some(item) = s.recv().await {
            if let Ok(PoolEvent::Event(GenerateEvent::Token(_))) = item {
                n += 1;
            }
        }
        n
    }

    #[tokio::test]
    async fn a_hit_replays_the_stored_answer() {
        let cache = ResponseCache::new(1 << 20, Duration::from_secs(60));
        assert!(cache.get("k").is_none());
        put(&cache, "k", answer(5));
        let hit = cache.get("k").expect("stored");
        assert_eq!(tokens_of(hit).await, 5);
        assert!(cache.get("other").is_none());
        let stats = cache.stats();
        assert_eq!(stats.entries, 1);
        assert_eq!(stats.bytes, 1 + answer(5).bytes() + ENTRY_BYTES);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl_from_when_they_were_stored() {
        let cache = ResponseCache::new(1 << 20, Duration::from_secs(10));
        put(&cache, "a", answer(1));
        tokio::time::advance(Duration::from_secs(6)).await;
        put(&cache, "b", answer(1));
        // A hit does not extend the time to live.
        assert!(cache.get("a").is_some());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(cache.get("a").is_none(), "expired 10 s after it was stored");
        assert!(cache.get("b").is_some());
        assert_eq!(cache.stats().entries, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(cache.stats(), CacheStats::default());
        // Stored again after expiring, it lives again.
        put(&cache, "a", answer(1));
        assert!(cache.get("a").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_keeps_entries_until_evicted() {
        let cache = ResponseCache::new(1 << 20, Duration::ZERO);
        put(&cache, "a", answer(1));
        tokio::time::advance(Duration::from_secs(365 * 86400)).await;
        assert!(cache.get("a").is_some());
    }

    #[test]
    fn the_byte_bound_evicts_the_least_recently_used() {
        let one = 1 + answer(10).bytes() + ENTRY_BYTES;
        // Room for three answers of this size, not four.
        let cache = ResponseCache::new(one * 3 + one / 2, Duration::ZERO);
        for k in ["a", "b", "c"] {
            put(&cache, k, answer(10));
        }
        assert_eq!(cache.stats(), CacheStats { entries: 3, bytes: one * 3 });
        // `a` was used lately, so `b` is the least recently used.
        assert!(cache.get("a").is_some());
        put(&cache, "d", answer(10));
        assert!(cache.get("b").is_none(), "the least recently used was evicted");
        for k in ["a", "c", "d"] {
            assert!(cache.get(k).is_some(), "{k}");
        }
        assert_eq!(cache.stats(), CacheStats { entries: 3, bytes: one * 3 });
        // A bigger answer evicts as many as it needs, least recently used first: `c`, then `d`,
        // but not `a`, as there is room then.
        let big = 1 + answer(25).bytes() + ENTRY_BYTES;
        assert!(big < one * 3 && big > one * 2);
        assert!(cache.get("a").is_some());
        put(&cache, "e", answer(25));
        assert!(cache.get("c").is_none() && cache.get("d").is_none());
        assert!(cache.get("e").is_some());
        assert_eq!(cache.stats(), CacheStats { entries: 2, bytes: one + big });
        // Storing a key again replaces it, it is not counted twice.
        put(&cache, "e", answer(25));
        assert_eq!(cache.stats(), CacheStats { entries: 2, bytes: one + big });
        // An answer bigger than the whole cache is not stored, and evicts nothing.
        let before = cache.stats();
        put(&cache, "huge", answer(200));
        assert!(cache.get("huge").is_none());
        assert_eq!(cache.stats(), before);
    }
}
