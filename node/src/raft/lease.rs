//! The leader's lease: linearizable reads without a heartbeat round each.
//!
//! Before a read, the leader must know that it still leads. openraft's `get_read_log_id`
//! learns it by sending a heartbeat to every voter and waiting for a quorum: a round trip,
//! and an AppendEntries for each follower to handle, per read round. Under a steady
//! stream of publishes (each one starts a read round to check the version is new) that
//! round is most of the wait before the upload can be committed.
//!
//! A follower that accepts an AppendEntries refuses to vote for another candidate for
//! `election_timeout_max` after it (openraft's leader lease, refreshed by every
//! AppendEntries and heartbeat). So if AppendEntries *sent* at `t` were accepted by a
//! quorum of every voter configuration, no other leader can be elected before
//! `t + election_timeout_max`, and until then the leader's state is the latest.
//!
//! ```text
//!   leader ── AppendEntries sent at t ──▶ quorum accepts ──▶ Lease::acked(t)
//!   read at now: leader, applied an entry of its term, quorum acked since now − TRUST
//!        └─ yes: read index = applied here, no round trip      └─ no: heartbeat round
//! ```
//!
//! What keeps it safe:
//! - **Send time, not answer time**: an ack proves the follower's lease started no
//!   earlier than when the request left.
//! - **A margin**: the lease is trusted for half of `election_timeout_min`, well inside a
//!   follower's `election_timeout_max`, even with members configured a little apart.
//! - **A member that just started holds votes back** for `election_timeout_max`
//!   ([`Lease::before_vote`]): it forgot when it last heard from the leader, and openraft
//!   would grant a vote at once.
//! - **Any vote request ends the leader's lease** until the next acks: the leader might
//!   grant it and step down, and its metrics would say so a moment later.
//! - **The read index is this node's applied index**, once an entry of the leader's own
//!   term is applied: every write acknowledged anywhere before the read was applied here
//!   (this leader acknowledges after applying; earlier leaders' writes come before its
//!   first entry).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use openraft::{Membership, Vote};
use tokio::time::Instant;

use super::{NodeId, NodeInfo};

/// When each follower last accepted this node's leadership.
pub(crate) struct Lease {
    /// Per follower: the vote it accepted and when the request it accepted was sent.
    acks: Mutex<HashMap<NodeId, (Vote<NodeId>, Instant)>>,
    started: Instant,
    /// A follower's lease: `election_timeout_max`.
    hold_votes_for: Duration,
    /// How long after a quorum's acks the leader trusts them.
    trust_for: Duration,
}

impl Lease {
    /// A lease for a node with these Raft timeouts (milliseconds).
    pub(crate) fn new(election_timeout_min: u64, election_timeout_max: u64) -> Self {
        Lease {
            acks: Mutex::new(HashMap::new()),
            started: Instant::now(),
            hold_votes_for: Duration::from_millis(election_timeout_max),
            trust_for: Duration::from_millis(election_timeout_min / 2),
        }
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, (Vote<NodeId>, Instant)>> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `target` accepted an AppendEntries carrying `vote`, sent at `sent`.
    pub(crate) fn acked(&self, target: NodeId, vote: &Vote<NodeId>, sent: Instant) {
        let mut acks = self.acks();
        match acks.get_mut(&target) {
            Some((v, at)) if v == vote => *at = (*at).max(sent),
            _ => {
                acks.insert(target, (*vote, sent));
            }
        }
    }

    /// Whether `me`, leading with `vote`, holds a lease granted by a quorum of every
    /// voter configuration of `membership`.
    pub(crate) fn held(
        &self,
        me: NodeId,
        vote: &Vote<NodeId>,
        membership: &Membership<NodeId, NodeInfo>,
    ) -> bool {
        let Some(since) = Instant::now().checked_sub(self.trust_for) else {
            return false;
        };
        let acks = self.acks();
        let granted = |id: &NodeId| {
            *id == me
                || acks
                    .get(id)
                    .is_some_and(|(v, at)| v == vote && *at >= since)
        };
        membership
            .get_joint_config()
            .iter()
            .all(|voters| voters.iter().filter(|id| granted(id)).count() > voters.len() / 2)
    }

    /// Called before this node handles a vote request: ends its own lease, and for
    /// `election_timeout_max` after starting, holds the request back.
    pub(crate) async fn before_vote(&self) {
        self.acks().clear();
        tokio::time::sleep_until(self.started + self.hold_votes_for).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn voters(config: Vec<Vec<NodeId>>) -> Membership<NodeId, NodeInfo> {
        let nodes: BTreeMap<NodeId, NodeInfo> = config
            .iter()
            .flatten()
            .map(|id| (*id, NodeInfo::default()))
            .collect();
        Membership::new(
            config
                .into_iter()
                .map(|c| c.into_iter().collect::<BTreeSet<_>>())
                .collect(),
            nodes,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_quorum_of_recent_acks_for_this_vote_holds_the_lease() {
        let lease = Lease::new(400, 800);
        let three = voters(vec![vec![1, 2, 3]]);
        let vote = Vote::new_committed(5, 1);
        assert!(!lease.held(1, &vote, &three), "no ack yet");
        lease.acked(2, &vote, Instant::now());
        assert!(lease.held(1, &vote, &three), "the leader and one follower");
        // An ack of another vote (an earlier term) counts for nothing.
        assert!(!lease.held(1, &Vote::new_committed(6, 1), &three));
        // The lease is trusted for half of election_timeout_min after the send.
        tokio::time::advance(Duration::from_millis(199)).await;
        assert!(lease.held(1, &vote, &three));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!lease.held(1, &vote, &three), "expired");
        // A later ack renews it; an older one arriving late does not move it back.
        let now = Instant::now();
        lease.acked(3, &vote, now);
        lease.acked(3, &vote, now - Duration::from_millis(300));
        assert!(lease.held(1, &vote, &three));
    }

    #[tokio::test(start_paused = true)]
    async fn joint_configurations_need_a_quorum_of_each() {
        let lease = Lease::new(400, 800);
        let vote = Vote::new_committed(2, 1);
        let joint = voters(vec![vec![1, 2, 3], vec![3, 4, 5]]);
        lease.acked(2, &vote, Instant::now());
        assert!(!lease.held(1, &vote, &joint), "only the old configuration");
        lease.acked(4, &vote, Instant::now());
        assert!(!lease.held(1, &vote, &joint), "one of three in the new one");
        lease.acked(5, &vote, Instant::now());
        assert!(lease.held(1, &vote, &joint));
    }

    #[tokio::test(start_paused = true)]
    async fn a_vote_request_ends_the_lease_and_waits_out_a_fresh_start() {
        let lease = Lease::new(400, 800);
        let three = voters(vec![vec![1, 2, 3]]);
        let vote = Vote::new_committed(5, 1);
        lease.acked(2, &vote, Instant::now());
        let started = Instant::now();
        lease.before_vote().await;
        assert!(
            started.elapsed() >= Duration::from_millis(800),
            "a member that just started holds votes back for election_timeout_max"
        );
        assert!(!lease.held(1, &vote, &three), "the lease ended");
        // Long after the start, a vote request is not held back.
        let later = Instant::now();
        lease.before_vote().await;
        assert_eq!(later.elapsed(), Duration::ZERO);
    }
}
