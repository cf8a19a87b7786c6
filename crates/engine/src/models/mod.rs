//! Decoder-only transformers in the mlx-community layout.
//!
//! [`transformer`] holds the forward pass shared by the supported architectures, written like the
//! math and like mlx-lm's model files. Each architecture's file (`llama.rs`, `qwen2.rs`, `qwen3.rs`)
//! reads its config.json the way mlx-lm's file of the same name does and says which variant of the
//! shared layers it uses.
mod llama;
mod qwen2;
mod qwen3;
pub mod transformer;

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
pub use transformer::{LoadOptions, Segment, Spec, Transformer};

/// The `model_type` values this engine loads.
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// The architecture's reading of the config.
pub(crate) fn spec_for(cfg: &ModelConfig, dir: &Path) -> Result<Spec> {
    match cfg.model_type.as_str() {
        "llama" | "mistral" => llama::spec(cfg),
        "qwen2" => qwen2::spec(cfg),
        "qwen3" => qwen3::spec(cfg),
        other => Err(EngineError::UnknownModelType {
            path: dir.join("config.json"),
            model_type: other.to_string(),
            supported: SUPPORTED.join(", "),
        }),
    }
}
