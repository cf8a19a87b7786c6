//! Prefix keys for affinity routing. The supervisor has no tokenizer, so it names the prefixes of
//! a prompt by hashing the request itself: for chat messages, each prefix `messages[..k]` (a
//! shared system prompt, the earlier turns of a conversation); for a text prompt, the prompt cut
//! every [`TEXT_BLOCK_BYTES`] bytes; for token ids, every [`TOKEN_BLOCK_IDS`] ids. Each key hashes
//! the model and everything before its cut, so two requests share a key exactly when they share
//! that prefix (up to 64-bit collisions, which cost a routing choice, never an output).
//!
//! Each worker remembers the keys of the requests it was sent lately in a [`PrefixMemory`], a
//! bounded LRU; the pool prefers the worker that knows the longest prefix of a new request,
//! within a bound on its extra load (`route::pick`).
use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use mlx_serving_protocol::Prompt;

/// A text prompt's prefixes are cut every this many bytes.
pub const TEXT_BLOCK_BYTES: usize = 256;

/// A token-id prompt's prefixes are cut every this many ids.
pub const TOKEN_BLOCK_IDS: usize = 64;

/// Of a request's keys, the longest this many are always remembered; shorter ones only at
/// power-of-two depths, so a long prompt leaves a bounded number of keys and a request that
/// shares any long part of it still finds a match.
const LAST_KEYS: usize = 16;

/// The keys of a prompt's prefixes, shortest first: `keys[i]` names the first `i + 1` messages
/// (or blocks). A prompt shorter than one block has no key.
pub fn keys(model: &str, prompt: &Prompt) -> Vec<u64> {
    // `DefaultHasher::new()` has fixed keys: the same prefix gives the same key all along.
    let mut h = DefaultHasher::new();
    model.hash(&mut h);
    let mut out = Vec::new();
    match prompt {
        Prompt::Messages(messages) => {
            0u8.hash(&mut h);
            for m in messages {
                m.role.hash(&mut h);
                m.content.hash(&mut h);
                // `finish` leaves the state as it is: the next key extends this one.
                out.push(h.finish());
            }
        }
        Prompt::Text(text) => {
            1u8.hash(&mut h);
            for block in text.as_bytes().chunks_exact(TEXT_BLOCK_BYTES) {
                h.write(block);
                out.push(h.finish());
            }
        }
        Prompt::TokenIds(ids) => {
            2u8.hash(&mut h);
            for block in ids.chunks_exact(TOKEN_BLOCK_IDS) {
                for id in block {
                    h.write_u32(*id);
                }
                out.push(h.finish());
            }
        }
    }
    out
}

/// The keys of `keys` a worker remembers when it is sent the request: the longest
/// [`LAST_KEYS`], and those at power-of-two depths (1, 2, 4, ...).
fn remembered(keys: &[u64]) -> impl Iterator<Item = u64> + '_ {
    let last = keys.len().saturating_sub(LAST_KEYS);
    keys.iter().enumerate().filter(move |(i, _)| *i >= last || (i + 1).is_power_of_two()).map(|(_, k)| *k)
}

/// The prefix keys one worker was sent lately: a least-recently-used set of at most `capacity`
/// keys.
#[derive(Debug, Default)]
pub struct PrefixMemory {
    capacity: usize,
    /// Key to the tick of its last use.
    keys: HashMap<u64, u64>,
    /// Tick of last use to key, oldest first.
    order: BTreeMap<u64, u64>,
    tick: u64,
}

