//! Raft traffic between nodes over gRPC (`granary_protocol::pb::raft_*`), with AppendEntries
//! and votes over HTTP/1.1 where the peer takes it (`cluster::peer_http`).
//!
//! openraft's requests and responses travel as JSON payloads inside the protobuf
//! messages; the receiving side ([`RaftService`]) hands them to its local Raft.

use std::sync::Arc;

use super::lease::Lease;
use super::reachability::Reachability;
use super::{NodeId, NodeInfo, Raft, TypeConfig};
use crate::cluster::Standing;
use crate::cluster::election_gate::LeaderContact;
use crate::cluster::peers::{PeerChannel, Peers};
use granary_protocol::pb;
use granary_protocol::pb::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Creates one [`PeerClient`] per target, over the node's shared peer channels.
#[derive(Clone)]
pub(crate) struct GrpcNetwork {
    peers: Peers,
    /// The lease acks are recorded in; whether this node, leading, is cut off or hands
    /// over, told to followers in AppendEntries.
    standing: Standing,
    reach: Arc<Reachability>,
}

impl GrpcNetwork {
    /// Accepted AppendEntries are recorded in the standing's lease, and say whether this
    /// node, leading, is cut off; peers that cannot be reached are logged and counted in
    /// `peers`' metrics.
    pub(crate) fn new(peers: Peers, standing: Standing) -> Self {
        let reach = Arc::new(Reachability::new(peers.metrics().clone()));
        GrpcNetwork {
            peers,
            standing,
            reach,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        self.reach.opened(target);
        PeerClient {
            target,
            addr: node.grpc_addr.clone(),
            peers: self.peers.clone(),
            standing: self.standing.clone(),
            reach: self.reach.clone(),
            client: None,
        }
    }
}

/// A connection to one peer, made on first use and kept.
pub(crate) struct PeerClient {
    target: NodeId,
    addr: String,
    peers: Peers,
    standing: Standing,
    reach: Arc<Reachability>,
    client: Option<RaftClient<PeerChannel>>,
}

impl Drop for PeerClient {
    fn drop(&mut self) {
        self.reach.closed(self.target);
    }
}

type RpcErr<E> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl PeerClient {
    fn client(&mut self) -> Result<RaftClient<PeerChannel>, Msg> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = self
            .peers
            .raft(&self.addr)
            .map_err(|e| Msg(e.to_string()))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call_with<Req, Resp, E>(
        &mut self,
        kind: Kind,
        req: &Req,
        snapshot_data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = pb::RaftRequest {
            payload,
            snapshot_data,
            leader_cut_off: matches!(kind, Kind::Append) && self.standing.cut_off.leader_unacked(),
            successor: match kind {
                Kind::Append => self.standing.handover.successor(),
                _ => 0,
            },
        };
        // Every way a call can go unanswered is recorded once, here, and becomes
        // openraft's `Unreachable` (which it backs off from).
        let reply = match self.exchange(kind, request, option.hard_ttl()).await {
            Ok(r) => {
                self.reach.answered(self.target, &self.addr);
                // (A test fault plays members of the release before batch entries.)
                let features = if self.peers.peers_predate(super::batch::PREDATES_BATCHES) {
                    0
                } else {
                    r.features
                };
                self.standing.features.answered(self.target, features);
                r
            }
            Err(e) => {
                self.reach.failed(self.target, &self.addr, &e);
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
        };
        if reply.is_error {
            let err: RaftError<NodeId, E> = serde_json::from_slice(&reply.payload)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            return Err(RPCError::RemoteError(RemoteError::new(self.target, err)));
        }
        serde_json::from_slice(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    /// Sends `request` and takes the peer's reply, within `ttl`: a peer behind a dropped
    /// link must not hold Raft's replication stream forever.
    async fn exchange(
        &mut self,
        kind: Kind,
        request: pb::RaftRequest,
        ttl: std::time::Duration,
    ) -> Result<pb::RaftReply, Msg> {
        let mut client = self.client()?;
        let peers = &self.peers;
        let addr = &self.addr;
        // AppendEntries and votes may be sent twice (Raft expects lost and repeated
        // messages), so they go over HTTP/1.1 where the peer takes it (`peer_http`).
        let call = async {
            match kind {
                Kind::Append => peers
                    .call_either(
                        addr,
                        "AppendEntries",
                        "append_entries",
                        request,
                        |r| async move { client.append_entries(r).await.map(|r| r.into_inner()) },
                    )
                    .await,
                Kind::Vote => {
                    peers
                        .call_either(addr, "Vote", "vote", request, |r| async move {
                            client.vote(r).await.map(|r| r.into_inner())
                        })
                        .await
                }
                Kind::Snapshot => client
                    .install_snapshot(request)
                    .await
                    .map(|r| r.into_inner()),
            }
        };
        match tokio::time::timeout(ttl, call).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(status)) => Err(Msg(status.to_string())),
            Err(_) => Err(Msg(format!(
                "no answer from node {} within {ttl:?}",
                self.target
            ))),
        }
    }
}

enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        // A member of the release before batch entries cannot decode one, and answers
        // every AppendEntries carrying one with an error (played here by a test fault).
        if self.peers.peers_predate(super::batch::PREDATES_BATCHES)
            && rpc.entries.iter().any(super::batch::is_batch)
        {
            return Err(RPCError::Unreachable(Unreachable::new(&Msg(
                "bad raft payload: unknown variant `Batch` (test fault)".into(),
            ))));
        }
        let (vote, sent) = (rpc.vote, tokio::time::Instant::now());
        let answer = self
            .call_with(Kind::Append, &rpc, Vec::new(), &option)
            .await;
        // Any answer but a higher vote means the follower took this leader's vote, and
        // will not vote for another for a while after `sent`.
        if let Ok(a) = &answer
            && !matches!(a, AppendEntriesResponse::HigherVote(_))
        {
            self.standing.lease.acked(self.target, &vote, sent);
        }
        answer
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        // The chunk travels as raw bytes beside the JSON header, not as a JSON array.
        let mut rpc = rpc;
        let data = std::mem::take(&mut rpc.data);
        self.call_with(Kind::Snapshot, &rpc, data, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.call_with(Kind::Vote, &rpc, Vec::new(), &option).await
    }
}

/// The receiving side: hands peer requests to the local Raft.
#[derive(Clone)]
pub(crate) struct RaftService {
    raft: Raft,
    lease: Arc<Lease>,
    contact: Arc<LeaderContact>,
}

impl RaftService {
    pub(crate) fn new(raft: Raft, lease: Arc<Lease>, contact: Arc<LeaderContact>) -> Self {
        RaftService {
            raft,
            lease,
            contact,
        }
    }
}

fn reply<T: Serialize, E: Serialize>(
    r: Result<T, E>,
) -> Result<tonic::Response<pb::RaftReply>, tonic::Status> {
    let (payload, is_error) = match r {
        Ok(v) => (serde_json::to_vec(&v), false),
        Err(e) => (serde_json::to_vec(&e), true),
    };
    let payload = payload.map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(tonic::Response::new(pb::RaftReply {
        payload,
        is_error,
        features: super::batch::FEATURES,
    }))
}

fn parse<T: DeserializeOwned>(req: tonic::Request<pb::RaftRequest>) -> Result<T, tonic::Status> {
    serde_json::from_slice(&req.into_inner().payload)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad raft payload: {e}")))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<pb::RaftRequest>,
    ) -> Result<tonic::Response<pb::RaftReply>, tonic::Status> {
        let (leader_cut_off, successor) = {
            let r = request.get_ref();
            (r.leader_cut_off, r.successor)
        };
        let req: AppendEntriesRequest<TypeConfig> = parse(request)?;
        let answer = self.raft.append_entries(req).await;
        // Accepted from a leader of this node's term or a later one (a conflict is
        // accepted too: the leader goes on to find where the logs agree).
        if answer
            .as_ref()
            .is_ok_and(|r| !matches!(r, AppendEntriesResponse::HigherVote(_)))
        {
            self.contact.heard(leader_cut_off, successor);
        }
        reply(answer)
    }

    async fn vote(
        &self,
        request: tonic::Request<pb::RaftRequest>,
    ) -> Result<tonic::Response<pb::RaftReply>, tonic::Status> {
        let req: VoteRequest<NodeId> = parse(request)?;
        // Ends this node's lease as a leader, and holds votes back just after a start
        // (see `lease`).
        self.lease.before_vote().await;
        reply(self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<pb::RaftRequest>,
    ) -> Result<tonic::Response<pb::RaftReply>, tonic::Status> {
        let inner = request.into_inner();
        let mut req: InstallSnapshotRequest<TypeConfig> = serde_json::from_slice(&inner.payload)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad raft payload: {e}")))?;
        req.data = inner.snapshot_data;
        reply(self.raft.install_snapshot(req).await)
    }
}
