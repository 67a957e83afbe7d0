//! The node as a member of a cluster: writes from any node (forwarded to the leader),
//! linearizable reads (a batched read index from the leader), membership, and blob
//! replication between members.
//!
//! ```text
//!  follower: propose ──client_write──▶ ForwardToLeader ──gRPC Cluster.Propose──▶ leader
//!                 ◀── result, log index ── commit + apply on the leader
//!            wait until applied here ≥ log index (read-your-writes on this node)
//!
//!  read:  ReadIndex (leader: quorum heartbeat; follower: gRPC to the leader, batched)
//!         → wait until applied here ≥ read index → read the local state
//! ```

pub(crate) mod blobs;
pub(crate) mod election_gate;
pub(crate) mod gc;
pub(crate) mod peer_http;
pub(crate) mod peers;
pub(crate) mod scrub;
pub(crate) mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use granary_protocol::pb;
use openraft::ChangeMembers;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::ReadConsistency;
use crate::metrics::LEADER_READS;
use crate::raft::lease::Lease;
use crate::raft::{NodeId, NodeInfo, ProposeError, Raft};
use crate::state::command::{Command, CommandResult};
use peers::{Http1Failure, Peers};

/// The least a write may wait for a leader (elections, forwarding) before it fails
/// retryably; see [`write_deadline`].
const MIN_WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// The least a linearizable read may wait for the leader's read index; see
/// [`read_deadline`].
const MIN_READ_DEADLINE: Duration = Duration::from_secs(3);

/// How long it may take to replace a failed leader: its followers' lease
/// (`election_timeout_max`), an election timeout (up to `election_timeout_max` again), and
/// a round or two more. 2 s with the single-region defaults (elections take 1.2–1.6 s),
/// 15 s with the multi-region timings (9–12 s).
fn election_bound(raft: &openraft::Config) -> Duration {
    Duration::from_millis(2 * raft.election_timeout_max + raft.election_timeout_min)
}

/// How long a write may wait for a leader before it fails retryably: long enough to
/// outlast an election, so that a write arriving while a failed leader is replaced is
/// acknowledged once there is a new one instead of refused (not every client retries a
/// refused publish: twine and Maven do not). 5 s with the single-region defaults, 15 s
/// with the multi-region timings.
pub(crate) fn write_deadline(raft: &openraft::Config) -> Duration {
    election_bound(raft).max(MIN_WRITE_DEADLINE)
}

/// How long a linearizable read may wait for the leader's read index, for the same
/// reason: a publish reads before it writes, and an install should not fail over an
/// election either. 3 s with the single-region defaults, 15 s with the multi-region
/// timings.
pub(crate) fn read_deadline(raft: &openraft::Config) -> Duration {
    election_bound(raft).max(MIN_READ_DEADLINE)
}

/// Why a linearizable read could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ReadError {
    /// No leader reachable, or it could not confirm its leadership with a quorum.
    #[error("the cluster has no reachable leader with a quorum; retry shortly")]
    Unavailable,
}

/// A membership change an operator asks for.
#[derive(Debug, Clone)]
pub(crate) enum MembershipChange {
    /// Add a learner (promoted once caught up unless `learner`).
    Add {
        /// Its id.
        id: NodeId,
        /// Its addresses and region.
        info: NodeInfo,
        /// Stay a learner.
        learner: bool,
    },
    /// Make a learner a voter.
    Promote(NodeId),
    /// Remove a voter or learner.
    Remove(NodeId),
}

/// Why a membership change failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum MembershipError {
    /// The request is wrong (unknown node, removing the last voter, …).
    #[error("{0}")]
    Invalid(String),
    /// No leader right now, or another change is in progress; retry.
    #[error("no leader is available or another membership change is in progress; retry shortly")]
    Unavailable,
    /// Raft failed.
    #[error("raft: {0}")]
    Fatal(String),
}

/// One member of the status report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MemberStatus {
    pub(crate) node_id: NodeId,
    pub(crate) grpc_addr: String,
    pub(crate) http_addr: String,
    pub(crate) region: String,
    /// `voter` or `learner`.
    pub(crate) role: &'static str,
    /// The member's own applied index, as it reported it (none if it did not answer).
    pub(crate) applied_index: Option<u64>,
    /// Whether the member answered this status request.
    pub(crate) reachable: bool,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClusterStatus {
    pub(crate) node_id: NodeId,
    pub(crate) leader_id: Option<NodeId>,
    pub(crate) term: u64,
    pub(crate) applied_index: Option<u64>,
    pub(crate) members: Vec<MemberStatus>,
}

/// Batches read-index requests: a reader reuses a round trip that started after it
/// arrived; otherwise it starts one.
#[derive(Default)]
struct ReadBatch {
    /// (when the last round trip started, the index it returned)
    last: Option<(Instant, u64)>,
    /// When the last failed round trip ended: readers that were already waiting fail
    /// with it rather than each waiting out a deadline of their own in turn.
    failed_at: Option<Instant>,
}

