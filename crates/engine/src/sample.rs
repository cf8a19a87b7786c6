//! Turning next-token logits into a token, as mlx-lm's `sample_utils` does: logits processors
//! (repetition penalty), log-softmax, then greedy argmax or filtered categorical sampling.
use mlx::{Array, Dtype, random};

use crate::error::{EngineError, Result};

/// Sampling settings of one request. Build with [`SamplingParams::validate`] before use.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus: keep the smallest set of tokens whose probability reaches `top_p`. 1 keeps all.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens. 0 keeps all.
    pub top_k: i32,
    /// Keep tokens at least `min_p` times as likely as the most likely one. 0 keeps all.
    pub min_p: f32,
    /// Multiplicative penalty for tokens among the last `repetition_context_size`. 1 is none.
    pub repetition_penalty: f32,
    pub repetition_context_size: usize,
    /// Seed for reproducible sampling; a random seed when absent.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context_size: 20,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field against its range; the error names the field and the range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(EngineError::invalid(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("`temperature` must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("`top_p` must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < 0 {
            return bad(format!("`top_k` must be >= 0, got {}", self.top_k));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("`min_p` must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("`repetition_penalty` must be a finite number > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The sampler of one sequence: its settings and its random key.
pub struct Sampler {
    params: SamplingParams,
    key: Option<Array>,
}

/// A sampled token (lazy, `[1]` uint32) with the log-probabilities it was drawn from (`[vocab]`).
pub struct Sampled {
    pub token: Array,
    pub logprobs: Array,
    /// Which output token of its sequence this is (0 for the first).
    pub index: usize,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let key = if params.is_greedy() {
            None
        } else {
            let seed = params.seed.unwrap_or_else(random_seed);
            Some(random::key(seed)?)
        };
        Ok(Sampler { params, key })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Skips `n` draws, as if `n` tokens had been sampled: a sequence resumed elsewhere continues
    /// the same random stream.
    pub fn advance(&mut self, n: usize) -> Result<()> {
        if let Some(key) = &mut self.key {
            for _ in 0..n {
                let (next, _) = random::split(key)?;
                *key = next;
            }
        }
        Ok(())
    }

    /// Samples from `logits` (`[1, vocab]`), given the tokens seen so far (prompt and output):
    /// `history`, then `last`, the previous sample while its value is not read yet (a lazy
    /// `[1]` array), so that a repetition penalty needs no wait for the step before.
    pub fn sample(&mut self, logits: &Array, history: &[u32], last: Option<&Array>) -> Result<Sampled> {
        let p = &self.params;
        let window = p.repetition_context_size;
        let logits = if p.repetition_penalty != 1.0 && window > 0 && (!history.is_empty() || last.is_some()) {
            let start = history.len().saturating_sub(window - usize::from(last.is_some()));
            repetition_penalty(logits, &history[start..], last, p.repetition_penalty)?
        } else {
            logits.clone()
        };
        let logprobs = logits.subtract(&logits.logsumexp(-1, true)?)?;
        let token = match &mut self.key {
            None => logprobs.argmax(-1, false)?,
            Some(key) => {
                let (next, sub) = random::split(key)?;
                *key = next;
                let mut lp = logprobs.clone();
                if p.top_p < 1.0 {
                    lp = apply_top_p(&lp, p.top_p)?;
                }
                if p.min_p > 0.0 {
                    lp = apply_min_p(&lp, p.min_p)?;
                }
                if p.top_k > 0 && p.top_k < lp.dim(-1) {
                    lp = apply_top_k(&lp, p.top_k)?;
                }
                let scaled = lp.multiply(&Array::scalar(f64::from(1.0 / p.temperature), lp.dtype())?)?;
                random::categorical(&scaled, -1, &sub)?
            }
        };
        Ok(Sampled { token: token.astype(Dtype::Uint32)?, logprobs: logprobs.squeeze(0)?, index: 0 })
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

fn neg_inf(dtype: Dtype) -> Result<Array> {
    Ok(Array::scalar(f64::NEG_INFINITY, dtype)?)
}

/// Logits of seen tokens (`tokens`, then `last`): negative ones multiplied by `penalty`, positive
/// ones divided by it.
fn repetition_penalty(logits: &Array, tokens: &[u32], last: Option<&Array>, penalty: f32) -> Result<Array> {
    let seen = (!tokens.is_empty()).then(|| Array::from_slice(tokens, &[1, tokens.len() as i32])).transpose()?;
    let last = last.map(|t| t.reshape(&[1, 1])).transpose()?;
    let idx = match (seen, last) {
        (Some(a), Some(b)) => mlx::concatenate(&[&a, &b], 1)?,
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return Ok(logits.clone()),
    };
    let selected = logits.take_along_axis(&idx, 1)?;
    let pen = Array::scalar(f64::from(penalty), logits.dtype())?;
    let zero = Array::scalar(0.0, logits.dtype())?;
    let updated = mlx::where_cond(&selected.less(&zero)?, &selected.multiply(&pen)?, &selected.divide(&pen)?)?;
    Ok(logits.put_along_axis(&idx, &updated, 1)?)
}

/// Nucleus filter: drop the least likely tokens whose total probability is below `1 - top_p`.
fn apply_top_p(logprobs: &Array, top_p: f32) -> Result<Array> {
    let sorted = logprobs.sort(-1)?;
    let probs = sorted.astype(Dtype::Float32)?.exp()?;
    let mass_above = probs.cumsum(-1, true, false)?;
    let total = mass_above.slice_axis(-1, 0, 1)?.add(&probs.slice_axis(-1, 0, 1)?)?;
    let limit = total.multiply(&Array::scalar(f64::from(top_p), Dtype::Float32)?)?;
    let dropped = mass_above.greater_equal(&limit)?.astype(Dtype::Int32)?.sum(-1, true)?;
    let threshold = sorted.take_along_axis(&dropped, -1)?;
    Ok(mlx::where_cond(&logprobs.less(&threshold)?, &neg_inf(logprobs.dtype())?, logprobs)?)
}

fn apply_min_p(logprobs: &Array, min_p: f32) -> Result<Array> {
    let top = logprobs.max(-1, true)?;
    let floor = top.add(&Array::scalar(f64::from(min_p).ln(), logprobs.dtype())?)?;
    Ok(mlx::where_cond(&logprobs.less(&floor)?, &neg_inf(logprobs.dtype())?, logprobs)?)
}

fn apply_top_k(logprobs: &Array, k: i32) -> Result<Array> {
    let vocab = logprobs.dim(-1);
    let order = logprobs.negative()?.argpartition(k - 1, -1)?;
    let drop = order.slice_axis(-1, k, vocab)?;
    let fill = neg_inf(logprobs.dtype())?.broadcast_to(&drop.shape())?;
    Ok(logprobs.put_along_axis(&drop, &fill, -1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(values: &[f32]) -> Array {
        Array::from_slice(values, &[1, values.len() as i32]).unwrap()
    }

    fn draws(params: SamplingParams, l: &Array, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params).unwrap();
        (0..n).map(|_| s.sample(l, &[], None).unwrap().token.item::<u32>().unwrap()).collect()
    }

    #[test]
    fn invalid_params_name_the_field() {
        let cases = [
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { top_k: -2, ..Default::default() }, "top_k"),
            (SamplingParams { min_p: 2.0, ..Default::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
        ];
        for (p, field) in cases {
            let err = p.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let l = logits(&[0.1, 3.0, -1.0, 2.9]);
        assert_eq!(draws(SamplingParams::default(), &l, 3), vec![1, 1, 1]);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let l = logits(&[0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]);
        let p = SamplingParams { temperature: 1.0, seed: Some(7), ..Default::default() };
        let a = draws(p.clone(), &l, 50);
        assert_eq!(a, draws(p, &l, 50));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 3, "sampling at temperature 1 should spread: {a:?}");
        let other = draws(SamplingParams { temperature: 1.0, seed: Some(8), ..Default::default() }, &l, 50);
        assert_ne!(a, other);
    }

    #[test]
    fn top_p_draws_only_inside_the_nucleus() {
        // Probabilities [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]: the smallest set reaching 0.85 is
        // {0, 1, 2, 3} (0.9); 0.8 alone would already be reached by {0, 1, 2}.
        let probs = [0.4f32, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02];
        let l = logits(&probs.iter().map(|p| p.ln()).collect::<Vec<_>>());
        let p = SamplingParams { temperature: 1.0, top_p: 0.85, seed: Some(1), ..Default::default() };
        let got = draws(p, &l, 2000);
        assert!(got.iter().all(|&t| t <= 3), "a token outside the nucleus was drawn");
        for t in 0..=3u32 {
            assert!(got.contains(&t), "token {t} of the nucleus never drawn");
        }
    }

    #[test]
    fn top_k_and_min_p_filter() {
        let l = logits(&[2.0, 1.9, 1.8, -5.0, -6.0]);
        let k = draws(SamplingParams { temperature: 1.0, top_k: 2, seed: Some(3), ..Default::default() }, &l, 500);
        assert!(k.iter().all(|&t| t < 2));
        let m = draws(SamplingParams { temperature: 1.0, min_p: 0.1, seed: Some(3), ..Default::default() }, &l, 500);
        assert!(m.iter().all(|&t| t < 3));
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let l = logits(&[2.0, 1.9, 1.5]);
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.5, ..Default::default() }).unwrap();
        assert_eq!(s.sample(&l, &[0], None).unwrap().token.item::<u32>().unwrap(), 1);
        // The previous sample, not read yet, counts as seen as well.
        let last = Array::from_slice(&[1u32], &[1]).unwrap();
        assert_eq!(s.sample(&l, &[0], Some(&last)).unwrap().token.item::<u32>().unwrap(), 2);
        // A window of one token holds only that last sample.
        let mut one =
            Sampler::new(SamplingParams { repetition_penalty: 1.5, repetition_context_size: 1, ..Default::default() })
                .unwrap();
        assert_eq!(one.sample(&l, &[0], Some(&last)).unwrap().token.item::<u32>().unwrap(), 0);
    }
}
