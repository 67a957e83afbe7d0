//! The leader's proposals, gathered into shared log entries.
//!
//! ```text
//!   proposals ──▶ queue ──▶ proposer task ──client_write_ff(one, or Batch[..])──▶ Raft core
//!                               │                                        │
//!                               └──── waits until that append is synced ◀┘
//! ```
//!
//! openraft 0.9's core appends one entry per `client_write` and waits for that append's
//! sync before it takes its next message, so at load every proposal cost the leader a
//! log sync of its own and held the core (and with it every follower's answer) for one.
//! The proposer hands Raft one entry at a time and waits until the core has appended and
//! synced it; whatever arrived meanwhile goes into the next entry, as a
//! [`Command::Batch`]. A lone proposal is proposed as it is.
//!
//! A member of an earlier release cannot read a batch entry: it would refuse every
//! AppendEntries carrying one. So members say what they understand in every Raft answer
//! (`RaftReply.features`), and the leader batches only while every member of the current
//! membership, learners included, has answered with [`BATCHES`] set; until then (a rolling
//! upgrade, a node just added) each proposal is an entry of its own, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, Fatal, RaftError};
use tokio::sync::{mpsc, oneshot};

use super::log_store::AppendProgress;
use super::{NodeId, NodeInfo, Raft};
use crate::state::command::{Command, CommandResult, PackageTarget};

/// `RaftReply.features`: this release reads entries carrying a [`Command::Batch`].
pub(crate) const BATCHES: u32 = 1;
/// Everything this release's Raft understands, sent in each of its answers.
pub(crate) const FEATURES: u32 = BATCHES;

/// The name under which a test fault (`Faults::unimplemented`) makes every peer act as a
/// member of the release before batch entries: answering without the bit, and failing
/// every AppendEntries that carries one.
pub const PREDATES_BATCHES: &str = "raft batch entries";

/// Whether `entry` carries a batch of commands.
pub(crate) fn is_batch(entry: &openraft::Entry<super::TypeConfig>) -> bool {
    matches!(
        entry.payload,
        openraft::EntryPayload::Normal(Command::Batch(_))
    )
}

/// What each peer last said it understands, from its Raft answers.
#[derive(Default)]
pub(crate) struct PeerFeatures(Mutex<HashMap<NodeId, u32>>);

impl PeerFeatures {
    /// Records a peer's answer (a member of an earlier release sends none: 0).
    pub(crate) fn answered(&self, peer: NodeId, features: u32) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, features);
    }

    /// Whether every one of `peers` has answered with all of `wanted`.
    fn all(&self, peers: impl IntoIterator<Item = NodeId>, wanted: u32) -> bool {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .into_iter()
            .all(|p| seen.get(&p).is_some_and(|f| f & wanted == wanted))
    }
}

/// Proposals gathered into one entry at most.
const MAX_BATCH: usize = 64;
/// How long the proposer waits for the core to take an entry into its log before it
/// proposes the next anyway (the core refused it, say, as no longer the leader).
const APPEND_WAIT: Duration = Duration::from_millis(5);

/// What a proposal came to: its result and the index of the entry that carried it.
pub(crate) type Written =
    Result<(CommandResult, u64), RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>;

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Written>,
}

/// Hands proposals to Raft, several to an entry at load; cheap to clone.
#[derive(Clone)]
pub(crate) struct Proposer {
    tx: mpsc::UnboundedSender<Proposal>,
}

impl Proposer {
    /// Starts the proposer of node `me`, a task which ends when every clone is dropped.
    pub(crate) fn spawn(
        raft: Raft,
        me: NodeId,
        progress: Arc<AppendProgress>,
        features: Arc<PeerFeatures>,
    ) -> Proposer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, me, progress, features, rx));
        Proposer { tx }
    }

    /// Queues `cmd` at once (proposals keep the order they were submitted in) and returns
    /// what waits for its outcome.
    pub(crate) fn submit(&self, cmd: Command) -> impl Future<Output = Written> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = self.tx.send(Proposal { cmd, reply }).is_ok();
        async move {
            if !queued {
                return Err(RaftError::Fatal(Fatal::Stopped));
            }
            rx.await.unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
        }
    }
}