/// This node's handle on the cluster.
#[derive(Clone)]
pub(crate) struct Cluster {
    raft: Raft,
    peers: Peers,
    me: NodeId,
    consistency: ReadConsistency,
    reads: Arc<Mutex<ReadBatch>>,
    /// Fired when the leader says this node was removed from the cluster.
    removed: Arc<tokio::sync::Notify>,
    /// The leader's lease, by which reads skip the heartbeat round (see `raft::lease`),
    /// whether this node is cut off from a majority of voters (found by the election
    /// gate: a request that needs the leader fails at once then instead of waiting out
    /// its deadline) and whether it is handing over as it shuts down.
    standing: Standing,
    /// The state machine's applied index, as soon as an entry is applied.
    applied: tokio::sync::watch::Receiver<u64>,
    /// Whether a snapshot is being installed, leaving the state incomplete meanwhile.
    installs: tokio::sync::watch::Receiver<bool>,
    /// Held by a membership change on the leader for its whole course: nodes joining at
    /// once take turns instead of colliding in openraft (which refuses, and logs an
    /// error for, a change while another is uncommitted).
    membership_turn: Arc<tokio::sync::Mutex<()>>,
    /// When a leader was last heard from (see `election_gate`).
    contact: Arc<election_gate::LeaderContact>,
    /// This node's proposals as leader, several to an entry at load.
    proposer: crate::raft::batch::Proposer,
}

/// Whether a peer refused a call for good: it answered invalid argument or internal
/// error (its apply or storage failed). tonic also reports a connection broken mid-call
/// (a peer shutting down, say) as `Internal`, with the HTTP/2 error as its source: that
/// one did not answer, and the call is retried like any other unanswered one.
fn refused_by_peer(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    match status.code() {
        tonic::Code::InvalidArgument => true,
        tonic::Code::Internal => status.source().is_none(),
        _ => false,
    }
}

/// What the Raft network and the cluster share about this node's standing with the other
/// voters: the leader's lease (acks recorded by the network, trusted by reads) and whether
/// it is cut off (found by the election gate, told to followers by the network).
#[derive(Clone)]
pub(crate) struct Standing {
    pub(crate) lease: Arc<Lease>,
    pub(crate) cut_off: Arc<election_gate::CutOffState>,
    /// The successor this node, leading and shutting down, names in its AppendEntries.
    pub(crate) handover: Arc<election_gate::Handover>,
    /// What each peer's Raft said it understands (see `raft::batch`).
    pub(crate) features: Arc<crate::raft::batch::PeerFeatures>,
}

impl Standing {
    /// A node's standing with these Raft timeouts (milliseconds): no lease, not cut off.
    pub(crate) fn new(election_timeout_min: u64, election_timeout_max: u64) -> Self {
        Standing {
            lease: Arc::new(Lease::new(election_timeout_min, election_timeout_max)),
            cut_off: Default::default(),
            handover: Default::default(),
            features: Default::default(),
        }
    }
}

/// What a leader cut off from its quorum answers a forwarded write or a read index with:
/// the follower that asked then fails its request at once instead of asking again until
/// its deadline.
pub(crate) fn leader_cut_off() -> tonic::Status {
    tonic::Status::failed_precondition("the leader reaches no quorum of voters")
}

/// Whether a leader answered with [`leader_cut_off`].
fn is_leader_cut_off(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
}

/// What this node's Raft storage reports as it goes.
pub(crate) struct StorageProgress {
    /// The state machine's applied index, as soon as an entry is applied.
    pub(crate) applied: tokio::sync::watch::Receiver<u64>,
    /// Whether a snapshot is being installed.
    pub(crate) installs: tokio::sync::watch::Receiver<bool>,
    /// How far the log's appends have come.
    pub(crate) appends: Arc<crate::raft::log_store::AppendProgress>,
}

impl Cluster {
    pub(crate) fn new(
        raft: Raft,
        peers: Peers,
        me: NodeId,
        consistency: ReadConsistency,
        standing: Standing,
        storage: StorageProgress,
    ) -> Self {
        let StorageProgress {
            applied,
            installs,
            appends,
        } = storage;
        Cluster {
            proposer: crate::raft::batch::Proposer::spawn(
                raft.clone(),
                me,
                appends,
                standing.features.clone(),
            ),
            raft,
            peers,
            me,
            consistency,
            reads: Default::default(),
            removed: Arc::new(tokio::sync::Notify::new()),
            standing,
            applied,
            installs,
            membership_turn: Default::default(),
            contact: Default::default(),
        }
    }

    /// Whether this node is cut off from a majority of voters (see `election_gate`).
    pub(crate) fn cut_off(&self) -> bool {
        self.standing.cut_off.get().is_some()
    }

    /// Whether the leader as this node knows it, itself or the one it hears, reaches no
    /// quorum: a forwarded request is then refused for good (a follower cut off for
    /// another reason may be asked by a member that has not yet heard of the leader).
    pub(crate) fn leader_known_cut_off(&self) -> bool {
        matches!(
            self.standing.cut_off.get(),
            Some(election_gate::CutOff::Unacked | election_gate::CutOff::LeaderUnacked)
        )
    }

    /// Refuses what a member forwards to this node as its leader while this node cannot
    /// serve it: cut off from its quorum (for good: the asker fails at once), or handing
    /// over (the asker retries, and finds the successor).
    pub(crate) fn serving_as_leader(&self) -> Result<(), tonic::Status> {
        if self.leader_known_cut_off() {
            return Err(leader_cut_off());
        }
        if self.handing_over() {
            return Err(tonic::Status::unavailable(
                "the leader is handing over as it shuts down; retry",
            ));
        }
        Ok(())
    }

