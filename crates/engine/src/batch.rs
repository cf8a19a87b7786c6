//! Batched decoding: the running sequences of one model share one KV cache, one row each, so a
//! decode step is one forward pass whose every operation covers the whole batch (as mlx-lm's
//! `BatchGenerator` does), instead of a chain of operations per sequence.
//!
//! Rows are left-padded: every row writes its next position at the same column `idx`, and row
//! `i` holds its positions in columns `[pads[i], idx)`. A mask hides the padding from attention
//! and each row's rotary positions start at its own offset, so a row computes what its sequence
//! would compute alone. Sequences join after their prompt is prefilled (their own cache is
//! copied into a new row) and leave when they stop; the common left padding is then dropped.
use mlx::fast::{self, Mask, RopeOffset};
use mlx::{Array, Dtype};

use crate::Model;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, LayerCache, STEP, Zeros};
use crate::sample::Sampled;
use crate::sequence::Sequence;

/// One layer's keys and values of every row: `[rows, kv_heads, capacity, head_dim]`.
struct Layer {
    keys: Array,
    values: Array,
}

/// The KV cache of a batch.
#[derive(Default)]
pub struct BatchCache {
    /// Empty while the batch has no rows.
    layers: Vec<Layer>,
    /// The column the next step writes, the same for every row.
    idx: i32,
    /// Row `i` holds its positions in columns `[pads[i], idx)`.
    pads: Vec<i32>,
}

/// Where each row's rotary positions start: one offset for every row when they agree, else one
/// per row (`[rows]`).
pub(crate) struct RowOffsets {
    per_row: Option<Array>,
    first: i32,
}

impl RowOffsets {
    pub(crate) fn new(offsets: &[i32]) -> Result<RowOffsets> {
        let first = offsets.first().copied().unwrap_or(0);
        let per_row = if offsets.iter().all(|&o| o == first) {
            None
        } else {
            Some(Array::from_slice(offsets, &[offsets.len() as i32])?)
        };
        Ok(RowOffsets { per_row, first })
    }

    pub(crate) fn rope_offset(&self) -> RopeOffset<'_> {
        match &self.per_row {
            Some(a) => RopeOffset::PerRow(a),
            None => RopeOffset::Scalar(self.first),
        }
    }
}

/// What one step's attention needs about the rows.
pub struct StepLayout {
    offsets: RowOffsets,
    padding: Padding,
}

/// How a step's attention leaves out the rows' padding columns.
enum Padding {
    /// No row is padded.
    None,
    /// A boolean mask over columns `[0, idx]`, `[rows, 1, 1, columns]`.
    Mask(Array),
    /// Each row's first column, `[rows]`, for the padded-attention kernel.
    Starts(Array),
}

impl StepLayout {
    pub fn rope_offset(&self) -> RopeOffset<'_> {
        self.offsets.rope_offset()
    }

    /// This step's attention of `queries` (`[rows, heads, 1, head_dim]`) over the rows' keys and
    /// values: padding columns are left out, by the padded-attention kernel or by a mask.
    pub fn attention(&self, queries: &Array, keys: &Array, values: &Array, scale: f32) -> Result<Array> {
        Ok(match &self.padding {
            Padding::None => fast::scaled_dot_product_attention(queries, keys, values, scale, Mask::None)?,
            Padding::Mask(m) => fast::scaled_dot_product_attention(queries, keys, values, scale, Mask::Array(m))?,
            Padding::Starts(starts) => fast::padded_attention(queries, keys, values, scale, starts)?,
        })
    }
}

impl BatchCache {
    fn capacity(&self) -> i32 {
        self.layers.first().map_or(0, |l| l.keys.dim(2))
    }

