//! Connections to the other members: one lazily connected gRPC channel per address and
//! lane, and a pool of HTTP/1.1 connections for blob pushes (see `peer_http`); every call
//! carries the cluster secret.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use granary_protocol::pb;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use crate::config::PeerTls;
use crate::faults::{Faults, Verdict};
use crate::metrics::{CALLS, Metrics};

/// The metadata key that carries the cluster secret.
pub(crate) const SECRET_HEADER: &str = "x-granary-cluster-secret";

/// The environment variable holding the cluster secret.
pub(crate) const SECRET_ENV: &str = "GRANARY_CLUSTER_SECRET";

/// Time to establish a connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 flow control and framing between peers, set on both ends. The defaults (a
/// 64 KiB window, 16 KiB frames) made every blob push above 64 KiB wait a round trip for
/// a window update halfway, and cut each 256 KiB chunk into sixteen frames. A peer
/// buffers at most one connection window per connection.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
/// See [`STREAM_WINDOW`].
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;
/// See [`STREAM_WINDOW`].
pub(crate) const MAX_FRAME: u32 = 1 << 20;

/// The cluster secret, shared by every member (empty when unset: a one-node deployment).
#[derive(Clone)]
pub(crate) struct Secret(Arc<str>);

impl Secret {
    /// From `GRANARY_CLUSTER_SECRET`.
    pub(crate) fn from_env() -> Secret {
        Secret(std::env::var(SECRET_ENV).unwrap_or_default().into())
    }

    /// Whether a secret is configured.
    pub(crate) fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether a request carries it (constant time in the secret's length).
    fn admits<T>(&self, req: &tonic::Request<T>) -> bool {
        self.admits_bytes(
            req.metadata()
                .get(SECRET_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default(),
        )
    }

    /// Whether `presented` is the secret (constant time in the secret's length).
    pub(crate) fn admits_bytes(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        presented
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Adds the secret to outgoing calls.
#[derive(Clone)]
pub(crate) struct AddSecret(Secret);

impl tonic::service::Interceptor for AddSecret {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.0.is_set() {
            let v = tonic::metadata::MetadataValue::try_from(&*self.0.0)
                .map_err(|_| tonic::Status::internal("cluster secret is not valid metadata"))?;
            req.metadata_mut().insert(SECRET_HEADER, v);
        }
        Ok(req)
    }
}

/// Checks the secret on incoming calls.
#[derive(Clone)]
pub(crate) struct CheckSecret(pub(crate) Secret);

impl tonic::service::Interceptor for CheckSecret {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.0.admits(&req) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "peer call without the cluster secret (GRANARY_CLUSTER_SECRET)",
            ))
        }
    }
}

/// A channel with the secret added to every call.
pub(crate) type PeerChannel = InterceptedService<FaultyChannel, AddSecret>;

/// A channel to one peer that first asks the test's [`Faults`] (if any) what happens to
/// each call.
#[derive(Clone)]
pub(crate) struct FaultyChannel {
    inner: Channel,
    faults: Option<(Arc<Faults>, Arc<str>, Arc<str>)>,
}

impl tower_service::Service<http::Request<tonic::body::Body>> for FaultyChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone that was polled ready serves this call; a fresh one waits for the next.
        let fresh = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, fresh);
        let verdict = self
            .faults
            .as_ref()
            .map_or(Verdict::Pass, |(f, from, to)| f.verdict(from, to));
        if let Some((f, _, _)) = &self.faults
            && f.lacks(req.uri().path())
        {
            let status =
                tonic::Status::unimplemented("method not known to this member (test fault)");
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(async move {
            let Some(back) = verdict.go_there().await else {
                return Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "peer link cut (test fault)",
                )) as Self::Error);
            };
            let answer = ready.call(req).await;
            tokio::time::sleep(back).await;
            answer.map_err(Into::into)
        })
    }
}

