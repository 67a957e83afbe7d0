//! Which peers this node's Raft calls cannot reach, logged when a peer is lost and when it
//! answers again (and once a minute between), instead of at every retry.
//!
//! While a peer is down, openraft retries it every heartbeat or backoff (a few times a
//! second) and logs each failure itself, several lines at ERROR and WARN each time: a
//! node down for a day would fill the leader's log with hundreds of thousands of lines
//! saying the same. Those lines are left out ([`crate::logging`]), and these take their
//! place, with the error each carried. A peer counts as lost once its calls have failed
//! for [`LOST_AFTER`] with no answer between: a busy peer that misses one call and answers
//! the next is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::NodeId;
use crate::metrics::{Metrics, PEERS_UNREACHABLE};

/// How often a peer still down is logged again.
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// How long a peer's calls must go on failing, with no answer between, before it counts
/// as lost. A busy peer misses a call now and then (openraft gives an AppendEntries one
/// heartbeat interval, 100 ms with the defaults) and answers the next: that is slow, not
/// lost, and is not logged. A peer that is down fails every call, retried every 500 ms.
const LOST_AFTER: Duration = Duration::from_secs(1);

/// The peers whose last Raft call failed to reach them.
pub(crate) struct Reachability {
    peers: Mutex<Peers>,
    metrics: Arc<Metrics>,
}

impl Peers {
    /// Peers lost (not merely failing lately): what the gauge counts.
    fn lost(&self) -> u64 {
        self.down.values().filter(|d| d.lost).count() as u64
    }
}

#[derive(Default)]
struct Peers {
    down: HashMap<NodeId, Down>,
    /// Clients open per peer: a leader holds one per member for its term, a candidate
    /// one per vote asked. A peer no client calls any more is no longer known to be down.
    clients: HashMap<NodeId, usize>,
}

struct Down {
    since: Instant,
    failed: u64,
    logged: Instant,
    /// Failing for [`LOST_AFTER`] or longer: logged, and counted in the gauge.
    lost: bool,
}

/// What a call's outcome changes, to log.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// Calls failing for [`LOST_AFTER`] since the peer last answered (or since this node
    /// started calling it).
    Lost { failed: u64 },
    /// Still failing, a reminder's interval after the last line.
    Still { down: Duration, failed: u64 },
    /// An answer after the peer was lost.
    Back { down: Duration, failed: u64 },
}

