//! The decoder-only transformer shared by llama, qwen2 and qwen3:
//!
//! ```text
//! h = embed(tokens)
//! for each layer:
//!     h = h + o_proj(attention(rope(q(norm1(h))), rope(k(norm1(h))), v(norm1(h))))
//!     h = h + down_proj(silu(gate_proj(norm2(h))) * up_proj(norm2(h)))
//! logits = lm_head(norm(h))          # or embed^T when the embeddings are tied
//! ```
//!
//! Several sequences run in one forward pass: their tokens are packed along the sequence axis, the
//! projections and the MLP see all of them at once, and attention runs per sequence against that
//! sequence's own cache, with the same shapes and mask as if it ran alone.
use mlx::fast::{self, Mask, RopeOffset};
use mlx::{Array, Dtype};

use crate::batch::{BatchCache, RowOffsets, StepLayout};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, LayerCache, Zeros};
use crate::nn::{Embedding, Linear, QuantizedWeight, RmsNorm, Rope, Stacked, heads_first, split_heads};
use crate::weights::Weights;

/// Which optional parts an architecture's attention has.
#[derive(Clone, Copy, Debug)]
pub struct AttentionKind {
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Per-head RMS norm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
}

/// An architecture's reading of config.json, beyond the fields every architecture shares.
#[derive(Clone, Debug)]
pub struct Spec {
    pub head_dim: i32,
    pub rope_theta: f32,
    pub rope_traditional: bool,
    pub attention: AttentionKind,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: Option<i32>,
}

/// Options of a model's loading that change how it computes, never what.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Stack the query, key and value projections into one product, and the MLP's gate and
    /// up projections into another (see [`Stacked`]).
    pub stack_projections: bool,
    /// On MLX's CUDA backend, attend over padded batch rows with the shim's padded-attention
    /// kernel instead of MLX's masked attention, which it composes from about 15 operations
    /// per layer. Elsewhere there is no such kernel and this changes nothing.
    pub padded_attention_kernel: bool,
    /// Prompts prefilled together run as rows of one batch, with one attention per layer for
    /// all of them ([`Transformer::forward_rows`]), instead of one attention each.
    pub prefill_rows: bool,
    /// How much padding rows of different lengths may add to such a pass, as a share of its
    /// tokens. `None`: 1 on MLX's CUDA backend, where a small model's prefill is bound by the
    /// host's cost per operation, else 0: the CPU is bound by arithmetic, and on Metal, where
    /// it is much closer to arithmetic than on a large NVIDIA GPU, the trade is not measured.
    /// With 0, rows are prompts of equal length at equal positions only.
    pub prefill_row_padding: Option<f32>,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            stack_projections: true,
            padded_attention_kernel: true,
            prefill_rows: true,
            prefill_row_padding: None,
        }
    }
}

/// Projections of one input, each on its own or stacked into one product.
enum Projections {
    Separate(Vec<Linear>),
    Stacked(Stacked),
}

impl Projections {
    fn load(
        w: &mut Weights,
        c: &ModelConfig,
        parts: &[(&str, i32)],
        in_f: i32,
        bias: bool,
        stack: bool,
    ) -> Result<Projections> {
        if stack && let Some(s) = Stacked::load(w, c, parts, in_f, bias)? {
            return Ok(Projections::Stacked(s));
        }
        let mut v = Vec::with_capacity(parts.len());
        for &(prefix, out_f) in parts {
            v.push(Linear::load(w, c, prefix, in_f, out_f, bias)?);
        }
        Ok(Projections::Separate(v))
    }

    fn forward(&self, x: &Array) -> Result<Vec<Array>> {
        match self {
            Projections::Separate(v) => v.iter().map(|l| l.forward(x)).collect(),
            Projections::Stacked(s) => s.forward(x),
        }
    }

    /// Each output for `x` (`[tokens, in]`) as `[lead..., heads, head_dim]`.
    fn forward_heads(&self, x: &Array, lead: &[i32], head_dim: i32) -> Result<Vec<Array>> {
        match self {
            Projections::Separate(v) => v.iter().map(|l| split_heads(&l.forward(x)?, lead, head_dim)).collect(),
            Projections::Stacked(s) => s.forward_heads(x, lead, head_dim),
        }
    }