/// The TLS settings of both sides of peer traffic, read from the configured files.
#[derive(Clone)]
pub(crate) struct TlsConfigs {
    pub(crate) server: ServerTlsConfig,
    pub(crate) client: ClientTlsConfig,
}

impl TlsConfigs {
    /// Reads the certificate, key and CA files.
    pub(crate) fn load(tls: &PeerTls) -> Result<TlsConfigs, String> {
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p).map_err(|e| format!("peer_tls.{what} {}: {e}", p.display()))
        };
        let identity = Identity::from_pem(
            read(&tls.cert_file, "cert_file")?,
            read(&tls.key_file, "key_file")?,
        );
        let ca = Certificate::from_pem(read(&tls.ca_file, "ca_file")?);
        Ok(TlsConfigs {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone()),
            client: ClientTlsConfig::new().ca_certificate(ca).identity(identity),
        })
    }
}

/// Channels to peers, by gRPC address.
#[derive(Clone)]
pub(crate) struct Peers {
    secret: Secret,
    tls: Option<ClientTlsConfig>,
    /// The address outgoing peer connections leave from (the node's gRPC address), so
    /// peers and firewalls see one address per node.
    local_ip: Option<std::net::IpAddr>,
    channels: Arc<Mutex<HashMap<(String, Lane), Channel>>>,
    /// Keep-alive HTTP/1.1 connections for the calls `peer_http` serves; none when peer
    /// traffic is TLS.
    http1: Option<Http1Client>,
    /// Peers whose HTTP/1.1 request failed where gRPC then worked (members from before
    /// it), by address: calls to them take gRPC until then.
    grpc_only_until: Arc<Mutex<HashMap<String, Instant>>>,
    /// Peers that answered their last HTTP/1.1 request, by address.
    http1_answered: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Where answered peer calls are counted.
    metrics: Arc<Metrics>,
    /// Test faults, and this node's gRPC address (the `from` of its calls).
    faults: Option<(Arc<Faults>, Arc<str>)>,
}

type Http1Client =
    hyper_util::client::legacy::Client<HttpConnector, http_body_util::Full<bytes::Bytes>>;

/// How long an HTTP/1.1 request to a peer may take (callers may bound it further). Unlike
/// gRPC's connections, which HTTP/2 pings find dead, an HTTP/1.1 request to a peer that
/// stopped answering would otherwise wait for good.
const HTTP1_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an idle HTTP/1.1 connection to a peer is kept for reuse. The peer closes one
/// that brings no request for 30 s (hyper's header read timeout, which tonic's server
/// sets); a request sent on it just as it closes would fail and go through gRPC, so the
/// pool lets go of it well before.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// How long a peer that answered only through gRPC gets gRPC before HTTP/1.1 is tried
/// again (it may have been upgraded meanwhile).
const GRPC_ONLY_FOR: Duration = Duration::from_secs(60);

/// The transports, as `granary_peer_calls_total` and `granary_peer_blob_pushes_total`
/// name them.
pub(crate) const HTTP1: &str = "http1";
/// See [`HTTP1`].
pub(crate) const GRPC: &str = "grpc";

/// Why a request did not go over HTTP/1.1, or got no answer.
#[derive(Debug)]
pub(crate) enum Http1Failure {
    /// Not tried: peer traffic is TLS, the peer takes gRPC only for now, or (for a call
    /// that must not be repeated) it has not answered HTTP/1.1 before.
    NotTried,
    /// Failed before the peer answered: a member from before the route does not speak
    /// HTTP/1.1 on the peer port, or the peer is unreachable.
    Failed(String),
}

/// Which connection to a peer a call takes. Bulk transfers (blobs, upstream files) get a
/// connection of their own, so a burst of them never delays Raft heartbeats, forwarded
/// writes or read-index rounds behind HTTP/2 flow control on a shared connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// Raft, forwarded proposals, read index, membership.
    Control,
    /// Blob pushes and pulls, upstream fetches.
    Bulk,
}