impl Reachability {
    /// Counts the peers down in `metrics` (`granary_raft_peers_unreachable`).
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        metrics.set(PEERS_UNREACHABLE, 0);
        Reachability {
            peers: Mutex::default(),
            metrics,
        }
    }

    /// A client for `target` was made.
    pub(crate) fn opened(&self, target: NodeId) {
        *self.lock().clients.entry(target).or_default() += 1;
    }

    /// A client for `target` was dropped. With the last one (this node no longer leads,
    /// or its vote was answered) what was known of the peer is forgotten, so the gauge
    /// does not keep counting a peer this node stopped calling.
    pub(crate) fn closed(&self, target: NodeId) {
        let mut peers = self.lock();
        let open = peers.clients.entry(target).or_default();
        *open = open.saturating_sub(1);
        if *open == 0 {
            peers.clients.remove(&target);
            if peers.down.remove(&target).is_some() {
                self.metrics.set(PEERS_UNREACHABLE, peers.lost());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call to `target` (at `addr`) got no answer: `error` says why.
    pub(crate) fn failed(&self, target: NodeId, addr: &str, error: &dyn std::fmt::Display) {
        match self.note(target, false, Instant::now()) {
            Some(Change::Lost { failed }) => tracing::warn!(
                node = target,
                addr,
                failed_calls = failed,
                error = %error,
                "cannot reach a peer; Raft retries it, and this is logged again once a minute \
                 while it lasts"
            ),
            Some(Change::Still { down, failed }) => tracing::warn!(
                node = target,
                addr,
                down_s = down.as_secs(),
                failed_calls = failed,
                error = %error,
                "a peer is still unreachable"
            ),
            _ => {}
        }
    }

    /// A call to `target` was answered (an error answer too: the peer is there).
    pub(crate) fn answered(&self, target: NodeId, addr: &str) {
        if let Some(Change::Back { down, failed }) = self.note(target, true, Instant::now()) {
            tracing::info!(
                node = target,
                addr,
                down_ms = down.as_millis() as u64,
                failed_calls = failed,
                "a peer answers again"
            );
        }
    }

    fn note(&self, target: NodeId, answered: bool, now: Instant) -> Option<Change> {
        let mut peers = self.lock();
        let down = &mut peers.down;
        let change = match (answered, down.get_mut(&target)) {
            // The common case, a call answered by a peer that was not down: no change.
            (true, None) => return None,
            (true, Some(_)) => {
                let d = down
                    .remove(&target)
                    .unwrap_or_else(|| unreachable!("just seen"));
                // A slow peer that missed a call or a few: nothing was said, nothing to say.
                d.lost.then(|| Change::Back {
                    down: now.saturating_duration_since(d.since),
                    failed: d.failed,
                })
            }
            (false, None) => {
                down.insert(
                    target,
                    Down {
                        since: now,
                        failed: 1,
                        logged: now,
                        lost: false,
                    },
                );
                None
            }
            (false, Some(d)) => {
                d.failed += 1;
                if !d.lost && now.saturating_duration_since(d.since) >= LOST_AFTER {
                    d.lost = true;
                    d.logged = now;
                    Some(Change::Lost { failed: d.failed })
                } else {
                    (d.lost && now.saturating_duration_since(d.logged) >= REMIND_EVERY).then(|| {
                        d.logged = now;
                        Change::Still {
                            down: now.saturating_duration_since(d.since),
                            failed: d.failed,
                        }
                    })
                }
            }
        };
        self.metrics.set(PEERS_UNREACHABLE, peers.lost());
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_peer_is_told_once_then_each_minute_then_when_back() {
        let metrics = Arc::new(Metrics::default());
        let r = Reachability::new(metrics.clone());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(r.note(2, true, at(0)), None, "answers are not news");
        // Failing, retried every half second: lost once it has failed for a second.
        assert_eq!(r.note(2, false, at(100)), None);
        assert_eq!(r.note(2, false, at(600)), None);
        assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(0), "not lost yet");
        assert_eq!(r.note(2, false, at(1100)), Some(Change::Lost { failed: 3 }));
        assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(1));
        // Retried every half second for most of a minute: nothing more to say.
        for i in 1..119 {
            assert_eq!(r.note(2, false, at(1100 + i * 500)), None, "retry {i}");
        }
        // Another peer is lost meanwhile, and counted apart.
        assert_eq!(r.note(3, false, at(30_000)), None);
        assert_eq!(
            r.note(3, false, at(31_000)),
            Some(Change::Lost { failed: 2 })
        );
        assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(2));
        assert_eq!(
            r.note(2, false, at(61_100)),
            Some(Change::Still {
                down: Duration::from_secs(61),
                failed: 122
            })
        );
        assert_eq!(r.note(2, false, at(61_600)), None);
        assert_eq!(
            r.note(2, true, at(62_100)),
            Some(Change::Back {
                down: Duration::from_secs(62),
                failed: 123
            })
        );
        assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(1));
        assert_eq!(r.note(2, true, at(62_200)), None);
        // Lost again later: told again.
        assert_eq!(r.note(2, false, at(90_000)), None);
        assert_eq!(
            r.note(2, false, at(91_000)),
            Some(Change::Lost { failed: 2 })
        );
        assert_eq!(r.note(3, true, at(91_000)).map(|_| ()), Some(()));
        assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(1));
    }

    #[test]
    fn a_busy_peer_that_misses_calls_and_answers_between_is_not_lost() {
        let metrics = Arc::new(Metrics::default());
        let r = Reachability::new(metrics.clone());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Under overload: a call in three misses its 100 ms, for a minute.
        for i in 0..600 {
            let answered = i % 3 != 0;
            assert_eq!(r.note(2, answered, at(i * 100)), None, "call {i}");
            assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(0), "call {i}");
        }
        // Missing several in a row, for less than a second: still only slow.
        for i in 0..9 {
            assert_eq!(r.note(2, false, at(60_000 + i * 100)), None);
        }
        assert_eq!(r.note(2, true, at(60_900)), None, "nothing was said");
        assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(0));
    }

    #[test]
    fn a_peer_no_client_calls_any_more_is_not_counted() {
        let metrics = Arc::new(Metrics::default());
        let r = Reachability::new(metrics.clone());
        let t0 = Instant::now();
        let later = t0 + LOST_AFTER;
        // A leader's client for node 2, and a vote's, both failing.
        r.opened(2);
        r.opened(2);
        assert_eq!(r.note(2, false, t0), None);
        assert_eq!(r.note(2, false, later), Some(Change::Lost { failed: 2 }));
        r.closed(2);
        assert_eq!(
            metrics.gauge(PEERS_UNREACHABLE),
            Some(1),
            "one client is left"
        );
        assert_eq!(r.note(2, false, later), None);
        // The leader steps down: its client goes, and so does what it knew.
        r.closed(2);
        assert_eq!(metrics.gauge(PEERS_UNREACHABLE), Some(0));
        r.opened(2);
        assert_eq!(r.note(2, false, later), None, "failing anew");
        assert_eq!(
            r.note(2, false, later + LOST_AFTER),
            Some(Change::Lost { failed: 2 }),
            "news again"
        );
    }
}