/// Whether every other member of the current membership reads batch entries.
fn members_read_batches(raft: &Raft, me: NodeId, features: &PeerFeatures) -> bool {
    let members: Vec<NodeId> = {
        let m = raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != me)
            .collect()
    };
    features.all(members, BATCHES)
}

async fn run(
    raft: Raft,
    me: NodeId,
    progress: Arc<AppendProgress>,
    features: Arc<PeerFeatures>,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
) {
    // A proposal taken from the queue that could not join the entry before it.
    let mut held: Option<Proposal> = None;
    loop {
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let most = if members_read_batches(&raft, me, &features) {
            MAX_BATCH
        } else {
            1
        };
        // (At most a few dozen: a list does.)
        let mut packages: Vec<PackageTarget> = package_targets(&first.cmd);
        let mut group = vec![first];
        while group.len() < most {
            let Ok(p) = rx.try_recv() else { break };
            // A package changes at most once per entry: apply stamps a change (and a
            // version's revision) with the entry's index, which must tell changes apart.
            let targets = package_targets(&p.cmd);
            if targets.iter().any(|t| packages.contains(t)) {
                held = Some(p);
                break;
            }
            packages.extend(targets);
            group.push(p);
        }
        let seen = progress.started();
        let (cmd, replies): (Command, Vec<_>) = if group.len() == 1 {
            let p = group.pop().unwrap_or_else(|| unreachable!("one proposal"));
            (p.cmd, vec![p.reply])
        } else {
            let (cmds, replies) = group.into_iter().map(|p| (p.cmd, p.reply)).unzip();
            (Command::Batch(cmds), replies)
        };
        let (answered_tx, answered) = oneshot::channel::<()>();
        match raft.client_write_ff(cmd).await {
            Ok(pending) => {
                tokio::spawn(async move {
                    let answer = pending.await;
                    answer_all(replies, answer);
                    let _ = answered_tx.send(());
                });
            }
            Err(fatal) => {
                for r in replies {
                    let _ = r.send(Err(RaftError::Fatal(fatal.clone())));
                }
                continue;
            }
        }
        if most > 1 {
            // Until the core has synced this entry, or answered it without (refused:
            // leadership moved), or the wait runs out.
            tokio::select! {
                _ = progress.wait_synced_after(seen, APPEND_WAIT) => {}
                _ = answered => {}
            }
        }
    }
}

/// The packages `cmd` changes.
fn package_targets(cmd: &Command) -> Vec<PackageTarget> {
    match cmd {
        Command::PublishVersion { target, .. }
        | Command::ChangePackage { target, .. }
        | Command::PutPackageOrigin { target, .. } => vec![target.clone()],
        Command::RetainVersion { targets, .. } => targets.clone(),
        _ => Vec::new(),
    }
}

type Answer = Result<
    Result<
        openraft::raft::ClientWriteResponse<super::TypeConfig>,
        ClientWriteError<NodeId, NodeInfo>,
    >,
    oneshot::error::RecvError,
>;

