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
            match verdict {
                Verdict::Pass => {}
                Verdict::Cut => {
                    return Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "peer link cut (test fault)",
                    )) as Self::Error);
                }
                Verdict::Delay(d) => tokio::time::sleep(d).await,
            }
            ready.call(req).await.map_err(Into::into)
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
    /// Keep-alive HTTP/1.1 connections for blob pushes (see `peer_http`); none when peer
    /// traffic is TLS.
    http1: Option<Http1Client>,
    /// Peers whose HTTP/1.1 push failed where gRPC then worked (members from before it),
    /// by address: pushes to them take gRPC until then.
    grpc_only_until: Arc<Mutex<HashMap<String, Instant>>>,
    /// Test faults, and this node's gRPC address (the `from` of its calls).
    faults: Option<(Arc<Faults>, Arc<str>)>,
}

type Http1Client =
    hyper_util::client::legacy::Client<HttpConnector, http_body_util::Full<bytes::Bytes>>;

/// How long an HTTP/1.1 push of a small blob may take. Unlike gRPC's connections, which
/// HTTP/2 pings find dead, an HTTP/1.1 request to a peer that stopped answering would
/// otherwise wait for good.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a peer that took a push only through gRPC gets gRPC before HTTP/1.1 is tried
/// again (it may have been upgraded meanwhile).
const GRPC_ONLY_FOR: Duration = Duration::from_secs(60);

/// How an HTTP/1.1 push ended.
#[derive(Debug)]
pub(crate) enum Http1Push {
    /// The peer holds the blob.
    Stored,
    /// Not tried: peer traffic is TLS, or the peer took its last push only through gRPC.
    NotTried,
    /// Failed before the peer answered (a member from before the route does not speak
    /// HTTP/1.1 on the peer port, or the peer is unreachable): push through gRPC.
    Failed(String),
    /// The peer answered and refused the blob.
    Refused(String),
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
                .build(connector)
        });
        Peers {
            secret,
            tls,
            local_ip,
            channels: Default::default(),
            http1,
            grpc_only_until: Default::default(),
            faults: None,
        }
    }

    /// Pushes a small blob to the peer at `addr` over HTTP/1.1 (see `peer_http`).
    pub(crate) async fn push_http1(
        &self,
        addr: &str,
        head: &pb::BlobChunk,
        data: bytes::Bytes,
    ) -> Http1Push {
        let Some(client) = &self.http1 else {
            return Http1Push::NotTried;
        };
        if self
            .grpc_only_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
            .is_some_and(|until| Instant::now() < *until)
        {
            return Http1Push::NotTried;
        }
        if let Some((f, me)) = &self.faults {
            if f.lacks(super::peer_http::PUSH_PATH) {
                return Http1Push::Failed("route not known to this member (test fault)".into());
            }
            match f.verdict(me, addr) {
                Verdict::Pass => {}
                Verdict::Cut => return Http1Push::Failed("peer link cut (test fault)".into()),
                Verdict::Delay(d) => tokio::time::sleep(d).await,
            }
        }
        let headers = match super::peer_http::head_headers(head) {
            Ok(h) => h,
            Err(e) => return Http1Push::Refused(e),
        };
        let mut req = http::Request::put(format!("http://{addr}{}", super::peer_http::PUSH_PATH))
            .body(http_body_util::Full::new(data))
            .unwrap_or_else(|_| unreachable!("a peer address makes a valid URI"));
        req.headers_mut().extend(headers);
        if self.secret.is_set() {
            match http::HeaderValue::from_str(&self.secret.0) {
                Ok(v) => {
                    req.headers_mut().insert(SECRET_HEADER, v);
                }
                Err(_) => return Http1Push::Refused("cluster secret is not a header value".into()),
            }
        }
        let answered = tokio::time::timeout(PUSH_TIMEOUT, async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| crate::error_chain(&e))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| crate::error_chain(&e))?;
            Ok::<_, String>((status, body.to_bytes()))
        })
        .await;
        match answered {
            Ok(Ok((status, _))) if status.is_success() => Http1Push::Stored,
            Ok(Ok((status, body))) => {
                Http1Push::Refused(format!("{status}: {}", String::from_utf8_lossy(&body)))
            }
            Ok(Err(e)) => Http1Push::Failed(format!("HTTP/1.1 push: {e}")),
            Err(_) => Http1Push::Failed(format!("HTTP/1.1 push: no answer in {PUSH_TIMEOUT:?}")),
        }
    }

    /// Records that `addr` took a push only through gRPC: it predates the HTTP/1.1 route.
    pub(crate) fn grpc_only(&self, addr: &str) {
        self.grpc_only_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_owned(), Instant::now() + GRPC_ONLY_FOR);
    }

    /// Routes every call through `faults`; `me` is this node's gRPC address.
    pub(crate) fn with_faults(mut self, faults: Arc<Faults>, me: &str) -> Peers {
        self.faults = Some((faults, Arc::from(me)));
        self
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
