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

pub use batch::{Batch, BatchStep};
pub use config::ModelConfig;
pub use error::{EngineError, Result};
pub use generate::{Completion, FinishReason, GenerateParams, TextStream, TokenEvent};
pub use mlx_serving_tokenizer::{ChatMessage, Tokenizer};
pub use models::{LoadOptions, Transformer};
pub use prefix_cache::{PrefixCache, PrefixCacheCounts};
pub use sample::{Sampler, SamplingParams};
pub use sequence::Sequence;

/// Context length assumed when config.json gives none.
pub const DEFAULT_CONTEXT_LENGTH: usize = 4096;

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

    /// Renders a chat with the model's template and tokenizes it.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode_chat(messages, true)?)
    }
}
