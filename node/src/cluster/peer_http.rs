//! Blob pushes between members over HTTP/1.1, on the peer port beside gRPC.
//!
//! ```text
//!   sender ── PUT /granary.v1.PeerHttp/PushBlob ──▶ peer port (tonic, HTTP/1.1 accepted)
//!             x-granary-cluster-secret, x-granary-blob-{sha256,size,md5,sha1,sha512,crc32c}
//!             body: the blob's bytes
//!          ◀── 204 stored (or it was there already) · 4xx/5xx with the reason as text
//! ```
//!
//! A push is the one peer call that carries a package's bytes, and one is made to every
//! other member for every upload. Through gRPC it cost 2.5 times the CPU of the same
//! bytes over HTTP/1.1 (`scripts/bench-transport.sh`: 218 µs against 89 µs per 100 KiB
//! between two processes, most of it HTTP/2's hand-offs between a call's task and the
//! connection's), and on a machine that CPU is what limits the publish rate.
//!
//! - **The same checks as gRPC**: the cluster secret (constant-time), the sender's digests
//!   and CRC32C, the store's size limit; the receiver stores through
//!   [`BlobReplicator::receive`], as the gRPC push does.
//! - **Only where peer traffic is plain TCP.** With `peer_tls` configured, pushes stay on
//!   gRPC, whose TLS and client certificates the members already check.
//! - **Members from before this route** do not accept HTTP/1.1 on the peer port, so the
//!   request fails as a transport error. A push is idempotent (blobs are named by their
//!   SHA-256), so the sender pushes again through gRPC; if that succeeds, it remembers for
//!   a while that this peer wants gRPC.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use granary_format::body::BodyError;
use granary_protocol::pb;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::blobs::{BlobReplicator, check_of, info_of};
use super::peers::{SECRET_HEADER, Secret};

/// The path of a push; the service's name is its first segment, as tonic routes it.
pub(crate) const PUSH_PATH: &str = "/granary.v1.PeerHttp/PushBlob";

const SHA256: &str = "x-granary-blob-sha256";
const SIZE: &str = "x-granary-blob-size";
const MD5: &str = "x-granary-blob-md5";
const SHA1: &str = "x-granary-blob-sha1";
const SHA512: &str = "x-granary-blob-sha512";
const CRC32C: &str = "x-granary-blob-crc32c";

/// The headers naming a blob: its size, digests and (if recorded) CRC32C, as the first
/// message of a gRPC push names them.
pub(crate) fn head_headers(head: &pb::BlobChunk) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        HeaderValue::from_str(&value)
            .map(|v| {
                h.insert(name, v);
            })
            .map_err(|_| format!("{name} is not a header value"))
    };
    put(SHA256, head.sha256.clone())?;
    put(SIZE, head.size.to_string())?;
    put(MD5, head.md5.clone())?;
    put(SHA1, head.sha1.clone())?;
    put(SHA512, head.sha512.clone())?;
    if let Some(crc) = head.crc32c {
        put(CRC32C, crc.to_string())?;
    }
    Ok(h)
}

/// The blob a push names, read back from its headers (the bytes are the body).
fn head_of(h: &HeaderMap) -> Result<pb::BlobChunk, String> {
    let text = |name: &str| {
        h.get(name)
            .ok_or_else(|| format!("missing header {name}"))?
            .to_str()
            .map(str::to_owned)
            .map_err(|_| format!("header {name} is not text"))
    };
    let number = |name: &str| {
        text(name)?
            .parse::<u64>()
            .map_err(|_| format!("header {name} is not a number"))
    };
    let crc32c = match h.get(CRC32C) {
        None => None,
        Some(_) => Some(
            u32::try_from(number(CRC32C)?).map_err(|_| format!("header {CRC32C} is too large"))?,
        ),
    };
    Ok(pb::BlobChunk {
        sha256: text(SHA256)?,
        data: Bytes::new(),
        size: number(SIZE)?,
        md5: text(MD5)?,
        sha1: text(SHA1)?,
        sha512: text(SHA512)?,
        crc32c,
    })
}

