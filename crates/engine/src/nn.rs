//! Layers shaped like mlx.nn's: each holds its arrays and computes exactly what mlx-lm computes.
use mlx::fast::{self, RopeOffset};
use mlx::{Array, Dtype};

use crate::config::{ModelConfig, Quantization};
use crate::error::{EngineError, Result};
use crate::weights::Weights;

/// The packed columns of one quantized row: `in_features * bits / 32` uint32 words.
fn packed(in_features: i32, q: Quantization) -> i32 {
    in_features * q.bits / 32
}

/// `y = x W^T + b`, dense or MLX affine-quantized. On the CPU a bfloat16 weight is kept packed
/// for [`fast::packed_matmul`], which gives MLX's own products faster.
pub enum Linear {
    /// `weight_t`: the weight's transpose, a view made once so that a product adds no
    /// transposition to the graph of each step.
    Dense {
        weight: Array,
        weight_t: Array,
        bias: Option<Array>,
    },
    Packed {
        weight: PackedWeight,
        bias: Option<Array>,
    },
    Quantized {
        weight: Array,
        scales: Array,
        biases: Array,
        bias: Option<Array>,
        q: Quantization,
    },
}

/// A quantized weight `[out_features, in_features]` (packed, with its scales and biases), as one
/// quantized product of the model takes it.
#[derive(Clone, Copy)]
pub struct QuantizedWeight<'a> {
    pub weight: &'a Array,
    pub scales: &'a Array,
    pub biases: &'a Array,
    pub q: Quantization,
}

impl QuantizedWeight<'_> {
    pub fn out_features(&self) -> i32 {
        self.weight.dim(0)
    }

    pub fn in_features(&self) -> i32 {
        self.weight.dim(1) * 32 / self.q.bits
    }

    /// `x W^T`.
    pub fn product(&self, x: &Array) -> Result<Array> {
        Ok(fast::quantized_matmul(
            x,
            self.weight,
            self.scales,
            Some(self.biases),
            true,
            self.q.group_size,
            self.q.bits,
        )?)
    }
}

/// A bfloat16 weight `[n, k]` packed for [`fast::packed_matmul`].
pub struct PackedWeight {
    packed: Array,
    n: i32,
}

impl PackedWeight {
    /// Packs `weight` when products with it run on the CPU and the packed product is offered
    /// there for its type (and `bias`'s).
    fn pack(weight: &Array, bias: Option<&Array>) -> Result<Option<PackedWeight>> {
        let bf16 = |a: &Array| a.dtype() == Dtype::Bfloat16;
        if mlx::default_device() != mlx::Device::Cpu
            || !fast::packed_matmul_supported()
            || weight.ndim() != 2
            || !bf16(weight)
            || !bias.is_none_or(bf16)
        {
            return Ok(None);
        }
        let packed = fast::pack_weight(weight)?;
        packed.eval()?;
        Ok(Some(PackedWeight { packed, n: weight.dim(0) }))
    }

    /// `x W^T (+ bias)`, as `matmul` (or `addmm`) with the original weight would give it.
    fn forward(&self, x: &Array, bias: Option<&Array>) -> Result<Array> {
        if x.dtype() == Dtype::Bfloat16 {
            return Ok(fast::packed_matmul(x, &self.packed, self.n, bias)?);
        }
        // Another input type: MLX's own product with the weight unpacked.
        let (groups, k) = (self.packed.dim(0), self.packed.dim(1));
        let weight = self.packed.transpose(&[0, 2, 1])?.reshape(&[groups * 8, k])?.slice_axis(0, 0, self.n)?;
        Ok(match bias {
            Some(b) => b.addmm(x, &weight.t()?, 1.0, 1.0)?,
            None => x.matmul(&weight.t()?)?,
        })
    }
}

impl Linear {
    /// Loads `{prefix}.weight` (and scales/biases when quantized) of shape `[out, in]`.
    pub fn load(w: &mut Weights, cfg: &ModelConfig, prefix: &str, in_f: i32, out_f: i32, bias: bool) -> Result<Linear> {
        let q = quantization(w, cfg, prefix);
        let t = LinearTensors::take(w, prefix, in_f, out_f, q, bias)?;
        Linear::build(t, q)
    }

