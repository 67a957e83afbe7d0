//! CodeArtifact's error shapes (rest-json): the status, an `x-amzn-ErrorType` header, and a
//! JSON body with `__type`, `message` and the exception's own fields.

use granary_format::Body;
use http::{Response, StatusCode};
use serde_json::json;

use crate::state::command::{ApplyError, ResourceKind};

/// An API error, named as the service model names its exceptions.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// 400 ValidationException.
    #[error("{message}")]
    Validation {
        /// What is wrong.
        message: String,
        /// CANNOT_PARSE, FIELD_VALIDATION_FAILED, UNKNOWN_OPERATION, OTHER.
        reason: &'static str,
    },
    /// 404 ResourceNotFoundException.
    #[error("{message}")]
    NotFound {
        message: String,
        kind: ResourceKind,
        id: String,
    },
    /// 409 ConflictException.
    #[error("{message}")]
    Conflict {
        message: String,
        kind: ResourceKind,
        id: String,
    },
    /// 403 AccessDeniedException.
    #[error("{0}")]
    AccessDenied(String),
    /// 403 with an authentication exception name (UnrecognizedClientException,
    /// InvalidSignatureException, MissingAuthenticationTokenException).
    #[error("{message}")]
    Unauthenticated { code: &'static str, message: String },
    /// 413: the request body is over the limit.
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    /// 429 ThrottlingException: retry later (also used while no leader is known).
    #[error("{message}")]
    Throttling { message: String, retry_after: u64 },
    /// 500 InternalServerException; the detail is logged, not returned.
    #[error("{0}")]
    Internal(String),
}

pub(crate) fn field(message: impl Into<String>) -> ApiError {
    ApiError::Validation {
        message: message.into(),
        reason: "FIELD_VALIDATION_FAILED",
    }
}

pub(crate) fn not_found(kind: ResourceKind, id: &str) -> ApiError {
    let what = match kind {
        ResourceKind::PackageVersion => "Package version",
        ResourceKind::Package => "Package",
        ResourceKind::Repository => "Repository",
        ResourceKind::Domain => "Domain",
        ResourceKind::Asset => "Asset",
    };
    ApiError::NotFound {
        message: format!("{what} {id} not found"),
        kind,
        id: id.to_owned(),
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::NotFound { kind, id } => not_found(kind, &id),
            ApplyError::Conflict { kind, id, message } => ApiError::Conflict { message, kind, id },
            ApplyError::VersionExists { version } => ApiError::Conflict {
                message: format!("Package version {version} already exists"),
                kind: ResourceKind::PackageVersion,
                id: version,
            },
            ApplyError::Invalid(m) => field(m),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<crate::raft::ProposeError> for ApiError {
    fn from(e: crate::raft::ProposeError) -> Self {
        match e {
            crate::raft::ProposeError::NoLeader => ApiError::Throttling {
                message: "The cluster is electing a leader; retry shortly.".into(),
                retry_after: 1,
            },
            crate::raft::ProposeError::Fatal(m) => ApiError::Internal(m),
        }
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Validation { .. } => (StatusCode::BAD_REQUEST, "ValidationException"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "ConflictException"),
            ApiError::AccessDenied(_) => (StatusCode::FORBIDDEN, "AccessDeniedException"),
            ApiError::Unauthenticated { code, .. } => (StatusCode::FORBIDDEN, code),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "ValidationException"),
            ApiError::Throttling { .. } => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException"),
        }
    }

    /// The HTTP response; internal details are logged under `request_id`, not returned.
    pub(crate) fn into_response(self, request_id: &str) -> Response<Body> {
        let (status, code) = self.parts();
        let mut body = json!({ "__type": code, "message": self.to_string() });
        match &self {
            ApiError::Validation { reason, .. } => body["reason"] = json!(reason),
            ApiError::TooLarge(_) => body["reason"] = json!("OTHER"),
            ApiError::NotFound { kind, id, .. } | ApiError::Conflict { kind, id, .. } => {
                body["resourceType"] = json!(kind.as_str());
                body["resourceId"] = json!(id);
            }
            ApiError::Throttling { retry_after, .. } => {
                body["retryAfterSeconds"] = json!(retry_after)
            }
            ApiError::Internal(detail) => {
                tracing::error!(request_id, error = %detail, "internal error in the API");
                body["message"] = json!(format!("Internal server error (request id {request_id})"));
            }
            _ => {}
        }
        let mut resp = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-amzn-errortype", code)
            .header("x-amzn-requestid", request_id);
        if let ApiError::Throttling { retry_after, .. } = &self {
            resp = resp.header("retry-after", retry_after.to_string());
        }
        resp.body(granary_format::body::full(body.to_string()))
            .unwrap_or_else(|_| Response::new(granary_format::body::empty()))
    }
}
