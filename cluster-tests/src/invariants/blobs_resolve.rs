//! Every referenced blob resolves on every node: each version a node's packument lists,
//! and each acknowledged version, has its tarball served by that node (fetched from a
//! peer if the node lacks it), with the bytes that were published.

use std::collections::BTreeMap;

use futures::StreamExt;
use serde_json::Value;

use crate::client::{NodeClient, Repo, integrity};
use crate::oracle::{Oracle, Publish};

/// The versions of `package` to fetch, each with the integrity its bytes must have:
/// every acknowledged one, and every one `doc` lists (the oracle's integrity when the
/// oracle knows the version, else the packument's).
pub fn expected(
    package: &str,
    acked: &[Publish],
    unknown: &[Publish],
    doc: Option<&Value>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(versions) = doc.and_then(|d| d["versions"].as_object()) {
        for (v, meta) in versions {
            let i = meta["dist"]["integrity"].as_str().unwrap_or("").to_owned();
            out.insert(v.clone(), i);
        }
    }
    for p in unknown.iter().filter(|p| p.package == package) {
        if let Some(i) = out.get_mut(&p.version) {
            *i = p.integrity.clone();
        }
    }
    for p in acked.iter().filter(|p| p.package == package) {
        out.insert(p.version.clone(), p.integrity.clone());
    }
    out
}

/// Fetches every referenced tarball from every node in `nodes`; panics listing each
/// one that is missing or has other bytes.
pub async fn check(nodes: &[NodeClient], repo: &Repo, oracle: &Oracle) {
    let acked = oracle.acknowledged();
    let unknown = oracle.unknowns();
    let mut problems = Vec::new();
    let mut fetched = 0usize;
    for node in nodes {
        let mut wanted = Vec::new();
        for package in oracle.packages() {
            match super::packument(node, repo, &package).await {
                Ok(doc) => {
                    for (version, want) in expected(&package, &acked, &unknown, doc.as_ref()) {
                        wanted.push((package.clone(), version, want));
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        fetched += wanted.len();
        let results: Vec<Option<String>> = futures::stream::iter(wanted)
            .map(|(package, version, want)| async move {
                let what = format!("node {}: tarball {package}@{version}", node.node_id);
                let r = super::retrying(&what, || node.npm_tarball(repo, &package, &version)).await;
                match r {
                    Err(e) => Some(format!("{what}: {e}")),
                    Ok(r) if r.status != 200 => Some(format!("{what}: {}", r.describe())),
                    Ok(r) if integrity(&r.body) != want => Some(format!(
                        "{what}: other bytes ({} bytes, {}; expected {want})",
                        r.body.len(),
                        integrity(&r.body)
                    )),
                    Ok(_) => None,
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        problems.extend(results.into_iter().flatten());
    }
    assert!(
        fetched > 0,
        "blobs resolve: no tarball to fetch, the check would be vacuous"
    );
    super::report(
        &format!(
            "every referenced blob readable on nodes {:?} ({fetched} fetches)",
            nodes.iter().map(|n| n.node_id).collect::<Vec<_>>()
        ),
        &problems,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fetches_acknowledged_and_listed_versions() {
        let a = Publish::new("p", "1.0.0", b"a".to_vec(), 1);
        let u = Publish::new("p", "1.0.1", b"u".to_vec(), 1);
        let gone = Publish::new("p", "1.0.3", b"g".to_vec(), 1);
        let other = Publish::new("q", "9.9.9", b"q".to_vec(), 1);
        let doc = json!({"versions": {
            "1.0.1": {"dist": {"integrity": "sha512-served"}},
            "1.0.2": {"dist": {"integrity": "sha512-listed"}},
        }});
        let e = expected("p", &[a.clone(), other], &[u.clone(), gone], Some(&doc));
        let want: BTreeMap<String, String> = [
            ("1.0.0".to_owned(), a.integrity.clone()),
            ("1.0.1".to_owned(), u.integrity.clone()),
            ("1.0.2".to_owned(), "sha512-listed".to_owned()),
        ]
        .into();
        assert_eq!(e, want);
        // A 404 packument still fetches every acknowledged tarball.
        assert_eq!(expected("p", &[a], &[], None).len(), 1);
    }
}
