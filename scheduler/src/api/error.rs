//! The API's one error type: every failure becomes `{"error": {"code", "message", "details"}}`
//! with a fitting status. Database and broker failures are logged in full and answered briefly.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::accept::AcceptError;
use crate::store::StoreError;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
    /// Seconds after which to try again (`Retry-After`).
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// Returns the error prefixed with the position of the run in a batch request.
    pub fn in_batch(mut self, index: usize) -> Self {
        self.message = format!("runs[{index}]: {}", self.message);
        self
    }

    /// Returns a 401: no valid API key. Missing, unknown and revoked keys get the same answer,
    /// so that it tells a caller nothing about which keys exist.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required: send it as `Authorization: Bearer <key>`",
        )
    }

    /// Returns a 401 for an `Authorization` header that is not `Bearer <key>`, saying what is
    /// wrong with it.
    pub fn malformed_credentials(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// Returns a 429: the tenant's quota is used up for now; try again in a second.
    pub fn quota_exceeded(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
        }
    }

    /// Returns a 403: the key is valid but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// Returns a 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// Returns a 422: the definition (or another part of the request) cannot be run.
    pub fn invalid(message: impl Into<String>, details: Option<Value>) -> Self {
        Self {
            details,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_definition",
                message,
            )
        }
    }

    /// Returns a 404 naming what was not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// Returns a 409: the request conflicts with the resource's state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// Returns a 413: the body is over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is over the limit of {limit} bytes"),
        )
    }

    /// Returns a 413 for a value (a run's or job's input) over its size limit.
    pub fn value_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// Returns a 415: the body is declared as something other than JSON.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the request body is declared as {content_type:?}; send JSON, with \
                 Content-Type: application/json"
            ),
        )
    }

    /// Returns a 503 naming the service that is down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// Returns a 500 after logging what went wrong.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the scheduler's log has the details",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if error.is_unavailable() {
            tracing::warn!(%error, "database unavailable");
            Self::unavailable("the database is unavailable; try again")
        } else {
            Self::internal(&error)
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(error: AcceptError) -> Self {
        match error {
            AcceptError::Store(store) if store.is_unavailable() => {
                tracing::warn!(error = %store, "database unavailable");
                Self::unavailable("the database is unavailable; try again")
            }
            AcceptError::Store(store) => Self::internal(&store),
            AcceptError::Stopped => Self::unavailable("the scheduler is shutting down"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(details) = self.details {
            error["details"] = details;
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