    /// Bytes held by the buffers.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(|l| l.keys.nbytes() + l.values.nbytes()).sum()
    }

    /// Makes room for one more column and describes the step: each row's rotary offset and,
    /// when rows are padded, the attention mask over columns `[0, idx]` (with `kernel`, each
    /// row's first column instead, for the padded-attention kernel).
    pub fn begin_step(&mut self, kernel: bool) -> Result<StepLayout> {
        if self.idx + 1 > self.capacity() {
            let mut zeros = Zeros::default();
            for l in &mut self.layers {
                let mut grow = |a: &Array| -> Result<Array> {
                    let mut shape = a.shape();
                    shape[2] = STEP;
                    Ok(mlx::concatenate(&[a, &zeros.get(&shape, a.dtype())?], 2)?)
                };
                l.keys = grow(&l.keys)?;
                l.values = grow(&l.values)?;
            }
        }
        let rows = self.pads.len();
        let offsets = RowOffsets::new(&self.pads.iter().map(|p| self.idx - p).collect::<Vec<_>>())?;
        let padding = if self.pads.iter().all(|&p| p == 0) {
            Padding::None
        } else if kernel {
            Padding::Starts(Array::from_slice(&self.pads, &[rows as i32])?)
        } else {
            let cols = (self.idx + 1) as usize;
            let mut m = Vec::with_capacity(rows * cols);
            for &p in &self.pads {
                m.extend((0..cols).map(|c| c as i32 >= p));
            }
            Padding::Mask(Array::from_slice(&m, &[rows as i32, 1, 1, cols as i32])?)
        };
        Ok(StepLayout { offsets, padding })
    }

    /// Writes one new position of every row (`[rows, kv_heads, 1, head_dim]`) into `layer` at
    /// the current column and returns every column so far.
    pub fn update(&mut self, layer: usize, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let idx = self.idx;
        let l = self.layers.get_mut(layer).ok_or_else(|| EngineError::invalid("batch cache: no such layer"))?;
        let put = |buf: &Array, new: &Array| -> Result<Array> {
            let mut start = vec![0; 4];
            let mut stop = buf.shape();
            start[2] = idx;
            stop[2] = idx + 1;
            Ok(buf.slice_update(new, &start, &stop)?)
        };
        l.keys = put(&l.keys, keys)?;
        l.values = put(&l.values, values)?;
        if idx + 1 < l.keys.dim(2) {
            Ok((l.keys.slice_axis(2, 0, idx + 1)?, l.values.slice_axis(2, 0, idx + 1)?))
        } else {
            Ok((l.keys.clone(), l.values.clone()))
        }
    }

    /// Ends a step: every row has one more position.
    pub fn end_step(&mut self) {
        self.idx += 1;
    }
}

/// The decode batch of one model: its cache, which sequence each row holds, and the next
/// step's input tokens.
#[derive(Default)]
pub struct Batch {
    cache: BatchCache,
    /// The caller's key of each row's sequence.
    keys: Vec<u64>,
    /// One input token per row for the next step (`[rows]` uint32, lazy).
    inputs: Option<Array>,
}

/// The lazy result of one batched step.
pub struct BatchStep {
    /// The sampled token of every row, `[rows]` uint32.
    pub tokens: Array,
    /// Log-probabilities every row's token was drawn from, `[rows, vocab]`.
    pub logprobs: Array,
    /// Row `i`'s sequence key and which of its output tokens this is.
    pub rows: Vec<(u64, usize)>,
}

impl BatchStep {
    /// The log-probability of each row's sampled token, `[rows]` float32 (lazy).
    pub fn token_logprobs(&self) -> Result<Array> {
        let idx = self.tokens.reshape(&[-1, 1])?;
        Ok(self.logprobs.take_along_axis(&idx, 1)?.reshape(&[-1])?.astype(Dtype::Float32)?)
    }

    /// Reads the step's tokens (waiting for them) and hands row `i`'s to `seqs[i]`, the
    /// sequences in the order the step was given them. Returns the tokens, one per row.
    pub fn accept(&self, seqs: &mut [Sequence]) -> Result<Vec<u32>> {
        let tokens = self.tokens.to_vec::<u32>()?;
        for (s, (&t, &(_, index))) in seqs.iter_mut().zip(tokens.iter().zip(&self.rows)) {
            s.accept(index, t);
        }
        Ok(tokens)
    }
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// The sequence keys of the rows, in row order.
    pub fn keys(&self) -> &[u64] {
        &self.keys
    }

    /// Every array the batch holds (its buffers and next inputs).
    pub fn arrays(&self) -> Vec<&Array> {
        self.cache.layers.iter().flat_map(|l| [&l.keys, &l.values]).chain(self.inputs.as_ref()).collect()
    }

