//! The admin API's cluster operations (`/admin/v1/cluster/…`), SigV4-authenticated like
//! the CodeArtifact API and answering in its error shape. `granary cluster …` calls these.

use granary_format::Body;
use http::Response;
use serde::Deserialize;

use super::{ApiError, ApiRequest, error::field, ok_json};
use crate::cluster::{MembershipChange, MembershipError};
use crate::raft::NodeInfo;

/// `GET /admin/v1/cluster/status`.
pub(crate) async fn status(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let status = req.node.cluster.status_of_all().await;
    ok_json(serde_json::to_value(status).map_err(|e| ApiError::Internal(e.to_string()))?)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddNode {
    node_id: u64,
    grpc_addr: String,
    #[serde(default)]
    http_addr: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    learner: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeRef {
    node_id: u64,
}

fn body<'a, T: Deserialize<'a>>(req: &'a ApiRequest<'_>) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(|e| ApiError::Validation {
        message: format!("invalid request body: {e}"),
        reason: "CANNOT_PARSE",
    })
}

/// `POST /admin/v1/cluster/add-node`, `…/promote`, `…/remove-node`.
pub(crate) async fn change(req: &ApiRequest<'_>, op: &str) -> Result<Response<Body>, ApiError> {
    let change = match op {
        "add-node" => {
            let b: AddNode = body(req)?;
            if b.node_id == 0 {
                return Err(field("nodeId must be at least 1"));
            }
            if !b.grpc_addr.contains(':') {
                return Err(field(format!(
                    "grpcAddr {:?} is not a host:port address",
                    b.grpc_addr
                )));
            }
            MembershipChange::Add {
                id: b.node_id,
                info: NodeInfo {
                    grpc_addr: b.grpc_addr,
                    http_addr: b.http_addr,
                    region: b.region.unwrap_or_else(|| "local".into()),
                },
                learner: b.learner,
            }
        }
        "promote" => MembershipChange::Promote(body::<NodeRef>(req)?.node_id),
        _ => MembershipChange::Remove(body::<NodeRef>(req)?.node_id),
    };
    req.node
        .cluster
        .change_membership(change)
        .await
        .map_err(|e| match e {
            MembershipError::Invalid(m) => field(m),
            MembershipError::Unavailable => ApiError::Throttling {
                message: e.to_string(),
                retry_after: 1,
            },
            MembershipError::Fatal(m) => ApiError::Internal(m),
        })?;
    status(req).await
}
