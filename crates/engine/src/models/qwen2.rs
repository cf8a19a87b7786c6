//! Qwen2: as mlx-lm's `models/qwen2.py`. Biases on q, k and v (not on o); the head size is always
//! `hidden_size / num_attention_heads`.
use super::transformer::{AttentionKind, Spec};
use crate::config::ModelConfig;
use crate::error::Result;

pub fn spec(cfg: &ModelConfig) -> Result<Spec> {
    Ok(Spec {
        head_dim: cfg.hidden_size / cfg.num_attention_heads,
        rope_theta: cfg.rope_theta().unwrap_or(1_000_000.0),
        rope_traditional: cfg.rope_traditional,
        attention: AttentionKind { qkv_bias: true, o_bias: false, qk_norm: false },
        mlp_bias: false,
        tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(true),
        max_position_embeddings: Some(cfg.max_position_embeddings.unwrap_or(32_768)),
    })
}
