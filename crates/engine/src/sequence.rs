//! One sequence in flight: its prompt, cache, sampler and the tokens it produced; and the step
//! functions that advance one or many sequences through the model.
use mlx::Array;

use crate::Model;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::models::Segment;
use crate::sample::{Sampled, Sampler};

pub struct Sequence {
    prompt: Vec<u32>,
    /// Prompt and accepted output tokens, for the repetition penalty.
    history: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The last sampled token, not yet fed to the model (lazy until read).
    pending: Option<Array>,
    /// Tokens sampled so far (some may not be read and accepted yet).
    sampled: usize,
}

impl Sequence {
    pub fn new(model: &Model, prompt: Vec<u32>, sampler: Sampler) -> Result<Sequence> {
        if prompt.is_empty() {
            return Err(EngineError::invalid("the prompt is empty"));
        }
        let vocab = model.transformer.config.vocab_size as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(EngineError::invalid(format!(
                "prompt token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        Ok(Sequence {
            history: prompt.clone(),
            prompt,
            cache: KvCache::new(model.transformer.num_layers()),
            sampler,
            prefilled: 0,
            pending: None,
            sampled: 0,
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Whether prompt tokens other than the last are still to be prefilled.
    pub fn needs_prefill(&self) -> bool {
        self.prefilled + 1 < self.prompt.len()
    }

    /// Prompt tokens in the cache (or fed to the model).
    pub fn prefilled(&self) -> usize {
        self.prefilled
    }

    /// Tokens in the cache.
    pub fn cached_tokens(&self) -> i32 {
        self.cache.offset()
    }

    pub fn kv_bytes(&self) -> usize {
        self.cache.nbytes()
    }

    /// Records the value of sampled token number `index` (from [`Sampled::index`]) once the caller
    /// has read it. Tokens are accepted in order; accepting one twice is harmless.
    pub fn accept(&mut self, index: usize, token: u32) {
        if self.history.len() - self.prompt.len() == index {
            self.history.push(token);
        }
    }

    /// The prompt and the generated tokens accepted so far.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Generated tokens accepted so far.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt.len()..]
    }

    /// One layer of the sequence's own cache (the prompt's keys and values until it joins a batch).
    pub fn cache_layer(&self, layer: usize) -> &crate::kv_cache::LayerCache {
        &self.cache.layers[layer]
    }

    /// Starts the sequence from cached keys and values of its first `cache.offset()` prompt
    /// tokens (at most all but the last), so prefill goes on from there.
    pub fn seed_cache(&mut self, cache: KvCache) -> Result<()> {
        let n = cache.offset().max(0) as usize;
        if self.prefilled != 0 || n + 1 > self.prompt.len() {
            return Err(EngineError::invalid("seed_cache: the cached prefix must leave a prompt token to feed"));
        }
        self.cache = cache;
        self.prefilled = n;
        Ok(())
    }

    /// Hands the sequence's own cache over (to a batch row or a prefix cache), leaving it empty.
    pub fn take_cache(&mut self) -> KvCache {
        let layers = self.cache.layers.len();
        std::mem::replace(&mut self.cache, KvCache::new(layers))
    }

    /// The first decode input: the last prompt token, `[1]` uint32.
    pub(crate) fn first_input(&self) -> Result<Array> {
        Ok(Array::from_slice(&[self.prompt[self.prompt.len() - 1]], &[1])?)
    }

    /// Whether the last sampled token is not read and accepted yet. Callers build a step before
    /// reading the one before it, never two: so only the last sample can be unread, and its lazy
    /// array stands in for it in a repetition penalty's window.
    pub(crate) fn unread(&self) -> bool {
        self.history.len() - self.prompt.len() < self.sampled
    }

    /// Whether the batch's shared argmax is this sequence's sample.
    pub(crate) fn batch_greedy(&self) -> bool {
        let p = self.sampler.params();
        p.is_greedy() && p.repetition_penalty == 1.0
    }

    /// Counts one more sampled token and returns its index.
    pub(crate) fn next_index(&mut self) -> usize {
        let i = self.sampled;
        self.sampled += 1;
        self.prefilled = self.prompt.len();
        i
    }

    /// Samples this sequence's token from its row of logits (`[1, vocab]`); `last` is the
    /// previous sample when its value is not read yet ([`Sequence::unread`]).
    pub(crate) fn sample_row(&mut self, logits: &Array, last: Option<&Array>) -> Result<Sampled> {
        self.sampler.sample(logits, &self.history, last)
    }

    /// The input token of the next decode step: the last prompt token first, then each sample.
    fn next_input(&mut self) -> Result<Array> {
        match self.pending.clone() {
            Some(t) => Ok(t.reshape(&[1])?),
            None => {
                let last = self.prompt[self.prompt.len() - 1];
                Ok(Array::from_slice(&[last], &[1])?)
            }
        }
    }
}

impl Model {
    /// Prefills up to `chunk` prompt tokens of `seq` (never its last one, which the first decode
    /// step feeds, as mlx-lm does) and evaluates the cache. Returns the tokens processed.
    pub fn prefill_chunk(&self, seq: &mut Sequence, chunk: usize) -> Result<usize> {
        Ok(self.prefill_chunks(&mut [seq], chunk)?[0])
    }

    /// Prefills the next prompt tokens of several sequences, `budget` tokens at most in all
    /// (oldest first, the first one always gets at least one), and evaluates their caches.
    /// Returns the tokens each one processed.
    ///
    /// Sequences of similar lengths run as rows of one batch, one attention per layer for all
    /// of them ([`crate::Transformer::forward_rows`]); the others are packed into one row with one
    /// attention each ([`crate::Transformer::forward`]). Which ones are rows depends on
    /// [`crate::LoadOptions::prefill_row_padding`].
    pub fn prefill_chunks(&self, seqs: &mut [&mut Sequence], budget: usize) -> Result<Vec<usize>> {
        self.prefill_chunks_with(seqs, budget, |_| Ok(()))
    }

    /// [`Model::prefill_chunks`], handing `inspect` the arrays it is about to evaluate (to
    /// count the operations of the graph, for example).
    pub fn prefill_chunks_with(
        &self,
        seqs: &mut [&mut Sequence],
        budget: usize,
        inspect: impl FnOnce(&[&Array]) -> Result<()>,
    ) -> Result<Vec<usize>> {
        let mut left = budget.max(1);
        let mut counts = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            let n = if s.needs_prefill() { (s.prompt.len() - 1 - s.prefilled).min(left) } else { 0 };
            left -= n;
            counts.push(n);
        }
        if counts.iter().all(|&n| n == 0) {
            return Ok(counts);
        }
        let earlier: Vec<i32> = seqs.iter().map(|s| s.cache.offset()).collect();
        let rows = self.transformer.prefill_rows(&counts, &earlier);
        let next = |s: &Sequence, n: usize| s.prompt[s.prefilled..s.prefilled + n].to_vec();
        let mut packed_ids = Vec::new();
        let mut row_ids = Vec::new();
        let width = rows.iter().map(|&i| counts[i]).max().unwrap_or(0);
        for (i, (s, &n)) in seqs.iter().zip(&counts).enumerate() {
            if rows.contains(&i) {
                // Padded after the tokens with the last of them: computed, never kept.
                let mut ids = next(s, n);
                ids.resize(width, ids[n - 1]);
                row_ids.extend(ids);
            } else if n > 0 {
                packed_ids.extend(next(s, n));
            }
        }
        {
            let mut packed = Vec::new();
            let mut in_rows = Vec::new();
            for (i, (s, &n)) in seqs.iter_mut().zip(&counts).enumerate() {
                let segment = Segment { cache: &mut s.cache, len: n as i32 };
                if rows.contains(&i) {
                    in_rows.push(segment);
                } else if n > 0 {
                    packed.push(segment);
                }
            }
            if !packed.is_empty() {
                let ids = Array::from_slice(&packed_ids, &[packed_ids.len() as i32])?;
                self.transformer.forward(&ids, &mut packed, false)?;
            }
            if !in_rows.is_empty() {
                let ids = Array::from_slice(&row_ids, &[row_ids.len() as i32])?;
                self.transformer.forward_rows(&ids, width as i32, &mut in_rows)?;
            }
        }
        let arrays: Vec<&Array> = seqs
            .iter()
            .zip(&counts)
            .filter(|(_, n)| **n > 0)
            .flat_map(|(s, _)| s.cache.layers.iter().flat_map(|l| l.state()))
            .collect();
        inspect(&arrays)?;
        mlx::eval(&arrays)?;
        for (s, &n) in seqs.iter_mut().zip(&counts) {
            s.prefilled += n;
        }
        Ok(counts)
    }

    /// One decode step for sequences whose prompts are prefilled, in one forward pass: feeds each
    /// its next input token and samples the next one. The results are lazy; the caller evaluates
    /// them (or starts the next step first, to overlap work) and calls [`Sequence::accept`].
    pub fn decode_step(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<Sampled>> {
        if seqs.iter().any(|s| s.needs_prefill()) {
            return Err(EngineError::invalid("decode_step: a sequence still needs prefill"));
        }
        let inputs = seqs.iter_mut().map(|s| s.next_input()).collect::<Result<Vec<_>>>()?;
        let ids = if let [one] = inputs.as_slice() {
            one.clone()
        } else {
            let refs: Vec<&Array> = inputs.iter().collect();
            mlx::concatenate(&refs, 0)?
        };
        let logits = {
            let mut segments: Vec<Segment<'_>> =
                seqs.iter_mut().map(|s| Segment { cache: &mut s.cache, len: 1 }).collect();
            self.transformer
                .forward(&ids, &mut segments, true)?
                .ok_or_else(|| EngineError::invalid("forward returned no logits"))?
        };
        let mut out = Vec::with_capacity(seqs.len());
        for (i, seq) in seqs.iter_mut().enumerate() {
            let row =
                if seqs_len_is_one(&logits) { logits.clone() } else { logits.slice_axis(0, i as i32, i as i32 + 1)? };
            let last = if seq.unread() { seq.pending.clone() } else { None };
            let mut sampled = seq.sampler.sample(&row, &seq.history, last.as_ref())?;
            sampled.index = seq.sampled;
            seq.sampled += 1;
            seq.pending = Some(sampled.token.clone());
            seq.prefilled = seq.prompt.len();
            out.push(sampled);
        }
        Ok(out)
    }
}

fn seqs_len_is_one(logits: &Array) -> bool {
    logits.dim(0) == 1
}
