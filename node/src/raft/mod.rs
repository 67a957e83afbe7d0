//! Metadata consensus: openraft with its log and state machine in the node's RocksDB.
//!
//! ```text
//!  proposer (batch: what arrives during a sync shares the next entry)
//!      │──client_write(Command)──▶ leader log (raft_log, fsync) ──▶ majority
//!      ▲                                                     │
//!      └──────── CommandResult ◀── apply (state CF, one WriteBatch per entry or per
//!                                  command of a batch, last applied log id included)
//!                                  ──▶ change notification
//! ```
//!
//! Apply never calls actors; it publishes [`Applied`] on a broadcast channel after each
//! batch of entries.

// openraft's storage traits return its `StorageError`, a large type; the helpers that feed
// them return it too rather than boxing and unboxing at every call.
pub mod batch;
pub(crate) mod lease;
#[allow(clippy::result_large_err)]
pub(crate) mod log_store;
pub(crate) mod network;
pub(crate) mod reachability;
#[allow(clippy::result_large_err)]
pub(crate) mod state_machine;

use serde::{Deserialize, Serialize};

use crate::state::command::{Command, CommandResult};

/// What Raft knows of a member: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// gRPC address for peer traffic.
    pub grpc_addr: String,
    /// HTTP address of the front.
    pub http_addr: String,
    /// Region label.
    pub region: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {})",
            self.grpc_addr, self.http_addr, self.region
        )
    }
}

openraft::declare_raft_types!(
    /// Granary's Raft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        Node = NodeInfo,
        SnapshotData = tokio::fs::File,
);

/// The node's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// Raft node ids.
pub type NodeId = u64;

/// Published after entries are applied: the highest applied log index.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    /// Highest applied index.
    pub index: u64,
}

#[allow(clippy::result_large_err)]
fn io_err<E: std::error::Error + 'static>(e: E) -> openraft::StorageError<NodeId> {
    openraft::StorageIOError::<NodeId>::new(
        openraft::ErrorSubject::Store,
        openraft::ErrorVerb::Write,
        openraft::AnyError::new(&e),
    )
    .into()
}

/// Why a proposal did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ProposeError {
    /// No leader right now (election in progress); the client may retry.
    #[error("no leader is available; retry shortly")]
    NoLeader,
    /// Raft or storage failed.
    #[error("raft: {0}")]
    Fatal(String),
}

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use super::{NodeId, TypeConfig};
    use crate::store::Store;

    struct RocksBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
            let dir = tempfile::tempdir().map_err(super::io_err)?;
            let store = Store::open(dir.path()).map_err(super::io_err)?;
            Ok((
                dir,
                LogStore::new(store.clone()),
                StateMachine::new(store, Default::default()),
            ))
        }
    }

    /// openraft's own conformance suite for log storage and state machines.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(RocksBuilder).unwrap();
    }
}
