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
use mlx::fast::{self, Mask};
use mlx::{Array, Dtype};

use crate::batch::{BatchCache, StepLayout};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, LayerCache};
use crate::nn::{Embedding, Linear, RmsNorm, Rope, Stacked, split_heads};
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
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions { stack_projections: true, padded_attention_kernel: true }
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

    /// Each output as `[..., heads, head_dim]`.
    fn forward_heads(&self, x: &Array, head_dim: i32) -> Result<Vec<Array>> {
        match self {
            Projections::Separate(v) => v.iter().map(|l| split_heads(&l.forward(x)?, head_dim)).collect(),
            Projections::Stacked(s) => s.forward_heads(x, head_dim),
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
        let model = Transformer { embed_tokens, layers, norm, lm_head, config, spec, padded_kernel };
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

    /// The dtype activations and the KV cache take.
    pub fn dtype(&self) -> Dtype {
        self.norm.weight.dtype()
    }

    /// Runs `ids` (`[1, tokens]`: all segments' tokens, concatenated) through the model, appending
    /// to each segment's cache. With `logits` it returns the next-token logits after the last token
    /// of every segment, shape `[segments, vocab]`; without, it only fills the caches (prefill).
    pub fn forward(&self, ids: &Array, segments: &mut [Segment<'_>], logits: bool) -> Result<Option<Array>> {
        let total: i32 = segments.iter().map(|s| s.len).sum();
        if segments.is_empty() || ids.shape() != [1, total] || segments.iter().any(|s| s.len <= 0) {
            return Err(EngineError::invalid("forward: segments must be non-empty and cover the tokens exactly"));
        }
        let mut h = self.embed_tokens.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&h)?;
            let r = layer.self_attn.forward(&normed, segments, i)?;
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
            h.take(&Array::from_slice(&rows, &[rows.len() as i32])?, 1)?
        };
        let out = match &self.lm_head {
            Some(head) => head.forward(&last)?,
            None => self.embed_tokens.as_linear(&last)?,
        };
        Ok(Some(out.squeeze(0)?))
    }
}

impl Transformer {
    /// One decode step of a batch: `ids` is `[rows, 1]`, one input token per row; each row
    /// appends one position to its row of `cache`. Returns the next-token logits, `[rows, vocab]`.
    pub fn forward_batch(&self, ids: &Array, cache: &mut BatchCache) -> Result<Array> {
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
        let h = self.norm.forward(&h)?;
        let out = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        Ok(out.squeeze(1)?)
    }
}

impl Attention {
    /// Attention of one new position per row (`[rows, 1, heads * head_dim]` input).
    fn forward_batch(&self, x: &Array, cache: &mut BatchCache, layer: usize, layout: &StepLayout) -> Result<Array> {
        let rows = x.dim(0);
        let [q, k, v] = self.project(x)?;
        let queries = heads(&q, self.q_norm.as_ref())?;
        let keys = heads(&k, self.k_norm.as_ref())?;
        let values = heads(&v, None)?;
        let queries = self.rope.forward_at(&queries, layout.rope_offset())?;
        let keys = self.rope.forward_at(&keys, layout.rope_offset())?;
        let (keys, values) = cache.update(layer, &keys, &values)?;
        let out = layout.attention(&queries, &keys, &values, self.scale)?;
        self.o_proj.forward(&out.transpose(&[0, 2, 1, 3])?.reshape(&[rows, 1, -1])?)
    }

    fn forward(&self, x: &Array, segments: &mut [Segment<'_>], layer: usize) -> Result<Array> {
        let [q, k, v] = self.project(x)?;
        if let [seg] = segments {
            let out = self.attend(&q, &k, &v, seg.len, &mut seg.cache.layers[layer])?;
            return self.o_proj.forward(&out);
        }
        let mut outs = Vec::with_capacity(segments.len());
        let mut start = 0;
        for seg in segments.iter_mut() {
            let end = start + seg.len;
            let part = |a: &Array| a.slice_axis(1, start, end);
            outs.push(self.attend(&part(&q)?, &part(&k)?, &part(&v)?, seg.len, &mut seg.cache.layers[layer])?);
            start = end;
        }
        let refs: Vec<&Array> = outs.iter().collect();
        self.o_proj.forward(&mlx::concatenate(&refs, 1)?)
    }

    /// The query, key and value projections of `x` (`[batch, len, hidden]`), each
    /// `[batch, len, heads, head_dim]`.
    fn project(&self, x: &Array) -> Result<[Array; 3]> {
        self.qkv
            .forward_heads(x, self.head_dim)?
            .try_into()
            .map_err(|_| EngineError::invalid("attention: three projections expected"))
    }

    /// Attention of one sequence's `len` new positions (`[1, len, heads, head_dim]` projections).
    fn attend(&self, q: &Array, k: &Array, v: &Array, len: i32, cache: &mut LayerCache) -> Result<Array> {
        let queries = heads(q, self.q_norm.as_ref())?;
        let keys = heads(k, self.k_norm.as_ref())?;
        let values = heads(v, None)?;
        let offset = cache.offset();
        let queries = self.rope.forward(&queries, offset)?;
        let keys = self.rope.forward(&keys, offset)?;
        let (keys, values) = cache.update_and_fetch(&keys, &values)?;
        let mask = if len > 1 { Mask::Causal } else { Mask::None };
        let out = fast::scaled_dot_product_attention(&queries, &keys, &values, self.scale, mask)?;
        Ok(out.transpose(&[0, 2, 1, 3])?.reshape(&[1, len, -1])?)
    }
}

/// `[batch, len, heads, head_dim]` to `[batch, heads, len, head_dim]`, after the per-head norm
/// when there is one.
fn heads(a: &Array, norm: Option<&RmsNorm>) -> Result<Array> {
    let a = match norm {
        Some(norm) => norm.forward(a)?,
        None => a.clone(),
    };
    Ok(a.transpose(&[0, 2, 1, 3])?)
}

impl Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let [gate, up]: [Array; 2] =
            self.gate_up.forward(x)?.try_into().map_err(|_| EngineError::invalid("mlp: two projections expected"))?;
        let gated = fast::swiglu(&gate, &up)?;
        self.down_proj.forward(&gated)
    }
}