    /// Each output for one position per row as `[rows, heads, 1, head_dim]` (see [`heads_first`]).
    fn forward_heads_first(&self, x: &Array, head_dim: i32) -> Result<Vec<Array>> {
        match self {
            Projections::Separate(v) => v.iter().map(|l| heads_first(&l.forward(x)?, head_dim)).collect(),
            Projections::Stacked(s) => s.forward_heads_first(x, head_dim),
        }
    }

    /// The weight of each quantized product.
    fn quantized(&self) -> Vec<QuantizedWeight<'_>> {
        match self {
            Projections::Separate(v) => v.iter().filter_map(Linear::quantized).collect(),
            Projections::Stacked(s) => s.quantized().into_iter().collect(),
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            Projections::Separate(v) => v.iter().flat_map(Linear::arrays).collect(),
            Projections::Stacked(s) => s.arrays(),
        }
    }
}

struct Attention {
    /// Queries, keys, values.
    qkv: Projections,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    head_dim: i32,
    scale: f32,
    rope: Rope,
}

struct Mlp {
    /// Gate, up.
    gate_up: Projections,
    down_proj: Linear,
}

struct Layer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// One sequence's share of a packed forward pass: `len` consecutive tokens, appended to `cache`.
pub struct Segment<'a> {
    pub cache: &'a mut KvCache,
    pub len: i32,
}

pub struct Transformer {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    pub config: ModelConfig,
    pub spec: Spec,
    /// Padded batch rows attend through [`fast::padded_attention`] (see [`LoadOptions`]).
    padded_kernel: bool,
    /// The padding a prefill as rows may add, as a share of its tokens; `None`: no such prefill.
    row_padding: Option<f32>,
}

