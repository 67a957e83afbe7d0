//! One repository's actor: serializes the repository's writes and proposes them through
//! Raft. Stops itself after a configured idle time.

use std::time::{Duration, Instant};

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::raft::{ProposeError, Raft};
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
}

/// Arguments.
pub(crate) struct RepositoryArgs {
    pub(crate) raft: Raft,
    pub(crate) idle_stop: Duration,
}

/// State.
pub(crate) struct RepositoryState {
    raft: Raft,
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
            raft: args.raft,
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
                let result = crate::raft::propose(&state.raft, *cmd).await;
                if let Err(ProposeError::Fatal(e)) = &result {
                    // Answer the caller, then fail so the supervisor restarts us.
                    let _ = reply.send(result.clone());
                    return Err(format!("proposal failed: {e}").into());
                }
                let _ = reply.send(result);
            }
            RepositoryMsg::IdleCheck => {
                if state.last_active.elapsed() >= state.idle_stop {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}
