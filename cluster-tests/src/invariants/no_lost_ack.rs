//! No acknowledged publish is lost: every version a client saw acknowledged (201) is in
//! the packument of every given node, with the integrity of the bytes that were sent; a
//! publish of unknown outcome, if present, has our integrity too.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::client::{NodeClient, Repo};
use crate::oracle::{Oracle, Publish, check_packument};

/// What is wrong with one node's packuments (`None`: the package was a 404).
pub fn problems(
    node: u64,
    acked: &[Publish],
    unknown: &[Publish],
    docs: &BTreeMap<String, Option<Value>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (package, doc) in docs {
        let a: Vec<&Publish> = acked.iter().filter(|p| &p.package == package).collect();
        let u: Vec<&Publish> = unknown.iter().filter(|p| &p.package == package).collect();
        match doc {
            None => out.extend(a.iter().map(|p| {
                format!(
                    "node {node}: {} acknowledged, but the package is a 404",
                    p.id()
                )
            })),
            Some(doc) => out.extend(
                check_packument(&a, &u, doc)
                    .into_iter()
                    .map(|m| format!("node {node}: {m}")),
            ),
        }
    }
    out
}

/// Reads every package the oracle knows from each of `nodes`; panics listing every lost
/// acknowledgement.
pub async fn check(nodes: &[NodeClient], repo: &Repo, oracle: &Oracle) {
    let acked = oracle.acknowledged();
    assert!(
        !acked.is_empty(),
        "no lost acknowledgement: nothing was acknowledged, the check would be vacuous"
    );
    let unknown = oracle.unknowns();
    let packages = oracle.packages();
    let mut all = oracle.conflicts();
    let per_node = futures::future::join_all(nodes.iter().map(|node| {
        let packages = &packages;
        async move {
            let mut docs = BTreeMap::new();
            let mut errors = Vec::new();
            for package in packages {
                match super::packument(node, repo, package).await {
                    Ok(doc) => {
                        docs.insert(package.clone(), doc);
                    }
                    Err(e) => errors.push(e),
                }
            }
            (node.node_id, docs, errors)
        }
    }))
    .await;
    for (node, docs, errors) in per_node {
        all.extend(errors);
        all.extend(problems(node, &acked, &unknown, &docs));
    }
    super::report(
        &format!(
            "no acknowledged publish lost ({} acknowledged, nodes {:?})",
            acked.len(),
            nodes.iter().map(|n| n.node_id).collect::<Vec<_>>()
        ),
        &all,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_missing_package_or_version_is_reported_per_node() {
        let a = Publish::new("p", "1.0.0", b"a".to_vec(), 1);
        let b = Publish::new("q", "1.0.0", b"b".to_vec(), 2);
        let mut docs = BTreeMap::new();
        docs.insert(
            "p".to_owned(),
            Some(json!({"versions": {"1.0.0": {"dist": {"integrity": a.integrity}}}})),
        );
        docs.insert("q".to_owned(), None);
        let found = problems(3, &[a.clone(), b], &[], &docs);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("node 3: q@1.0.0"), "{found:?}");
        docs.insert("q".to_owned(), Some(json!({"versions": {}})));
        assert_eq!(problems(3, &[a], &[], &docs).len(), 0);
    }
}
