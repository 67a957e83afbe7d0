//! The actor tree: `NodeSupervisor` → one `FormatSupervisor` per format → one
//! `RepositoryActor` per (format, domain, repository), spawned on first use, stopped when
//! idle, restarted with backoff when it fails.
//!
//! ```text
//!   NodeSupervisor ── FormatSupervisor "format/npm" ─┬─ RepositoryActor "npm/acme/app"
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

use crate::config::Config;
use crate::raft::{ProposeError, Raft};
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
    root: ActorRef<()>,
    handle: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

fn repository_name(format: &str, domain: &str, repo: &str) -> String {
    format!("{format}/{domain}/{repo}")
}

impl Actors {
    /// Starts the tree.
    pub(crate) async fn start(config: &Config, raft: Raft) -> Result<Actors, ActorError> {
        let args = NodeSupervisorArgs {
            raft,
            actors: config.actors.clone(),
        };
        let (root, handle) = ractor::Actor::spawn(None, NodeSupervisor, args)
            .await
            .map_err(|e| ActorError::Spawn(e.to_string()))?;
        Ok(Actors {
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
        let name = repository_name(format, domain, repo);
        if let Some(cell) = ractor::registry::where_is(name.clone()) {
            return Ok(cell.into());
        }
        let sup: ActorRef<FormatMsg> = ractor::registry::where_is(format!("format/{format}"))
            .ok_or_else(|| ActorError::Unavailable(format!("no supervisor for format {format}")))?
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
