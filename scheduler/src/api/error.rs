//! The API's one error type: every failure becomes `{"error": {"code", "message", "details"}}`
//! with a fitting status. Database and broker failures are logged in full and answered briefly.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::accept::AcceptError;
use crate::store::StoreError;

/// What kind of error an answer reports; each goes with one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed; the message names what.
    BadRequest,
    /// 401: no valid API key.
    Unauthorized,
    /// 403: the key lacks a scope.
    Forbidden,
    /// 404: no such object, or not the caller's tenant's.
    NotFound,
    /// 409: the object's state forbids it (cancelling a finished run).
    Conflict,
    /// 413: the body, or a value in it, is over its limit.
    PayloadTooLarge,
    /// 415: the body is not declared as JSON.
    UnsupportedMediaType,
    /// 422: the definition (or another part of the request) cannot run; `details` lists why.
    InvalidDefinition,
    /// 429: the tenant's quota is used up for now (see `Retry-After`).
    QuotaExceeded,
    /// 500: something unexpected; the scheduler's log has the details.
    Internal,
    /// 503: a service the scheduler needs is down, or it is stopping.
    Unavailable,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong, in an error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The kind of error, stable for programs to match on.
    pub code: ErrorCode,
    /// A sentence for people, naming what is wrong.
    pub message: String,
    /// More about it; for `invalid_definition`, the list of problems (`{"step"?, "message"}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    details: Option<Value>,
    /// Seconds after which to try again (`Retry-After`).
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
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
            ErrorCode::Unauthorized,
            "a valid API key is required: send it as `Authorization: Bearer <key>`",
        )
    }

    /// Returns a 401 for an `Authorization` header that is not `Bearer <key>`, saying what is
    /// wrong with it.
    pub fn malformed_credentials(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    /// Returns a 429: the tenant's quota is used up for now; try again in a second.
    pub fn quota_exceeded(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::QuotaExceeded,
                message,
            )
        }
    }

    /// Returns a 403: the key is valid but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    /// Returns a 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    /// Returns a 422: the definition (or another part of the request) cannot be run.
    pub fn invalid(message: impl Into<String>, details: Option<Value>) -> Self {
        Self {
            details,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidDefinition,
                message,
            )
        }
    }

    /// Returns a 404 naming what was not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// Returns a 409: the request conflicts with the resource's state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
    }

    /// Returns a 413: the body is over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("request body is over the limit of {limit} bytes"),
        )
    }

    /// Returns a 413 for a value (a run's or job's input) over its size limit.
    pub fn value_too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            message,
        )
    }

    /// Returns a 415: the body is declared as something other than JSON.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            format!(
                "the request body is declared as {content_type:?}; send JSON, with \
                 Content-Type: application/json"
            ),
        )
    }

    /// Returns a 503 naming the service that is down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            message,
        )
    }

    /// Returns a 500 after logging what went wrong.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
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
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                details: self.details,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
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
