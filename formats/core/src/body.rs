//! The streaming body type shared by the node and the formats, and small helpers.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::FormatError;

/// Error type of a body stream.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming HTTP body: requests arrive as one, responses leave as one.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Reads a whole body, failing with [`FormatError::PayloadTooLarge`] past `limit` bytes.
///
/// Only for documents that must be parsed whole (JSON manifests); artifacts stream through
/// [`crate::Registry::store_blob`] instead.
pub async fn read_to_bytes(mut body: Body, limit: usize) -> Result<Bytes, FormatError> {
    // A frame loop rather than `Limited::collect`: that future is not provably `Send`.
    let too_large = || FormatError::PayloadTooLarge {
        limit: limit as u64,
    };
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if is_too_large(&*e) {
                too_large()
            } else {
                FormatError::BadRequest(format!("could not read request body: {e}"))
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len().saturating_add(data.len()) > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// True when a body error (possibly nested) is a length-limit error.
pub fn is_too_large(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = e.source();
    }
    false
}
