//! The actor tree: `NodeSupervisor` → one `FormatSupervisor` per format → one
//! `RepositoryActor` per (format, domain, repository), spawned on first use, stopped when
//! idle, restarted with backoff when it fails.
//!
//! ```text
//!   NodeSupervisor ── FormatSupervisor "n1/format/npm" ─┬─ RepositoryActor "n1/npm/acme/app"
//!                                                    └─ RepositoryActor "npm/acme/team"
//! ```
//!
//! A repository actor serializes its repository's writes and proposes them through Raft.
//! Its mailbox never waits on a client's bytes: uploads are stored by the request's own
//! task before the actor is asked to commit the metadata that names them.

mod format_supervisor;
mod node_supervisor;
mod repository;

use std::time::Duration;

use ractor::{ActorRef, concurrency::JoinHandle};

use crate::cluster::Cluster;
use crate::config::Config;
use crate::raft::ProposeError;
use crate::state::command::{Command, CommandResult};

pub(crate) use format_supervisor::FormatMsg;
use node_supervisor::{NodeSupervisor, NodeSupervisorArgs};
pub(crate) use repository::RepositoryMsg;

/// The formats that get a supervisor.
pub(crate) const FORMATS: &[&str] = &["npm"];

/// How long a caller waits for a repository actor's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the actor tree.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ActorError {
    /// The tree could not start.
    #[error("spawn: {0}")]
    Spawn(String),
    /// The actor is gone or did not answer in time; the request may be retried.
    #[error("repository actor unavailable: {0}")]
    Unavailable(String),
}

/// The node's handle on the actor tree.
pub(crate) struct Actors {
    /// This node's id: actor names start with it (ractor's registry is per process, and
    /// tests run several nodes in one).
    node: u64,
    root: ActorRef<()>,
    handle: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

fn repository_name(node: u64, format: &str, domain: &str, repo: &str) -> String {
    format!("n{node}/{format}/{domain}/{repo}")
}

fn format_supervisor_name(node: u64, format: &str) -> String {
    format!("n{node}/format/{format}")
}

impl Actors {
    /// Starts the tree.
    pub(crate) async fn start(config: &Config, cluster: Cluster) -> Result<Actors, ActorError> {
        let node = cluster.id();
        let args = NodeSupervisorArgs {
            cluster,
            actors: config.actors.clone(),
        };
        let (root, handle) = ractor::Actor::spawn(None, NodeSupervisor, args)
            .await
            .map_err(|e| ActorError::Spawn(e.to_string()))?;
        Ok(Actors {
            node,
            root,
            handle: tokio::sync::Mutex::new(Some(handle)),
        })
    }

    /// The actor of one repository, spawned if it is not running.
    async fn repository(
        &self,
        format: &str,
        domain: &str,
        repo: &str,
    ) -> Result<ActorRef<RepositoryMsg>, ActorError> {
        let name = repository_name(self.node, format, domain, repo);
        if let Some(cell) = ractor::registry::where_is(name.clone()) {
            return Ok(cell.into());
        }
        let sup: ActorRef<FormatMsg> =
            ractor::registry::where_is(format_supervisor_name(self.node, format))
                .ok_or_else(|| {
                    ActorError::Unavailable(format!("no supervisor for format {format}"))
                })?
                .into();
        let reply = sup
            .call(
                |port| FormatMsg::Get {
                    domain: domain.to_owned(),
                    repository: repo.to_owned(),
                    reply: port,
                },
                Some(CALL_TIMEOUT),
            )
            .await
            .map_err(|e| ActorError::Unavailable(e.to_string()))?;
        match reply {
            ractor::rpc::CallResult::Success(r) => r,
            other => Err(ActorError::Unavailable(format!("{other:?}"))),
        }
    }

    /// Proposes a write for a repository through its actor.
    pub(crate) async fn propose(
        &self,
        format: &str,
        domain: &str,
        repo: &str,
        cmd: Command,
    ) -> Result<Result<CommandResult, ProposeError>, ActorError> {
        // An actor found in the registry may be stopping (idle); one retry spawns a new one.
        let mut last_err = None;
        for _ in 0..3 {
            let actor = self.repository(format, domain, repo).await?;
            let cmd = cmd.clone();
            match actor
                .call(
                    |port| RepositoryMsg::Propose(Box::new(cmd), port),
                    Some(CALL_TIMEOUT),
                )
                .await
            {
                Ok(ractor::rpc::CallResult::Success(r)) => return Ok(r),
                Ok(other) => last_err = Some(format!("{other:?}")),
                Err(e) => last_err = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(ActorError::Unavailable(last_err.unwrap_or_default()))
    }

    /// Stops the tree and waits for it.
    pub(crate) async fn stop(&self) {
        self.root.stop(Some("node shutdown".into()));
        if let Some(h) = self.handle.lock().await.take() {
            let _ = h.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::state::model::DomainRecord;

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repository_actors_spawn_on_use_restart_after_failure_and_stop_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let raft = crate::cluster::tests::one_node_cluster(dir.path()).await;
        let mut config = Config::default();
        config.actors.idle_stop_secs = 1;
        let actors = Actors::start(&config, raft.clone()).await.unwrap();
        let name = repository_name(1, "npm", "sup", "repo");
        assert!(
            ractor::registry::where_is(name.clone()).is_none(),
            "not spawned before use"
        );

        let cmd = Command::CreateDomain(DomainRecord {
            name: "sup".into(),
            owner: "000000000000".into(),
            created_ms: 0,
            encryption_key: "k".into(),
            tags: vec![],
        });
        let result = actors
            .propose("npm", "sup", "repo", cmd)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(result, CommandResult::Domain(_)), "{result:?}");
        let first = ractor::registry::where_is(name.clone()).expect("spawned on first use");

        // A failure is followed by a restart (after a backoff) under the same name.
        let actor: ActorRef<RepositoryMsg> = first.clone().into();
        actor.send_message(RepositoryMsg::Crash).unwrap();
        wait_for("the failed actor to be replaced", || {
            ractor::registry::where_is(name.clone()).is_some_and(|c| c.get_id() != first.get_id())
        })
        .await;

        // Unused for idle_stop_secs: it stops, and comes back on the next use.
        wait_for("the idle actor to stop", || {
            ractor::registry::where_is(name.clone()).is_none()
        })
        .await;
        let again = Command::DeleteDomain { name: "sup".into() };
        let result = actors
            .propose("npm", "sup", "repo", again)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(result, CommandResult::Domain(_)), "{result:?}");
        assert!(ractor::registry::where_is(name).is_some());

        actors.stop().await;
        raft.raft().shutdown().await.unwrap();
    }
}
