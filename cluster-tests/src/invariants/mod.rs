//! The properties every scenario checks, one per file. Each file has a pure part that
//! judges what was collected (unit-tested here, without a cluster) and a `check` that
//! collects it from the nodes and panics with every violation it found.
//!
//! Reads made while collecting retry what the contract calls retryable (503, a node not
//! up yet) until a deadline: a node catching up may answer 503, never a stale answer.

// Every acknowledged publish is in every node's packument, with its integrity.
pub mod no_lost_ack;

// At most one leader per term, across every status read during the test.
pub mod single_leader;

// Every tarball the metadata refers to is readable on every node, with its bytes.
pub mod blobs_resolve;

// All nodes reach the same applied index and serve identical listings and packuments.
pub mod replicas_converge;

use std::time::Duration;

use crate::client::{NodeClient, Repo, Resp};
use crate::load::Kind;
use crate::poll;

/// How long collecting one answer may retry a retryable failure.
pub const READ_RETRY: Duration = Duration::from_secs(30);

/// The packument of `package` from `node`, retrying retryable failures: `Ok(None)` for a
/// 404. `Err` on anything else, or when retries run out.
pub async fn packument(
    node: &NodeClient,
    repo: &Repo,
    package: &str,
) -> Result<Option<serde_json::Value>, String> {
    let r = retrying(
        &format!("packument {package} from node {}", node.node_id),
        || node.npm_packument(repo, package),
    )
    .await?;
    match r.status {
        404 => Ok(None),
        200 => serde_json::from_slice(&r.body).map(Some).map_err(|e| {
            format!(
                "node {}: packument {package} is not JSON: {e}",
                node.node_id
            )
        }),
        _ => Err(format!(
            "node {}: packument {package}: {}",
            node.node_id,
            r.describe()
        )),
    }
}

/// Sends until the answer is not retryable (503 with Retry-After, refused, closed,
/// timed out), or [`READ_RETRY`] passes.
pub async fn retrying<F, Fut>(what: &str, mut send: F) -> Result<Resp, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Resp, crate::client::TransportError>>,
{
    poll::try_until(READ_RETRY, || {
        let sent = send();
        async move {
            match sent.await {
                Ok(r) if Kind::of_response(&r) == Kind::Unavailable => {
                    Err(format!("{what}: {}", r.describe()))
                }
                Ok(r) => Ok(r),
                Err(e) => Err(format!("{what}: {e}")),
            }
        }
    })
    .await
    .map_err(|last| format!("gave up after {READ_RETRY:?}: {last}"))
}

/// Panics with `what` and the problems, if there are any (at most 30 listed).
pub fn report(what: &str, problems: &[String]) {
    if problems.is_empty() {
        return;
    }
    let shown: Vec<&String> = problems.iter().take(30).collect();
    panic!(
        "{what}: {} violation(s):\n  {}{}",
        problems.len(),
        shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        if problems.len() > shown.len() {
            "\n  …"
        } else {
            ""
        }
    );
}
