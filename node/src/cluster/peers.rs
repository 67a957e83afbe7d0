//! Connections to the other members: one lazily connected gRPC channel per address, every
//! call carrying the cluster secret.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use granary_protocol::pb;
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
        let presented = req
            .metadata()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
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
    /// Test faults, and this node's gRPC address (the `from` of its calls).
    faults: Option<(Arc<Faults>, Arc<str>)>,
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
        Peers {
            secret,
            tls,
            local_ip: local_ip.filter(|ip| !ip.is_unspecified()),
            channels: Default::default(),
            faults: None,
        }
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