    /// Whether this node is handing leadership over as it shuts down: it proposes nothing
    /// and confirms no read meanwhile (each would send AppendEntries, renewing the lease
    /// that keeps the successor from being elected); requests wait for the new leader.
    pub(crate) fn handing_over(&self) -> bool {
        self.standing.handover.successor() != 0
    }

    /// On a leader shutting down with other voters: names the most caught-up voter its
    /// successor in the AppendEntries it still sends (two heartbeat intervals, so every
    /// follower hears it), then stops sending any. The successor campaigns as soon as
    /// the followers' lease has run out (see `election_gate`), instead of the followers
    /// waiting out that lease and an election timeout after this node stops: the cluster
    /// has a new leader an election timeout sooner, often before this node has stopped.
    pub(crate) async fn hand_over(&self) {
        let successor = {
            let m = self.raft.metrics();
            let m = m.borrow();
            if m.state != openraft::ServerState::Leader || self.cut_off() {
                return;
            }
            let membership = m.membership_config.membership();
            let matched = |id: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
            };
            // The most caught-up voter: a candidate with a shorter log than a majority's
            // would not be elected.
            membership
                .voter_ids()
                .filter(|id| *id != self.me)
                .max_by_key(|id| (matched(id), std::cmp::Reverse(*id)))
        };
        let Some(successor) = successor else {
            return;
        };
        tracing::info!(successor, "shutting down while leading: handing over");
        self.standing.handover.name(successor);
        let heartbeat = Duration::from_millis(self.raft.config().heartbeat_interval);
        tokio::time::sleep(heartbeat * 2).await;
        self.raft.runtime_config().heartbeat(false);
    }

    /// Set by the election gate after each of its rounds.
    pub(crate) fn cut_off_state(&self) -> &election_gate::CutOffState {
        &self.standing.cut_off
    }

    /// Completes once this node is cut off (at once when it is already).
    pub(crate) async fn until_cut_off(&self) {
        self.standing.cut_off.reached().await
    }

    /// When a leader was last heard from.
    pub(crate) fn contact(&self) -> &Arc<election_gate::LeaderContact> {
        &self.contact
    }

    /// The leader's lease.
    pub(crate) fn lease(&self) -> &Arc<Lease> {
        &self.standing.lease
    }

    /// The peer connections.
    /// Completes once the leader has said this node was removed from the cluster.
    pub(crate) async fn removed(&self) {
        self.removed.notified().await;
    }

    /// The leader says this node was removed.
    pub(crate) fn mark_removed(&self) {
        self.removed.notify_one();
    }

    pub(crate) fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The Raft handle.
    pub(crate) fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Proposes `cmd` on this node as leader: queued at once, in submission order (see
    /// `raft::batch`); the future waits for its outcome.
    pub(crate) fn submit(
        &self,
        cmd: Command,
    ) -> impl Future<Output = crate::raft::batch::Written> + Send + 'static {
        self.proposer.submit(cmd)
    }

    /// This node's id.
    pub(crate) fn id(&self) -> NodeId {
        self.me
    }

    /// How long a write may wait for a leader here (see [`write_deadline`]).
    pub(crate) fn write_deadline(&self) -> Duration {
        write_deadline(self.raft.config())
    }

    /// How long a linearizable read may wait for the read index here (see
    /// [`read_deadline`]).
    fn read_deadline(&self) -> Duration {
        read_deadline(self.raft.config())
    }

    /// Proposes a command from any node and waits until it is committed and applied on
    /// this node. A follower forwards it to the leader; during an election the write is
    /// retried until [`Cluster::write_deadline`], then fails retryably.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        let deadline = Instant::now() + self.write_deadline();
        let mut payload = None;
        loop {
            // No leader to reach and no majority to elect one: waiting would not help.
            if self.cut_off() {
                return Err(ProposeError::NoLeader);
            }
            // A follower that knows the leader forwards at once; otherwise Raft commits
            // here (this node leads) or says where the leader is.
            let leader = match self.other_leader() {
                Some(leader) => Some(leader),
                // Handing over: wait for the successor, then forward to it.
                None if self.handing_over() => None,
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // A leader cut off from its quorum never commits: bound the wait. The
                    // outcome is then unknown, which a retry resolves (a repeated publish
                    // is recognized).
                    // So does finding itself cut off meanwhile (see `election_gate`).
                    let written = tokio::select! {
                        w = tokio::time::timeout(left, self.proposer.submit(cmd.clone())) => w,
                        _ = self.standing.cut_off.reached() => return Err(ProposeError::NoLeader),
                    };
                    let Ok(written) = written else {
                        return Err(ProposeError::NoLeader);
                    };
                    match written {
                        Ok((result, _)) => return Ok(result),
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                            self.elsewhere(f)
                        }
                        Err(e) => return Err(ProposeError::Fatal(e.to_string())),
                    }
                }
            };
            if let Some((id, addr)) = leader {
                let payload = match &payload {
                    Some(p) => p,
                    None => payload.insert(
                        serde_json::to_vec(&cmd).map_err(|e| ProposeError::Fatal(e.to_string()))?,
                    ),
                };
                let wait_local = !self.answer_before_local_apply(&cmd);
                match self.forward(&addr, payload, wait_local, deadline).await {
                    Ok(r) => return Ok(r),
                    Err(Forward::Refused(e)) => return Err(e),
                    Err(Forward::Retry(why)) => {
                        tracing::debug!(leader = id, %why, "forwarded write not answered; retrying");
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ProposeError::NoLeader);
            }
            let mut metrics = self.raft.metrics();
            let _ = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
        }
    }

    /// Whether a forwarded `cmd` may be acknowledged once the leader has applied it,
    /// before this node has. Only publishes and retained versions, which nothing reads
    /// back in the request that wrote them, and only with linearizable reads: every later
    /// read, on this node too, first catches up with the leader, so it sees the write
    /// anyway. Waiting for this node's apply costs the next AppendEntries round (2-3 ms
    /// at load); with `read_consistency = "local"` it is what gives read-your-writes here.
    fn answer_before_local_apply(&self, cmd: &Command) -> bool {
        self.consistency == ReadConsistency::Linearizable
            && matches!(
                cmd,
                Command::PublishVersion { .. } | Command::RetainVersion { .. }
            )
    }

    /// The leader and its peer address, when another member leads as far as this node
    /// knows.
    fn other_leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader.filter(|id| *id != self.me)?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some((id, node.grpc_addr.clone()))
    }

    /// The leader Raft points to, when it is another member.
    fn elsewhere(&self, f: ForwardToLeader<NodeId, NodeInfo>) -> Option<(NodeId, String)> {
        match (f.leader_id, f.leader_node) {
            (Some(id), Some(node)) if id != self.me => Some((id, node.grpc_addr)),
            _ => None,
        }
    }

    async fn forward(
        &self,
        leader_addr: &str,
        payload: &[u8],
        wait_local: bool,
        deadline: Instant,
    ) -> Result<CommandResult, Forward> {
        let mut client = self
            .peers
            .cluster(leader_addr)
            .map_err(|e| Forward::Retry(e.to_string()))?;
        let left = deadline.saturating_duration_since(Instant::now());
        let req = pb::ProposeRequest {
            command: payload.to_vec(),
        };
        // A proposal must not be sent twice on a guess: over HTTP/1.1 only to a leader
        // known to answer it (`peer_http`); one that fails there is retried like any
        // failed forward, and the retry takes gRPC.
        let call = async {
            match self
                .peers
                .call_http1(leader_addr, "Propose", &req, true)
                .await
            {
                Ok(answer) => {
                    self.peers.count("propose", peers::HTTP1);
                    answer
                }
                Err(Http1Failure::Failed(why)) => Err(tonic::Status::unavailable(why)),
                Err(Http1Failure::NotTried) => {
                    let answer = client.propose(req).await.map(|r| r.into_inner());
                    if answer.is_ok() {
                        self.peers.count("propose", peers::GRPC);
                    }
                    answer
                }
            }
        };
        let answer = tokio::select! {
            a = tokio::time::timeout(left, call) => a,
            // Its leader said it is cut off, or this node found itself cut off.
            _ = self.standing.cut_off.reached() => return Err(Forward::Refused(ProposeError::NoLeader)),
        };
        let reply = match answer {
            Err(_) => return Err(Forward::Retry("timed out".into())),
            Ok(Err(status)) => {
                return Err(if is_leader_cut_off(&status) {
                    Forward::Refused(ProposeError::NoLeader)
                } else if refused_by_peer(&status) {
                    Forward::Refused(ProposeError::Fatal(status.message().to_owned()))
                } else {
                    Forward::Retry(status.message().to_owned())
                });
            }
            Ok(Ok(r)) => r,
        };
        let result: CommandResult = serde_json::from_slice(&reply.result)
            .map_err(|e| Forward::Refused(ProposeError::Fatal(e.to_string())))?;
        // Read-your-writes on this node: answer once the entry is applied here too
        // (unless every read catches up first, see `answer_before_local_apply`).
        if wait_local {
            self.wait_applied(reply.log_index, deadline)
                .await
                .map_err(|_| Forward::Retry("the entry did not reach this node in time".into()))?;
        }
        Ok(result)
    }

    /// Commits a forwarded command on this node, which must be the leader.
    pub(crate) async fn propose_as_leader(
        &self,
        cmd: Command,
    ) -> Result<(CommandResult, u64), tonic::Status> {
        self.serving_as_leader()?;
        let written = tokio::select! {
            w = tokio::time::timeout(self.write_deadline(), self.proposer.submit(cmd)) => w,
            _ = self.standing.cut_off.reached() => return Err(leader_cut_off()),
        }
        .map_err(|_| tonic::Status::unavailable("the leader could not commit in time"))?;
        match written {
            Ok(written) => Ok(written),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(
                tonic::Status::unavailable("not the leader (leadership moved); retry"),
            ),
            Err(e) => Err(tonic::Status::internal(e.to_string())),
        }
    }

    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), ReadError> {
        let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
        if applied >= Some(index) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "entry applied on this node")
            .await
            .map(|_| ())
            .map_err(|_| ReadError::Unavailable)
    }

    /// Makes the next read of the local state linearizable: learns the leader's commit
    /// index (batched with concurrent readers) and waits until this node has applied it.
    /// With `read_consistency = "local"` it only waits out a snapshot being installed
    /// (then the state is partly old, partly new), as every read does.
    pub(crate) async fn linearize(&self) -> Result<(), ReadError> {
        self.read_point(self.consistency == ReadConsistency::Local)
            .await
    }

    /// As [`Cluster::linearize`] in the default mode, whatever this node's: for a
    /// background task that must see every committed write (the blob collector).
    pub(crate) async fn linearize_strictly(&self) -> Result<(), ReadError> {
        self.read_point(false).await
    }

    /// Watches snapshot installs on this node (`true` while one runs).
    pub(crate) fn installs(&self) -> tokio::sync::watch::Receiver<bool> {
        self.installs.clone()
    }

    async fn read_point(&self, local: bool) -> Result<(), ReadError> {
        let arrived = Instant::now();
        let deadline = arrived + self.read_deadline();
        self.wait_installed(deadline).await?;
        if local || self.sole_voter_leading() {
            return Ok(());
        }
        let index = {
            let mut batch = self.reads.lock().await;
            match batch.last {
                // A round trip that started after this reader arrived answers for it too.
                Some((started, index)) if started >= arrived => index,
                _ if batch.failed_at.is_some_and(|t| t >= arrived) => {
                    return Err(ReadError::Unavailable);
                }
                _ => {
                    let started = Instant::now();
                    let result = tokio::time::timeout(self.read_deadline(), self.read_index())
                        .await
                        .map_err(|_| ReadError::Unavailable)
                        .and_then(|r| r);
                    match result {
                        Ok(index) => {
                            batch.last = Some((started, index));
                            index
                        }
                        Err(e) => {
                            batch.failed_at = Some(Instant::now());
                            return Err(e);
                        }
                    }
                }
            }
        };
        self.wait_applied(index, deadline).await
    }

    /// Waits until no snapshot is being installed here.
    async fn wait_installed(&self, deadline: Instant) -> Result<(), ReadError> {
        if !*self.installs.borrow() {
            return Ok(());
        }
        let mut installs = self.installs.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, installs.wait_for(|installing| !installing)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ReadError::Unavailable),
        }
    }

    /// Whether this node leads a cluster in which it is the only voter: then no other node
    /// can commit, and every acknowledged write was applied here before its answer, so the
    /// local state is already linearizable.
    fn sole_voter_leading(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.current_leader != Some(self.me) {
            return false;
        }
        let mut voters = m.membership_config.membership().voter_ids();
        voters.next() == Some(self.me) && voters.next().is_none()
    }

    /// The leader's read index: confirmed locally when this node leads, else asked of the
    /// leader.
    async fn read_index(&self) -> Result<u64, ReadError> {
        let deadline = Instant::now() + self.read_deadline();
        loop {
            // As a write does: a node cut off fails at once; a follower that knows the
            // leader asks it at once.
            if self.cut_off() {
                return Err(ReadError::Unavailable);
            }
            let leader = match self.other_leader() {
                Some(leader) => Some(leader),
                None if self.handing_over() => None,
                None => match self.leader_read_index_unless_cut_off().await {
                    Ok(i) => return Ok(i),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                        self.elsewhere(f)
                    }
                    Err(_) if self.cut_off() => return Err(ReadError::Unavailable),
                    Err(_) => None,
                },
            };
            if let Some((_, addr)) = leader
                && let Ok(mut c) = self.peers.cluster(&addr)
            {
                let left = deadline.saturating_duration_since(Instant::now());
                let ask = self.peers.call_either(
                    &addr,
                    "ReadIndex",
                    "read_index",
                    pb::ReadIndexRequest {},
                    |r| async move { c.read_index(r).await.map(|r| r.into_inner()) },
                );
                let answer = tokio::select! {
                    a = tokio::time::timeout(left, ask) => a,
                    _ = self.standing.cut_off.reached() => return Err(ReadError::Unavailable),
                };
                match answer {
                    Ok(Ok(r)) => return Ok(r.read_index),
                    Ok(Err(status)) if is_leader_cut_off(&status) => {
                        return Err(ReadError::Unavailable);
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(ReadError::Unavailable);
            }
            let mut metrics = self.raft.metrics();
            let _ = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
        }
    }

    /// On the leader: confirms leadership with a quorum and returns the index a read must
    /// wait for. Under a lease (see `raft::lease`) the quorum's recent acks confirm it
    /// without a round trip.
    pub(crate) async fn leader_read_index(
        &self,
    ) -> Result<u64, RaftError<NodeId, CheckIsLeaderError<NodeId, NodeInfo>>> {
        let count = |by| self.peers.metrics().inc(LEADER_READS, &[("by", by)]);
        if let Some(index) = self.lease_read_index() {
            count("lease");
            return Ok(index);
        }
        let (read, applied) = self.raft.get_read_log_id().await?;
        count("heartbeats");
        Ok(read.max(applied).map(|l| l.index).unwrap_or(0))
    }

    /// [`Cluster::leader_read_index`], given up once this node finds itself cut off: a
    /// leader that no quorum acknowledges confirms nothing.
    pub(crate) async fn leader_read_index_unless_cut_off(
        &self,
    ) -> Result<u64, RaftError<NodeId, CheckIsLeaderError<NodeId, NodeInfo>>> {
        tokio::select! {
            r = self.leader_read_index() => r,
            _ = self.standing.cut_off.reached() => Err(RaftError::APIError(
                CheckIsLeaderError::QuorumNotEnough(openraft::error::QuorumNotEnough {
                    cluster: String::new(),
                    got: Default::default(),
                }),
            )),
        }
    }

    /// The read index under the leader's lease: this node's applied index, if it leads,
    /// has applied an entry of its own term and a quorum acked it lately.
    fn lease_read_index(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let vote = m.vote;
        if m.state != openraft::ServerState::Leader
            || !vote.is_committed()
            || vote.leader_id().voted_for() != Some(self.me)
            || m.last_applied?.leader_id.term != vote.leader_id().term
            || !self
                .standing
                .lease
                .held(self.me, &vote, m.membership_config.membership())
        {
            return None;
        }
        Some(*self.applied.borrow())
    }

    /// Asks any of `seeds` (gRPC addresses of members) to add this node.
    pub(crate) async fn join(
        &self,
        seeds: &[String],
        info: &NodeInfo,
        learner: bool,
    ) -> Result<(), String> {
        let req = pb::JoinRequest {
            member: Some(pb::MemberInfo {
                node_id: self.me,
                grpc_addr: info.grpc_addr.clone(),
                http_addr: info.http_addr.clone(),
                region: info.region.clone(),
            }),
            learner,
        };
        let mut last = String::from("no member to join through");
        // Joining waits for the new learner to catch up, which can take a while for a
        // large state; members may also still be starting.
        for attempt in 0..60 {
            for seed in seeds {
                let mut client = match self.peers.cluster(seed) {
                    Ok(c) => c,
                    Err(e) => {
                        last = format!("{seed}: {e}");
                        continue;
                    }
                };
                match client.join(req.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::InvalidArgument | tonic::Code::Unauthenticated
                        ) =>
                    {
                        return Err(format!("{seed} refused the join: {}", s.message()));
                    }
                    Err(s) => last = format!("{seed}: {}", s.message()),
                }
            }
            tracing::info!(attempt, %last, "join not answered yet; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(last)
    }

    /// Applies a membership change; forwards it to the leader when this node is not.
    pub(crate) async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<u64, MembershipError> {
        let deadline = Instant::now() + self.write_deadline();
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l == self.me => match self.change_as_leader(change.clone()).await {
                    // Another change in progress, or leadership moving: retry.
                    Err(MembershipError::Unavailable) => {}
                    other => return other,
                },
                Some(l) => {
                    let addr = self
                        .raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.grpc_addr.clone());
                    if let Some(addr) = addr {
                        let mut c = self
                            .peers
                            .cluster(&addr)
                            .map_err(|e| MembershipError::Fatal(e.to_string()))?;
                        match c.change_membership(to_pb(&change)).await {
                            Ok(r) => return Ok(r.into_inner().log_index),
                            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                                return Err(MembershipError::Invalid(s.message().to_owned()));
                            }
                            Err(s) if refused_by_peer(&s) => {
                                return Err(MembershipError::Fatal(s.message().to_owned()));
                            }
                            Err(_) => {}
                        }
                    }
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(MembershipError::Unavailable);
            }
            let mut metrics = self.raft.metrics();
            let _ = tokio::time::timeout(Duration::from_millis(200), metrics.changed()).await;
        }
    }

    /// This leader's turn to change the membership, waited for at most
    /// [`Cluster::write_deadline`] (then retryable).
    async fn membership_turn(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, MembershipError> {
        tokio::time::timeout(self.write_deadline(), self.membership_turn.lock())
            .await
            .map_err(|_| MembershipError::Unavailable)
    }

    /// Waits until this leader has replicated to learner `id` its log up to `index`, as
    /// openraft's blocking `add_learner` does; ends early if this node stops leading or
    /// `id` stops being a member.
    async fn wait_caught_up(&self, id: NodeId, index: u64) -> Result<(), MembershipError> {
        let mut metrics = self.raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.current_leader != Some(self.me) {
                    return Err(MembershipError::Unavailable);
                }
                if m.membership_config.membership().get_node(&id).is_none() {
                    return Err(MembershipError::Invalid(format!(
                        "node {id} was removed while it caught up"
                    )));
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten());
                if matched.is_some_and(|l| l.index >= index) {
                    return Ok(());
                }
            }
            if metrics.changed().await.is_err() {
                return Err(MembershipError::Unavailable);
            }
        }
    }

    /// Runs a membership change on this node, which must be the leader.
    pub(crate) async fn change_as_leader(
        &self,
        request: MembershipChange,
    ) -> Result<u64, MembershipError> {
        let turn = self.membership_turn().await?;
        let membership = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known = |id: &NodeId| membership.get_node(id).is_some();
        let write = |r: Result<_, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>| match r {
            Ok(resp) => {
                let resp: openraft::raft::ClientWriteResponse<crate::raft::TypeConfig> = resp;
                Ok(resp.log_id.index)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(MembershipError::Unavailable)
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                openraft::error::ChangeMembershipError::InProgress(_),
            ))) => Err(MembershipError::Unavailable),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(MembershipError::Invalid(e.to_string()))
            }
            Err(e) => Err(MembershipError::Fatal(e.to_string())),
        };
        let change = |c: ChangeMembers<NodeId, NodeInfo>| self.raft.change_membership(c, false);
        match request {
            MembershipChange::Add { id, info, learner } => {
                if let Some(existing) = membership.get_node(&id)
                    && existing.grpc_addr != info.grpc_addr
                {
                    return Err(MembershipError::Invalid(format!(
                        "node id {id} is already a member at {}; give each node its own \
                         --node-id, or remove the old member first",
                        existing.grpc_addr
                    )));
                }
                if voters.contains(&id) {
                    // Already a voter (a restarted node joining again): nothing to do.
                    return Ok(0);
                }
                let index = write(self.raft.add_learner(id, info, false).await)?;
                // Catching up (a snapshot, then the log) may take long: other changes
                // (removing a node, another joining) go on meanwhile.
                drop(turn);
                self.wait_caught_up(id, index).await?;
                if learner {
                    return Ok(index);
                }
                let _turn = self.membership_turn().await?;
                write(change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await)
            }
            MembershipChange::Promote(id) => {
                if !known(&id) {
                    return Err(MembershipError::Invalid(format!(
                        "node {id} is not a member; add it first"
                    )));
                }
                if voters.contains(&id) {
                    return Ok(0);
                }
                write(change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await)
            }
            MembershipChange::Remove(id) => {
                if !known(&id) {
                    return Err(MembershipError::Invalid(format!(
                        "node {id} is not a member"
                    )));
                }
                let addr = membership.get_node(&id).map(|n| n.grpc_addr.clone());
                let index = if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(MembershipError::Invalid(
                            "cannot remove the last voter".into(),
                        ));
                    }
                    write(change(ChangeMembers::RemoveVoters(BTreeSet::from([id]))).await)?
                } else {
                    write(change(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await)?
                };
                // No longer replicated to, the removed node would not learn it: tell it
                // (best effort; a node that is down learns nothing, and needs nothing).
                if id == self.me {
                    self.mark_removed();
                } else if let Some(addr) = addr {
                    let peers = self.peers.clone();
                    tokio::spawn(async move {
                        if let Ok(mut c) = peers.cluster(&addr) {
                            let req = pb::LeaveRequest { node_id: id };
                            let _ =
                                tokio::time::timeout(Duration::from_secs(5), c.leave(req)).await;
                        }
                    });
                }
                Ok(index)
            }
        }
    }

    /// The cluster as this node sees it (replication progress only on the leader).
    pub(crate) fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let progress: BTreeMap<NodeId, Option<u64>> = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, log)| (*id, log.as_ref().map(|l| l.index)))
                    .collect()
            })
            .unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, info)| MemberStatus {
                node_id: *id,
                grpc_addr: info.grpc_addr.clone(),
                http_addr: info.http_addr.clone(),
                region: info.region.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                },
                applied_index: if *id == self.me {
                    m.last_applied.map(|l| l.index)
                } else {
                    progress.get(id).copied().flatten()
                },
                reachable: *id == self.me,
            })
            .collect();
        ClusterStatus {
            node_id: self.me,
            leader_id: m.current_leader,
            term: m.current_term,
            applied_index: m.last_applied.map(|l| l.index),
            members,
        }
    }

    /// The status with every member's own applied index, asked of each (briefly).
    pub(crate) async fn status_of_all(&self) -> ClusterStatus {
        let mut status = self.status();
        let asks = status.members.iter().map(|m| {
            let peers = self.peers.clone();
            let (id, addr) = (m.node_id, m.grpc_addr.clone());
            let me = self.me;
            async move {
                if id == me {
                    return None;
                }
                let reply = peers.status_of(&addr, Duration::from_secs(1)).await?;
                Some(reply.last_applied_index)
            }
        });
        let answers = futures::future::join_all(asks).await;
        for (m, answer) in status.members.iter_mut().zip(answers) {
            if let Some(applied) = answer {
                m.applied_index = applied;
                m.reachable = true;
            }
        }
        status
    }

    /// The gRPC addresses of the other members, voters first.
    pub(crate) fn other_members(&self) -> Vec<(NodeId, String, bool)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut out: Vec<(NodeId, String, bool)> = membership
            .nodes()
            .filter(|(id, _)| **id != self.me)
            .map(|(id, n)| (*id, n.grpc_addr.clone(), voters.contains(id)))
            .collect();
        out.sort_by_key(|(id, _, voter)| (!voter, *id));
        out
    }

    /// Every member (this node included): id, gRPC address, region.
    pub(crate) fn members_with_regions(&self) -> Vec<(NodeId, String, String)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.grpc_addr.clone(), n.region.clone()))
            .collect()
    }

    /// Voter count and whether this node is one.
    pub(crate) fn voters(&self) -> (usize, bool) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        (voters.len(), voters.contains(&self.me))
    }
}

