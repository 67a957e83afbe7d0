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
//! held back (`runtime_config().elect(false)`): its term stays where it was. A learner
//! asks the same way, only to know whether it is cut off (below).
//!
//! They are held back too while the voters that would vote for this node are no majority:
//! a voter that leads, or that heard its leader within the lease (`election_timeout_max`),
//! refuses votes (openraft's leader lease), and says so in its status
//! (`StatusReply.hears_leader`, see [`hears_leader`]). This is the question a pre-vote
//! asks. It covers a node that its leader's AppendEntries do not reach while the others
//! hear that leader: a restarted node before the leader's replication, backing off from
//! the failures while it was down, reaches it again, or a node whose link to the leader
//! alone is down. Its campaigns would be refused, but each raises its term, and the higher
//! term, answered to the leader's next AppendEntries, deposes a healthy leader. Once the
//! leader falls silent everywhere, the others' leases run out and the node may campaign
//! at once: its own timer fires only an election timeout after its lease.
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
//!                                                          yes, but the others hear
//!                                                          a leader (no majority
//!                                                          would vote) ──────────▶ elect(false)
//!                                                          yes, for a grace, ─────▶ elect(true)
//!                                                          or a leader heard ─────▶ elect(true)
//! ```
//!
//! Each round also finds whether the node is cut off ([`Cluster::cut_off`], [`CutOff`]):
//! writes and linearizable reads that need the leader then fail at once with their
//! retryable error instead of waiting out a deadline that outlasts an election (15 s with
//! the multi-region timings) for a leader that cannot commit them. Three ways:
//! - a follower whose round finds no majority ([`CutOff::NoMajority`]);
//! - a leader that no quorum of voters has acknowledged for [`Timing::unacked_after`]
//!   (openraft's `millis_since_quorum_ack`: the send time of the last AppendEntries a
//!   quorum answered), the followers' lease plus an election timeout, by when the others
//!   may have elected another leader ([`CutOff::Unacked`]);
//! - a follower whose leader says so ([`CutOff::LeaderUnacked`]): a leader cut off tells
//!   its followers in every AppendEntries (`RaftRequest.leader_cut_off`), so a region cut
//!   off together with its leader refuses as a whole. Its followers hear their leader and
//!   would otherwise never ask; a request they forward, or a read index they ask for, is
//!   answered at once with `FAILED_PRECONDITION` by a cut-off leader in any case.
//!
//! ```text
//!   leader:   millis_since_quorum_ack > election_timeout_max + min ─▶ Unacked ─▶ AppendEntries say so
//!   follower: leader heard, and it says so ──────────────────────────▶ LeaderCutOff
//!             leader silent, Status round short ──────────────────────▶ NoMajority
//! ```
//!
//! The gate also carries out a hand-over: a follower that a leader shutting down named its
//! successor (`RaftRequest.successor`, see `Cluster::hand_over`) campaigns once it has
//! heard nothing for the leader's lease, without waiting out its own election timeout.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::config::RaftConfig;
use crate::last_seen::LastSeen;
use crate::metrics::{CUT_OFF, ELECTIONS_HELD_BACK, Metrics, QUORUM_PROBES};
use crate::raft::NodeId;

/// When this node last accepted AppendEntries (a heartbeat included) from a leader, and
/// whether that leader said it was cut off.
#[derive(Default)]
pub(crate) struct LeaderContact {
    /// The last accepted AppendEntries.
    at: LastSeen,
    /// What the last accepted AppendEntries said: its leader reaches no quorum.
    leader_cut_off: AtomicBool,
    /// What the last accepted AppendEntries said: the member its leader, shutting down,
    /// names to take over (0: none).
    successor: AtomicU64,
}

impl LeaderContact {
    /// A leader's AppendEntries was accepted just now; `cut_off`: the leader said it has
    /// had no quorum's acknowledgement for longer than an election takes; `successor`:
    /// the member it names to take over as it shuts down (0: none).
    pub(crate) fn heard(&self, cut_off: bool, successor: NodeId) {
        self.at.mark();
        self.leader_cut_off.store(cut_off, Ordering::Relaxed);
        self.successor.store(successor, Ordering::Relaxed);
    }

