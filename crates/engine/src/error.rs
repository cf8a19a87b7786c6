use std::path::PathBuf;

/// Everything that can go wrong loading a model or running a request. Each variant names the
/// file, field or limit at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model directory {0} does not exist or is not a directory")]
    MissingDir(PathBuf),
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{path}: model_type {model_type:?} is not supported (supported: {supported})")]
    UnknownModelType { path: PathBuf, model_type: String, supported: String },
    #[error("weights: tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("weights: tensor {name:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<i32>, got: Vec<i32> },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] mlx_serving_tokenizer::TokenizerError),
    #[error("invalid request: stop strings: {0}")]
    StopStrings(#[from] mlx_serving_tokenizer::StopStringError),
    #[error(transparent)]
    Mlx(#[from] mlx::Error),
}

impl EngineError {
    pub(crate) fn bad_file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        EngineError::BadFile { path: path.into(), message: message.to_string() }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        EngineError::InvalidRequest(message.into())
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