enum Forward {
    /// The leader answered with a definite failure.
    Refused(ProposeError),
    /// No answer (leader gone, timeout): try again.
    Retry(String),
}

fn to_pb(change: &MembershipChange) -> pb::MembershipRequest {
    use pb::membership_request::Change;
    let change = match change {
        MembershipChange::Add { id, info, learner } => Change::Add(pb::JoinRequest {
            member: Some(pb::MemberInfo {
                node_id: *id,
                grpc_addr: info.grpc_addr.clone(),
                http_addr: info.http_addr.clone(),
                region: info.region.clone(),
            }),
            learner: *learner,
        }),
        MembershipChange::Promote(id) => Change::Promote(*id),
        MembershipChange::Remove(id) => Change::Remove(*id),
    };
    pb::MembershipRequest {
        change: Some(change),
    }
}

/// The change a gRPC membership request names.
pub(crate) fn from_pb(req: pb::MembershipRequest) -> Result<MembershipChange, String> {
    use pb::membership_request::Change;
    match req.change {
        Some(Change::Add(j)) => {
            let (id, info) = member_from_pb(j.member)?;
            Ok(MembershipChange::Add {
                id,
                info,
                learner: j.learner,
            })
        }
        Some(Change::Promote(id)) => Ok(MembershipChange::Promote(id)),
        Some(Change::Remove(id)) => Ok(MembershipChange::Remove(id)),
        None => Err("no membership change given".into()),
    }
}