impl PrefixMemory {
    pub fn new(capacity: usize) -> PrefixMemory {
        PrefixMemory { capacity, ..PrefixMemory::default() }
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Forgets every key (the worker's KV cache went with its process).
    pub fn clear(&mut self) {
        self.keys.clear();
        self.order.clear();
    }

    /// Changes the bound, forgetting the oldest keys beyond it.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.shrink();
    }

    /// Remembers that the worker was sent a request with these keys (from [`keys`]).
    pub fn remember(&mut self, keys: &[u64]) {
        if self.capacity == 0 {
            return;
        }
        for key in remembered(keys) {
            self.tick += 1;
            if let Some(old) = self.keys.insert(key, self.tick) {
                self.order.remove(&old);
            }
            self.order.insert(self.tick, key);
        }
        self.shrink();
    }

    fn shrink(&mut self) {
        while self.keys.len() > self.capacity {
            let Some((_, key)) = self.order.pop_first() else { break };
            self.keys.remove(&key);
        }
    }

    /// How many messages (or blocks) of the prompt with these keys the worker is known to hold:
    /// the depth of the longest remembered key, 0 when none is.
    pub fn longest(&self, keys: &[u64]) -> usize {
        if self.keys.is_empty() {
            return 0;
        }
        keys.iter().rposition(|k| self.keys.contains_key(k)).map_or(0, |i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_serving_protocol::Message;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn message_prefixes_share_keys_exactly_as_far_as_the_messages_agree() {
        let system = msg("system", "You are terse.");
        let turn1 = vec![system.clone(), msg("user", "Hi")];
        let turn2 = vec![system.clone(), msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Bye")];
        let other = vec![system.clone(), msg("user", "Something else")];
        let (a, b, c) = (
            keys("m", &Prompt::Messages(turn1)),
            keys("m", &Prompt::Messages(turn2)),
            keys("m", &Prompt::Messages(other)),
        );
        assert_eq!(a.len(), 2);
        assert_eq!(b.len(), 4);
        assert_eq!(a[..], b[..2], "a follow-up turn extends the conversation's keys");
        assert_eq!(a[0], c[0], "a shared system prompt is a shared first key");
        assert_ne!(a[1], c[1]);
        // The role counts, and the model too.
        let as_user = keys("m", &Prompt::Messages(vec![msg("user", "You are terse.")]));
        assert_ne!(as_user[0], a[0]);
        assert_ne!(keys("m2", &Prompt::Messages(vec![system])), a[..1]);
    }

    #[test]
    fn messages_are_not_confused_by_where_one_ends() {
        let a = keys("m", &Prompt::Messages(vec![msg("user", "ab"), msg("user", "c")]));
        let b = keys("m", &Prompt::Messages(vec![msg("user", "a"), msg("user", "bc")]));
        assert_ne!(a[1], b[1]);
    }

    #[test]
    fn text_and_token_prompts_are_cut_in_whole_blocks() {
        let text = "x".repeat(TEXT_BLOCK_BYTES * 3 + 10);
        let k = keys("m", &Prompt::Text(text.clone()));
        assert_eq!(k.len(), 3);
        assert!(keys("m", &Prompt::Text("short".into())).is_empty());
        // A longer prompt with the same start shares the blocks they have in common.
        let longer =
            keys("m", &Prompt::Text(format!("{}{}", &text[..TEXT_BLOCK_BYTES * 2], "y".repeat(TEXT_BLOCK_BYTES * 2))));
        assert_eq!(longer[..2], k[..2]);
        assert_ne!(longer[2], k[2]);
        let ids: Vec<u32> = (0..(TOKEN_BLOCK_IDS as u32 * 2 + 5)).collect();
        let t = keys("m", &Prompt::TokenIds(ids.clone()));
        assert_eq!(t.len(), 2);
        let mut changed = ids;
        changed[TOKEN_BLOCK_IDS + 1] = 9999;
        let u = keys("m", &Prompt::TokenIds(changed));
        assert_eq!(t[0], u[0]);
        assert_ne!(t[1], u[1]);
        // Text and ids never share keys.
        assert_ne!(
            keys("m", &Prompt::Text("\0".repeat(TEXT_BLOCK_BYTES)))[0],
            keys("m", &Prompt::TokenIds(vec![0; TOKEN_BLOCK_IDS]))[0]
        );
    }

    #[test]
    fn memory_finds_the_longest_known_prefix() {
        let conversation: Vec<Message> =
            (0..6).map(|i| msg(if i % 2 == 0 { "user" } else { "assistant" }, &format!("turn {i}"))).collect();
        let short = keys("m", &Prompt::Messages(conversation[..2].to_vec()));
        let long = keys("m", &Prompt::Messages(conversation.clone()));
        let mut memory = PrefixMemory::new(100);
        assert_eq!(memory.longest(&long), 0);
        memory.remember(&short);
        assert_eq!(memory.longest(&long), 2);
        memory.remember(&long[..5]);
        assert_eq!(memory.longest(&long), 5);
        assert_eq!(memory.longest(&keys("m", &Prompt::Messages(vec![msg("user", "new")]))), 0);
        memory.clear();
        assert_eq!(memory.longest(&long), 0);
    }

    #[test]
    fn a_long_prompt_leaves_a_bounded_number_of_keys_that_still_match_long_shares() {
        let ids: Vec<u32> = (0..(TOKEN_BLOCK_IDS as u32 * 1000)).collect();
        let all = keys("m", &Prompt::TokenIds(ids.clone()));
        assert_eq!(all.len(), 1000);
        let mut memory = PrefixMemory::new(10_000);
        memory.remember(&all);
        // 16 last keys and the power-of-two depths 1..512.
        assert_eq!(memory.len(), LAST_KEYS + 10);
        // A prompt that shares the first 700 blocks is known to depth 512.
        let mut other = ids;
        other[700 * TOKEN_BLOCK_IDS] = 7;
        assert_eq!(memory.longest(&keys("m", &Prompt::TokenIds(other))), 512);
        // The same prompt again, or one that goes on from it, matches in full.
        assert_eq!(memory.longest(&all), 1000);
    }

    #[test]
    fn memory_is_a_bounded_lru() {
        let k = |i: u64| vec![i];
        let mut memory = PrefixMemory::new(3);
        for i in 0..3 {
            memory.remember(&k(i));
        }
        // Using key 0 again makes key 1 the oldest.
        memory.remember(&k(0));
        memory.remember(&k(3));
        assert_eq!(memory.len(), 3);
        assert_eq!(memory.longest(&k(1)), 0);
        for i in [0, 2, 3] {
            assert_eq!(memory.longest(&k(i)), 1, "key {i}");
        }
        memory.set_capacity(1);
        assert_eq!(memory.len(), 1);
        assert_eq!(memory.longest(&k(3)), 1);
        // A memory of no keys remembers nothing: affinity is off.
        let mut off = PrefixMemory::new(0);
        off.remember(&k(1));
        assert_eq!(off.longest(&k(1)), 0);
    }
}
