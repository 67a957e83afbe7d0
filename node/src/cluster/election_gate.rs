//! Holding back elections a node cannot win, so that a node cut off from the others does
//! not depose a healthy leader when it comes back.
//!
//! openraft 0.9 has no pre-vote: a follower whose election timer fires raises its term
//! and campaigns whether or not it reaches anyone. A node (or a whole region) cut off from
//! the rest goes on raising its term, one election timeout after another. When the link
//! comes back, the higher term reaches the leader in the answers to its AppendEntries,
//! the leader steps down, and the whole cluster holds an election it did not need. With
//! the multi-region timings that cost ~20 s of refused and stalled writes after a region
//! link of 14 s came back (`regions.rs` in the integration tests, before this gate).
//!
//! The gate: a voter that has not heard from a leader for [`Timing::silent_after`] asks
//! every other voter for its status (`Node.Status`, answered from memory), every
//! [`Timing::every`], each ask bounded by the same. While the voters that answered (and
//! this node) are not a majority of every voter configuration, the node's elections are
//! held back (`runtime_config().elect(false)`): its term stays where it was.
//!
//! A leader heard from again allows them again at once. A majority reachable again allows
//! them only after [`Timing::grace`] (`election_timeout_max`) of rounds that all reach
//! one: by then its election timer has long run out, and a node allowed at once would
//! campaign before the leader, whose replication to it backs off for 500 ms after
//! failures, has reached it again, which is the very disruption the gate is for. A leader
//! that is there reaches it within the grace (its AppendEntries resets the timer); when
//! none does, there is no leader to disrupt and the node campaigns.
//!
//! ```text
//!   follower, leader silent ─▶ Status to every voter ─▶ a majority answered? ─ no ──▶ elect(false)
//!                                                          yes, for a grace, ─────▶ elect(true)
//!                                                          or a leader heard ─────▶ elect(true)
//! ```
//!
//! A round that finds no majority also marks the node cut off ([`Cluster::cut_off`]):
//! writes and linearizable reads that need the leader then fail at once with their
//! retryable error instead of waiting out a deadline that outlasts an election (15 s with
//! the multi-region timings) for a leader this node cannot reach. A node that hears its
//! leader is never marked, so a region cut off together with the leader it had still
//! waits (its leader can no longer commit, but neither of them knows it from the gate).
//!
//! Only liveness is at stake, never safety: a held-back node could not have won (winning
//! takes a majority's votes, and it reaches no majority). Whenever a majority of voters
//! are up and reach each other, each of them reaches a majority, so none of them is held
//! back and they elect a leader as before (the grace applies only to a node that was held
//! back). And it is quick enough: a follower that heard from a leader campaigns only after
//! `election_timeout_max` (the leader's lease) plus its own election timeout of at least
//! `election_timeout_min`, while the gate closes at most `silent_after + every + ask`
//! (`election_timeout_min` × 7/4) after the last contact.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::config::RaftConfig;
use crate::metrics::{ELECTIONS_HELD_BACK, Metrics, QUORUM_PROBES};
use crate::raft::NodeId;

/// When this node last accepted AppendEntries (a heartbeat included) from a leader.
pub(crate) struct LeaderContact {
    origin: Instant,
    /// Milliseconds after `origin`, plus one (0: never).
    at: AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact {
            origin: Instant::now(),
            at: AtomicU64::new(0),
        }
    }
}

impl LeaderContact {
    /// A leader's AppendEntries was accepted just now.
    pub(crate) fn heard(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.at.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since a leader was last heard from (`None`: never, since the start).
    fn silent_for(&self) -> Option<Duration> {
        match self.at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at - 1)),
            ),
        }
    }
}

/// How often the gate looks, after how much silence it asks the voters, how long it waits
/// for their answers, and how long a majority must stay reachable before a held-back node
/// may campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// Between two looks.
    pub(crate) every: Duration,
    /// A leader silent this long: ask whether a majority is reachable.
    pub(crate) silent_after: Duration,
    /// The bound of each status ask: generous, so that a slow answer on a busy machine
    /// does not close the gate during an ordinary failover.
    pub(crate) ask: Duration,
    /// Before a held-back node that reaches a majority again may campaign.
    pub(crate) grace: Duration,
}

impl Timing {
    /// Looks every quarter of `election_timeout_min`, asks after half of it, waits for
    /// answers up to all of it: the gate has closed by 7/4 of `election_timeout_min` after
    /// the last contact, while the node's timer fires no sooner than
    /// `election_timeout_max + election_timeout_min` after it. The grace is
    /// `election_timeout_max`, above openraft's 500 ms replication backoff plus a
    /// heartbeat and a round trip with the shipped timings.
    pub(crate) fn of(raft: &RaftConfig) -> Timing {
        let min = Duration::from_millis(raft.election_timeout_min_ms.max(4));
        Timing {
            every: min / 4,
            silent_after: min / 2,
            ask: min,
            grace: Duration::from_millis(raft.election_timeout_max_ms),
        }
    }
}