impl Transformer {
    pub fn load(config: ModelConfig, spec: Spec, w: &mut Weights, opts: LoadOptions) -> Result<Transformer> {
        let c = &config;
        let (dim, heads, kv_heads, hd) = (c.hidden_size, c.num_attention_heads, c.kv_heads(), spec.head_dim);
        if hd <= 0 || hd % 2 != 0 {
            return Err(EngineError::invalid(format!(
                "config.json: head_dim must be a positive even number, got {hd}"
            )));
        }
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = spec.attention;
            let self_attn = Attention {
                qkv: Projections::load(
                    w,
                    c,
                    &[
                        (&format!("{p}.self_attn.q_proj"), heads * hd),
                        (&format!("{p}.self_attn.k_proj"), kv_heads * hd),
                        (&format!("{p}.self_attn.v_proj"), kv_heads * hd),
                    ],
                    dim,
                    a.qkv_bias,
                    opts.stack_projections,
                )?,
                o_proj: Linear::load(w, c, &format!("{p}.self_attn.o_proj"), heads * hd, dim, a.o_bias)?,
                q_norm: a
                    .qk_norm
                    .then(|| RmsNorm::load(w, &format!("{p}.self_attn.q_norm"), hd, c.rms_norm_eps))
                    .transpose()?,
                k_norm: a
                    .qk_norm
                    .then(|| RmsNorm::load(w, &format!("{p}.self_attn.k_norm"), hd, c.rms_norm_eps))
                    .transpose()?,
                head_dim: hd,
                scale: (f64::from(hd)).powf(-0.5) as f32,
                rope: Rope::new(hd, spec.rope_theta, spec.rope_traditional, c.rope_scaling())?,
            };
            let ff = c.intermediate_size;
            let mlp = Mlp {
                gate_up: Projections::load(
                    w,
                    c,
                    &[(&format!("{p}.mlp.gate_proj"), ff), (&format!("{p}.mlp.up_proj"), ff)],
                    dim,
                    spec.mlp_bias,
                    opts.stack_projections,
                )?,
                down_proj: Linear::load(w, c, &format!("{p}.mlp.down_proj"), ff, dim, spec.mlp_bias)?,
            };
            layers.push(Layer {
                self_attn,
                mlp,
                input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm"), dim, c.rms_norm_eps)?,
                post_attention_layernorm: RmsNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    dim,
                    c.rms_norm_eps,
                )?,
            });
        }
        let embed_tokens = Embedding::load(w, c, "model.embed_tokens", c.vocab_size, dim, spec.tie_word_embeddings)?;
        let norm = RmsNorm::load(w, "model.norm", dim, c.rms_norm_eps)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(w, c, "lm_head", dim, c.vocab_size, false)?)
        };
        let padded_kernel = opts.padded_attention_kernel && fast::padded_attention_available(hd);
        let row_padding = opts
            .prefill_rows
            .then(|| opts.prefill_row_padding.unwrap_or(if mlx::default_device_is_cuda() { 1.0 } else { 0.0 }));
        let model = Transformer { embed_tokens, layers, norm, lm_head, config, spec, padded_kernel, row_padding };
        mlx::eval(&model.arrays())?;
        Ok(model)
    }

    /// Every weight array, for evaluation and memory accounting.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.embed_tokens.arrays();
        for l in &self.layers {
            let a = &l.self_attn;
            v.extend(a.qkv.arrays());
            v.extend(l.mlp.gate_up.arrays());
            for lin in [&a.o_proj, &l.mlp.down_proj] {
                v.extend(lin.arrays());
            }
            v.extend(a.q_norm.iter().chain(a.k_norm.iter()).map(|n| &n.weight));
            v.extend([&l.input_layernorm.weight, &l.post_attention_layernorm.weight]);
        }
        v.push(&self.norm.weight);
        if let Some(h) = &self.lm_head {
            v.extend(h.arrays());
        }
        v
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The weight of every quantized matrix product of the layers, in the order a forward pass
    /// runs them (one entry per product, so a shape repeats once per layer): the projections,
    /// stacked or not. The output projection is [`Transformer::quantized_output`].
    pub fn quantized_products(&self) -> Vec<QuantizedWeight<'_>> {
        let mut v = Vec::new();
        for l in &self.layers {
            v.extend(l.self_attn.qkv.quantized());
            v.extend(l.self_attn.o_proj.quantized());
            v.extend(l.mlp.gate_up.quantized());
            v.extend(l.mlp.down_proj.quantized());
        }
        v
    }

    /// The output projection's weight when quantized (the tied embeddings' when there is no
    /// `lm_head`). It takes one row per sequence: the last position of each prompt, or one per
    /// decoded row.
    pub fn quantized_output(&self) -> Option<QuantizedWeight<'_>> {
        match &self.lm_head {
            Some(head) => head.quantized(),
            None => self.embed_tokens.quantized(),
        }
    }

    /// The most rows (tokens, padding included) a product of one prefill pass of at most
    /// `tokens` tokens takes: the tokens, and the padding rows of one batch may add to them
    /// (see [`Transformer::prefill_rows`]).
    pub fn max_prefill_rows(&self, tokens: usize) -> usize {
        match self.row_padding {
            Some(share) => ((1.0 + f64::from(share)) * tokens as f64).floor() as usize,
            None => tokens,
        }
    }

    /// Which of several sequences to prefill as rows of one batch, given each one's next
    /// `counts` tokens (0: none) and the positions `earlier` in its cache. Rows cost more
    /// arithmetic than packing: padding after the shorter rows, and attention of every row over
    /// the columns of the row with the most positions. Both must stay within the loaded share
    /// of what packing computes. Tried in turn: every sequence with tokens; those at least half
    /// as long as the longest; the ones with no earlier positions; of those, the ones at least
    /// half as long. The first set of two rows or more that fits is taken; none when
    /// [`LoadOptions::prefill_rows`] is off.
    pub fn prefill_rows(&self, counts: &[usize], earlier: &[i32]) -> Vec<usize> {
        let Some(share) = self.row_padding else { return Vec::new() };
        let allowed = 1.0 + f64::from(share);
        let fits = |rows: &[usize]| {
            let len = rows.iter().map(|&i| counts[i]).max().unwrap_or(0) as f64;
            let columns = rows.iter().map(|&i| earlier[i] as f64 + counts[i] as f64).fold(0.0, f64::max);
            let tokens: f64 = rows.iter().map(|&i| counts[i] as f64).sum();
            let area: f64 = rows.iter().map(|&i| counts[i] as f64 * (earlier[i] as f64 + counts[i] as f64)).sum();
            let n = rows.len() as f64;
            rows.len() >= 2 && n * len <= allowed * tokens && n * len * columns <= allowed * area
        };
        let long = |rows: &[usize]| -> Vec<usize> {
            let longest = rows.iter().map(|&i| counts[i]).max().unwrap_or(0);
            rows.iter().copied().filter(|&i| 2 * counts[i] > longest).collect()
        };
        let active: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
        let new: Vec<usize> = active.iter().copied().filter(|&i| earlier[i] == 0).collect();
        let (long_active, long_new) = (long(&active), long(&new));
        [active, long_active, new, long_new].into_iter().find(|rows| fits(rows)).unwrap_or_default()
    }

    /// The dtype activations and the KV cache take.
    pub fn dtype(&self) -> Dtype {
        self.norm.weight.dtype()
    }

    /// Runs `ids` (`[tokens]`: all segments' tokens, concatenated) through the model, appending
    /// to each segment's cache. With `logits` it returns the next-token logits after the last token
    /// of every segment, shape `[segments, vocab]`; without, it only fills the caches (prefill).
    ///
    /// The hidden states are `[tokens, hidden]`: each product takes them as one matrix, which a
    /// `[1, tokens, hidden]` input would be folded into and the result unfolded from (two
    /// operations per product). Attention takes each segment's positions as `[1, heads, len,
    /// head_dim]`.
    pub fn forward(&self, ids: &Array, segments: &mut [Segment<'_>], logits: bool) -> Result<Option<Array>> {
        let total: i32 = segments.iter().map(|s| s.len).sum();
        if segments.is_empty() || ids.shape() != [total] || segments.iter().any(|s| s.len <= 0) {
            return Err(EngineError::invalid("forward: segments must be non-empty and cover the tokens exactly"));
        }
        let mut zeros = Zeros::default();
        let mut h = self.embed_tokens.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&h)?;
            let r = layer.self_attn.forward(&normed, segments, i, &mut zeros)?;
            h = h.add(&r)?;
            let r = layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?;
            h = h.add(&r)?;
        }
        if !logits {
            return Ok(None);
        }
        let h = self.norm.forward(&h)?;
        // The last position of each segment.
        let last = if segments.iter().all(|s| s.len == 1) {
            h
        } else {
            let mut rows = Vec::with_capacity(segments.len());
            let mut end = 0;
            for s in segments.iter() {
                end += s.len;
                rows.push(end - 1);
            }
            h.take(&Array::from_slice(&rows, &[rows.len() as i32])?, 0)?
        };
        Ok(Some(self.output(&last)?))
    }
}

