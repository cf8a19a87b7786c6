//! MLX's fused kernels and the quantized matrix products.
use std::ffi::CString;
use std::ptr;

use crate::array::wrap;
use crate::{Array, Error, Result, ffi};

fn opt(a: Option<&Array>) -> ffi::CArr {
    a.map_or(ptr::null(), Array::raw)
}

/// RMS normalisation over the last axis, scaled by `weight` when given.
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    // SAFETY: live handles or null.
    wrap(unsafe { ffi::mlxs_rms_norm(x.raw(), opt(weight), eps) })
}

/// Where a sequence's positions start for [`rope`].
pub enum RopeOffset<'a> {
    /// The same offset for the whole batch.
    Scalar(i32),
    /// One offset per batch row (an int32 array of shape `[batch]`).
    PerRow(&'a Array),
}

/// Rotary position embedding over the first `dims` features of the last axis. Either `base` or
/// explicit inverse `freqs` (for scaled variants such as Llama 3's) give the frequencies.
pub fn rope(
    x: &Array,
    dims: i32,
    traditional: bool,
    base: f32,
    scale: f32,
    offset: RopeOffset<'_>,
    freqs: Option<&Array>,
) -> Result<Array> {
    let (off, off_arr) = match offset {
        RopeOffset::Scalar(o) => (o, ptr::null()),
        RopeOffset::PerRow(a) => (0, a.raw()),
    };
    // SAFETY: live handles or null.
    wrap(unsafe { ffi::mlxs_rope(x.raw(), dims, traditional as i32, base, scale, off, off_arr, opt(freqs)) })
}

/// The attention mask for [`scaled_dot_product_attention`].
pub enum Mask<'a> {
    None,
    /// Lower-triangular, aligned to the end of the keys.
    Causal,
    /// A boolean (true = attend) or additive mask broadcastable to `[B, heads, L, S]`.
    Array(&'a Array),
}

/// `softmax(q @ k^T * scale + mask) @ v` with grouped-query heads.
pub fn scaled_dot_product_attention(q: &Array, k: &Array, v: &Array, scale: f32, mask: Mask<'_>) -> Result<Array> {
    let (mode, arr) = match mask {
        Mask::None => ("", ptr::null()),
        Mask::Causal => ("causal", ptr::null()),
        Mask::Array(a) => ("", a.raw()),
    };
    let mode = CString::new(mode).map_err(|e| Error::Invalid(e.to_string()))?;
    // SAFETY: live handles or null; `mode` outlives the call.
    wrap(unsafe { ffi::mlxs_sdpa(q.raw(), k.raw(), v.raw(), scale, mode.as_ptr(), arr) })
}

/// Whether [`padded_attention`] runs here for heads of `head_dim`: on MLX's CUDA backend with
/// the GPU as default device, `head_dim` a multiple of 32 up to 256. Elsewhere, attention with a
/// mask ([`scaled_dot_product_attention`]) is already one kernel (Metal) or composed anyway (CPU).
pub fn padded_attention_available(head_dim: i32) -> bool {
    // SAFETY: a plain integer.
    unsafe { ffi::mlxs_padded_attention_available(head_dim) == 1 }
}

/// Decode attention of `q [B, H, 1, D]` over `k`, `v [B, Hkv, N, D]` in which row `b` attends
/// to columns `[starts[b], N)` only (left-padded rows), as one CUDA kernel: the value of
/// [`scaled_dot_product_attention`] with the matching mask, softmax in float32.
pub fn padded_attention(q: &Array, k: &Array, v: &Array, scale: f32, starts: &Array) -> Result<Array> {
    // SAFETY: live handles.
    wrap(unsafe { ffi::mlxs_padded_attention(q.raw(), k.raw(), v.raw(), scale, starts.raw()) })
}

/// `silu(gate) * x` as one compiled, fused function (the same graph mlx-lm compiles).
pub fn swiglu(gate: &Array, x: &Array) -> Result<Array> {
    // SAFETY: live handles.
    wrap(unsafe { ffi::mlxs_swiglu(gate.raw(), x.raw()) })
}

/// Whether [`packed_matmul`] is offered here: everywhere but Apple's Accelerate build of MLX, whose
/// CPU product sums in another order.
pub fn packed_matmul_supported() -> bool {
    // SAFETY: no arguments.
    unsafe { ffi::mlxs_packed_matmul_supported() == 1 }
}

/// Packs a bfloat16 weight `[n, k]` for [`packed_matmul`] (`[ceil(n / 8), k, 8]`, lazy).
pub fn pack_weight(w: &Array) -> Result<Array> {
    // SAFETY: a live handle.
    wrap(unsafe { ffi::mlxs_pack_weight(w.raw()) })
}