/// Whether `reached` (this node among them) holds a majority of every voter configuration
/// (two during a membership change, one otherwise).
fn majority_of_every(configs: &[BTreeSet<NodeId>], reached: &BTreeSet<NodeId>) -> bool {
    configs
        .iter()
        .all(|c| c.intersection(reached).count() * 2 > c.len())
}

/// Starts the gate. It ends with `cancel`.
pub(crate) fn spawn(
    cluster: Cluster,
    timing: Timing,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut open = true;
        // While held back: since when every round has reached a majority.
        let mut reached_since: Option<Instant> = None;
        metrics.set(ELECTIONS_HELD_BACK, 0);
        let mut tick = tokio::time::interval(timing.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let look = look(&cluster, timing).await;
            cluster.set_cut_off(matches!(look, Look::Probed { reached: false, .. }));
            let wanted = match look {
                Look::Open => true,
                Look::Probed { reached, of } => {
                    let result = if reached { "reached" } else { "short" };
                    metrics.inc(QUORUM_PROBES, &[("result", result)]);
                    if !reached && open {
                        // Quiet at the start, when peers may not listen yet.
                        if cluster.contact().silent_for().is_some() {
                            tracing::warn!(
                                answered = of,
                                "no majority of voters reachable: elections held back until one is"
                            );
                        } else {
                            tracing::debug!(answered = of, "elections held back at the start");
                        }
                    }
                    if !reached {
                        reached_since = None;
                        false
                    } else if open {
                        true
                    } else {
                        let since = *reached_since.get_or_insert_with(Instant::now);
                        since.elapsed() >= timing.grace
                    }
                }
            };
            if wanted {
                reached_since = None;
            }
            if wanted != open {
                if wanted {
                    tracing::info!("elections allowed again");
                }
                cluster.raft().runtime_config().elect(wanted);
                metrics.set(ELECTIONS_HELD_BACK, u64::from(!wanted));
                open = wanted;
            }
        }
    });
}

/// What one look found.
enum Look {
    /// Nothing to hold back: a leader, a learner, the only voter, or a leader heard from.
    Open,
    /// The voters were asked: whether a majority (this node included) answered, and how
    /// many voters answered in all.
    Probed { reached: bool, of: usize },
}

async fn look(cluster: &Cluster, timing: Timing) -> Look {
    let me = cluster.id();
    let (state, membership) = {
        let m = cluster.raft().metrics();
        let m = m.borrow();
        (m.state, m.membership_config.clone())
    };
    let membership = membership.membership();
    let configs = membership.get_joint_config();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if state == ServerState::Leader || !voters.contains(&me) || voters.len() == 1 {
        return Look::Open;
    }
    if cluster
        .contact()
        .silent_for()
        .is_some_and(|s| s < timing.silent_after)
    {
        return Look::Open;
    }
    let asks = voters.iter().filter(|id| **id != me).filter_map(|id| {
        let addr = membership.get_node(id)?.grpc_addr.clone();
        let peers = cluster.peers().clone();
        let id = *id;
        Some(async move { peers.status_of(&addr, timing.ask).await.map(|_| id) })
    });
    let mut reached: BTreeSet<NodeId> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let of = reached.len();
    reached.insert(me);
    Look::Probed {
        reached: majority_of_every(configs, &reached),
        of,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_majority_of_every_configuration() {
        let six = vec![set(&[1, 2, 3, 4, 5, 6])];
        assert!(!majority_of_every(&six, &set(&[5, 6])), "a region of two");
        assert!(
            !majority_of_every(&six, &set(&[1, 2, 3])),
            "half is no majority"
        );
        assert!(majority_of_every(&six, &set(&[1, 2, 3, 4])));
        // During a change from {1,2,3} to {3,4,5}: a majority of both.
        let joint = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!majority_of_every(&joint, &set(&[1, 2, 3])));
        assert!(majority_of_every(&joint, &set(&[2, 3, 4])));
    }

    #[test]
    fn the_gate_closes_before_the_timer_could_fire() {
        let raft = RaftConfig::default();
        let t = Timing::of(&raft);
        let closed_by = t.silent_after + t.every + t.ask;
        assert!(closed_by <= Duration::from_millis(raft.election_timeout_min_ms) * 7 / 4);
        // The grace outlasts openraft's replication backoff, a heartbeat and a round trip.
        assert!(t.grace > Duration::from_millis(500 + raft.heartbeat_ms + 100));
        // A follower campaigns `election_timeout_max` (the lease) plus at least
        // `election_timeout_min` after the last contact.
        assert!(
            closed_by
                < Duration::from_millis(
                    raft.election_timeout_max_ms + raft.election_timeout_min_ms
                )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn contact_is_measured_from_the_last_accepted_append() {
        let c = LeaderContact::default();
        assert_eq!(c.silent_for(), None, "never heard");
        c.heard();
        tokio::time::advance(Duration::from_millis(250)).await;
        let s = c.silent_for().expect("heard");
        assert!(
            s >= Duration::from_millis(249) && s <= Duration::from_millis(251),
            "{s:?}"
        );
        c.heard();
        assert!(c.silent_for().expect("heard") < Duration::from_millis(2));
    }
}