    /// The member the last leader heard from named to take over (0: none).
    fn successor(&self) -> NodeId {
        self.successor.load(Ordering::Relaxed)
    }

    /// When `me`, if the last leader heard from named it to take over, is to campaign:
    /// `after` past that last contact.
    fn take_over_due(&self, me: NodeId, after: Duration) -> Option<Instant> {
        if self.successor() != me {
            return None;
        }
        self.at.at().map(|at| at + after)
    }

    /// Whether the leader last heard from said it was cut off.
    fn leader_cut_off(&self) -> bool {
        self.leader_cut_off.load(Ordering::Relaxed)
    }

    /// How long since a leader was last heard from (`None`: never, since the start).
    fn silent_for(&self) -> Option<Duration> {
        self.at.since()
    }
}

/// Why a node knows it cannot serve a request that needs the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CutOff {
    /// A follower that hears no leader and whose round of status asks reached no majority
    /// of voters.
    NoMajority,
    /// A leader that has had no quorum's acknowledgement for [`Timing::unacked_after`]:
    /// by then the others may have elected another leader, and it commits nothing.
    Unacked,
    /// A follower whose leader says it is [`CutOff::Unacked`].
    LeaderUnacked,
}

impl std::fmt::Display for CutOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CutOff::NoMajority => "no leader heard and no majority of voters answering",
            CutOff::Unacked => "leading without a quorum of voters acknowledging",
            CutOff::LeaderUnacked => "the leader it hears reaches no quorum of voters",
        })
    }
}

/// Whether (and why) this node is cut off, as the gate's last round found; requests
/// that need the leader wait on it to fail at once (see [`Cluster::cut_off`]).
pub(crate) struct CutOffState(tokio::sync::watch::Sender<Option<CutOff>>);

impl Default for CutOffState {
    fn default() -> Self {
        CutOffState(tokio::sync::watch::channel(None).0)
    }
}

impl CutOffState {
    /// Why this node is cut off, if it is.
    pub(crate) fn get(&self) -> Option<CutOff> {
        *self.0.borrow()
    }

    /// Records the last round's finding; true when it changed.
    fn set(&self, now: Option<CutOff>) -> bool {
        self.0.send_if_modified(|was| {
            let changed = *was != now;
            *was = now;
            changed
        })
    }