/// `x @ w.T` (plus `bias`, as `addmm`) for bfloat16 `x [..., k]` and a weight `[n, k]` packed by
/// [`pack_weight`], on the CPU: the same values as MLX's own product, bit for bit, computed with
/// several rows and columns at once.
pub fn packed_matmul(x: &Array, packed: &Array, n: i32, bias: Option<&Array>) -> Result<Array> {
    // SAFETY: live handles or null.
    wrap(unsafe { ffi::mlxs_packed_matmul(x.raw(), packed.raw(), n, opt(bias)) })
}

/// `x @ dequantize(w).T` (or without the transpose) for MLX affine-quantized weights.
pub fn quantized_matmul(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    transpose: bool,
    group_size: i32,
    bits: i32,
) -> Result<Array> {
    // SAFETY: live handles or null.
    wrap(unsafe {
        ffi::mlxs_quantized_matmul(x.raw(), w.raw(), scales.raw(), opt(biases), transpose as i32, group_size, bits)
    })
}

/// The full-precision matrix behind affine-quantized weights.
pub fn dequantize(w: &Array, scales: &Array, biases: Option<&Array>, group_size: i32, bits: i32) -> Result<Array> {
    // SAFETY: live handles or null.
    wrap(unsafe { ffi::mlxs_dequantize(w.raw(), scales.raw(), opt(biases), group_size, bits) })
}

