//! The mlx-serving engine: loads models in the mlx-community layout and generates with them on
//! MLX, token for token as mlx-lm does.
//!
//! Layers: [`models::Transformer::forward`] (one packed forward pass over one or many sequences),
//! [`Model::prefill_chunk`] / [`Model::decode_step`] (advance sequences), and [`Model::generate`]
//! (one request, streamed).
pub mod batch;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod models;
pub mod nn;
pub mod prefix_cache;
pub mod sample;
pub mod sequence;
pub mod weights;

use std::path::{Path, PathBuf};
use std::time::Instant;

use mlx::Array;

pub use batch::{Batch, BatchStep};
pub use config::ModelConfig;
pub use error::{EngineError, Result};
pub use generate::{Completion, FinishReason, GenerateParams, TextStream, TokenEvent};
pub use mlx_serving_tokenizer::{ChatMessage, Tokenizer};
pub use models::{LoadOptions, Transformer};
use nn::QuantizedWeight;
pub use prefix_cache::{PrefixCache, PrefixCacheCounts};
pub use sample::{Sampler, SamplingParams};
pub use sequence::Sequence;

/// Context length assumed when config.json gives none.
pub const DEFAULT_CONTEXT_LENGTH: usize = 4096;

/// What [`Model::warm_up`] ran.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WarmUp {
    /// Distinct quantized products: by output and input features, bits and group size.
    pub products: usize,
    /// Products evaluated: every distinct one at each number of rows of [`warm_up_rows`] up to
    /// its bound.
    pub calls: usize,
    pub seconds: f64,
    /// The slowest call: its rows and seconds.
    pub slowest: Option<(usize, f64)>,
    /// Seconds of the pass through the engine's own paths (see [`Model::warm_up`]).
    pub engine_seconds: f64,
}

