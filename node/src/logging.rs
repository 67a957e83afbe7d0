//! The node's log: `RUST_LOG`-style filtering (default `info,openraft=warn`) to stderr, in
//! colour on a terminal and plain otherwise, without openraft's line-per-retry reports of
//! a peer it cannot reach.
//!
//! openraft logs every failed call to an unreachable peer at ERROR (`RPCError`) and WARN
//! (`error replication to target`, `update progress error`, the backoff that follows), a
//! few times a second for as long as the peer is down. Those events are dropped here;
//! [`crate::raft::reachability`] logs the same failures, with their errors, when a peer is
//! lost, once a minute while it stays down, and when it answers again. Every other
//! openraft event (a storage error, a remote error, a timeout of anything else) passes.

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

/// Drops openraft's reports of calls to a peer that could not be reached.
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
/// `raft::network`), or the backoff openraft enters after one.
struct Unreachable(bool);

impl Visit for Unreachable {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.0 {
            return;
        }
        let text = format!("{value:?}");
        self.0 = if field.name() == "message" {
            text.contains("Unreachable node:") || text.contains("backoff mode: drain events")
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
    fn openraft_retries_of_an_unreachable_peer_are_dropped_and_nothing_else() {
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
        });
        assert_eq!(
            *kept.0.lock().unwrap(),
            [
                "error replication to target=3",
                "timeout while confirming leadership for read request",
                "Unreachable node: an info line is not looked into",
                "cannot reach a peer",
            ]
        );
    }
}
