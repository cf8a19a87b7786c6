//! Llama (and Mistral, which shares the architecture): as mlx-lm's `models/llama.py`.
use super::transformer::{AttentionKind, Spec};
use crate::config::ModelConfig;
use crate::error::Result;

pub fn spec(cfg: &ModelConfig) -> Result<Spec> {
    let head_dim = cfg.head_dim.unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
    Ok(Spec {
        head_dim,
        rope_theta: cfg.rope_theta().unwrap_or(10_000.0),
        rope_traditional: cfg.rope_traditional,
        // mlx-lm: `attention_bias` applies to q, k, v and o alike.
        attention: AttentionKind { qkv_bias: cfg.attention_bias, o_bias: cfg.attention_bias, qk_norm: false },
        mlp_bias: cfg.mlp_bias,
        tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(true),
        max_position_embeddings: cfg.max_position_embeddings,
    })
}
