//! The receiving side of the cluster service (`granary.v1.Cluster`).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use granary_protocol::pb;
use openraft::error::{CheckIsLeaderError, RaftError};
use tonic::{Request, Response, Status, Streaming};

use super::blobs::{BlobReplicator, body_chunks, check_of, chunks_body, info_of};
use super::{Cluster, MembershipChange, MembershipError, from_pb, member_from_pb};
use crate::state::command::Command;

/// Serves forwarding, read index, membership and blob transfer to peers.
#[derive(Clone)]
pub(crate) struct ClusterService {
    pub(crate) cluster: Cluster,
    pub(crate) blobs: BlobReplicator,
    /// Public registries' documents and files, for members asking this node (their
    /// owner in the region) to fetch them.
    pub(crate) public_docs: std::sync::Arc<crate::upstream::metadata::MetadataCache>,
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
        self.cluster.serving_as_leader()?;
        match self.cluster.leader_read_index_unless_cut_off().await {
            Ok(read_index) => Ok(Response::new(pb::ReadIndexReply { read_index })),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(Status::unavailable("not the leader"))
            }
            Err(_) if self.cluster.leader_known_cut_off() => Err(super::leader_cut_off()),
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
        let check = check_of(&first);
        let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
        let body = chunks_body(head.chain(stream.map(|r| r.map(|c| c.data))));
        self.blobs
            .receive(&info, check, body)
            .await
            .map_err(Status::data_loss)?;
        Ok(Response::new(pb::PushBlobReply { stored: true }))
    }

    async fn push_small_blob(
        &self,
        request: Request<pb::BlobChunk>,
    ) -> Result<Response<pb::PushBlobReply>, Status> {
        let blob = request.into_inner();
        let info = info_of(&blob).map_err(Status::invalid_argument)?;
        let check = check_of(&blob);
        self.blobs
            .receive(&info, check, granary_format::body::full(blob.data))
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
            Some((info, crc32c, body)) => {
                Ok(Response::new(Box::pin(body_chunks(&info, crc32c, body))))
            }
            None => Err(Status::not_found(format!("blob {sha} is not stored here"))),
        }
    }

    type FetchUpstreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::UpstreamChunk, Status>> + Send + 'static>>;

    async fn fetch_upstream(
        &self,
        request: Request<pb::UpstreamRequest>,
    ) -> Result<Response<Self::FetchUpstreamStream>, Status> {
        let req = request.into_inner();
        if !(req.url.starts_with("http://") || req.url.starts_with("https://")) {
            return Err(Status::invalid_argument("an upstream URL is http(s)"));
        }
        let package = (!req.name.is_empty()).then(|| {
            granary_format::model::PackageKey::new(
                (!req.namespace.is_empty()).then_some(req.namespace.as_str()),
                &req.name,
            )
        });
        let reader = crate::upstream::reader_for(&req.format);
        // A failed upstream answers every asker the same: `Unavailable("upstream …")`.
        let raw = match (req.kind.as_str(), package, reader) {
            ("metadata", Some(key), Some(reader)) => {
                self.public_docs
                    .serve_peer(&req.url, &key, reader, &req.format, &req.repository)
                    .await
            }
            (kind, package, _) => {
                let labels = crate::upstream::fetch::Labels {
                    format: req.format,
                    repository: req.repository,
                    kind: if kind == "artifact" {
                        "artifact"
                    } else {
                        "metadata"
                    },
                    package,
                };
                self.public_docs
                    .fetcher()
                    .raw_local(&req.url, &labels, req.fresh)
                    .await
            }
        }
        .map_err(Status::unavailable)?;
        Ok(Response::new(Box::pin(crate::upstream::fetch::to_stream(
            raw,
        ))))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        let id = request.into_inner().node_id;
        if id != self.cluster.id() {
            return Err(Status::invalid_argument(format!(
                "this is node {}, not node {id}",
                self.cluster.id()
            )));
        }
        tracing::warn!("the leader removed this node from the cluster");
        self.cluster.mark_removed();
        Ok(Response::new(pb::LeaveReply {}))
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