/// The numbers of rows [`Model::warm_up`] runs each quantized product at, ascending: every power
/// of two from 2 up to the first at or above `max_rows`, each also plus one, and `max_rows`
/// itself. Whatever rows MLX's kernels start a new tile size at, each size is run. One row is
/// left out (MLX ships that product's kernels compiled), so `max_rows <= 1` gives none.
pub fn warm_up_rows(max_rows: usize) -> Vec<usize> {
    if max_rows <= 1 {
        return Vec::new();
    }
    let top = max_rows.next_power_of_two();
    let mut rows: Vec<usize> =
        std::iter::successors(Some(2usize), |&p| (p < top).then_some(p * 2)).flat_map(|p| [p, p + 1]).collect();
    rows.push(max_rows);
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// A loaded model: weights on the MLX device, and its tokenizer.
pub struct Model {
    pub transformer: Transformer,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
    /// A context below the model's own, set by the operator.
    context_cap: Option<usize>,
}

impl Model {
    /// Loads a model directory: config.json, *.safetensors, tokenizer.json, tokenizer_config.json.
    pub fn load(dir: &Path) -> Result<Model> {
        Model::load_with(dir, LoadOptions::default())
    }

    /// [`Model::load`] with options.
    pub fn load_with(dir: &Path, opts: LoadOptions) -> Result<Model> {
        if !dir.is_dir() {
            return Err(EngineError::MissingDir(dir.to_path_buf()));
        }
        let config = ModelConfig::load(dir)?;
        let spec = models::spec_for(&config, dir)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let mut weights = weights::Weights::load(dir)?;
        let transformer = Transformer::load(config, spec, &mut weights, opts)?;
        Ok(Model { transformer, tokenizer, dir: dir.to_path_buf(), context_cap: None })
    }

    /// The most tokens (prompt plus output) one sequence may hold: the model's context, or the
    /// cap when that is lower.
    pub fn context_length(&self) -> usize {
        let own = self.transformer.spec.max_position_embeddings.map_or(DEFAULT_CONTEXT_LENGTH, |n| n.max(1) as usize);
        self.context_cap.map_or(own, |cap| own.min(cap.max(1)))
    }

    /// Caps the context below the model's own (`None`: the model's own).
    pub fn set_context_cap(&mut self, cap: Option<usize>) {
        self.context_cap = cap;
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.transformer.arrays().iter().map(|a| a.nbytes()).sum()
    }

    /// Bytes of KV cache one token of context takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        let t = &self.transformer;
        kv_cache::bytes_per_token(t.num_layers() as i32, t.config.kv_heads(), t.spec.head_dim, t.dtype())
    }

    /// Runs every distinct quantized product of the model on zeros of the activations' type, at
    /// each number of rows of [`warm_up_rows`] up to the most it takes: `max_rows` for the
    /// layers' products ([`Transformer::quantized_products`]), `max_output_rows` for the output
    /// projection ([`Transformer::quantized_output`]), one evaluation per product. MLX's CUDA
    /// backend compiles the kernels of a quantized product of several rows at run time, one per
    /// tile size (it picks the size from the rows), the first time that size runs; each
    /// compiled kernel is kept on disk, so a later process finds it. Then one pass through the
    /// engine's own paths compiles the rest of what a first burst of requests needs
    /// (`warm_up_engine`). Elsewhere this only computes. A model without quantized
    /// weights runs no product.
    pub fn warm_up(&self, max_rows: usize, max_output_rows: usize) -> Result<WarmUp> {
        let start = Instant::now();
        let dtype = self.transformer.dtype();
        let t = &self.transformer;
        let all = t.quantized_products().into_iter().map(|w| (w, max_rows));
        // Distinct by shape, bits and group size, each with the most rows any of its uses takes.
        let key = |w: &QuantizedWeight<'_>| (w.out_features(), w.in_features(), w.q.bits, w.q.group_size);
        let mut products: Vec<(QuantizedWeight<'_>, usize)> = Vec::new();
        for (w, bound) in all.chain(t.quantized_output().map(|w| (w, max_output_rows))) {
            match products.iter_mut().find(|(p, _)| key(p) == key(&w)) {
                Some((_, b)) => *b = (*b).max(bound),
                None => products.push((w, bound)),
            }
        }
        // Fewest rows first: the sizes every step needs are ready soonest.
        let mut calls: Vec<(usize, &QuantizedWeight<'_>)> =
            products.iter().flat_map(|(w, bound)| warm_up_rows(*bound).into_iter().map(move |r| (r, w))).collect();
        calls.sort_by_key(|(rows, _)| *rows);
        let mut report = WarmUp { products: products.len(), ..WarmUp::default() };
        for (rows, w) in calls {
            let m =
                i32::try_from(rows).map_err(|_| EngineError::invalid(format!("warm_up: {rows} rows are too many")))?;
            let x = Array::zeros(&[m, w.in_features()], dtype)?.contiguous()?;
            x.eval()?;
            let t = Instant::now();
            w.product(&x)?.eval()?;
            let seconds = t.elapsed().as_secs_f64();
            report.calls += 1;
            if report.slowest.is_none_or(|(_, s)| seconds > s) {
                report.slowest = Some((rows, seconds));
            }
        }
        let engine = Instant::now();
        self.warm_up_engine()?;
        report.engine_seconds = engine.elapsed().as_secs_f64();
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Three requests through the engine's own paths, as the worker runs a burst of them: prompts
    /// of different lengths prefilled in small chunks, joined into one batch, two decode steps of
    /// greedy and sampled rows with their tokens' log-probabilities, then twice a row removed
    /// (its keys and values copied out, as for the prefix cache) and one more step. On MLX's CUDA
    /// backend this compiles, in this process, the kernels of those paths: fused elementwise
    /// chains, gathers and the padded-attention kernel. Each takes well under the supervisor's
    /// stall timeout, but a first step that meets several of them at once may not.
    fn warm_up_engine(&self) -> Result<()> {
        let vocab = self.transformer.config.vocab_size.max(1) as usize;
        let sampled = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            min_p: 0.05,
            repetition_penalty: 1.1,
            seed: Some(0),
            ..SamplingParams::default()
        };
        let mut seqs = [(5, SamplingParams::default()), (11, sampled), (19, SamplingParams::default())]
            .into_iter()
            .enumerate()
            .map(|(r, (len, params))| {
                let prompt = (0..len).map(|i| ((1 + i * 7 + r * 13) % vocab) as u32).collect();
                Sequence::new(self, prompt, Sampler::new(params)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut batch = self.prefilled_batch(&mut seqs, 16)?;
        // Three rows of different lengths twice, then two, then one (unpadded).
        for step in 0..4 {
            if step >= 2 {
                let copied = batch.remove(&[batch.keys()[1]], |_| true)?;
                let arrays: Vec<&Array> =
                    copied.iter().flat_map(|(_, kv)| kv.layers.iter().flat_map(|l| l.state())).collect();
                mlx::eval(&arrays)?;
                seqs.remove(1);
            }
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            let out = self.decode_batch(&mut batch, &mut refs)?;
            let logprobs = out.token_logprobs()?;
            mlx::eval(&[&out.tokens, &logprobs])?;
            out.accept(&mut seqs)?;
        }
        Ok(())
    }

    /// Renders a chat with the model's template and tokenizes it.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode_chat(messages, true)?)
    }
}

#[cfg(test)]
mod tests {
    use super::warm_up_rows;

    #[test]
    fn warm_up_rows_are_powers_of_two_each_plus_one_and_the_bound() {
        assert_eq!(warm_up_rows(0), Vec::<usize>::new());
        assert_eq!(warm_up_rows(1), Vec::<usize>::new());
        assert_eq!(warm_up_rows(2), [2, 3]);
        assert_eq!(warm_up_rows(3), [2, 3, 4, 5]);
        assert_eq!(warm_up_rows(6), [2, 3, 4, 5, 6, 8, 9]);
        assert_eq!(warm_up_rows(8), [2, 3, 4, 5, 8, 9]);
        let mut expected: Vec<usize> = (1..=11).flat_map(|k| [1 << k, (1 << k) + 1]).collect();
        assert_eq!(warm_up_rows(2048), expected);
        expected.extend([3000, 4096, 4097]);
        assert_eq!(warm_up_rows(3000), expected);
    }
}