/// A member's id and info from its protobuf form, validated.
pub(crate) fn member_from_pb(m: Option<pb::MemberInfo>) -> Result<(NodeId, NodeInfo), String> {
    let m = m.ok_or("no member given")?;
    if m.node_id == 0 {
        return Err("node id must be at least 1".into());
    }
    if m.grpc_addr.is_empty() || !m.grpc_addr.contains(':') {
        return Err(format!("{:?} is not a host:port gRPC address", m.grpc_addr));
    }
    Ok((
        m.node_id,
        NodeInfo {
            grpc_addr: m.grpc_addr,
            http_addr: m.http_addr,
            region: m.region,
        },
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::cluster::peers::Secret;
    use crate::raft::log_store::LogStore;
    use crate::raft::network::GrpcNetwork;
    use crate::raft::state_machine::StateMachine;
    use crate::store::Store;

    #[test]
    fn writes_and_reads_wait_out_an_election() {
        let raft = |c: &crate::config::RaftConfig| openraft::Config {
            election_timeout_min: c.election_timeout_min_ms,
            election_timeout_max: c.election_timeout_max_ms,
            ..Default::default()
        };
        // The defaults elect in 1.2–1.6 s: the floor.
        let defaults = crate::config::RaftConfig::default();
        assert_eq!(write_deadline(&raft(&defaults)), Duration::from_secs(5));
        assert_eq!(read_deadline(&raft(&defaults)), Duration::from_secs(3));
        // The multi-region timings (3–6 s) elect in 9–12 s.
        let far = crate::config::RaftConfig {
            election_timeout_min_ms: 3000,
            election_timeout_max_ms: 6000,
            ..defaults
        };
        assert_eq!(write_deadline(&raft(&far)), Duration::from_secs(15));
        assert_eq!(read_deadline(&raft(&far)), Duration::from_secs(15));
    }

    /// A peer's own refusal ends a forwarded write; a connection broken mid-call (which
    /// tonic reports as `Internal` too, seen when a leader shut down during a rolling
    /// restart) has it retried.
    #[test]
    fn only_a_peers_answer_refuses_a_call() {
        assert!(refused_by_peer(&tonic::Status::internal("apply failed")));
        assert!(refused_by_peer(&tonic::Status::invalid_argument("bad")));
        assert!(!refused_by_peer(&tonic::Status::unavailable("down")));
        let broken =
            tonic::Status::from_error(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert_eq!(broken.code(), tonic::Code::Internal, "{broken:?}");
        assert!(!refused_by_peer(&broken));
    }

    /// A one-node cluster over a store in `dir`, leading once this returns.
    pub(crate) async fn one_node_cluster(dir: &std::path::Path) -> Cluster {
        let store = Store::open(dir).unwrap();
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let standing = Standing::new(150, 300);
        let state_machine = StateMachine::new(store.clone(), Default::default());
        let applied = state_machine.subscribe();
        let installs = state_machine.installs();
        let log = LogStore::new(store);
        let appends = log.progress();
        let raft = Raft::new(
            1,
            Arc::new(config),
            GrpcNetwork::new(Peers::new(Secret::from_env(), None, None), standing.clone()),
            log,
            state_machine,
        )
        .await
        .unwrap();
        let me = crate::raft::NodeInfo::default();
        raft.initialize(std::collections::BTreeMap::from([(1, me)]))
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader == Some(1), "leader")
            .await
            .unwrap();
        Cluster::new(
            raft,
            Peers::new(Secret::from_env(), None, None),
            1,
            crate::config::ReadConsistency::Linearizable,
            standing,
            StorageProgress {
                applied,
                installs,
                appends,
            },
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_wait_while_a_snapshot_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = one_node_cluster(dir.path()).await;
        for consistency in [ReadConsistency::Linearizable, ReadConsistency::Local] {
            cluster.consistency = consistency;
            let (installing, installs) = tokio::sync::watch::channel(true);
            cluster.installs = installs;
            let read = tokio::spawn({
                let cluster = cluster.clone();
                async move { cluster.linearize().await }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                !read.is_finished(),
                "{consistency:?}: read during an install"
            );
            installing.send_replace(false);
            let answer = tokio::time::timeout(Duration::from_secs(5), read).await;
            assert!(
                matches!(answer, Ok(Ok(Ok(())))),
                "{consistency:?}: read after the install"
            );
        }
        // An install that outlasts a read's deadline fails the read, retryably.
        let (_installing, installs) = tokio::sync::watch::channel(true);
        cluster.installs = installs;
        assert!(matches!(
            cluster.linearize().await,
            Err(ReadError::Unavailable)
        ));
    }
}