impl Peers {
    pub(crate) fn new(
        secret: Secret,
        tls: Option<ClientTlsConfig>,
        local_ip: Option<std::net::IpAddr>,
    ) -> Peers {
        let local_ip = local_ip.filter(|ip| !ip.is_unspecified());
        let http1 = tls.is_none().then(|| {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
            connector.set_local_address(local_ip);
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(connector)
        });
        Peers {
            secret,
            tls,
            local_ip,
            channels: Default::default(),
            http1,
            grpc_only_until: Default::default(),
            http1_answered: Default::default(),
            metrics: Default::default(),
            faults: None,
        }
    }

    /// Counts answered calls in `metrics` (the node's).
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Peers {
        self.metrics = metrics;
        self
    }

    /// Sends one request to the peer at `addr` over HTTP/1.1 (see `peer_http`): its
    /// status, headers and body, or why it was not sent or not answered.
    async fn send_http1(
        &self,
        addr: &str,
        method: http::Method,
        path: &str,
        headers: http::HeaderMap,
        body: bytes::Bytes,
        only_if_known: bool,
    ) -> Result<(http::StatusCode, http::HeaderMap, bytes::Bytes), Http1Failure> {
        let Some(client) = &self.http1 else {
            return Err(Http1Failure::NotTried);
        };
        if self
            .grpc_only_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
            .is_some_and(|until| Instant::now() < *until)
        {
            return Err(Http1Failure::NotTried);
        }
        if only_if_known && !self.answers_http1(addr) {
            return Err(Http1Failure::NotTried);
        }
        let mut back = Duration::ZERO;
        if let Some((f, me)) = &self.faults {
            if f.lacks(path) {
                self.forget_http1(addr);
                return Err(Http1Failure::Failed(
                    "route not known to this member (test fault)".into(),
                ));
            }
            let Some(rest) = f.verdict(me, addr).go_there().await else {
                return Err(Http1Failure::Failed("peer link cut (test fault)".into()));
            };
            back = rest;
        }
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .body(http_body_util::Full::new(body))
            .map_err(|e| Http1Failure::Failed(format!("peer request to {addr}: {e}")))?;
        req.headers_mut().extend(headers);
        if self.secret.is_set() {
            let v = http::HeaderValue::from_str(&self.secret.0)
                .map_err(|_| Http1Failure::Failed("cluster secret is not a header value".into()))?;
            req.headers_mut().insert(SECRET_HEADER, v);
        }
        let answered = tokio::time::timeout(HTTP1_TIMEOUT, async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| crate::error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| crate::error_chain(&e))?;
            Ok::<_, String>((parts.status, parts.headers, body.to_bytes()))
        })
        .await;
        tokio::time::sleep(back).await;
        match answered {
            Ok(Ok(answer)) => {
                self.http1_answered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(addr.to_owned());
                Ok(answer)
            }
            Ok(Err(e)) => {
                self.forget_http1(addr);
                Err(Http1Failure::Failed(format!("HTTP/1.1 {path}: {e}")))
            }
            Err(_) => {
                self.forget_http1(addr);
                Err(Http1Failure::Failed(format!(
                    "HTTP/1.1 {path}: no answer in {HTTP1_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Whether the peer at `addr` answered its last HTTP/1.1 request.
    fn answers_http1(&self, addr: &str) -> bool {
        self.http1_answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(addr)
    }

    fn forget_http1(&self, addr: &str) {
        self.http1_answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }

    /// Pushes a small blob to the peer at `addr` over HTTP/1.1 (see `peer_http`): stored,
    /// or refused with the peer's reason.
    pub(crate) async fn push_http1(
        &self,
        addr: &str,
        head: &pb::BlobChunk,
        data: bytes::Bytes,
    ) -> Result<Result<(), String>, Http1Failure> {
        let headers = match super::peer_http::head_headers(head) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        let path = super::peer_http::PUSH_PATH;
        let (status, _, body) = self
            .send_http1(addr, http::Method::PUT, path, headers, data, false)
            .await?;
        Ok(if status.is_success() {
            Ok(())
        } else {
            Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
        })
    }

    /// Makes the unary peer call `call` (a `peer_http` route, such as `Propose`) over
    /// HTTP/1.1. With `only_if_known`, only to a peer that answered HTTP/1.1 before: a
    /// call that must not be sent twice cannot fall back to gRPC after a failure whose
    /// outcome is unknown, so it goes over HTTP/1.1 only where that is known to work.
    pub(crate) async fn call_http1<Req, Resp>(
        &self,
        addr: &str,
        call: &str,
        req: &Req,
        only_if_known: bool,
    ) -> Result<Result<Resp, tonic::Status>, Http1Failure>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let body = req.encode_to_vec();
        if body.len() > super::peer_http::MAX_CALL_BYTES {
            return Err(Http1Failure::NotTried);
        }
        let path = format!("/{}/{call}", super::peer_http::SERVICE);
        let (status, headers, body) = self
            .send_http1(
                addr,
                http::Method::POST,
                &path,
                http::HeaderMap::new(),
                body.into(),
                only_if_known,
            )
            .await?;
        Ok(super::peer_http::reply_of(status, &headers, body))
    }

    /// Makes a unary call that may safely be sent twice (a read index round, AppendEntries,
    /// a vote): over HTTP/1.1 where the peer takes it, else through `grpc`. `label` names
    /// it in `granary_peer_calls_total`.
    pub(crate) async fn call_either<Req, Resp, F, Fut>(
        &self,
        addr: &str,
        call: &str,
        label: &'static str,
        req: Req,
        grpc: F,
    ) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
        F: FnOnce(Req) -> Fut,
        Fut: Future<Output = Result<Resp, tonic::Status>>,
    {
        let http1 = self.call_http1(addr, call, &req, false).await;
        let (answer, transport) = self.or_grpc(addr, http1, || grpc(req)).await;
        // Over HTTP/1.1 any answer counts; through gRPC an error may be the transport's.
        if transport == HTTP1 || answer.is_ok() {
            self.count(label, transport);
        }
        answer
    }

    /// Ends a request that may safely be sent twice: the answer `http1` got, or else
    /// `grpc`'s. A peer that answers through gRPC after HTTP/1.1 failed predates the
    /// HTTP/1.1 routes, and gets gRPC for a while. Returns the answer and the transport
    /// that gave it (`"http1"` or `"grpc"`).
    pub(crate) async fn or_grpc<T, E, Fut>(
        &self,
        addr: &str,
        http1: Result<Result<T, E>, Http1Failure>,
        grpc: impl FnOnce() -> Fut,
    ) -> (Result<T, E>, &'static str)
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let failed = match http1 {
            Ok(answer) => return (answer, HTTP1),
            Err(Http1Failure::NotTried) => None,
            Err(Http1Failure::Failed(why)) => Some(why),
        };
        let answer = grpc().await;
        if answer.is_ok()
            && let Some(why) = failed
        {
            tracing::info!(peer = addr, reason = %why, "peer answered only through gRPC; using gRPC for it for a while");
            self.grpc_only_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr.to_owned(), Instant::now() + GRPC_ONLY_FOR);
        }
        (answer, GRPC)
    }

    /// The node's counters.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Counts one answered peer call in `granary_peer_calls_total`.
    pub(crate) fn count(&self, call: &'static str, transport: &'static str) {
        self.metrics
            .add(CALLS, &[("call", call), ("transport", transport)], 1);
    }

    /// Whether a test fault makes peers act as members that predate `what` (see
    /// [`Faults::unimplemented`]).
    pub(crate) fn peers_predate(&self, what: &str) -> bool {
        self.faults.as_ref().is_some_and(|(f, _)| f.lacks(what))
    }

    /// Routes every call through `faults`; `me` is this node's gRPC address.
    pub(crate) fn with_faults(mut self, faults: Arc<Faults>, me: &str) -> Peers {
        self.faults = Some((faults, Arc::from(me)));
        self
    }

    /// The status of the member at `addr` (`Node.Status`, answered from its memory), if it
    /// answers `within`.
    pub(crate) async fn status_of(&self, addr: &str, within: Duration) -> Option<pb::StatusReply> {
        let channel = self.channel(addr, Lane::Control).ok()?;
        let mut client = pb::node_client::NodeClient::new(channel);
        let reply = tokio::time::timeout(within, client.status(pb::StatusRequest {}))
            .await
            .ok()?
            .ok()?;
        Some(reply.into_inner())
    }

    /// A channel to `addr` (`host:port`) in `lane`, connected on first use and
    /// reconnected as needed.
    pub(crate) fn channel(&self, addr: &str, lane: Lane) -> Result<PeerChannel, tonic::Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr.to_owned(), lane);
        let channel = match channels.get(&key) {
            Some(c) => c.clone(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                    .map_err(|e| tonic::Status::invalid_argument(format!("{addr}: {e}")))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_frame_size(MAX_FRAME)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .local_address(self.local_ip);
                if let Some(tls) = &self.tls {
                    endpoint = endpoint
                        .tls_config(tls.clone())
                        .map_err(|e| tonic::Status::internal(format!("peer TLS: {e}")))?;
                }
                let c = endpoint.connect_lazy();
                channels.insert(key, c.clone());
                c
            }
        };
        let channel = FaultyChannel {
            inner: channel,
            faults: self
                .faults
                .as_ref()
                .map(|(f, me)| (f.clone(), me.clone(), Arc::from(addr))),
        };
        Ok(InterceptedService::new(
            channel,
            AddSecret(self.secret.clone()),
        ))
    }

    /// The cluster client for a peer, for control calls.
    pub(crate) fn cluster(
        &self,
        addr: &str,
    ) -> Result<pb::cluster_client::ClusterClient<PeerChannel>, tonic::Status> {
        self.cluster_in(addr, Lane::Control)
    }

    /// The cluster client for a peer, for bulk transfers.
    pub(crate) fn cluster_bulk(
        &self,
        addr: &str,
    ) -> Result<pb::cluster_client::ClusterClient<PeerChannel>, tonic::Status> {
        self.cluster_in(addr, Lane::Bulk)
    }

    fn cluster_in(
        &self,
        addr: &str,
        lane: Lane,
    ) -> Result<pb::cluster_client::ClusterClient<PeerChannel>, tonic::Status> {
        Ok(
            pb::cluster_client::ClusterClient::new(self.channel(addr, lane)?)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
    }

    /// The Raft client for a peer.
    pub(crate) fn raft(
        &self,
        addr: &str,
    ) -> Result<pb::raft_client::RaftClient<PeerChannel>, tonic::Status> {
        Ok(
            pb::raft_client::RaftClient::new(self.channel(addr, Lane::Control)?)
                .max_decoding_message_size(1 << 30)
                .max_encoding_message_size(1 << 30),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn the_secret_is_required_and_compared_exactly() {
        let secret = Secret("s3cret".into());
        let mut check = CheckSecret(secret.clone());
        let mut add = AddSecret(secret);
        let signed = add.call(tonic::Request::new(())).unwrap();
        assert!(check.call(signed).is_ok());
        assert!(check.call(tonic::Request::new(())).is_err());
        let mut wrong = AddSecret(Secret("s3creT".into()));
        assert!(
            check
                .call(wrong.call(tonic::Request::new(())).unwrap())
                .is_err()
        );
        // No secret configured on either side: calls pass (a single node).
        let mut open = CheckSecret(Secret("".into()));
        assert!(open.call(tonic::Request::new(())).is_ok());
    }
}
