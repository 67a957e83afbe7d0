//! The node's log: `RUST_LOG`-style filtering (default `info,openraft=warn`) to stderr, in
//! colour on a terminal and plain otherwise, without openraft's line-per-retry reports of
//! a peer it cannot reach, and without its warnings about stale messages it ignores.
//!
//! openraft logs every failed call to an unreachable peer at ERROR (`RPCError`) and WARN
//! (`error replication to target`, `update progress error`, the backoff that follows), a
//! few times a second for as long as the peer is down. Those events are dropped here;
//! [`crate::raft::reachability`] logs the same failures, with their errors, when a peer is
//! lost, once a minute while it stays down, and when it answers again.
//!
//! openraft also warns, on every member at every election or membership change, that it
//! ignores a message sent before the change (`A message will be ignored because vote
//! changed`, `membership_log_id changed: … ignore when …`): a vote answer or a replication
//! progress report that arrives after the vote or the membership it was sent under has
//! moved on. Ignoring it is what openraft is meant to do, and an operator reading WARN
//! lines has nothing to act on, so those are dropped too. Every other openraft event (a
//! storage error, a remote error, a timeout of anything else, a higher vote seen) passes.

use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

/// Installs the node's log as the process's global subscriber.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::registry()
        .with(filter)
        .with(QuietRetries)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                // Colours for a terminal only: a log file or journal gets plain text.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
}

/// Drops openraft's reports of calls to a peer that could not be reached, and its notes
/// that it ignores a stale message.
pub struct QuietRetries;

impl<S: Subscriber> Layer<S> for QuietRetries {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        // Only openraft's warnings and errors are looked into; `Level`s order by verbosity.
        if !meta.target().starts_with("openraft") || *meta.level() > Level::WARN {
            return true;
        }
        let mut seen = Unreachable(false);
        event.record(&mut seen);
        !seen.0
    }
}

/// Whether an event says a peer could not be reached: an error, in a field or in the
/// message, that is openraft's `Unreachable` (what every failed peer call becomes, see
/// `raft::network`), or the backoff openraft enters after one; or a warning that a
/// message sent before a vote or membership change is ignored.
struct Unreachable(bool);

impl Visit for Unreachable {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.0 {
            return;
        }
        let text = format!("{value:?}");
        self.0 = if field.name() == "message" {
            text.contains("Unreachable node:")
                || text.contains("backoff mode: drain events")
                || text.starts_with("A message will be ignored because vote changed:")
                || (text.starts_with("membership_log_id changed:")
                    && text.contains("; ignore when ("))
        } else {
            text.starts_with("Unreachable node:")
        };
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.0 && field.name() != "message" {
            self.0 = value.starts_with("Unreachable node:");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Keeps the message of every event that reaches it.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Kept {
        fn on_event(&self, event: &Event<'_>, _cx: Context<'_, S>) {
            struct Message(String);
            impl Visit for Message {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }

    #[test]
    fn openraft_retries_and_stale_message_notes_are_dropped_and_nothing_else() {
        let kept = Kept::default();
        let subscriber = tracing_subscriber::registry()
            .with(QuietRetries)
            .with(kept.clone());
        tracing::subscriber::with_default(subscriber, || {
            let unreachable = "Unreachable node: tcp connect error";
            // What openraft 0.9 logs at each failed call to a peer that is down.
            tracing::error!(target: "openraft::replication", err = %unreachable, "RPCError");
            tracing::warn!(target: "openraft::replication", error = %unreachable,
                "error replication to target=3");
            tracing::warn!(target: "openraft::replication", interval = ?500,
                "ReplicationCore::backoff_drain_events backoff mode: drain events without processing them");
            tracing::warn!(target: "openraft::engine::handler::replication_handler",
                request_id = "AppendEntries(7)", result = %unreachable, "update progress error");
            tracing::warn!(target: "openraft::engine::handler::replication_handler",
                "heartbeat error: {unreachable}");
            tracing::error!(target: "openraft::core::raft_core", error = %unreachable, target = 3,
                "while requesting vote");
            // Everything else passes: other openraft errors, and anyone else's lines.
            tracing::error!(target: "openraft::replication", error = "storage error: disk full",
                "error replication to target=3");
            tracing::error!(target: "openraft::core::raft_core", error = "timeout after 1s",
                "timeout while confirming leadership for read request");
            tracing::info!(target: "openraft::core", "Unreachable node: an info line is not looked into");
            tracing::warn!(target: "granary_node::raft::reachability",
                error = %unreachable, "cannot reach a peer");
            // What openraft 0.9 warns, on every member, when an answer arrives after the
            // vote or membership it was sent under has changed: dropped.
            tracing::warn!(target: "openraft::core::raft_core",
                "A message will be ignored because vote changed: msg sent by vote: {}; \
                 current my vote: {}; when ({})", "T1-N1:committed", "None", "VoteResponse");
            tracing::warn!(target: "openraft::core::raft_core",
                "membership_log_id changed: msg sent by: {}; curr: {}; ignore when ({})",
                "Some(T1-N1-6)", "Some(T1-N1-7)", "UpdateReplicationMatched");
            // A higher vote seen (the leader stepping down) passes.
            tracing::warn!(target: "openraft::replication",
                "error replication to target=2 error=seen a higher vote: T2-N2:uncommitted GT mine: T1-N1:committed");
        });
        assert_eq!(
            *kept.0.lock().unwrap(),
            [
                "error replication to target=3",
                "timeout while confirming leadership for read request",
                "Unreachable node: an info line is not looked into",
                "cannot reach a peer",
                "error replication to target=2 error=seen a higher vote: T2-N2:uncommitted GT mine: T1-N1:committed",
            ]
        );
    }
}