    fn build(t: LinearTensors, q: Option<Quantization>) -> Result<Linear> {
        let LinearTensors { weight, scales_biases, bias } = t;
        match (q, scales_biases) {
            (Some(q), Some((scales, biases))) => Ok(Linear::Quantized { weight, scales, biases, bias, q }),
            _ => Ok(match PackedWeight::pack(&weight, bias.as_ref())? {
                Some(weight) => Linear::Packed { weight, bias },
                None => Linear::Dense { weight_t: transposed(&weight)?, weight, bias },
            }),
        }
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(match self {
            Linear::Dense { weight_t, bias: None, .. } => x.matmul(weight_t)?,
            Linear::Dense { weight_t, bias: Some(b), .. } => b.addmm(x, weight_t, 1.0, 1.0)?,
            Linear::Packed { weight, bias } => weight.forward(x, bias.as_ref())?,
            Linear::Quantized { weight, scales, biases, bias, q } => {
                let y = QuantizedWeight { weight, scales, biases, q: *q }.product(x)?;
                match bias {
                    Some(b) => y.add(b)?,
                    None => y,
                }
            }
        })
    }

    /// The weight of its product when quantized.
    pub fn quantized(&self) -> Option<QuantizedWeight<'_>> {
        match self {
            Linear::Quantized { weight, scales, biases, q, .. } => {
                Some(QuantizedWeight { weight, scales, biases, q: *q })
            }
            Linear::Dense { .. } | Linear::Packed { .. } => None,
        }
    }

    pub(crate) fn arrays(&self) -> Vec<&Array> {
        match self {
            Linear::Dense { weight, bias, .. } => std::iter::once(weight).chain(bias.as_ref()).collect(),
            Linear::Packed { weight, bias } => std::iter::once(&weight.packed).chain(bias.as_ref()).collect(),
            Linear::Quantized { weight, scales, biases, bias, .. } => {
                [weight, scales, biases].into_iter().chain(bias.as_ref()).collect()
            }
        }
    }
}

/// `weight^T` as a view, evaluated now: it shares the weight's memory, and products that take it
/// build no transposition of their own.
fn transposed(weight: &Array) -> Result<Array> {
    let t = weight.t()?;
    t.eval()?;
    Ok(t)
}

/// The tensors of one projection, as the checkpoint has them.
struct LinearTensors {
    weight: Array,
    scales_biases: Option<(Array, Array)>,
    bias: Option<Array>,
}

impl LinearTensors {
    fn take(
        w: &mut Weights,
        prefix: &str,
        in_f: i32,
        out_f: i32,
        q: Option<Quantization>,
        bias: bool,
    ) -> Result<LinearTensors> {
        let bias = if bias { Some(w.take_shaped(&format!("{prefix}.bias"), &[out_f])?) } else { None };
        Ok(match q {
            Some(q) => {
                check_group(prefix, in_f, q)?;
                let groups = in_f / q.group_size;
                LinearTensors {
                    weight: w.take_shaped(&format!("{prefix}.weight"), &[out_f, packed(in_f, q)])?,
                    scales_biases: Some((
                        w.take_shaped(&format!("{prefix}.scales"), &[out_f, groups])?,
                        w.take_shaped(&format!("{prefix}.biases"), &[out_f, groups])?,
                    )),
                    bias,
                }
            }
            None => LinearTensors {
                weight: w.take_shaped(&format!("{prefix}.weight"), &[out_f, in_f])?,
                scales_biases: None,
                bias,
            },
        })
    }
}

/// Several projections of one input computed as one product: their weights (scales, biases)
/// stacked along the output axis. Every output is the same dot product as in its own projection,
/// and a step launches one product instead of several.
pub struct Stacked {
    linear: Linear,
    sizes: Vec<i32>,
}