    pub fn contains(&self, key: u64) -> bool {
        self.keys.contains(&key)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes of KV cache the batch holds.
    pub fn nbytes(&self) -> usize {
        self.cache.nbytes()
    }

    /// Removes the rows of `gone`. For the keys `keep_kv` accepts, the row's keys and values are
    /// returned as a cache of their own (copied out of the batch's buffers).
    pub fn remove(&mut self, gone: &[u64], keep_kv: impl Fn(u64) -> bool) -> Result<Vec<(u64, KvCache)>> {
        let mut out = Vec::new();
        if gone.is_empty() {
            return Ok(out);
        }
        for (i, &key) in self.keys.iter().enumerate() {
            if gone.contains(&key) && keep_kv(key) && self.cache.idx > self.cache.pads[i] {
                out.push((key, self.row_kv(i)?));
            }
        }
        // Copied out now, before the next step writes the buffers (a pending copy would keep
        // the old buffers alive and make the write copy them).
        let copies: Vec<&Array> = out.iter().flat_map(|(_, kv)| kv.layers.iter().flat_map(|l| l.state())).collect();
        if !copies.is_empty() {
            mlx::async_eval(&copies)?;
        }
        let kept: Vec<usize> = (0..self.keys.len()).filter(|&i| !gone.contains(&self.keys[i])).collect();
        if kept.is_empty() {
            *self = Batch::default();
            return Ok(out);
        }
        let c = &mut self.cache;
        let trim = kept.iter().map(|&i| c.pads[i]).min().unwrap_or(0);
        let index: Vec<i32> = kept.iter().map(|&i| i as i32).collect();
        let index = Array::from_slice(&index, &[index.len() as i32])?;
        for l in &mut c.layers {
            let cut = |a: &Array| -> Result<Array> {
                let a = if trim > 0 { a.slice_axis(2, trim, a.dim(2))? } else { a.clone() };
                Ok(a.take(&index, 0)?)
            };
            l.keys = cut(&l.keys)?;
            l.values = cut(&l.values)?;
        }
        c.idx -= trim;
        c.pads = kept.iter().map(|&i| c.pads[i] - trim).collect();
        self.keys = kept.iter().map(|&i| self.keys[i]).collect();
        if let Some(inputs) = &self.inputs {
            self.inputs = Some(inputs.take(&index, 0)?);
        }
        Ok(out)
    }

    /// Row `i`'s filled positions as a cache of its own (a copy of the row).
    fn row_kv(&self, i: usize) -> Result<KvCache> {
        let c = &self.cache;
        let index = Array::from_slice(&[i as i32], &[1])?;
        let mut layers = Vec::with_capacity(c.layers.len());
        for l in &c.layers {
            let row = |a: &Array| -> Result<Array> { Ok(a.take(&index, 0)?.slice_axis(2, c.pads[i], c.idx)?) };
            layers.push(LayerCache::from_arrays(row(&l.keys)?, row(&l.values)?));
        }
        Ok(KvCache { layers })
    }
}

impl Model {
    /// Prefills `seqs` in chunks of at most `chunk` tokens and joins them all into a new batch,
    /// row `i` keyed `i`: a burst of requests admitted together.
    pub fn prefilled_batch(&self, seqs: &mut [Sequence], chunk: usize) -> Result<Batch> {
        {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            while refs.iter().any(|s| s.needs_prefill()) {
                self.prefill_chunks(&mut refs, chunk)?;
            }
        }
        let mut batch = Batch::new();
        self.join(&mut batch, seqs.iter_mut().enumerate().map(|(i, s)| (i as u64, s)).collect())?;
        Ok(batch)
    }

