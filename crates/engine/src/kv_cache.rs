//! Per-sequence key/value cache, grown in fixed steps as mlx-lm's `KVCache` is.
use mlx::{Array, Dtype};

use crate::error::Result;

/// Positions added per growth of the buffers.
pub const STEP: i32 = 256;

/// One layer's keys and values for one sequence: `[1, kv_heads, capacity, head_dim]` buffers of
/// which the first `offset` positions are filled.
#[derive(Default)]
pub struct LayerCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl LayerCache {
    /// A cache holding `keys`/`values` (`[1, kv_heads, n, head_dim]`), all `n` positions filled.
    /// The arrays are shared, never written: the first append copies them into new buffers.
    pub fn from_arrays(keys: Array, values: Array) -> LayerCache {
        let offset = keys.dim(2);
        LayerCache { keys: Some(keys), values: Some(values), offset }
    }

    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Views of the filled positions, or `None` when empty.
    pub fn filled(&self) -> Result<Option<(Array, Array)>> {
        if self.offset == 0 {
            return Ok(None);
        }
        self.fetch().map(Some)
    }

    /// The first `n` filled positions (views), or `None` when empty.
    pub fn prefix(&self, n: i32) -> Result<Option<(Array, Array)>> {
        let (Some(k), Some(v)) = (&self.keys, &self.values) else { return Ok(None) };
        let n = n.min(self.offset);
        if n <= 0 {
            return Ok(None);
        }
        Ok(Some((k.slice_axis(2, 0, n)?, v.slice_axis(2, 0, n)?)))
    }

    /// Appends `keys`/`values` of shape `[1, kv_heads, L, head_dim]` and returns views of every
    /// position so far. The zeroed buffers the cache grows by come from `zeros`.
    pub fn append(&mut self, keys: &Array, values: &Array, zeros: &mut Zeros) -> Result<(Array, Array)> {
        let prev = self.offset;
        let len = keys.dim(2);
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        if self.keys.is_none() || prev + len > capacity {
            let shape = keys.shape();
            let (b, heads, k_dim, v_dim) = (shape[0], shape[1], shape[3], values.dim(3));
            let n_steps = (STEP + len - 1) / STEP;
            let new_k = zeros.get(&[b, heads, n_steps * STEP, k_dim], keys.dtype())?;
            let new_v = zeros.get(&[b, heads, n_steps * STEP, v_dim], values.dtype())?;
            match (self.keys.take(), self.values.take()) {
                (Some(k), Some(v)) => {
                    let (k, v) =
                        if prev % STEP != 0 { (k.slice_axis(2, 0, prev)?, v.slice_axis(2, 0, prev)?) } else { (k, v) };
                    self.keys = Some(mlx::concatenate(&[&k, &new_k], 2)?);
                    self.values = Some(mlx::concatenate(&[&v, &new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
        }
        let (Some(k), Some(v)) = (self.keys.take(), self.values.take()) else {
            return Err(mlx::Error::Invalid("the cache has no buffers".into()).into());
        };
        let end = prev + len;
        let put = |buf: &Array, new: &Array| -> Result<Array> {
            let mut start = vec![0; 4];
            let mut stop = buf.shape();
            start[2] = prev;
            stop[2] = end;
            Ok(buf.slice_update(new, &start, &stop)?)
        };
        self.keys = Some(put(&k, keys)?);
        self.values = Some(put(&v, values)?);
        self.offset = end;
        self.fetch()
    }

    fn fetch(&self) -> Result<(Array, Array)> {
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            return Err(mlx::Error::Invalid("the cache is empty".into()).into());
        };
        if self.offset < k.dim(2) {
            Ok((k.slice_axis(2, 0, self.offset)?, v.slice_axis(2, 0, self.offset)?))
        } else {
            Ok((k.clone(), v.clone()))
        }
    }

    /// The buffers, for evaluation after a prefill chunk.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }

    /// Bytes held by the buffers.
    pub fn nbytes(&self) -> usize {
        self.state().iter().map(|a| a.nbytes()).sum()
    }

    /// Drops the last `n` positions (they are overwritten by later appends).
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.min(self.offset);
        self.offset -= n;
        n
    }
}

/// Zeroed arrays, one per shape and dtype, shared by the caches a forward pass grows: a write
/// into a shared array copies it, so every cache still gets a buffer of its own, and the pass
/// adds one MLX operation per shape instead of one per buffer.
#[derive(Default)]
pub struct Zeros {
    made: Vec<(Vec<i32>, Dtype, Array)>,
}

impl Zeros {
    pub fn get(&mut self, shape: &[i32], dtype: Dtype) -> Result<Array> {
        if let Some((_, _, a)) = self.made.iter().find(|(s, d, _)| s == shape && *d == dtype) {
            return Ok(a.clone());
        }
        let a = Array::zeros(shape, dtype)?;
        self.made.push((shape.to_vec(), dtype, a.clone()));
        Ok(a)
    }
}

/// The cache of one sequence: one [`LayerCache`] per layer.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache { layers: (0..num_layers).map(|_| LayerCache::default()).collect() }
    }

    /// The first `n` positions of every layer, as a cache of its own sharing the arrays.
    pub fn prefix(&self, n: i32) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l.prefix(n)? {
                Some((k, v)) => LayerCache::from_arrays(k, v),
                None => LayerCache::default(),
            });
        }
        Ok(KvCache { layers })
    }

    /// Tokens held.
    pub fn offset(&self) -> i32 {
        self.layers.first().map_or(0, LayerCache::offset)
    }

    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(LayerCache::nbytes).sum()
    }

    pub fn eval(&self) -> Result<()> {
        let arrays: Vec<&Array> = self.layers.iter().flat_map(LayerCache::state).collect();
        Ok(mlx::eval(&arrays)?)
    }
}

/// Bytes of KV cache per token for a model shape, for memory budgets.
pub fn bytes_per_token(layers: i32, kv_heads: i32, head_dim: i32, dtype: Dtype) -> usize {
    2 * layers as usize * kv_heads as usize * head_dim as usize * dtype.size()
}