impl Stacked {
    /// Loads `parts` (`(prefix, out_features)`, each `[out, in_f]`) as one projection, or `None`
    /// when they are not all quantized alike (mlx-lm allows a quantization per module).
    pub fn load(
        w: &mut Weights,
        cfg: &ModelConfig,
        parts: &[(&str, i32)],
        in_f: i32,
        bias: bool,
    ) -> Result<Option<Stacked>> {
        let qs: Vec<Option<Quantization>> = parts.iter().map(|(p, _)| quantization(w, cfg, p)).collect();
        if parts.len() < 2 || qs.windows(2).any(|pair| pair[0] != pair[1]) {
            return Ok(None);
        }
        let q = qs[0];
        let mut taken = Vec::with_capacity(parts.len());
        for &(prefix, out_f) in parts {
            taken.push(LinearTensors::take(w, prefix, in_f, out_f, q, bias)?);
        }
        let stack = |pick: &dyn Fn(&LinearTensors) -> &Array| -> Result<Array> {
            let v: Vec<&Array> = taken.iter().map(pick).collect();
            Ok(mlx::concatenate(&v, 0)?)
        };
        let weight = stack(&|t| &t.weight)?;
        let scales_biases = match q {
            Some(_) => Some((
                stack(&|t| &t.scales_biases.as_ref().expect("quantized").0)?,
                stack(&|t| &t.scales_biases.as_ref().expect("quantized").1)?,
            )),
            None => None,
        };
        let bias = if bias { Some(stack(&|t| t.bias.as_ref().expect("bias taken"))?) } else { None };
        // The stacked copies replace the checkpoint's arrays.
        let stacked: Vec<&Array> =
            std::iter::once(&weight).chain(scales_biases.iter().flat_map(|(s, b)| [s, b])).chain(bias.iter()).collect();
        mlx::eval(&stacked)?;
        drop(taken);
        let linear = Linear::build(LinearTensors { weight, scales_biases, bias }, q)?;
        Ok(Some(Stacked { linear, sizes: parts.iter().map(|p| p.1).collect() }))
    }

    /// Every part's output, in the order of `parts`, as views of one product.
    pub fn forward(&self, x: &Array) -> Result<Vec<Array>> {
        self.split(&self.linear.forward(x)?, -1, 1)
    }

    /// Every part's output for `x` (`[tokens, in]`) as `[lead..., heads, head_dim]` (`lead`
    /// multiplies to `tokens`), as views of one product. The product is split into heads before
    /// the parts are taken, so that each part is a view with unit stride along its heads (a
    /// later reshape of a part would copy it).
    pub fn forward_heads(&self, x: &Array, lead: &[i32], head_dim: i32) -> Result<Vec<Array>> {
        self.split(&split_heads(&self.linear.forward(x)?, lead, head_dim)?, -2, head_dim)
    }

    /// Every part's output for one position per row (`x` is `[rows, in]`) as
    /// `[rows, heads, 1, head_dim]`, as views of one product (see [`heads_first`]).
    pub fn forward_heads_first(&self, x: &Array, head_dim: i32) -> Result<Vec<Array>> {
        self.split(&heads_first(&self.linear.forward(x)?, head_dim)?, 1, head_dim)
    }

    /// The parts of `y` along `axis`, whose every index holds `unit` outputs.
    fn split(&self, y: &Array, axis: i32, unit: i32) -> Result<Vec<Array>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(self.sizes.len());
        for &n in &self.sizes {
            let n = n / unit;
            out.push(y.slice_axis(axis, start, start + n)?);
            start += n;
        }
        Ok(out)
    }

    /// The weight of the stacked product when quantized.
    pub fn quantized(&self) -> Option<QuantizedWeight<'_>> {
        self.linear.quantized()
    }

    pub(crate) fn arrays(&self) -> Vec<&Array> {
        self.linear.arrays()
    }
}

/// `[rows, heads * head_dim]`, one position per row, as `[rows, heads, 1, head_dim]`: a
/// reshape, the layout attention takes without the transposition a longer input needs.
pub fn heads_first(y: &Array, head_dim: i32) -> Result<Array> {
    if y.ndim() != 2 {
        return Err(EngineError::invalid("heads_first: one position per row, [rows, features], is needed"));
    }
    Ok(y.reshape(&[y.dim(0), -1, 1, head_dim])?)
}

