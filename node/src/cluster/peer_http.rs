//! Peer calls over HTTP/1.1, on the peer port beside gRPC.
//!
//! ```text
//!   sender ── PUT  /granary.v1.PeerHttp/PushBlob ──▶ peer port (tonic, HTTP/1.1 accepted)
//!             x-granary-cluster-secret, x-granary-blob-{sha256,size,md5,sha1,sha512,crc32c}
//!             body: the blob's bytes
//!          ◀── 204 stored (or it was there already) · 4xx/5xx with the reason as text
//!
//!          ── POST /granary.v1.PeerHttp/{Propose,ReadIndex,AppendEntries,Vote} ──▶
//!             body: the gRPC call's request message (protobuf)
//!          ◀── 200 + the reply message · 500 + x-granary-status: <gRPC code>, message
//! ```
//!
//! Through gRPC a peer call cost 2.5–3.5 times the CPU of the same call over HTTP/1.1
//! (`scripts/bench-transport.sh`: 218 µs against 89 µs for a 100 KiB blob, 116 against
//! 37 µs for 1 KiB, between two processes; most of it HTTP/2's hand-offs between a call's
//! task and the connection's), and on a busy node that CPU is what limits the publish
//! rate. So the calls every publish makes (two blob pushes, the forwarded proposal, read
//! index rounds, Raft's AppendEntries) go over HTTP/1.1; the rest (membership, pulls,
//! snapshots, upstream fetches) stay on gRPC.
//!
//! - **The same handlers and checks as gRPC**: the cluster secret (constant-time) on every
//!   request; a push is stored through `BlobReplicator::receive` with the sender's
//!   digests and CRC32C checked; the unary calls are answered by the gRPC services' own
//!   methods, so they behave identically.
//! - **Only where peer traffic is plain TCP.** With `peer_tls` configured, every call stays
//!   on gRPC, whose TLS and client certificates the members already check.
//! - **Members from before these routes** do not accept HTTP/1.1 on the peer port, so a
//!   request fails before reaching them. A push, a read index round, AppendEntries and a
//!   vote may be sent twice, so they are sent again through gRPC at once, and the sender
//!   then uses gRPC for that peer for a while. A forwarded proposal must not be sent twice
//!   on a guess, so it goes over HTTP/1.1 only to a peer that answered HTTP/1.1 last time;
//!   when it fails, the write is retried as any failed forward is (the command is
//!   recognised if it was applied), and the retry takes gRPC.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use granary_format::body::BodyError;
use granary_protocol::pb;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::blobs::{check_of, info_of};
use super::peers::{SECRET_HEADER, Secret};
use super::service::ClusterService;
use crate::raft::network::RaftService;
use granary_protocol::pb::cluster_server::Cluster as _;
use granary_protocol::pb::raft_server::Raft as _;

/// The service's name: the first segment of its paths, as tonic routes them.
pub(crate) const SERVICE: &str = "granary.v1.PeerHttp";
/// The path of a push.
pub(crate) const PUSH_PATH: &str = "/granary.v1.PeerHttp/PushBlob";
/// Unary calls larger than this take gRPC (which streams nothing either, but has no
/// second limit to keep in step with).
pub(crate) const MAX_CALL_BYTES: usize = 16 << 20;
/// The header naming the gRPC status code of a failed unary call.
const STATUS_HEADER: &str = "x-granary-status";

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

/// The HTTP/1.1 side of the peer port.
#[derive(Clone)]
pub(crate) struct PeerHttp {
    pub(crate) cluster: ClusterService,
    pub(crate) raft: RaftService,
    pub(crate) secret: Secret,
}

impl tonic::server::NamedService for PeerHttp {
    const NAME: &'static str = SERVICE;
}

/// A unary call's answer: its reply message, or its status.
fn answer<M: prost::Message>(
    result: Result<tonic::Response<M>, tonic::Status>,
) -> Response<tonic::body::Body> {
    match result {
        Ok(reply) => {
            let bytes = Bytes::from(reply.into_inner().encode_to_vec());
            Response::new(tonic::body::Body::new(http_body_util::Full::new(bytes)))
        }
        Err(status) => {
            let mut resp = text(StatusCode::INTERNAL_SERVER_ERROR, status.message());
            resp.headers_mut()
                .insert(STATUS_HEADER, HeaderValue::from(status.code() as i32));
            resp
        }
    }
}

/// The caller's side of [`answer`].
pub(crate) fn reply_of<M: prost::Message + Default>(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<M, tonic::Status> {
    if status == StatusCode::OK {
        return M::decode(body)
            .map_err(|e| tonic::Status::internal(format!("peer reply is not a message: {e}")));
    }
    let message = String::from_utf8_lossy(&body).into_owned();
    let code = headers
        .get(STATUS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32);
    Err(match (code, status) {
        (Some(code), _) => tonic::Status::new(code, message),
        (None, StatusCode::UNAUTHORIZED) => tonic::Status::unauthenticated(message),
        (None, _) => tonic::Status::unknown(format!("peer answered {status}: {message}")),
    })
}

/// Reads a unary call's request message.
async fn request_of<M: prost::Message + Default>(
    req: Request<tonic::body::Body>,
) -> Result<M, Response<tonic::body::Body>> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_CALL_BYTES)
        .collect()
        .await
        .map_err(|e| text(StatusCode::BAD_REQUEST, format!("request body: {e}")))?
        .to_bytes();
    M::decode(body).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            format!("request is not a message: {e}"),
        )
    })
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
        let call = req
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .unwrap_or_default()
            .to_owned();
        macro_rules! unary {
            ($service:expr, $method:ident) => {
                match request_of(req).await {
                    Ok(m) => answer($service.$method(tonic::Request::new(m)).await),
                    Err(refused) => refused,
                }
            };
        }
        match (req.method().clone(), &*call) {
            (Method::PUT, "PushBlob") => self.push(req).await,
            (Method::POST, "Propose") => unary!(self.cluster, propose),
            (Method::POST, "ReadIndex") => unary!(self.cluster, read_index),
            (Method::POST, "AppendEntries") => unary!(self.raft, append_entries),
            (Method::POST, "Vote") => unary!(self.raft, vote),
            (_, "PushBlob") => text(StatusCode::METHOD_NOT_ALLOWED, "PushBlob is a PUT"),
            (_, "Propose" | "ReadIndex" | "AppendEntries" | "Vote") => {
                text(StatusCode::METHOD_NOT_ALLOWED, format!("{call} is a POST"))
            }
            _ => text(StatusCode::NOT_FOUND, "no such peer call"),
        }
    }

    /// Stores a blob a peer pushes: its bytes are the body, its size and digests in
    /// headers.
    async fn push(&self, req: Request<tonic::body::Body>) -> Response<tonic::body::Body> {
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
        match self
            .cluster
            .blobs
            .receive(&info, check_of(&head), body)
            .await
        {
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