    /// Moves sequences whose prompts are prefilled into `batch` (`key` names each one's row).
    /// Each sequence's own cache is copied into its row and handed back, in order (for a prefix
    /// cache; dropping it frees it).
    pub fn join(&self, batch: &mut Batch, seqs: Vec<(u64, &mut Sequence)>) -> Result<Vec<KvCache>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        if seqs.iter().any(|(_, s)| s.needs_prefill()) {
            return Err(EngineError::invalid("join: a sequence still needs prefill"));
        }
        let t = &self.transformer;
        let (kv_heads, head_dim, dtype) = (t.config.kv_heads(), t.spec.head_dim, t.dtype());
        let c = &mut batch.cache;
        let lens: Vec<i32> = seqs.iter().map(|(_, s)| s.cached_tokens()).collect();
        let target = lens.iter().copied().max().unwrap_or(0).max(c.idx);
        let shift = if batch.keys.is_empty() { 0 } else { target - c.idx };
        let old_cap = c.capacity();
        let capacity = ((old_cap + shift).max(target + 1) + STEP - 1) / STEP * STEP;
        let rows_before = batch.keys.len() as i32;
        let rows = rows_before + seqs.len() as i32;
        let mut layers = Vec::with_capacity(t.num_layers());
        let mut zeros = Zeros::default();
        for layer in 0..t.num_layers() {
            // Each array starts from one zeroed buffer shared by all (a write copies it): the old
            // rows are written in shifted right by `shift` columns, and each new row ends at
            // column `target`. That is one write for the old rows and one per new row, where
            // padding each part and concatenating them would take about 3 operations per row.
            let shape = [rows, kv_heads, capacity, head_dim];
            let (mut keys, mut values) = (zeros.get(&shape, dtype)?, zeros.get(&shape, dtype)?);
            let place = |buf: &Array, part: &Array, row: i32, col: i32| -> Result<Array> {
                let (n, cols) = (part.dim(0), part.dim(2));
                Ok(buf.slice_update(
                    &part.astype(dtype)?,
                    &[row, 0, col, 0],
                    &[row + n, kv_heads, col + cols, head_dim],
                )?)
            };
            if let Some(l) = c.layers.get(layer) {
                keys = place(&keys, &l.keys, 0, shift)?;
                values = place(&values, &l.values, 0, shift)?;
            }
            for (i, ((_, s), &n)) in seqs.iter().zip(&lens).enumerate() {
                if let Some((k, v)) = s.cache_layer(layer).filled()? {
                    let row = rows_before + i as i32;
                    keys = place(&keys, &k, row, target - n)?;
                    values = place(&values, &v, row, target - n)?;
                }
            }
            layers.push(Layer { keys, values });
        }
        c.layers = layers;
        for p in &mut c.pads {
            *p += shift;
        }
        c.pads.extend(lens.iter().map(|&n| target - n));
        c.idx = target;
        let mut inputs: Vec<Array> = batch.inputs.take().into_iter().collect();
        let mut caches = Vec::with_capacity(seqs.len());
        for (key, s) in seqs {
            inputs.push(s.first_input()?);
            caches.push(s.take_cache());
            batch.keys.push(key);
        }
        batch.inputs = Some(concat(inputs, 0)?);
        Ok(caches)
    }

    /// One decode step for every row of `batch`: `seqs` are the rows' sequences in row order.
    /// Returns the lazy tokens; the next step feeds them without waiting for their values.
    pub fn decode_batch(&self, batch: &mut Batch, seqs: &mut [&mut Sequence]) -> Result<BatchStep> {
        if seqs.len() != batch.keys.len() || seqs.is_empty() {
            return Err(EngineError::invalid("decode_batch: one sequence per row is needed"));
        }
        let inputs = batch.inputs.clone().ok_or_else(|| EngineError::invalid("decode_batch: no inputs"))?;
        let logits = self.transformer.forward_batch(&inputs, &mut batch.cache)?;
        let logprobs = logits.subtract(&logits.logsumexp(-1, true)?)?;
        let mut logprobs = logprobs;
        let mut tokens = logprobs.argmax(-1, false)?.astype(Dtype::Uint32)?;
        let mut out_rows = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter_mut().enumerate() {
            let unread = s.unread();
            let index = s.next_index();
            if !s.batch_greedy() {
                // Sampling, or a penalty changing the logits: this row on its own. A penalty's
                // window ends with the row's input token, this step's input, which need not be
                // read yet: the step after is built while this one runs.
                let r = i as i32;
                let last = if unread { Some(inputs.slice_axis(0, r, r + 1)?) } else { None };
                let Sampled { token, logprobs: row_lp, .. } =
                    s.sample_row(&logits.slice_axis(0, r, r + 1)?, last.as_ref())?;
                tokens = tokens.slice_update(&token.reshape(&[1])?, &[r], &[r + 1])?;
                let vocab = logprobs.dim(1);
                logprobs = logprobs.slice_update(&row_lp.reshape(&[1, vocab])?, &[r, 0], &[r + 1, vocab])?;
            }
            out_rows.push((batch.keys[i], index));
        }
        batch.inputs = Some(tokens.clone());
        Ok(BatchStep { tokens, logprobs, rows: out_rows })
    }
}

fn concat(parts: Vec<Array>, axis: i32) -> Result<Array> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    let refs: Vec<&Array> = parts.iter().collect();
    Ok(mlx::concatenate(&refs, axis)?)
}