/// Affine quantization of `w` along its last axis: (weights, scales, biases).
pub fn quantize(w: &Array, group_size: i32, bits: i32) -> Result<(Array, Array, Array)> {
    let mut s = ptr::null_mut();
    let mut b = ptr::null_mut();
    // SAFETY: the out-pointers are written only on success.
    let q = wrap(unsafe { ffi::mlxs_quantize(w.raw(), group_size, bits, &mut s, &mut b) })?;
    Ok((q, wrap(s)?, wrap(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn bf16(data: &[f32], shape: &[i32]) -> Result<Array> {
        Array::from_slice(data, shape)?.astype(Dtype::Bfloat16)
    }

    #[test]
    fn the_packed_matmul_gives_mlxs_products_bit_for_bit() -> Result<()> {
        if !packed_matmul_supported() {
            return Ok(());
        }
        let mut seed = 1;
        for m in [1, 2, 3, 4, 5, 8, 9, 33] {
            for k in [16, 100, 128, 129, 300] {
                for n in [1, 7, 8, 9, 33, 130] {
                    seed += 1;
                    let x = bf16(&noise((m * k) as usize, seed), &[m, k])?;
                    let w = bf16(&noise((n * k) as usize, seed + 1000), &[n, k])?;
                    let b = bf16(&noise(n as usize, seed + 2000), &[n])?;
                    let p = pack_weight(&w)?;
                    let ours = packed_matmul(&x, &p, n, None)?.astype(Dtype::Float32)?.to_vec::<f32>()?;
                    let theirs = x.matmul(&w.t()?)?.astype(Dtype::Float32)?.to_vec::<f32>()?;
                    assert_eq!(ours, theirs, "matmul m={m} k={k} n={n}");
                    let ours = packed_matmul(&x, &p, n, Some(&b))?.astype(Dtype::Float32)?.to_vec::<f32>()?;
                    let theirs = b.addmm(&x, &w.t()?, 1.0, 1.0)?.astype(Dtype::Float32)?.to_vec::<f32>()?;
                    assert_eq!(ours, theirs, "addmm m={m} k={k} n={n}");
                }
            }
        }
        // Leading axes, and a transposed (non-contiguous) input.
        let x = bf16(&noise(2 * 3 * 64, 7), &[2, 3, 64])?;
        let w = bf16(&noise(40 * 64, 8), &[40, 64])?;
        let p = pack_weight(&w)?;
        let ours = packed_matmul(&x, &p, 40, None)?;
        assert_eq!(ours.shape(), vec![2, 3, 40]);
        let theirs = x.matmul(&w.t()?)?;
        assert_eq!(ours.astype(Dtype::Float32)?.to_vec::<f32>()?, theirs.astype(Dtype::Float32)?.to_vec::<f32>()?);
        let xt = bf16(&noise(64 * 5, 9), &[64, 5])?.t()?;
        let ours = packed_matmul(&xt, &p, 40, None)?.astype(Dtype::Float32)?.to_vec::<f32>()?;
        let theirs = xt.matmul(&w.t()?)?.astype(Dtype::Float32)?.to_vec::<f32>()?;
        assert_eq!(ours, theirs);
        // Wrong inputs are refused with a message.
        let e = packed_matmul(&x, &p, 41, None).unwrap_err().to_string();
        assert!(e.contains("packed weight"), "{e}");
        let e = packed_matmul(&x.astype(Dtype::Float32)?, &p, 40, None).unwrap_err().to_string();
        assert!(e.contains("bfloat16"), "{e}");
        Ok(())
    }

    #[test]
    fn the_padded_attention_kernel_names_what_it_needs() -> Result<()> {
        let q = Array::zeros(&[2, 4, 1, 32], Dtype::Bfloat16)?;
        let kv = Array::zeros(&[2, 2, 8, 32], Dtype::Bfloat16)?;
        let starts = Array::from_slice(&[0i32, 3], &[2])?;
        // Shapes are checked first, on every device.
        let bad = Array::zeros(&[2, 3, 8, 32], Dtype::Bfloat16)?;
        let e = padded_attention(&q, &bad, &bad, 1.0, &starts).unwrap_err().to_string();
        assert!(e.contains("H a multiple of Hkv"), "{e}");
        let e = padded_attention(&q, &kv, &kv, 1.0, &Array::from_slice(&[0i32], &[1])?).unwrap_err().to_string();
        assert!(e.contains("starts [B]"), "{e}");
        // Only MLX's CUDA backend runs the kernel; elsewhere the call says so instead of failing later.
        assert_eq!(padded_attention_available(32), crate::default_device_is_cuda());
        assert!(!padded_attention_available(48) && !padded_attention_available(512), "head sizes");
        if !padded_attention_available(32) {
            let e = padded_attention(&q, &kv, &kv, 1.0, &starts).unwrap_err().to_string();
            assert!(e.contains("CUDA"), "{e}");
        }
        Ok(())
    }

    #[test]
    fn quantize_round_trip_and_kernels() -> Result<()> {
        let data: Vec<f32> = (0..64 * 8).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let w = Array::from_slice(&data, &[8, 64])?;
        let (q, s, b) = quantize(&w, 64, 8)?;
        let back = dequantize(&q, &s, Some(&b), 64, 8)?;
        let err = back.subtract(&w)?.abs()?.max(-1, false)?.max(0, false)?.item::<f32>()?;
        assert!(err < 0.01, "8-bit round trip error {err}");
        let x = Array::from_slice(&data[..64], &[1, 64])?;
        let y = quantized_matmul(&x, &q, &s, Some(&b), true, 64, 8)?;
        assert_eq!(y.shape(), vec![1, 8]);
        // Rows over a batch dimension ([3, 1, 64]) give the rows of the one [3, 64] product.
        let rows = Array::from_slice(&data[..3 * 64], &[3, 64])?;
        let flat = quantized_matmul(&rows, &q, &s, Some(&b), true, 64, 8)?;
        let batched = quantized_matmul(&rows.reshape(&[3, 1, 64])?, &q, &s, Some(&b), true, 64, 8)?;
        assert_eq!(batched.shape(), vec![3, 1, 8]);
        assert_eq!(batched.to_vec::<f32>()?, flat.to_vec::<f32>()?);
        let nested = quantized_matmul(&rows.reshape(&[3, 1, 1, 64])?, &q, &s, Some(&b), true, 64, 8)?;
        assert_eq!(nested.shape(), vec![3, 1, 1, 8]);
        assert_eq!(nested.to_vec::<f32>()?, flat.to_vec::<f32>()?);

        let n = rms_norm(&x, None, 1e-5)?;
        let ms = n.multiply(&n)?.mean(-1, false)?.item::<f32>()?;
        assert!((ms - 1.0).abs() < 1e-3, "{ms}");

        let qkv = Array::from_slice(&data[..4 * 32], &[1, 1, 4, 32])?;
        let r = rope(&qkv, 32, false, 10000.0, 1.0, RopeOffset::Scalar(0), None)?;
        let out = scaled_dot_product_attention(&r, &r, &qkv, 0.1, Mask::Causal)?;
        assert_eq!(out.shape(), vec![1, 1, 4, 32]);
        // The first query attends only to the first key, so it returns the first value exactly.
        let first = out.slice_axis(2, 0, 1)?.to_vec::<f32>()?;
        assert_eq!(first, data[..32].to_vec());

        let g = swiglu(&x, &x)?;
        let expect = x.silu()?.multiply(&x)?;
        let diff = g.subtract(&expect)?.abs()?.max(-1, false)?.item::<f32>()?;
        assert!(diff < 1e-6);
        assert_eq!(g.dtype(), Dtype::Float32);
        Ok(())
    }
}
