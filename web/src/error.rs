//! The one mapping from errors to HTTP statuses and `{"error": {...}}` bodies.

use node_core::api::CoreError;

use crate::auth::AuthError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(401, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(403, "forbidden", message)
    }
    pub fn not_found() -> ApiError {
        ApiError::new(404, "not_found", "no such route")
    }
    pub fn too_large() -> ApiError {
        ApiError::new(413, "too_large", "request bodies are at most 64 KiB")
    }
    pub fn overloaded(message: impl Into<String>) -> ApiError {
        ApiError::new(429, "overloaded", message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "unavailable", message)
    }
    /// Seconds a client should wait before retrying, for 429 and 503.
    pub fn retry_after(&self) -> Option<u32> {
        matches!(self.status, 429 | 503).then_some(1)
    }
}

impl From<CoreError> for ApiError {
    fn from(error: CoreError) -> ApiError {
        match error {
            CoreError::BadRequest(m) => ApiError::bad_request(m),
            CoreError::Forbidden(m) => ApiError::forbidden(m),
            CoreError::NotFound(m) => ApiError::new(404, "not_found", m),
            CoreError::Overloaded(m) => ApiError::overloaded(m),
            CoreError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> ApiError {
        ApiError::unauthorized(error.to_string())
    }
}