impl Transformer {
    /// One decode step of a batch: `ids` is `[rows]`, one input token per row; each row appends
    /// one position to its row of `cache`. Returns the next-token logits, `[rows, vocab]`.
    ///
    /// The hidden states are `[rows, hidden]`, without the length axis of one position: every
    /// product takes its rows as one matrix, as a longer input's products do after folding its
    /// batch and length axes (a quantized product folds them itself, two reshapes per product
    /// and step), and the logits need no squeeze.
    pub fn forward_batch(&self, ids: &Array, cache: &mut BatchCache) -> Result<Array> {
        if ids.ndim() != 1 {
            return Err(EngineError::invalid("forward_batch: one input token per row, [rows], is needed"));
        }
        let layout = cache.begin_step(self.padded_kernel)?;
        let mut h = self.embed_tokens.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&h)?;
            let r = layer.self_attn.forward_batch(&normed, cache, i, &layout)?;
            h = h.add(&r)?;
            let r = layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?;
            h = h.add(&r)?;
        }
        cache.end_step();
        self.output(&self.norm.forward(&h)?)
    }

    /// The logits of normed hidden states: the output projection, or the tied embeddings.
    fn output(&self, h: &Array) -> Result<Array> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.embed_tokens.as_linear(h),
        }
    }
}

impl Transformer {
    /// Prefills the next tokens of several sequences as rows of one batch. `ids` is
    /// `[rows * len]`, `len` tokens per row, one row per segment: row `i`'s first
    /// `segments[i].len` tokens are its sequence's next ones, appended to its cache; the rest of
    /// the row is padding after them, computed and dropped.
    /// Each layer runs one attention for all rows. When no row has earlier positions, the rows'
    /// new keys are all there is and a causal mask covers both their order and their padding.
    /// Otherwise each row's cache is gathered into one `[rows, kv_heads, columns, head_dim]`
    /// array and a mask lets each row's position `p` see its columns up to `p`. Fills the
    /// caches only (no logits). The hidden states are `[rows * len, hidden]`, as in
    /// [`Transformer::forward`].
    pub fn forward_rows(&self, ids: &Array, len: i32, segments: &mut [Segment<'_>]) -> Result<()> {
        let rows = segments.len() as i32;
        if ids.shape() != [rows * len] || rows == 0 || segments.iter().any(|s| s.len <= 0 || s.len > len) {
            return Err(EngineError::invalid("forward_rows: one segment per row, each within its row"));
        }
        let layout = RowsLayout::new(segments, rows, len)?;
        let mut zeros = Zeros::default();
        let mut h = self.embed_tokens.forward(ids)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&h)?;
            // Of the last layer, a prefill needs only the keys and values.
            let Some(r) = layer.self_attn.forward_rows(&normed, segments, i, &layout, &mut zeros, i < last)? else {
                break;
            };
            h = h.add(&r)?;
            let r = layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?;
            h = h.add(&r)?;
        }
        Ok(())
    }
}

