//! The gRPC endpoint for peer traffic: Raft, the cluster service and node status. Every
//! service checks the cluster secret.

use granary_protocol::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::cluster::peers::{CONNECTION_WINDOW, CheckSecret, MAX_FRAME, STREAM_WINDOW, Secret};
use crate::cluster::service::ClusterService;
use crate::raft::network::RaftService;

/// What a node reports of itself over gRPC.
#[derive(Clone)]
pub(crate) struct SelfInfo {
    pub(crate) region: String,
    pub(crate) http_addr: String,
    pub(crate) grpc_addr: String,
}

struct StatusService {
    cluster: Cluster,
    me: SelfInfo,
}

#[tonic::async_trait]
impl pb::node_server::Node for StatusService {
    async fn status(
        &self,
        _request: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusReply>, tonic::Status> {
        let m = self.cluster.raft().metrics().borrow().clone();
        Ok(tonic::Response::new(pb::StatusReply {
            node_id: m.id,
            region: self.me.region.clone(),
            http_addr: self.me.http_addr.clone(),
            grpc_addr: self.me.grpc_addr.clone(),
            leader_id: m.current_leader,
            current_term: m.current_term,
            last_applied_index: m.last_applied.map(|l| l.index),
            hears_leader: crate::cluster::election_gate::hears_leader(&self.cluster, m.state),
        }))
    }
}

/// Serves gRPC on `listener` until `cancel` fires.
pub(crate) async fn serve(
    cluster_service: ClusterService,
    secret: Secret,
    tls: Option<tonic::transport::ServerTlsConfig>,
    me: SelfInfo,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    // Replies are small frames written as soon as they are ready: without TCP_NODELAY,
    // Nagle's algorithm holds one back until the peer's delayed ACK (40 ms on Linux).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let check = CheckSecret(secret.clone());
    let cluster = cluster_service.cluster.clone();
    let raft_service = RaftService::new(
        cluster.raft().clone(),
        cluster.lease().clone(),
        cluster.contact().clone(),
    );
    let peer_http = crate::cluster::peer_http::PeerHttp {
        cluster: cluster_service.clone(),
        raft: raft_service.clone(),
        secret,
    };
    let raft = pb::raft_server::RaftServer::new(raft_service)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30);
    let service = pb::cluster_server::ClusterServer::new(cluster_service)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut builder = tonic::transport::Server::builder()
        // The calls every publish makes come over HTTP/1.1 (`cluster::peer_http`) where
        // peer traffic is plain TCP; with TLS they stay on gRPC.
        .accept_http1(tls.is_none())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    if let Some(tls) = tls {
        builder = match builder.tls_config(tls) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "peer TLS configuration refused; gRPC not served");
                return;
            }
        };
    }
    let result = builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            raft,
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            service,
            check.clone(),
        ))
        .add_service(peer_http)
        .add_service(pb::node_server::NodeServer::with_interceptor(
            StatusService { cluster, me },
            check,
        ))
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}