/// `[tokens, heads * head_dim]` as `[lead..., heads, head_dim]`, where `lead` multiplies to
/// `tokens` (`[1, tokens]` for one sequence's positions, `[rows, len]` for rows of a batch).
pub fn split_heads(y: &Array, lead: &[i32], head_dim: i32) -> Result<Array> {
    if y.ndim() != 2 || lead.iter().product::<i32>() != y.dim(0) {
        return Err(EngineError::invalid("split_heads: [tokens, features] and a leading shape of that many tokens"));
    }
    let mut shape = lead.to_vec();
    shape.extend([y.dim(1) / head_dim, head_dim]);
    Ok(y.reshape(&shape)?)
}

fn quantization(w: &Weights, cfg: &ModelConfig, prefix: &str) -> Option<Quantization> {
    // As mlx-lm: a module is quantized exactly when its scales are in the checkpoint.
    if !w.contains(&format!("{prefix}.scales")) {
        return None;
    }
    cfg.quantization.as_ref().map(|qc| qc.for_module(prefix))
}

fn check_group(prefix: &str, in_f: i32, q: Quantization) -> Result<()> {
    if in_f % q.group_size != 0 {
        return Err(EngineError::invalid(format!(
            "{prefix}: input size {in_f} is not a multiple of the quantization group size {}",
            q.group_size
        )));
    }
    Ok(())
}

/// Token embeddings, dense or quantized, usable as the output projection when tied.
pub enum Embedding {
    /// `packed`: the weight packed for the output projection on the CPU, when tied;
    /// `weight_t`: the weight's transpose (a view made once), for the output projection otherwise.
    Dense {
        weight: Array,
        weight_t: Array,
        packed: Option<PackedWeight>,
    },
    Quantized {
        weight: Array,
        scales: Array,
        biases: Array,
        q: Quantization,
    },
}

impl Embedding {
    /// `tied`: the embeddings are also the output projection.
    pub fn load(
        w: &mut Weights,
        cfg: &ModelConfig,
        prefix: &str,
        vocab: i32,
        dim: i32,
        tied: bool,
    ) -> Result<Embedding> {
        match quantization(w, cfg, prefix) {
            Some(q) => {
                check_group(prefix, dim, q)?;
                let groups = dim / q.group_size;
                Ok(Embedding::Quantized {
                    weight: w.take_shaped(&format!("{prefix}.weight"), &[vocab, packed(dim, q)])?,
                    scales: w.take_shaped(&format!("{prefix}.scales"), &[vocab, groups])?,
                    biases: w.take_shaped(&format!("{prefix}.biases"), &[vocab, groups])?,
                    q,
                })
            }
            None => {
                let weight = w.take_shaped(&format!("{prefix}.weight"), &[vocab, dim])?;
                let packed = if tied { PackedWeight::pack(&weight, None)? } else { None };
                Ok(Embedding::Dense { weight_t: transposed(&weight)?, weight, packed })
            }
        }
    }

    pub fn forward(&self, ids: &Array) -> Result<Array> {
        Ok(match self {
            Embedding::Dense { weight, .. } => weight.take(ids, 0)?,
            Embedding::Quantized { weight, scales, biases, q } => fast::dequantize(
                &weight.take(ids, 0)?,
                &scales.take(ids, 0)?,
                Some(&biases.take(ids, 0)?),
                q.group_size,
                q.bits,
            )?,
        })
    }

    /// `x E^T`: the tied output projection.
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        Ok(match self {
            Embedding::Dense { packed: Some(p), .. } => p.forward(x, None)?,
            Embedding::Dense { weight_t, .. } => x.matmul(weight_t)?,
            Embedding::Quantized { weight, scales, biases, q } => {
                QuantizedWeight { weight, scales, biases, q: *q }.product(x)?
            }
        })
    }

    /// The weight of the output projection [`Embedding::as_linear`] when quantized.
    pub fn quantized(&self) -> Option<QuantizedWeight<'_>> {
        match self {
            Embedding::Quantized { weight, scales, biases, q } => {
                Some(QuantizedWeight { weight, scales, biases, q: *q })
            }
            Embedding::Dense { .. } => None,
        }
    }

    pub(crate) fn arrays(&self) -> Vec<&Array> {
        match self {
            Embedding::Dense { weight, packed, .. } => {
                std::iter::once(weight).chain(packed.as_ref().map(|p| &p.packed)).collect()
            }
            Embedding::Quantized { weight, scales, biases, .. } => vec![weight, scales, biases],
        }
    }
}

pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(w: &mut Weights, prefix: &str, dim: i32, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: w.take_shaped(&format!("{prefix}.weight"), &[dim])?, eps })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}

/// Rotary position embedding: default or linear scaling through `base` and `scale`, Llama 3
/// scaling through precomputed frequencies, as mlx-lm's `initialize_rope`.
pub struct Rope {
    dims: i32,
    traditional: bool,
    base: f32,
    scale: f32,
    freqs: Option<Array>,
}

impl Rope {
    pub fn new(dims: i32, base: f32, traditional: bool, scaling: Option<&serde_json::Value>) -> Result<Rope> {
        let mut rope = Rope { dims, traditional, base, scale: 1.0, freqs: None };
        let Some(s) = scaling else { return Ok(rope) };
        let kind = s.get("type").or_else(|| s.get("rope_type")).and_then(|v| v.as_str()).unwrap_or("default");
        let num = |key: &str, default: Option<f64>| -> Result<f64> {
            s.get(key)
                .and_then(|v| v.as_f64())
                .or(default)
                .ok_or_else(|| EngineError::invalid(format!("rope_scaling of type {kind:?} needs a numeric {key:?}")))
        };
        match kind {
            "default" => {}
            "linear" => rope.scale = (1.0 / num("factor", None)?) as f32,
            "llama3" => {
                rope.freqs = Some(llama3_freqs(
                    dims,
                    base,
                    num("factor", None)? as f32,
                    num("low_freq_factor", Some(1.0))? as f32,
                    num("high_freq_factor", Some(4.0))? as f32,
                    num("original_max_position_embeddings", Some(8192.0))? as f32,
                )?)
            }
            other => {
                return Err(EngineError::invalid(format!(
                    "rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
                )));
            }
        }
        Ok(rope)
    }

    pub fn forward(&self, x: &Array, offset: i32) -> Result<Array> {
        self.forward_at(x, RopeOffset::Scalar(offset))
    }

    /// With one offset for all rows or one per row.
    pub fn forward_at(&self, x: &Array, offset: RopeOffset<'_>) -> Result<Array> {
        Ok(fast::rope(x, self.dims, self.traditional, self.base, self.scale, offset, self.freqs.as_ref())?)
    }
}

/// Llama 3's frequency scaling, computed with MLX in float32 as mlx-lm's `Llama3RoPE` does.
fn llama3_freqs(dims: i32, base: f32, factor: f32, low: f32, high: f32, old_ctx: f32) -> Result<Array> {
    let s = |v: f32| Array::scalar(f64::from(v), Dtype::Float32);
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    let exponents = Array::arange(0.0, f64::from(dims), 2.0, Dtype::Int32)?
        .divide(&Array::scalar(f64::from(dims), Dtype::Int32)?)?;
    let freqs = s(base)?.power(&exponents)?;
    let wavelens = s(2.0 * std::f32::consts::PI)?.multiply(&freqs)?;
    let freqs = mlx::where_cond(&wavelens.greater(&s(low_wavelen)?)?, &freqs.multiply(&s(factor)?)?, &freqs)?;
    let medium = wavelens.greater(&s(high_wavelen)?)?.logical_and(&wavelens.less(&s(low_wavelen)?)?)?;
    let smooth = s(old_ctx)?.divide(&wavelens)?.subtract(&s(low)?)?.divide(&s(high - low)?)?;
    let one = s(1.0)?;
    let smooth_freqs = freqs.divide(&one.subtract(&smooth)?.divide(&s(factor)?)?.add(&smooth)?)?;
    let out = mlx::where_cond(&medium, &smooth_freqs, &freqs)?;
    out.eval()?;
    Ok(out)
}
