//! The HTTP front: accepts connections, gives each request an id, and routes it to the
//! health endpoints, the CodeArtifact API (`/v1/…`) or a format's package endpoints
//! (`/{format}/{domain}/{repository}/…`), authenticating on the way.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use granary_format::{Action, Body, Caller, Format, FormatError, RepositoryRef};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::auth::{self, TokenAuthError};
use crate::metrics::WRITES_TURNED_AWAY;
use crate::node::Node;
use crate::registry::{CatchUp, NodeRegistry};

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// Serves HTTP on `listener` until `cancel` fires, then lets open requests finish (bounded).
pub(crate) async fn serve(node: Arc<Node>, listener: TcpListener, cancel: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let npm = Arc::new(granary_format_npm::NpmFormat::new(
        node.config.max_body_bytes as usize,
    ));
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        let npm = npm.clone();
        let service = hyper::service::service_fn(move |req| {
            let node = node.clone();
            let npm = npm.clone();
            async move { Ok::<_, Infallible>(route(node, npm, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        // Per-connection task, tied to the shutdown signal through `graceful`.
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("connections still open after 10 s; closing them");
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(granary_format::body::full(text.to_owned()))
        .unwrap_or_else(|_| Response::new(granary_format::body::empty()))
}

async fn route(
    node: Arc<Node>,
    npm: Arc<granary_format_npm::NpmFormat>,
    req: Request<Incoming>,
) -> Response<Body> {
    let request_id = format!(
        "{:x}-{:x}",
        node.started.elapsed().as_millis(),
        REQUEST_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = req.uri().path().to_owned();
    // What a load balancer routes: not its probes, monitoring, or operators' requests.
    if !matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz") && !path.starts_with("/admin/")
    {
        node.client_request();
    }
    let mut resp = if path == "/metrics" {
        match node.blobs.file_bytes() {
            Ok(bytes) => node.metrics.set(crate::metrics::BLOB_FILE_BYTES, bytes),
            Err(e) => tracing::warn!(error = %e, "metrics: blob file bytes not read"),
        }
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(granary_format::body::full(node.metrics.render()))
            .unwrap_or_else(|_| Response::new(granary_format::body::empty()))
    } else if path == "/healthz" {
        // Liveness: up and serving (HTTP is served only once this node is a member). It
        // stays 200 through elections and network faults, which a restart would not mend.
        plain(StatusCode::OK, "ok\n")
    } else if path == "/readyz" {
        match node.ready() {
            Ok(()) => plain(StatusCode::OK, "ok\n"),
            Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
        }
    } else if path.starts_with("/v1/") || path.starts_with("/admin/v1/") {
        api::handle(&node, req, &request_id).await
    } else if let Some(rest) = path.strip_prefix("/npm/") {
        let rest = rest.to_owned();
        serve_format(&node, &*npm, req, &rest, &request_id).await
    } else {
        plain(StatusCode::NOT_FOUND, "not found\n")
    };
    if let Ok(v) = http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn format_error<F: Format>(format: &F, err: FormatError, request_id: &str) -> Response<Body> {
    if let FormatError::Internal(detail) = &err {
        tracing::error!(request_id, format = F::NAME, error = %detail, "internal error");
    }
    let mut resp = format.error_response(&err);
    if err.status() == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert("retry-after", http::HeaderValue::from_static("1"));
    }
    resp
}

/// Checks the path under a repository before any format sees it: no empty segments (a
/// trailing slash aside), no `.` or `..` (also percent-encoded), no backslashes or control
/// characters.
fn path_is_safe(inner: &str) -> bool {
    let trimmed = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty() {
        return true;
    }
    trimmed.split('/').all(|seg| {
        let Ok(decoded) = percent_encoding::percent_decode_str(seg).decode_utf8() else {
            return false;
        };
        !seg.is_empty()
            && !decoded.chars().any(|c| c == '\\' || c.is_control())
            && decoded.split('/').all(|part| part != "." && part != "..")
    })
}

/// Checks one path segment naming a domain or repository.
fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

async fn serve_format<F: Format>(
    node: &Arc<Node>,
    format: &F,
    req: Request<Incoming>,
    rest: &str,
    request_id: &str,
) -> Response<Body> {
    // The body is read only by the format's handler. An error answered before the body
    // was read to its end (refused before the handler, or by it part way through: a bad
    // token, a write turned away, a bad document, one too large) first reads what the
    // client is still sending (see `drain`): an early 401 or 503 to `npm publish` of a
    // large package then reaches npm as such, not as a connection reset.
    let (parts, body) = req.into_parts();
    let kept = Kept::new(body);
    // A write's turn is held until it is answered, its body drained included.
    let (resp, _turn) = match admit(node, format, &parts, rest, request_id).await {
        Ok(admitted) => respond(node, format, admitted, kept.clone(), request_id).await,
        Err(e) => (format_error(format, e, request_id), None),
    };
    if resp.status().is_client_error() || resp.status().is_server_error() {
        kept.drain_rest().await;
    }
    resp
}

/// Hands an admitted request to its format; returns the answer and the write's turn.
async fn respond<F: Format>(
    node: &Arc<Node>,
    format: &F,
    admitted: Admitted<'_, F::Route>,
    body: Kept,
    request_id: &str,
) -> (Response<Body>, Option<tokio::sync::OwnedSemaphorePermit>) {
    let Admitted {
        domain,
        repository,
        created_ms,
        username,
        round,
        route,
        turn,
    } = admitted;
    // Every principal with a token for the domain may read and publish until policies
    // (a later change) narrow it; the action is still computed so that check has a place.
    let _action: Action = F::action(&route);
    let body: Body = http_body_util::Limited::new(body, node.config.max_body_bytes as usize)
        .map_err(|e| e as granary_format::body::BodyError)
        .boxed_unsync();
    let registry = NodeRegistry::new(
        node.clone(),
        F::NAME,
        RepositoryRef {
            domain: domain.to_owned(),
            repository: repository.to_owned(),
            base_url: format!("{}/{}/{domain}/{repository}/", node.public_url, F::NAME),
            created_ms,
        },
        Caller { username },
        format.upstream(),
    )
    .after(round);
    let resp = match format.handle(route, body, &registry).await {
        Ok(resp) => resp,
        Err(e) => format_error(format, e, request_id),
    };
    (resp, turn)
}

/// A request body handed to a format's handler, which can still be taken back to be
/// drained if the handler answers before reading it all.
#[derive(Clone)]
pub(crate) struct Kept(Arc<std::sync::Mutex<Option<Incoming>>>);

impl Kept {
    pub(crate) fn new(body: Incoming) -> Kept {
        Kept(Arc::new(std::sync::Mutex::new(Some(body))))
    }

    /// Takes what the handler left of the body and [`drain`]s it.
    pub(crate) async fn drain_rest(&self) {
        let rest = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rest) = rest
            && !http_body::Body::is_end_stream(&rest)
        {
            drain(rest).await;
        }
    }
}

impl http_body::Body for Kept {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(body) => std::pin::Pin::new(body).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(http_body::Body::size_hint)
            .unwrap_or_default()
    }
}

/// A package request that may go to its format's handler.
struct Admitted<'a, R> {
    domain: &'a str,
    repository: &'a str,
    /// When the repository was created (see `RepositoryRef::created_ms`).
    created_ms: i64,
    /// The caller, as the format names it.
    username: String,
    /// A write's catch-up round, started (see `registry::CatchUp`).
    round: Option<CatchUp>,
    route: R,
    /// A write's turn (see `Config::max_concurrent_writes`), held until it is answered.
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Everything a package request must pass before its format sees it: a well-formed
/// path, a token for the domain, a write's turn, reads caught up, the repository, a
/// route. Reads nothing of the body.
async fn admit<'a, F: Format>(
    node: &Arc<Node>,
    format: &F,
    parts: &http::request::Parts,
    rest: &'a str,
    request_id: &str,
) -> Result<Admitted<'a, F::Route>, FormatError> {
    let mut segments = rest.splitn(3, '/');
    let domain = segments.next().unwrap_or("");
    let repository = segments.next().unwrap_or("");
    let Some(inner) = segments.next() else {
        return Err(FormatError::NotFound("Not found".into()));
    };
    if !segment_ok(domain) || !segment_ok(repository) {
        return Err(FormatError::BadRequest(
            "invalid domain or repository in the path".into(),
        ));
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if !path_is_safe(inner) {
        return Err(FormatError::BadRequest(
            "invalid path: empty, '.' or '..' segments are not allowed".into(),
        ));
    }
    let mut authenticated = auth::authenticate_token(&node.state, &parts.headers, domain, now);
    if matches!(authenticated, Err(TokenAuthError::UnknownKey)) {
        // Perhaps signed with a key this node has not applied yet (it joined moments ago
        // and is still catching up): catch up with the leader and check once more.
        // Malformed and forged tokens are refused without costing the leader anything.
        if node.cluster.linearize().await.is_ok() {
            authenticated = auth::authenticate_token(&node.state, &parts.headers, domain, now);
        }
    }
    let claims = match authenticated {
        Ok(c) => c,
        Err(TokenAuthError::Store(e)) => return Err(FormatError::Internal(e.to_string())),
        Err(TokenAuthError::WrongDomain(d)) => {
            return Err(FormatError::Forbidden(format!(
                "the authorization token is not valid for domain {d}"
            )));
        }
        Err(e) => {
            tracing::debug!(request_id, error = %e, "package request not authenticated");
            return Err(FormatError::Unauthorized);
        }
    };
    // A write takes a turn before any of its work starts (see
    // `Config::max_concurrent_writes`), and holds it until it is answered.
    let write = !matches!(parts.method, Method::GET | Method::HEAD);
    let turn = if write {
        let Some(turn) = write_turn(node).await else {
            node.metrics.inc(WRITES_TURNED_AWAY, &[("format", F::NAME)]);
            return Err(FormatError::Unavailable(format!(
                "this node is at its limit of {} writes at once; retry shortly",
                node.config.max_concurrent_writes
            )));
        };
        Some(turn)
    } else {
        None
    };
    // Reads see every write acknowledged before them, on whichever node they land; a node
    // cut off from the leader answers 503 rather than stale metadata. Only authenticated
    // requests cost the leader a round trip. A write starts its round and goes on with the
    // upload meanwhile (see `registry::CatchUp`).
    let round = if write {
        Some(crate::registry::catch_up(node))
    } else {
        if let Err(e) = node.cluster.linearize().await {
            return Err(FormatError::Unavailable(e.to_string()));
        }
        None
    };
    let mut found = node.state.repository_cached(domain, repository);
    if let (Ok(None), Some(round)) = (&found, &round) {
        // Perhaps created a moment ago through another node: look again once caught up.
        round.clone().await.map_err(FormatError::Unavailable)?;
        found = node.state.repository_cached(domain, repository);
    }
    let created_ms = match found {
        Ok(Some(record)) => record.created_ms,
        Ok(None) => {
            return Err(FormatError::NotFound(format!(
                "repository {repository} not found in domain {domain}"
            )));
        }
        Err(e) => return Err(FormatError::Internal(e.to_string())),
    };
    let route = format.route(parts, inner)?;
    Ok(Admitted {
        domain,
        repository,
        created_ms,
        username: claims
            .principal
            .rsplit('/')
            .next()
            .unwrap_or("aws")
            .to_owned(),
        round,
        route,
        turn,
    })
}

/// Most of a refused request's body [`drain`] reads, and how long it takes for it.
const DRAIN_BYTES: usize = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads and drops a request body the answer does not need, up to [`DRAIN_BYTES`] and
/// [`DRAIN_TIME`]: a client that is still uploading when it is answered early would
/// otherwise have the connection reset under it (hyper closes a connection whose request
/// body was left unread) and never see the answer. Past either bound the connection is
/// closed after the answer all the same.
async fn drain(mut body: Incoming) {
    let read = async {
        let mut left = DRAIN_BYTES;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            let n = frame.data_ref().map_or(0, |d| d.len());
            if n >= left {
                return;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Waits up to `write_queue_ms` for a write's turn; `None` when it did not come.
async fn write_turn(node: &Node) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(turn) = node.writes.clone().try_acquire_owned() {
        return Some(turn);
    }
    let wait = Duration::from_millis(node.config.write_queue_ms);
    match tokio::time::timeout(wait, node.writes.clone().acquire_owned()).await {
        Ok(Ok(turn)) => Some(turn),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        for ok in [
            "",
            "pkg",
            "@s%2fp",
            "@s/p",
            "p/-/p-1.0.0.tgz",
            "simple/",
            "-/package/p/dist-tags/latest",
        ] {
            assert!(path_is_safe(ok), "{ok}");
        }
        for bad in [
            "/p",
            "a//b",
            "..",
            "a/../b",
            "./a",
            "%2e%2e/a",
            "a/..%2f..%2fx",
            "a%5cb",
            "a%00b",
            "a/%2E",
        ] {
            assert!(!path_is_safe(bad), "{bad}");
        }
    }
}
