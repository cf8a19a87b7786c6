//! Keys and values of recent sequences, kept so that a new prompt starting with the same tokens
//! (a shared system prompt, the earlier turns of a chat) skips their prefill.
//!
//! Entries are token sequences with their KV arrays, bounded by a byte budget and evicted least
//! recently used first. A lookup takes the entry sharing the longest common prefix with the new
//! prompt and hands out views of its first positions; MLX arrays are never written in place while
//! shared, so the entry stays intact when the new sequence appends to its copy.
use crate::error::Result;
use crate::kv_cache::KvCache;

struct Entry {
    tokens: Vec<u32>,
    kv: KvCache,
    bytes: usize,
    used: u64,
}

/// Counters for metrics and stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheCounts {
    /// Lookups that reused at least one token.
    pub hits: u64,
    pub misses: u64,
    /// Prompt tokens whose prefill was skipped, over all hits.
    pub cached_tokens: u64,
    pub evictions: u64,
    pub entries: usize,
    pub bytes: usize,
}

pub struct PrefixCache {
    budget: usize,
    entries: Vec<Entry>,
    clock: u64,
    counts: PrefixCacheCounts,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of arrays (0 disables it).
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache { budget, entries: Vec::new(), clock: 0, counts: PrefixCacheCounts::default() }
    }

    /// Whether entries are kept at all (a budget above 0).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn counts(&self) -> PrefixCacheCounts {
        PrefixCacheCounts { entries: self.entries.len(), bytes: self.bytes(), ..self.counts }
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// The cached keys and values of the longest prefix of `prompt` that some entry shares, at
    /// most `max` tokens; `None` (a miss) when no entry shares a token.
    pub fn lookup(&mut self, prompt: &[u32], max: usize) -> Result<Option<KvCache>> {
        if self.budget == 0 {
            return Ok(None);
        }
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(max).min(e.kv.offset().max(0) as usize)))
            .max_by_key(|&(i, n)| (n, self.entries[i].used));
        match best {
            Some((i, n)) if n > 0 => {
                self.clock += 1;
                self.entries[i].used = self.clock;
                self.counts.hits += 1;
                self.counts.cached_tokens += n as u64;
                Ok(Some(self.entries[i].kv.prefix(n as i32)?))
            }
            _ => {
                self.counts.misses += 1;
                Ok(None)
            }
        }
    }

    /// Keeps `kv`, the keys and values of `tokens` (one position per token). An entry whose
    /// tokens are a prefix of these is replaced; if an entry already covers them, it is only
    /// marked as used.
    pub fn insert(&mut self, tokens: Vec<u32>, kv: KvCache) {
        if self.budget == 0 || tokens.is_empty() || kv.offset() as usize != tokens.len() {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) =
            self.entries.iter_mut().find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(&tokens))
        {
            e.used = clock;
            return;
        }
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        let bytes = kv.nbytes();
        if bytes > self.budget {
            return;
        }
        self.entries.push(Entry { tokens, kv, bytes, used: clock });
        let mut total = self.bytes();
        while total > self.budget {
            let Some((i, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used) else { break };
            total -= self.entries.swap_remove(i).bytes;
            self.counts.evictions += 1;
        }
    }

    /// Every array the entries hold.
    pub fn arrays(&self) -> Vec<&mlx::Array> {
        self.entries.iter().flat_map(|e| e.kv.layers.iter().flat_map(|l| l.state())).collect()
    }
}