    /// Completes once this node is cut off (at once when it is already).
    pub(crate) async fn reached(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`, so this only ends by finding it set.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// For the AppendEntries this node sends as leader: it has had no quorum's
    /// acknowledgement for longer than an election takes.
    pub(crate) fn leader_unacked(&self) -> bool {
        self.get() == Some(CutOff::Unacked)
    }
}

/// A leader shutting down names a successor in its AppendEntries (see
/// [`Cluster::hand_over`]); while it does, it proposes nothing and confirms no read, so
/// that no AppendEntries renews the followers' lease and the successor can be elected as
/// soon as that lease has run out.
#[derive(Default)]
pub(crate) struct Handover(AtomicU64);

impl Handover {
    /// The member named (0: none).
    pub(crate) fn successor(&self) -> NodeId {
        self.0.load(Ordering::Relaxed)
    }

    /// Names `successor`.
    pub(crate) fn name(&self, successor: NodeId) {
        self.0.store(successor, Ordering::Relaxed);
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
    /// A leader without a quorum's acknowledgement this long is cut off: the followers'
    /// lease (`election_timeout_max`) and an election timeout (`election_timeout_min`),
    /// the soonest the others could have elected another leader. Until then waiting for
    /// this leader is the best bet; after, it most likely commits nothing.
    pub(crate) unacked_after: Duration,
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
            unacked_after: Duration::from_millis(
                raft.election_timeout_max_ms + raft.election_timeout_min_ms,
            ),
        }
    }

    /// How long a successor waits after its leader's last AppendEntries: the leader's
    /// lease (`grace`, which every follower holds from its own last AppendEntries) and
    /// a look's interval more, for the others' last contact coming a little later.
    fn take_over_after(&self) -> Duration {
        self.grace + self.every
    }
}

/// Whether a leader that last had a quorum's acknowledgement `since_ack` ago (`None`: not
/// yet in this term, which it has led for `leading_for`) is cut off.
fn leader_unacked(since_ack: Option<Duration>, leading_for: Duration, timing: Timing) -> bool {
    since_ack.unwrap_or(leading_for) > timing.unacked_after
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
        // Whether a round reached no majority since elections were last allowed: the
        // node then campaigns only after a grace of rounds that all reach one.
        let mut regaining = false;
        // While regaining: since when every round has reached a majority.
        let mut reached_since: Option<Instant> = None;
        // While leading: the term, and since when this node has led in it.
        let mut leading: Option<(u64, Instant)> = None;
        // Whether being cut off was logged as a warning (so its end is logged too).
        let mut warned = false;
        metrics.set(ELECTIONS_HELD_BACK, 0);
        metrics.set(CUT_OFF, 0);
        let mut tick = tokio::time::interval(timing.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Named to take over: campaign when due, not at the next look after it.
            let take_over = cluster
                .contact()
                .take_over_due(cluster.id(), timing.take_over_after());
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(take_over.unwrap_or_else(Instant::now)),
                    if take_over.is_some() => {}
            }
            take_over_if_named(&cluster, timing).await;
            let look = look(&cluster, timing).await;
            let cut_off = match look {
                Look::Open => None,
                Look::HeardCutOff => Some(CutOff::LeaderUnacked),
                Look::Probed { reached, .. } => (!reached).then_some(CutOff::NoMajority),
                Look::Leading { term, since_ack } => {
                    let since = match leading {
                        Some((t, since)) if t == term => since,
                        _ => leading.insert((term, Instant::now())).1,
                    };
                    // A leader handing over sends no AppendEntries on purpose: unanswered
                    // ones would say nothing about its reach.
                    (!cluster.handing_over() && leader_unacked(since_ack, since.elapsed(), timing))
                        .then_some(CutOff::Unacked)
                }
            };
            if !matches!(look, Look::Leading { .. }) {
                leading = None;
            }
            if cluster.cut_off_state().set(cut_off) {
                metrics.set(CUT_OFF, u64::from(cut_off.is_some()));
                match cut_off {
                    // Quiet at the start, when peers may not listen yet.
                    Some(why) if cluster.contact().silent_for().is_none() && leading.is_none() => {
                        tracing::debug!(%why, "cut off at the start");
                    }
                    Some(why) => {
                        tracing::warn!(
                            %why,
                            "cut off: requests that need the leader are refused at once until \
                             a majority of voters is reached again"
                        );
                        warned = true;
                    }
                    None if warned => {
                        tracing::info!("no longer cut off: a majority of voters is reached");
                        warned = false;
                    }
                    None => tracing::debug!("no longer cut off"),
                }
            }
            let wanted = match look {
                Look::Open | Look::HeardCutOff | Look::Leading { .. } => true,
                Look::Probed { voter: false, .. } => true,
                Look::Probed {
                    reached,
                    could_win,
                    of,
                    ..
                } => {
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
                        regaining = true;
                        reached_since = None;
                        false
                    } else if regaining
                        && reached_since.get_or_insert_with(Instant::now).elapsed() < timing.grace
                    {
                        false
                    } else {
                        regaining = false;
                        reached_since = None;
                        if !could_win && open {
                            // A restarted node, or one that its leader's AppendEntries
                            // do not reach while the others hear it: its campaign would
                            // be refused, and its raised term would depose the leader.
                            tracing::info!(
                                answered = of,
                                "the other voters hear a leader: elections held back until \
                                 it reaches this node or falls silent"
                            );
                        }
                        could_win
                    }
                }
            };
            if wanted {
                regaining = false;
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

/// A follower named by its leader to take over (the leader is shutting down) campaigns
/// once it has heard nothing for the leader's lease (`election_timeout_max`, which every
/// follower holds from its last AppendEntries) and a look's interval more
/// ([`Timing::take_over_after`]; the gate wakes then): the others' leases have run out
/// too, so they grant the vote, while their own election timers would fire only an
/// election timeout later.
async fn take_over_if_named(cluster: &Cluster, timing: Timing) {
    let contact = cluster.contact();
    if contact.successor() != cluster.id() {
        return;
    }
    let Some(silent) = contact.silent_for() else {
        return;
    };
    if silent < timing.take_over_after() {
        return;
    }
    contact.successor.store(0, Ordering::Relaxed);
    let state = cluster.raft().metrics().borrow().state;
    if state != ServerState::Follower {
        return;
    }
    tracing::info!(
        silent_ms = silent.as_millis() as u64,
        "the leader is shutting down and named this node to take over: campaigning"
    );
    if let Err(e) = cluster.raft().trigger().elect().await {
        tracing::warn!(error = %e, "could not campaign to take over");
    }
}

/// Whether this node would refuse a candidate's vote now, as openraft does for the lease
/// (`election_timeout_max`) after it last heard its leader: it leads, a quorum of voters
/// acknowledges it and it is not handing over; or it follows a leader whose AppendEntries
/// it accepted within that lease and which did not say it was cut off. Answered to other
/// voters' gates in `Node.Status` (`StatusReply.hears_leader`).
pub(crate) fn hears_leader(cluster: &Cluster, state: ServerState) -> bool {
    let lease = Duration::from_millis(cluster.raft().config().election_timeout_max);
    match state {
        ServerState::Leader => cluster.cut_off_state().get().is_none() && !cluster.handing_over(),
        ServerState::Follower => {
            let contact = cluster.contact();
            contact.silent_for().is_some_and(|s| s < lease) && !contact.leader_cut_off()
        }
        _ => false,
    }
}

/// What one look found.
enum Look {
    /// Nothing to hold back: the only voter, or a leader heard from.
    Open,
    /// A leader heard from, which said it reaches no quorum.
    HeardCutOff,
    /// This node leads `term` among other voters; `since_ack`: how long since a quorum
    /// of them acknowledged it (`None`: not yet in this term).
    Leading {
        term: u64,
        since_ack: Option<Duration>,
    },
    /// The voters were asked: whether a majority (this node included) answered; whether
    /// those that would vote for this node (it, and those that answered and hear no
    /// leader: see [`hears_leader`]) are a majority, so that it could win an election;
    /// how many voters answered in all; and whether this node is one of them (a learner
    /// has no elections to hold back).
    Probed {
        reached: bool,
        could_win: bool,
        of: usize,
        voter: bool,
    },
}

async fn look(cluster: &Cluster, timing: Timing) -> Look {
    let me = cluster.id();
    let (state, membership, term, since_ack) = {
        let m = cluster.raft().metrics();
        let m = m.borrow();
        (
            m.state,
            m.membership_config.clone(),
            m.current_term,
            m.millis_since_quorum_ack.map(Duration::from_millis),
        )
    };
    let membership = membership.membership();
    let configs = membership.get_joint_config();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if voters.len() == 1 && voters.contains(&me) {
        return Look::Open;
    }
    if state == ServerState::Leader {
        return Look::Leading { term, since_ack };
    }
    // A learner asks too, for whether it is cut off; it has no elections to hold back.
    let voter = voters.contains(&me);
    let contact = cluster.contact();
    if contact
        .silent_for()
        .is_some_and(|s| s < timing.silent_after)
    {
        return if contact.leader_cut_off() {
            Look::HeardCutOff
        } else {
            Look::Open
        };
    }
    let asks = voters.iter().filter(|id| **id != me).filter_map(|id| {
        let addr = membership.get_node(id)?.grpc_addr.clone();
        let peers = cluster.peers().clone();
        let id = *id;
        Some(async move {
            let reply = peers.status_of(&addr, timing.ask).await?;
            Some((id, reply.hears_leader))
        })
    });
    let answers: Vec<(NodeId, bool)> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let of = answers.len();
    let mut reached: BTreeSet<NodeId> = answers.iter().map(|(id, _)| *id).collect();
    reached.insert(me);
    let mut would_vote: BTreeSet<NodeId> = answers
        .iter()
        .filter(|(_, hears_leader)| !hears_leader)
        .map(|(id, _)| *id)
        .collect();
    would_vote.insert(me);
    Look::Probed {
        reached: majority_of_every(configs, &reached),
        could_win: majority_of_every(configs, &would_vote),
        of,
        voter,
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
        c.heard(false, 0);
        tokio::time::advance(Duration::from_millis(250)).await;
        let s = c.silent_for().expect("heard");
        assert!(
            s >= Duration::from_millis(249) && s <= Duration::from_millis(251),
            "{s:?}"
        );
        c.heard(false, 0);
        assert!(c.silent_for().expect("heard") < Duration::from_millis(2));
        // What the leader says rides with each contact: the last one counts.
        assert!(!c.leader_cut_off());
        c.heard(true, 0);
        assert!(c.leader_cut_off());
        c.heard(false, 0);
        assert!(!c.leader_cut_off());
    }

    #[tokio::test(start_paused = true)]
    async fn a_named_successor_is_due_to_take_over_a_lease_and_a_look_after_the_last_contact() {
        let t = Timing::of(&RaftConfig::default());
        let c = LeaderContact::default();
        assert_eq!(c.take_over_due(2, t.take_over_after()), None, "never heard");
        c.heard(false, 2);
        let heard = Instant::now();
        assert_eq!(c.take_over_due(3, t.take_over_after()), None, "not named");
        let due = c.take_over_due(2, t.take_over_after()).expect("named");
        let after = due - heard;
        assert!(
            after >= t.grace + t.every && after <= t.grace + t.every + Duration::from_millis(1),
            "{after:?}"
        );
        // Each AppendEntries still sent moves it on.
        tokio::time::advance(Duration::from_millis(100)).await;
        c.heard(false, 2);
        assert!(
            c.take_over_due(2, t.take_over_after()).expect("named")
                >= due + Duration::from_millis(99)
        );
        // A leader that names nobody (its hand-over over) is followed as usual.
        c.heard(false, 0);
        assert_eq!(c.take_over_due(2, t.take_over_after()), None);
    }

    #[test]
    fn a_leader_is_cut_off_once_unacknowledged_past_the_lease_and_an_election_timeout() {
        let raft = RaftConfig::default();
        let t = Timing::of(&raft);
        let lease_and_election =
            Duration::from_millis(raft.election_timeout_max_ms + raft.election_timeout_min_ms);
        assert_eq!(t.unacked_after, lease_and_election);
        let ms = Duration::from_millis;
        // Acknowledged lately: not cut off, however long it has led.
        assert!(!leader_unacked(Some(ms(150)), ms(60_000), t));
        assert!(!leader_unacked(Some(lease_and_election), ms(60_000), t));
        assert!(leader_unacked(
            Some(lease_and_election + ms(1)),
            ms(60_000),
            t
        ));
        // Never acknowledged in this term: counted from when it began to lead.
        assert!(!leader_unacked(None, ms(100), t));
        assert!(leader_unacked(None, lease_and_election + ms(1), t));
        // With the multi-region timings: 9 s, under the 15 s a request would wait.
        let far = RaftConfig {
            heartbeat_ms: 500,
            election_timeout_min_ms: 3000,
            election_timeout_max_ms: 6000,
            ..RaftConfig::default()
        };
        let far_t = Timing::of(&far);
        assert_eq!(far_t.unacked_after, ms(9000));
        assert!(leader_unacked(Some(ms(9001)), ms(60_000), far_t));
        assert!(!leader_unacked(Some(ms(8000)), ms(60_000), far_t));
    }

    #[tokio::test]
    async fn requests_waiting_on_the_cut_off_state_wake_when_it_is_set() {
        let state = Arc::new(CutOffState::default());
        assert_eq!(state.get(), None);
        let waiting = tokio::spawn({
            let state = state.clone();
            async move { state.reached().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(!state.set(None), "unchanged");
        assert!(state.set(Some(CutOff::LeaderUnacked)));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("joined");
        // Only a leader's own finding rides in its AppendEntries.
        assert!(!state.leader_unacked());
        assert!(state.set(Some(CutOff::Unacked)));
        assert!(state.leader_unacked());
        // Already set: a new waiter completes at once.
        tokio::time::timeout(Duration::from_millis(100), state.reached())
            .await
            .expect("at once");
        assert!(state.set(None));
        assert!(!state.leader_unacked());
    }
}