/// Where rows prefilled together start, and what each row's attention sees.
struct RowsLayout {
    /// Rows, and positions per row.
    rows: i32,
    len: i32,
    /// Each row's earlier positions (its cache's).
    offsets: RowOffsets,
    /// When a row has earlier positions: the columns of the gathered keys (the most positions
    /// of any row) and the mask over them, `[rows, 1, len, columns]`, true where new position
    /// `j` of row `i` sees column `c`: `c <= earlier_i + j`.
    gathered: Option<(i32, Array)>,
}

impl RowsLayout {
    fn new(segments: &[Segment<'_>], rows: i32, len: i32) -> Result<RowsLayout> {
        let earlier: Vec<i32> = segments.iter().map(|s| s.cache.offset()).collect();
        let offsets = RowOffsets::new(&earlier)?;
        let gathered = if earlier.iter().all(|&p| p == 0) {
            None
        } else {
            let columns = segments.iter().zip(&earlier).map(|(s, p)| p + s.len).max().unwrap_or(0);
            let mut mask = Vec::with_capacity(earlier.len() * (len * columns) as usize);
            for &p in &earlier {
                for j in 0..len {
                    mask.extend((0..columns).map(|c| c <= p + j));
                }
            }
            Some((columns, Array::from_slice(&mask, &[earlier.len() as i32, 1, len, columns])?))
        };
        Ok(RowsLayout { rows, len, offsets, gathered })
    }

    fn rope_offset(&self) -> RopeOffset<'_> {
        self.offsets.rope_offset()
    }
}

