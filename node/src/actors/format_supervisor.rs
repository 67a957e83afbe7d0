//! Supervises the repository actors of one format: spawns them on demand and restarts a
//! failed one with exponential backoff, within a restart budget; past the budget the
//! failure is escalated to the node supervisor.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::repository::{RepositoryActor, RepositoryArgs, RepositoryMsg};
use super::{ActorError, repository_name};
use crate::cluster::Cluster;
use crate::config::ActorConfig;

/// One format's supervisor.
pub(crate) struct FormatSupervisor;

/// Messages to a format supervisor.
pub(crate) enum FormatMsg {
    /// The actor of a repository, spawned if needed.
    Get {
        domain: String,
        repository: String,
        reply: RpcReplyPort<Result<ActorRef<RepositoryMsg>, ActorError>>,
    },
    /// Restart a failed repository actor (sent after the backoff delay).
    Restart { domain: String, repository: String },
}

/// Arguments of a format supervisor.
pub(crate) struct FormatSupervisorArgs {
    pub(crate) format: &'static str,
    pub(crate) cluster: Cluster,
    pub(crate) actors: ActorConfig,
}

/// State of a format supervisor.
pub(crate) struct FormatState {
    args: FormatSupervisorArgs,
    /// For each supervised actor name: its (domain, repository) and recent failure times.
    children: HashMap<String, ((String, String), Vec<Instant>)>,
}

impl FormatState {
    async fn spawn(
        &mut self,
        myself: &ActorRef<FormatMsg>,
        domain: &str,
        repository: &str,
    ) -> Result<ActorRef<RepositoryMsg>, ActorError> {
        let name = repository_name(self.args.cluster.id(), self.args.format, domain, repository);
        if let Some(cell) = ractor::registry::where_is(name.clone()) {
            return Ok(cell.into());
        }
        let args = RepositoryArgs {
            cluster: self.args.cluster.clone(),
            idle_stop: Duration::from_secs(self.args.actors.idle_stop_secs.max(1)),
        };
        let (actor, _handle) =
            Actor::spawn_linked(Some(name.clone()), RepositoryActor, args, myself.get_cell())
                .await
                .map_err(|e| ActorError::Spawn(e.to_string()))?;
        self.children
            .entry(name)
            .or_insert_with(|| ((domain.to_owned(), repository.to_owned()), Vec::new()));
        Ok(actor)
    }
}

impl Actor for FormatSupervisor {
    type Msg = FormatMsg;
    type State = FormatState;
    type Arguments = FormatSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<FormatMsg>,
        args: FormatSupervisorArgs,
    ) -> Result<FormatState, ActorProcessingErr> {
        Ok(FormatState {
            args,
            children: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<FormatMsg>,
        msg: FormatMsg,
        state: &mut FormatState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FormatMsg::Get {
                domain,
                repository,
                reply,
            } => {
                let r = state.spawn(&myself, &domain, &repository).await;
                let _ = reply.send(r);
            }
            FormatMsg::Restart { domain, repository } => {
                if let Err(e) = state.spawn(&myself, &domain, &repository).await {
                    tracing::warn!(%domain, %repository, error = %e, "restarting repository actor failed");
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<FormatMsg>,
        event: SupervisionEvent,
        state: &mut FormatState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let name = cell.get_name().unwrap_or_default();
                let window = Duration::from_secs(state.args.actors.restart_window_secs);
                let budget = state.args.actors.max_restarts as usize;
                let Some(((domain, repository), failures)) = state.children.get_mut(&name) else {
                    return Ok(());
                };
                let now = Instant::now();
                failures.retain(|t| now.duration_since(*t) < window);
                failures.push(now);
                if failures.len() > budget {
                    return Err(format!(
                        "repository actor {name} failed {} times within {window:?}: {err}",
                        failures.len()
                    )
                    .into());
                }
                let delay = Duration::from_millis(100u64 << failures.len().min(6));
                tracing::warn!(actor = %name, error = %err, ?delay, "repository actor failed; restarting");
                let msg = FormatMsg::Restart {
                    domain: domain.clone(),
                    repository: repository.clone(),
                };
                // The delay runs outside the mailbox; the restart arrives as a message.
                myself.send_after(delay, move || msg);
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                // Stopped while idle: forget its failure history too.
                if let Some(name) = cell.get_name() {
                    state.children.remove(&name);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
