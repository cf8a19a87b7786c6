//! Error codes of the worker protocol. Standard JSON-RPC codes for malformed messages; codes in
//! 1000..2000 for what the worker decided about a well-formed request.
use jsonrpsee::types::ErrorObjectOwned;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not JSON.
    ParseError,
    /// JSON, but not a JSON-RPC request (no `method`, a notification, a batch, a line over the
    /// length limit, invalid UTF-8).
    InvalidRequest,
    MethodNotFound,
    /// Parameters of the wrong shape or type.
    InvalidParams,
    /// The request names a model that is not loaded.
    ModelNotLoaded,
    /// Loading a model failed: missing files, an unknown architecture, bad weights.
    ModelLoadFailed,
    /// A well-formed request the worker refuses: prompt too long for the context, max_tokens 0,
    /// a sampling value out of range, a duplicate request id.
    InvalidRequestParams,
    /// The queue is full: try another worker or later. Not a worker failure.
    Overloaded,
    /// The worker is shutting down and admits no new work.
    ShuttingDown,
    /// MLX or the engine failed (out of memory included).
    EngineFailure,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::ParseError,
        ErrorCode::InvalidRequest,
        ErrorCode::MethodNotFound,
        ErrorCode::InvalidParams,
        ErrorCode::ModelNotLoaded,
        ErrorCode::ModelLoadFailed,
        ErrorCode::InvalidRequestParams,
        ErrorCode::Overloaded,
        ErrorCode::ShuttingDown,
        ErrorCode::EngineFailure,
    ];

    pub fn code(self) -> i32 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::ModelNotLoaded => 1001,
            ErrorCode::ModelLoadFailed => 1002,
            ErrorCode::InvalidRequestParams => 1003,
            ErrorCode::Overloaded => 1004,
            ErrorCode::ShuttingDown => 1005,
            ErrorCode::EngineFailure => 1006,
        }
    }

    pub fn from_code(code: i32) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The error object for this code with a message that names the problem.
    pub fn error(self, message: impl Into<String>) -> ErrorObjectOwned {
        ErrorObjectOwned::owned::<()>(self.code(), message.into(), None)
    }
}

/// An error as it travels inside a stream's final event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: i32,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorInfo {
        ErrorInfo { code: code.code(), message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        let mut codes: Vec<i32> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
    }
}
