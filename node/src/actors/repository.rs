//! One repository's actor: orders the repository's writes and proposes them through
//! Raft. Stops itself after a configured idle time.

use std::time::{Duration, Instant};

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use openraft::error::{ClientWriteError, RaftError};

use crate::cluster::Cluster;
use crate::raft::ProposeError;
use crate::state::command::{Command, CommandResult};

/// The repository actor.
pub(crate) struct RepositoryActor;

/// Messages to a repository actor.
pub(crate) enum RepositoryMsg {
    /// Commit a command through Raft and reply with what apply returned.
    Propose(
        Box<Command>,
        RpcReplyPort<Result<CommandResult, ProposeError>>,
    ),
    /// Stop if idle for long enough.
    IdleCheck,
    /// Fail on purpose, to exercise supervision.
    #[cfg(test)]
    Crash,
}

/// Arguments.
pub(crate) struct RepositoryArgs {
    pub(crate) cluster: Cluster,
    pub(crate) idle_stop: Duration,
}

/// State.
pub(crate) struct RepositoryState {
    cluster: Cluster,
    idle_stop: Duration,
    last_active: Instant,
    ticker: Option<JoinHandle<()>>,
}

impl Actor for RepositoryActor {
    type Msg = RepositoryMsg;
    type State = RepositoryState;
    type Arguments = RepositoryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RepositoryMsg>,
        args: RepositoryArgs,
    ) -> Result<RepositoryState, ActorProcessingErr> {
        let period = (args.idle_stop / 2).max(Duration::from_millis(100));
        let ticker = myself.send_interval(period, || RepositoryMsg::IdleCheck);
        Ok(RepositoryState {
            cluster: args.cluster,
            idle_stop: args.idle_stop,
            last_active: Instant::now(),
            ticker: Some(ticker),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RepositoryMsg>,
        state: &mut RepositoryState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RepositoryMsg>,
        msg: RepositoryMsg,
        state: &mut RepositoryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RepositoryMsg::Propose(cmd, reply) => {
                state.last_active = Instant::now();
                // Submit in mailbox order, but do not hold the mailbox while the entry
                // commits: proposals of one repository keep their order and share log
                // flushes, instead of paying one fsync each in turn.
                let cluster = state.cluster.clone();
                let leader = cluster.raft().metrics().borrow().current_leader;
                if leader != Some(cluster.id()) {
                    // A follower forwards to the leader; order across the forward is the
                    // leader's, as for any two clients.
                    tokio::spawn(async move {
                        let _ = reply.send(cluster.propose(*cmd).await);
                    });
                    return Ok(());
                }
                let retry = (*cmd).clone();
                let deadline = cluster.write_deadline();
                // Queued now, in mailbox order; answered when applied (or when Raft
                // stops, so it cannot outlive the node).
                let pending = cluster.submit(*cmd);
                tokio::spawn(async move {
                    let Ok(answer) = tokio::time::timeout(deadline, pending).await else {
                        // No quorum to commit it (this leader is cut off).
                        let _ = reply.send(Err(ProposeError::NoLeader));
                        return;
                    };
                    let result = match answer {
                        Ok((result, _)) => Ok(result),
                        // Leadership moved after submission: retry within a bound.
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                            cluster.propose(retry).await
                        }
                        Err(e) => Err(ProposeError::Fatal(e.to_string())),
                    };
                    let _ = reply.send(result);
                });
            }
            #[cfg(test)]
            RepositoryMsg::Crash => return Err("crash requested by a test".into()),
            RepositoryMsg::IdleCheck => {
                if state.last_active.elapsed() >= state.idle_stop {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}
