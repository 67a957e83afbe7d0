//! The streaming body type shared by the node and the formats, and small helpers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
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

/// `body`, declaring that it holds at most `limit` bytes (the upper bound of its size
/// hint), for a consumer that sizes its buffer by that: a tarball decoded from a request
/// of known length, say. The bound must hold; a longer body is still passed on whole.
pub fn at_most(body: Body, limit: u64) -> Body {
    AtMost { body, limit }.boxed_unsync()
}

/// See [`at_most`].
struct AtMost {
    body: Body,
    limit: u64,
}

impl http_body::Body for AtMost {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        if hint.upper().is_none_or(|upper| upper > self.limit) && hint.lower() <= self.limit {
            hint.set_upper(self.limit);
        }
        hint
    }
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

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[tokio::test]
    async fn at_most_bounds_the_size_hint_and_passes_the_body_on() {
        let stream = futures::stream::iter(
            [&b"abc"[..], b"de"].map(|b| Ok::<_, BodyError>(Frame::data(Bytes::from(b)))),
        );
        let unknown: Body = http_body_util::StreamBody::new(stream).boxed_unsync();
        assert_eq!(unknown.size_hint().upper(), None);
        let bounded = at_most(unknown, 10);
        assert_eq!(bounded.size_hint().upper(), Some(10));
        assert_eq!(read_to_bytes(bounded, 100).await.unwrap(), &b"abcde"[..]);
        // A tighter bound the body already has is kept.
        assert_eq!(at_most(full("abc"), 10).size_hint().upper(), Some(3));
    }
}
