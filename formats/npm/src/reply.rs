//! Building successful responses: JSON replies, cached documents with `ETag`, tarball
//! streams, `304 Not Modified`, and HEAD (same headers, empty body).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use granary_format::{Body, FormatError, body};

use crate::error::internal;

/// `application/json`.
pub(crate) const JSON: &str = "application/json";

/// A JSON reply.
pub(crate) fn json<T: Serialize>(
    status: StatusCode,
    value: &T,
    head: bool,
) -> Result<Response<Body>, FormatError> {
    let bytes = serde_json::to_vec(value).map_err(internal)?;
    Ok(bytes_reply(status, JSON, Bytes::from(bytes), head))
}

/// A reply whose body is already rendered, with its length.
pub(crate) fn bytes_reply(
    status: StatusCode,
    content_type: &'static str,
    bytes: Bytes,
    head: bool,
) -> Response<Body> {
    let len = bytes.len() as u64;
    let mut resp = Response::new(if head {
        body::empty()
    } else {
        body::full(bytes)
    });
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// Adds an `ETag`.
pub(crate) fn with_etag(
    mut resp: Response<Body>,
    etag: &str,
) -> Result<Response<Body>, FormatError> {
    let value = HeaderValue::from_str(etag).map_err(internal)?;
    resp.headers_mut().insert(header::ETAG, value);
    Ok(resp)
}

/// `304 Not Modified` for a matching `If-None-Match`.
pub(crate) fn not_modified(etag: &str) -> Result<Response<Body>, FormatError> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    with_etag(resp, etag)
}

/// Whether an `If-None-Match` header matches `etag` (weak comparison, lists, `*`).
pub(crate) fn etag_matches(if_none_match: Option<&str>, etag: &str) -> bool {
    let ours = etag.trim_start_matches("W/");
    if_none_match.is_some_and(|h| {
        h.split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == ours)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_matching() {
        assert!(etag_matches(Some("\"a\""), "\"a\""));
        assert!(etag_matches(Some("W/\"a\""), "\"a\""));
        assert!(etag_matches(Some("\"b\", \"a\""), "\"a\""));
        assert!(etag_matches(Some("*"), "\"a\""));
        assert!(!etag_matches(Some("\"b\""), "\"a\""));
        assert!(!etag_matches(None, "\"a\""));
    }

    #[test]
    fn head_keeps_length() {
        let resp = bytes_reply(StatusCode::OK, JSON, Bytes::from_static(b"{}"), true);
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "2");
    }
}