/// The HTTP/1.1 side of the peer port: blob pushes.
#[derive(Clone)]
pub(crate) struct PeerHttp {
    pub(crate) blobs: BlobReplicator,
    pub(crate) secret: Secret,
}

impl tonic::server::NamedService for PeerHttp {
    const NAME: &'static str = "granary.v1.PeerHttp";
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<tonic::body::Body> {
    let mut resp = Response::new(tonic::body::Body::new(http_body_util::Full::new(
        Bytes::from(message.into()),
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl PeerHttp {
    async fn handle(self, req: Request<tonic::body::Body>) -> Response<tonic::body::Body> {
        let presented = req
            .headers()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !self.secret.admits_bytes(presented) {
            return text(
                StatusCode::UNAUTHORIZED,
                "peer call without the cluster secret (GRANARY_CLUSTER_SECRET)",
            );
        }
        if req.uri().path() != PUSH_PATH {
            return text(StatusCode::NOT_FOUND, "no such peer call");
        }
        if req.method() != Method::PUT {
            return text(StatusCode::METHOD_NOT_ALLOWED, "a push is a PUT");
        }
        let head = match head_of(req.headers()) {
            Ok(h) => h,
            Err(m) => return text(StatusCode::BAD_REQUEST, m),
        };
        let info = match info_of(&head) {
            Ok(i) => i,
            Err(m) => return text(StatusCode::BAD_REQUEST, m),
        };
        let body = req
            .into_body()
            .map_err(|s| Box::new(s) as BodyError)
            .boxed_unsync();
        match self.blobs.receive(&info, check_of(&head), body).await {
            Ok(()) => {
                let mut resp = Response::new(tonic::body::Body::empty());
                *resp.status_mut() = StatusCode::NO_CONTENT;
                resp
            }
            // The copy did not match what the sender named, or could not be stored.
            Err(m) => text(StatusCode::UNPROCESSABLE_ENTITY, m),
        }
    }
}

impl tower_service::Service<Request<tonic::body::Body>> for PeerHttp {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> pb::BlobChunk {
        pb::BlobChunk {
            sha256: "ab".repeat(32),
            data: Bytes::new(),
            size: 102_400,
            md5: "cd".repeat(16),
            sha1: "ef".repeat(20),
            sha512: "01".repeat(64),
            crc32c: Some(u32::MAX),
        }
    }

    #[test]
    fn a_push_names_its_blob_in_headers_and_reads_back_the_same() {
        let h = head();
        assert_eq!(head_of(&head_headers(&h).unwrap()).unwrap(), h);
        // No CRC recorded (a blob stored before CRCs were): none sent, none read.
        let old = pb::BlobChunk { crc32c: None, ..h };
        let headers = head_headers(&old).unwrap();
        assert!(headers.get(CRC32C).is_none());
        assert_eq!(head_of(&headers).unwrap(), old);
    }

    #[test]
    fn missing_or_malformed_headers_are_refused_by_name() {
        let good = head_headers(&head()).unwrap();
        for (name, value, expect) in [
            (SIZE, None, "missing header x-granary-blob-size"),
            (
                SIZE,
                Some("12k"),
                "header x-granary-blob-size is not a number",
            ),
            (SHA256, None, "missing header x-granary-blob-sha256"),
            (
                CRC32C,
                Some("4294967296"),
                "header x-granary-blob-crc32c is too large",
            ),
            (
                CRC32C,
                Some("-1"),
                "header x-granary-blob-crc32c is not a number",
            ),
        ] {
            let mut h = good.clone();
            match value {
                Some(v) => {
                    h.insert(name, HeaderValue::from_static(v));
                }
                None => {
                    h.remove(name);
                }
            }
            assert_eq!(head_of(&h).unwrap_err(), expect);
        }
        // Well-formed headers with a digest of the wrong length pass here and are refused
        // by the same check as a gRPC push's first message.
        let mut h = good;
        h.insert(MD5, HeaderValue::from_static("abc"));
        assert!(info_of(&head_of(&h).unwrap()).is_err());
    }
}
