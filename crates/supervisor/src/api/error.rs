//! Errors in the OpenAI format (`{"error": {"message", "type", "param", "code"}}`), and the one
//! place that maps each pool error to an HTTP status.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::PoolError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
            retry_after_s: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn new(status: StatusCode, kind: &'static str, message: String) -> ApiError {
        ApiError { status, message, kind, param: None, code: None, retry_after_s: None }
    }

    pub fn unauthorized(message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message.into()).with_code("invalid_api_key")
    }

    /// The API key's request rate is spent; a token is back after `wait`.
    pub fn rate_limited(wait: std::time::Duration) -> ApiError {
        ApiError {
            retry_after_s: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            code: Some("rate_limit_exceeded"),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "request rate limit of this API key reached".into(),
            )
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body exceeds the limit of {limit} bytes"),
        );
        e.code = Some("request_too_large");
        e
    }

    /// The JSON body of the error, as streamed in an SSE `data:` line too.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// `prompt` or `messages`, whichever the route takes, for errors about the prompt.
    pub fn from_pool(e: PoolError, prompt_param: &str) -> ApiError {
        let message = e.to_string();
        match e {
            PoolError::UnknownModel { .. } => ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid(Some("model".to_string()), message).with_code("model_not_found")
            },
            PoolError::InvalidRequest { message } => {
                // Worker messages name the field in backticks: "`max_tokens` must be at least 1".
                let param = message.split('`').nth(1).map(str::to_string).unwrap_or_else(|| prompt_param.to_string());
                let code = if message.contains("context") { Some("context_length_exceeded") } else { None };
                ApiError { code, ..ApiError::invalid(Some(param), message) }
            }
            PoolError::Poisoned { .. } => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: Some("request_quarantined"),
                ..ApiError::invalid(None, message)
            },
            PoolError::QueueFull { retry_after_s, .. } => ApiError {
                retry_after_s: Some(retry_after_s),
                code: Some("rate_limit_exceeded"),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            PoolError::Overloaded => ApiError {
                retry_after_s: Some(1),
                code: Some("overloaded"),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            PoolError::NoWorker { .. } | PoolError::ShuttingDown => ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            PoolError::RetriesExhausted { .. } | PoolError::WorkerFailedMidStream { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message)
            }
            PoolError::UnknownWorker { .. } | PoolError::Conflict { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}
