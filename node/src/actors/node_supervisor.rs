//! The root of the actor tree: starts one format supervisor per format and restarts one
//! that fails.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::FORMATS;
use super::format_supervisor::{FormatSupervisor, FormatSupervisorArgs};
use crate::cluster::Cluster;
use crate::config::ActorConfig;

/// The root supervisor.
pub(crate) struct NodeSupervisor;

/// What the root needs to start its children.
pub(crate) struct NodeSupervisorArgs {
    pub(crate) cluster: Cluster,
    pub(crate) actors: ActorConfig,
}

async fn spawn_format(
    myself: &ActorRef<()>,
    args: &NodeSupervisorArgs,
    format: &'static str,
) -> Result<(), ActorProcessingErr> {
    let child_args = FormatSupervisorArgs {
        format,
        cluster: args.cluster.clone(),
        actors: args.actors.clone(),
    };
    Actor::spawn_linked(
        Some(super::format_supervisor_name(args.cluster.id(), format)),
        FormatSupervisor,
        child_args,
        myself.get_cell(),
    )
    .await?;
    Ok(())
}

impl Actor for NodeSupervisor {
    type Msg = ();
    type State = NodeSupervisorArgs;
    type Arguments = NodeSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: NodeSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        for format in FORMATS {
            spawn_format(&myself, &args, format).await?;
        }
        Ok(args)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            let name = cell.get_name().unwrap_or_default();
            tracing::error!(actor = %name, error = %err, "format supervisor failed; restarting it");
            if let Some(format) = FORMATS
                .iter()
                .find(|f| name == super::format_supervisor_name(state.cluster.id(), f))
            {
                // The failed child's name is released once it is gone; wait briefly for that.
                for _ in 0..50 {
                    if ractor::registry::where_is(name.clone()).is_none() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                spawn_format(&myself, state, format).await?;
            }
        }
        Ok(())
    }
}