fn answer_all(replies: Vec<oneshot::Sender<Written>>, answer: Answer) {
    match answer {
        Ok(Ok(resp)) => {
            let index = resp.log_id.index;
            match resp.data {
                CommandResult::Batch(results) if replies.len() > 1 => {
                    for (r, result) in replies.into_iter().zip(results) {
                        let _ = r.send(Ok((result, index)));
                    }
                }
                result => {
                    for r in replies {
                        let _ = r.send(Ok((result.clone(), index)));
                    }
                }
            }
        }
        Ok(Err(e)) => {
            for r in replies {
                let _ = r.send(Err(RaftError::APIError(e.clone())));
            }
        }
        Err(_) => {
            for r in replies {
                let _ = r.send(Err(RaftError::Fatal(Fatal::Stopped)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use granary_format::model::{OriginRestrictions, PackageKey};

    use super::*;
    use crate::cluster::tests::one_node_cluster;
    use crate::raft::state_machine::tests::{domain, repository};

    fn last_index(cluster: &crate::cluster::Cluster) -> u64 {
        cluster
            .raft()
            .metrics()
            .borrow()
            .last_log_index
            .unwrap_or_default()
    }

    /// A member batches only while every other member has answered with the bit: one
    /// not heard from yet (just added), or whose last answer lacked it (a member of an
    /// earlier release, or one started again with one), holds it back.
    #[test]
    fn only_members_that_answered_with_the_bit_count_as_reading_batches() {
        let f = PeerFeatures::default();
        assert!(f.all([], BATCHES), "no other member");
        assert!(!f.all([2], BATCHES), "not heard from");
        f.answered(2, 0);
        assert!(!f.all([2], BATCHES), "an earlier release");
        f.answered(2, FEATURES);
        f.answered(3, FEATURES);
        assert!(f.all([2, 3], BATCHES));
        assert!(!f.all([2, 3, 4], BATCHES), "a member added since");
        f.answered(3, 0);
        assert!(
            !f.all([2, 3], BATCHES),
            "started again with an earlier release"
        );
    }

    /// Proposals submitted while the log is busy share entries, and each gets its own
    /// result: a refusal (a domain that exists) stays with its proposal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proposals_submitted_together_share_entries_with_results_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = one_node_cluster(dir.path()).await;
        let before = last_index(&cluster);
        let mut pending: Vec<_> = (0..40)
            .map(|i| cluster.submit(domain(&format!("d{i}"))))
            .collect();
        pending.push(cluster.submit(domain("d7")));
        let results = futures::future::join_all(pending).await;
        for (i, r) in results.iter().take(40).enumerate() {
            match r {
                Ok((CommandResult::Domain(d), _)) => assert_eq!(d.name, format!("d{i}")),
                other => panic!("d{i}: {other:?}"),
            }
        }
        assert!(
            matches!(results[40], Ok((CommandResult::Failed(_), _))),
            "{:?}",
            results[40]
        );
        let entries = last_index(&cluster) - before;
        assert!(
            entries < 20,
            "41 proposals submitted at once took {entries} entries"
        );
    }

    /// Two changes to one package never share an entry (apply stamps each change, and a
    /// version's revision, with the entry's index); other packages' changes still do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_package_changes_at_most_once_per_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = one_node_cluster(dir.path()).await;
        cluster.submit(domain("d")).await.unwrap();
        cluster.submit(repository("d", "r")).await.unwrap();
        let origin = |package: &str, now_ms: i64| Command::PutPackageOrigin {
            target: PackageTarget {
                domain: "d".into(),
                repository: "r".into(),
                format: "npm".into(),
                package: PackageKey {
                    namespace: None,
                    name: package.into(),
                },
            },
            restrictions: OriginRestrictions::PUBLISHED_FIRST,
            now_ms,
        };
        // Ten changes of `same` between changes of ten other packages, all at once.
        let pending: Vec<_> = (0..10)
            .flat_map(|i| [origin("same", i), origin(&format!("p{i}"), i)])
            .map(|cmd| cluster.submit(cmd))
            .collect();
        let results = futures::future::join_all(pending).await;
        let indexes: Vec<u64> = results
            .iter()
            .map(|r| match r {
                Ok((CommandResult::Done, index)) => *index,
                other => panic!("{other:?}"),
            })
            .collect();
        let same: std::collections::BTreeSet<u64> = indexes.iter().step_by(2).copied().collect();
        assert_eq!(
            same.len(),
            10,
            "one package's changes in shared entries: {indexes:?}"
        );
        let all: std::collections::BTreeSet<u64> = indexes.iter().copied().collect();
        assert!(all.len() < 20, "no entry was shared: {indexes:?}");
    }
}
