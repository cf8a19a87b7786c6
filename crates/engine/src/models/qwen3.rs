//! Qwen3: as mlx-lm's `models/qwen3.py`. No biases; RMS norms on each query and key head before
//! RoPE; an explicit `head_dim`; RoPE is never traditional.
use super::transformer::{AttentionKind, Spec};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

pub fn spec(cfg: &ModelConfig) -> Result<Spec> {
    let missing = |field: &str| EngineError::invalid(format!("config.json: qwen3 needs {field:?}"));
    Ok(Spec {
        head_dim: cfg.head_dim.ok_or_else(|| missing("head_dim"))?,
        rope_theta: cfg.rope_theta().ok_or_else(|| missing("rope_theta"))?,
        rope_traditional: false,
        attention: AttentionKind { qkv_bias: false, o_bias: false, qk_norm: true },
        mlp_bias: false,
        tie_word_embeddings: cfg.tie_word_embeddings.ok_or_else(|| missing("tie_word_embeddings"))?,
        max_position_embeddings: Some(cfg.max_position_embeddings.ok_or_else(|| missing("max_position_embeddings"))?),
    })
}
