//! Errors of the format layer. [`FormatError::status`] is the one place where a format
//! error becomes an HTTP status; each format renders the body in its own shape.

use http::StatusCode;

/// What went wrong serving a package-manager request, named for what the client can do.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// No such route, package, version or file.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or fails validation; it changed nothing.
    #[error("{0}")]
    BadRequest(String),
    /// No valid credentials were presented.
    #[error("authentication required")]
    Unauthorized,
    /// Authenticated, but not allowed (also: npm's "cannot publish over" rule).
    #[error("{0}")]
    Forbidden(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The body exceeds the configured limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The path exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A transient condition (leader election, overload); retry after a moment.
    #[error("{0}")]
    Unavailable(String),
    /// A failure inside the node; the detail is logged, the client gets a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl FormatError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            FormatError::NotFound(_) => StatusCode::NOT_FOUND,
            FormatError::BadRequest(_) => StatusCode::BAD_REQUEST,
            FormatError::Unauthorized => StatusCode::UNAUTHORIZED,
            FormatError::Forbidden(_) => StatusCode::FORBIDDEN,
            FormatError::Conflict(_) => StatusCode::CONFLICT,
            FormatError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            FormatError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            FormatError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            FormatError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client may see: internal details are never exposed.
    pub fn public_message(&self) -> String {
        match self {
            FormatError::Internal(_) => "internal server error".to_owned(),
            other => other.to_string(),
        }
    }
}

/// Errors returned by the node through the [`crate::Registry`] port.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The version already exists (or existed) in this repository.
    #[error("version {version} already exists")]
    VersionExists {
        /// The version string.
        version: String,
    },
    /// The package or version does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with the current state (e.g. an asset with other bytes).
    #[error("{0}")]
    Conflict(String),
    /// The change is invalid for the current state.
    #[error("{0}")]
    Invalid(String),
    /// A stream exceeded the size limit.
    #[error("content exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// Retryable: no leader, or the cluster is busy.
    #[error("{0}")]
    Unavailable(String),
    /// A storage or internal failure.
    #[error("{0}")]
    Internal(String),
}

impl From<RegistryError> for FormatError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::VersionExists { version } => {
                FormatError::Conflict(format!("version {version} already exists"))
            }
            RegistryError::NotFound(m) => FormatError::NotFound(m),
            RegistryError::Conflict(m) => FormatError::Conflict(m),
            RegistryError::Invalid(m) => FormatError::BadRequest(m),
            RegistryError::TooLarge { limit } => FormatError::PayloadTooLarge { limit },
            RegistryError::Unavailable(m) => FormatError::Unavailable(m),
            RegistryError::Internal(m) => FormatError::Internal(m),
        }
    }
}
