//! The gRPC endpoint for peer traffic: Raft and node status.

use std::sync::Arc;

use granary_protocol::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::raft::network::RaftService;

struct StatusService {
    node: Arc<Node>,
}

#[tonic::async_trait]
impl pb::node_server::Node for StatusService {
    async fn status(
        &self,
        _request: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusReply>, tonic::Status> {
        let m = self.node.raft.metrics().borrow().clone();
        Ok(tonic::Response::new(pb::StatusReply {
            node_id: m.id,
            region: self.node.config.region.clone(),
            http_addr: self.node.http_addr.to_string(),
            grpc_addr: self.node.grpc_addr.to_string(),
            leader_id: m.current_leader,
            current_term: m.current_term,
            last_applied_index: m.last_applied.map(|l| l.index),
        }))
    }
}

/// Serves gRPC on `listener` until `cancel` fires.
pub(crate) async fn serve(node: Arc<Node>, listener: TcpListener, cancel: CancellationToken) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let result = tonic::transport::Server::builder()
        .add_service(pb::raft_server::RaftServer::new(RaftService::new(
            node.raft.clone(),
        )))
        .add_service(pb::node_server::NodeServer::new(StatusService { node }))
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}
