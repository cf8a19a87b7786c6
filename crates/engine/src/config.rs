//! `config.json` of a model directory in the mlx-community layout.
use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// MLX affine quantization of a checkpoint (`"quantization"` in config.json).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct Quantization {
    pub group_size: i32,
    pub bits: i32,
}

/// The fields of config.json that the supported architectures read. Unknown keys are ignored, as
/// mlx-lm ignores them; each architecture checks the ones it needs.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub intermediate_size: i32,
    pub num_attention_heads: i32,
    #[serde(default)]
    pub num_key_value_heads: Option<i32>,
    #[serde(default)]
    pub head_dim: Option<i32>,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    #[serde(default)]
    pub max_position_embeddings: Option<i32>,
    #[serde(default)]
    pub rope_theta: Option<f32>,
    #[serde(default)]
    pub rope_traditional: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// The model-wide quantization plus per-module overrides keyed by module path.
    #[serde(default)]
    pub quantization: Option<QuantizationConfig>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

/// `"quantization": {"group_size": 64, "bits": 4, "model.layers.0.mlp.down_proj": {...}}`.
#[derive(Clone, Debug, Deserialize)]
pub struct QuantizationConfig {
    pub group_size: i32,
    pub bits: i32,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(flatten)]
    pub overrides: HashMap<String, serde_json::Value>,
}

impl QuantizationConfig {
    /// The quantization of the module at `path` (its override if it has one).
    pub fn for_module(&self, path: &str) -> Quantization {
        match self.overrides.get(path).and_then(|v| serde_json::from_value::<Quantization>(v.clone()).ok()) {
            Some(q) => q,
            None => Quantization { group_size: self.group_size, bits: self.bits },
        }
    }
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::bad_file(&path, e))?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| EngineError::bad_file(&path, e))?;
        cfg.check().map_err(|m| EngineError::bad_file(&path, m))?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(format!("{name} must be positive, got {v}"));
            }
        }
        let kv = self.kv_heads();
        if kv <= 0 || self.num_attention_heads % kv != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps must be positive, got {}", self.rms_norm_eps));
        }
        if let Some(q) = &self.quantization {
            if ![2, 3, 4, 5, 6, 8].contains(&q.bits) || ![32, 64, 128].contains(&q.group_size) {
                return Err(format!(
                    "quantization bits {} / group_size {} are not supported (bits 2-8, group 32, 64 or 128)",
                    q.bits, q.group_size
                ));
            }
            if let Some(mode) = &q.mode
                && mode != "affine"
            {
                return Err(format!("quantization mode {mode:?} is not supported (only \"affine\")"));
            }
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `rope_scaling`, or transformers 5's `rope_parameters` where it carries the scaling.
    pub fn rope_scaling(&self) -> Option<&serde_json::Value> {
        self.rope_scaling.as_ref().or(self.rope_parameters.as_ref())
    }

    /// `rope_theta`, also looked for under `rope_parameters`.
    pub fn rope_theta(&self) -> Option<f32> {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64().map(|v| v as f32))
    }

    /// The end-of-sequence ids declared in config.json (an int or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            _ => Vec::new(),
        }
    }
}
