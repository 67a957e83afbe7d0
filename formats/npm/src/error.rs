//! npm's error shape: every failure is `{"error": "<message>"}` with the status from
//! [`FormatError::status`] (the one mapping, in `formats/core`). Internal errors show a
//! generic message only; 401 carries the Basic challenge npm expects.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use granary_format::{Body, FormatError, RegistryError, body};

use crate::model::ErrorBody;

/// The realm of the `WWW-Authenticate` challenge.
pub(crate) const REALM_CHALLENGE: &str = "Basic realm=\"granary\"";

/// Renders an error as npm's `{"error": …}` body; a 401 carries the Basic challenge.
pub(crate) fn render(err: &FormatError) -> Response<Body> {
    let status = err.status();
    let mut resp = error_with_message(status, &err.public_message());
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(REALM_CHALLENGE),
        );
    }
    resp
}

/// An npm error body with any status and message, without a challenge: npm shows the
/// message of a 401 only when no `Basic`/`Bearer` challenge comes with it (it prints a
/// canned "Incorrect or missing password" text otherwise).
pub(crate) fn error_with_message(status: StatusCode, message: &str) -> Response<Body> {
    let json = serde_json::to_vec(&ErrorBody { error: message })
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from_static(b"{\"error\":\"internal server error\"}"));
    let mut resp = Response::new(body::full(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// npm's 404 message.
pub(crate) fn not_found() -> FormatError {
    FormatError::NotFound("Not found".to_owned())
}

/// npm's duplicate-publish error (npmjs wording; the CLI shows it as is). A 403, not a
/// 409: on 409 the CLI re-reads the document and retries with every version.
pub(crate) fn cannot_publish_over(version: &str) -> FormatError {
    FormatError::Forbidden(format!(
        "You cannot publish over the previously published versions: {version}."
    ))
}

/// A registry error, with `VersionExists` in npm's wording.
pub(crate) fn from_registry(err: RegistryError) -> FormatError {
    match err {
        RegistryError::VersionExists { version } => cannot_publish_over(&version),
        other => other.into(),
    }
}

/// An internal failure inside this crate (serialization, header construction).
pub(crate) fn internal(what: impl std::fmt::Display) -> FormatError {
    FormatError::Internal(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_stay_private() {
        let resp = render(&FormatError::Internal("rocksdb: disk on fire".into()));
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn unauthorized_has_challenge() {
        let resp = render(&FormatError::Unauthorized);
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], REALM_CHALLENGE);
    }

    #[test]
    fn duplicate_is_403_with_npm_wording() {
        let err = from_registry(RegistryError::VersionExists {
            version: "1.0.0".into(),
        });
        assert_eq!(err.status(), 403);
        assert_eq!(
            err.to_string(),
            "You cannot publish over the previously published versions: 1.0.0."
        );
    }
}
