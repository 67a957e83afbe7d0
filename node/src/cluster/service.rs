//! The receiving side of the cluster service (`granary.v1.Cluster`).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use granary_protocol::pb;
use openraft::error::{CheckIsLeaderError, RaftError};
use tonic::{Request, Response, Status, Streaming};

use super::blobs::{BlobReplicator, body_chunks, chunks_body, info_of};
use super::{Cluster, MembershipChange, MembershipError, from_pb, member_from_pb};
use crate::state::command::Command;

/// Serves forwarding, read index, membership and blob transfer to peers.
pub(crate) struct ClusterService {
    pub(crate) cluster: Cluster,
    pub(crate) blobs: BlobReplicator,
}

fn membership_status(e: MembershipError) -> Status {
    match e {
        MembershipError::Invalid(m) => Status::invalid_argument(m),
        MembershipError::Unavailable => Status::unavailable(e.to_string()),
        MembershipError::Fatal(m) => Status::internal(m),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let cmd: Command = serde_json::from_slice(&request.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("bad command: {e}")))?;
        let (result, log_index) = self.cluster.propose_as_leader(cmd).await?;
        let result = serde_json::to_vec(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ProposeReply { result, log_index }))
    }

    async fn read_index(
        &self,
        _request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        match self.cluster.leader_read_index().await {
            Ok(read_index) => Ok(Response::new(pb::ReadIndexReply { read_index })),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(Status::unavailable("not the leader"))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let req = request.into_inner();
        let (id, info) = member_from_pb(req.member).map_err(Status::invalid_argument)?;
        tracing::info!(node = id, %info, learner = req.learner, "a node asks to join");
        let log_index = self
            .cluster
            .change_membership(MembershipChange::Add {
                id,
                info,
                learner: req.learner,
            })
            .await
            .map_err(membership_status)?;
        Ok(Response::new(pb::MembershipReply { log_index }))
    }

    async fn change_membership(
        &self,
        request: Request<pb::MembershipRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let change = from_pb(request.into_inner()).map_err(Status::invalid_argument)?;
        let log_index = self
            .cluster
            .change_as_leader(change)
            .await
            .map_err(membership_status)?;
        Ok(Response::new(pb::MembershipReply { log_index }))
    }

    async fn push_blob(
        &self,
        request: Request<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::PushBlobReply>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty blob stream"))?;
        let info = info_of(&first).map_err(Status::invalid_argument)?;
        let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
        let body = chunks_body(head.chain(stream.map(|r| r.map(|c| c.data))));
        self.blobs
            .receive(&info, body)
            .await
            .map_err(Status::data_loss)?;
        Ok(Response::new(pb::PushBlobReply { stored: true }))
    }

    type PullBlobStream = ChunkStream;

    async fn pull_blob(
        &self,
        request: Request<pb::BlobRef>,
    ) -> Result<Response<ChunkStream>, Status> {
        let sha = request.into_inner().sha256;
        match self.blobs.send(&sha).map_err(Status::internal)? {
            Some((info, body)) => Ok(Response::new(Box::pin(body_chunks(&info, body)))),
            None => Err(Status::not_found(format!("blob {sha} is not stored here"))),
        }
    }

    async fn has_blob(
        &self,
        request: Request<pb::BlobRef>,
    ) -> Result<Response<pb::HasBlobReply>, Status> {
        let sha = request.into_inner().sha256;
        let present = self.blobs.has(&sha).map_err(Status::internal)?;
        Ok(Response::new(pb::HasBlobReply { present }))
    }
}