impl Attention {
    /// Attention of rows prefilled together (`[rows * len, hidden]` input; see
    /// [`Transformer::forward_rows`]). Without `output`, returns `None` once the caches hold the
    /// keys and values.
    fn forward_rows(
        &self,
        x: &Array,
        segments: &mut [Segment<'_>],
        layer: usize,
        layout: &RowsLayout,
        zeros: &mut Zeros,
        output: bool,
    ) -> Result<Option<Array>> {
        let (rows, len) = (layout.rows, layout.len);
        let [q, k, v] = self.project(x, &[rows, len])?;
        let keys = self.rope.forward_at(&heads(&k, self.k_norm.as_ref())?, layout.rope_offset())?;
        let values = heads(&v, None)?;
        let (kv_heads, k_dim, v_dim) = (keys.dim(1), keys.dim(3), values.dim(3));
        let mut cached = Vec::with_capacity(segments.len());
        for (i, seg) in segments.iter_mut().enumerate() {
            let r = i as i32;
            let row = |a: &Array, dim: i32| a.slice(&[r, 0, 0, 0], &[r + 1, kv_heads, seg.len, dim], &[1; 4]);
            cached.push(seg.cache.layers[layer].append(&row(&keys, k_dim)?, &row(&values, v_dim)?, zeros)?);
        }
        if !output {
            return Ok(None);
        }
        let queries = self.rope.forward_at(&heads(&q, self.q_norm.as_ref())?, layout.rope_offset())?;
        let out = match &layout.gathered {
            None => fast::scaled_dot_product_attention(&queries, &keys, &values, self.scale, Mask::Causal)?,
            Some((columns, mask)) => {
                let mut all_keys = zeros.get(&[rows, kv_heads, *columns, k_dim], keys.dtype())?;
                let mut all_values = zeros.get(&[rows, kv_heads, *columns, v_dim], values.dtype())?;
                for (i, (k, v)) in cached.iter().enumerate() {
                    let (r, n) = (i as i32, k.dim(2));
                    all_keys = all_keys.slice_update(k, &[r, 0, 0, 0], &[r + 1, kv_heads, n, k_dim])?;
                    all_values = all_values.slice_update(v, &[r, 0, 0, 0], &[r + 1, kv_heads, n, v_dim])?;
                }
                fast::scaled_dot_product_attention(&queries, &all_keys, &all_values, self.scale, Mask::Array(mask))?
            }
        };
        Ok(Some(self.o_proj.forward(&out.transpose(&[0, 2, 1, 3])?.reshape(&[rows * len, -1])?)?))
    }

    /// Attention of one new position per row (`[rows, hidden]` input). With one position,
    /// queries, keys and values are reshaped straight to `[rows, heads, 1, head_dim]` and the
    /// output straight back, where a longer input takes a transposition each way: the same
    /// values, and four operations fewer per layer.
    fn forward_batch(&self, x: &Array, cache: &mut BatchCache, layer: usize, layout: &StepLayout) -> Result<Array> {
        let rows = x.dim(0);
        let [q, k, v] = qkv(self.qkv.forward_heads_first(x, self.head_dim)?)?;
        let queries = self.rope.forward_at(&normed(&q, self.q_norm.as_ref())?, layout.rope_offset())?;
        let keys = self.rope.forward_at(&normed(&k, self.k_norm.as_ref())?, layout.rope_offset())?;
        let (keys, values) = cache.update(layer, &keys, &v)?;
        let out = layout.attention(&queries, &keys, &values, self.scale)?;
        self.o_proj.forward(&out.reshape(&[rows, -1])?)
    }

    /// Attention of segments' positions (`[tokens, hidden]` input; see [`Transformer::forward`]).
    fn forward(&self, x: &Array, segments: &mut [Segment<'_>], layer: usize, zeros: &mut Zeros) -> Result<Array> {
        let [q, k, v] = self.project(x, &[1, x.dim(0)])?;
        if let [seg] = segments {
            let out = self.attend(&q, &k, &v, seg.len, &mut seg.cache.layers[layer], zeros)?;
            return self.o_proj.forward(&out);
        }
        let mut outs = Vec::with_capacity(segments.len());
        let mut start = 0;
        for seg in segments.iter_mut() {
            let end = start + seg.len;
            let part = |a: &Array| a.slice_axis(1, start, end);
            outs.push(self.attend(&part(&q)?, &part(&k)?, &part(&v)?, seg.len, &mut seg.cache.layers[layer], zeros)?);
            start = end;
        }
        let refs: Vec<&Array> = outs.iter().collect();
        self.o_proj.forward(&mlx::concatenate(&refs, 0)?)
    }

    /// The query, key and value projections of `x` (`[tokens, hidden]`), each
    /// `[lead..., heads, head_dim]` (`lead`: `[batch, len]`).
    fn project(&self, x: &Array, lead: &[i32]) -> Result<[Array; 3]> {
        qkv(self.qkv.forward_heads(x, lead, self.head_dim)?)
    }

    /// Attention of one sequence's `len` new positions (`[1, len, heads, head_dim]` projections),
    /// as `[len, heads * head_dim]`.
    fn attend(
        &self,
        q: &Array,
        k: &Array,
        v: &Array,
        len: i32,
        cache: &mut LayerCache,
        zeros: &mut Zeros,
    ) -> Result<Array> {
        let queries = heads(q, self.q_norm.as_ref())?;
        let keys = heads(k, self.k_norm.as_ref())?;
        let values = heads(v, None)?;
        let offset = cache.offset();
        let queries = self.rope.forward(&queries, offset)?;
        let keys = self.rope.forward(&keys, offset)?;
        let (keys, values) = cache.append(&keys, &values, zeros)?;
        let mask = if len > 1 { Mask::Causal } else { Mask::None };
        let out = fast::scaled_dot_product_attention(&queries, &keys, &values, self.scale, mask)?;
        Ok(out.transpose(&[0, 2, 1, 3])?.reshape(&[len, -1])?)
    }
}

/// The query, key and value projections, in that order.
fn qkv(parts: Vec<Array>) -> Result<[Array; 3]> {
    parts.try_into().map_err(|_| EngineError::invalid("attention: three projections expected"))
}

/// `[batch, len, heads, head_dim]` to `[batch, heads, len, head_dim]`, after the per-head norm
/// when there is one.
fn heads(a: &Array, norm: Option<&RmsNorm>) -> Result<Array> {
    Ok(normed(a, norm)?.transpose(&[0, 2, 1, 3])?)
}

/// `a` after the per-head norm when there is one.
fn normed(a: &Array, norm: Option<&RmsNorm>) -> Result<Array> {
    match norm {
        Some(norm) => norm.forward(a),
        None => Ok(a.clone()),
    }
}

impl Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let [gate, up]: [Array; 2] =
            self.gate_up.forward(x)?.try_into().map_err(|_| EngineError::invalid("mlp: two projections expected"))?;
        let gated = fast::swiglu(&gate, &up)?;
        self.down_proj.forward(&gated)
    }
}
