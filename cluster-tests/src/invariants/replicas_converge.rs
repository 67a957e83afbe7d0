//! Replicas converge: once the faults are healed and the load has stopped, every node
//! reaches the same applied index and serves the same `ListPackages` result and the same
//! packument for every package (after replacing each node's own address, which its
//! tarball URLs carry, by a placeholder).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::client::{NodeClient, Repo, npm_escape};
use crate::cluster::{Cluster, SETTLE_TIMEOUT};
use crate::poll;

/// `doc` with the node's own address (`http://ip:port` and `ip:port`) replaced by
/// `{node}`.
pub fn normalize(doc: &Value, base: &str) -> Value {
    let host = base
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let text = doc
        .to_string()
        .replace(base, "{node}")
        .replace(host, "{node}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("normalized JSON is invalid: {e}"))
}

/// Where `a` and `b` differ, as JSON paths with both values (at most `limit`).
pub fn diff(a: &Value, b: &Value, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    walk("", a, b, &mut out, limit);
    out
}

fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>, limit: usize) {
    if out.len() >= limit || a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                walk(&format!("{path}/{k}"), va, vb, out, limit);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                walk(&format!("{path}/{i}"), va, vb, out, limit);
            }
        }
        _ => out.push(format!(
            "{}: {} ≠ {}",
            if path.is_empty() { "/" } else { path },
            short(a),
            short(b)
        )),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

/// A package name from a `ListPackages` entry.
fn package_name(entry: &Value) -> String {
    let name = entry["package"].as_str().unwrap_or_default();
    match entry["namespace"].as_str() {
        Some(ns) => format!("@{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// What one node serves: its listing and its packuments, normalized.
async fn view(node: &NodeClient, repo: &Repo) -> Result<Value, String> {
    let listing = node.list_packages(repo).await?;
    let mut docs = BTreeMap::new();
    for entry in &listing {
        let name = package_name(entry);
        let r = node
            .npm_packument(repo, &name)
            .await
            .map_err(|e| format!("node {}: packument {name}: {e}", node.node_id))?;
        if r.status != 200 {
            return Err(format!(
                "node {}: packument {name}: {}",
                node.node_id,
                r.describe()
            ));
        }
        let doc: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("node {}: packument {name} is not JSON: {e}", node.node_id))?;
        docs.insert(npm_escape(&name), normalize(&doc, &node.base));
    }
    Ok(serde_json::json!({ "listPackages": listing, "packuments": docs }))
}

/// Waits until nodes `ids` have applied the same index and serve identical listings and
/// packuments for `repo`; panics with the differences after [`SETTLE_TIMEOUT`].
pub async fn check(cluster: &Cluster, ids: &[u64], repo: &Repo) {
    assert!(
        ids.len() >= 2,
        "replicas converge: needs two nodes, got {ids:?}"
    );
    let what = format!("replicas {ids:?} to converge");
    poll::until(&what, SETTLE_TIMEOUT, || async move {
        let index = cluster.wait_converged(ids, SETTLE_TIMEOUT).await;
        let mut views = Vec::new();
        for &id in ids {
            views.push((id, view(&cluster.client(id), repo).await?));
        }
        let (first, reference) = &views[0];
        if reference["listPackages"]
            .as_array()
            .is_none_or(|l| l.is_empty())
        {
            return Err(format!(
                "node {first} lists no packages: the check would be vacuous"
            ));
        }
        let mut differences = Vec::new();
        for (id, v) in &views[1..] {
            for d in diff(reference, v, 10) {
                differences.push(format!("node {first} vs node {id} at {d}"));
            }
        }
        if differences.is_empty() {
            Ok(index)
        } else {
            Err(format!(
                "at applied index {index}:\n  {}",
                differences.join("\n  ")
            ))
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalize_hides_the_nodes_own_address() {
        let a = json!({"dist": {"tarball": "http://127.0.0.11:4000/npm/d/r/p/-/p-1.0.0.tgz"}, "host": "127.0.0.11:4000"});
        let b = json!({"dist": {"tarball": "http://127.0.0.12:4100/npm/d/r/p/-/p-1.0.0.tgz"}, "host": "127.0.0.12:4100"});
        assert_ne!(a, b);
        assert_eq!(
            normalize(&a, "http://127.0.0.11:4000"),
            normalize(&b, "http://127.0.0.12:4100")
        );
    }

    #[test]
    fn diff_names_the_paths() {
        let a = json!({"versions": {"1.0.0": {"x": 1}, "1.0.1": {}}, "tags": [1, 2]});
        let b = json!({"versions": {"1.0.0": {"x": 2}}, "tags": [1, 3]});
        let d = diff(&a, &b, 10);
        assert_eq!(
            d,
            [
                "/tags/1: 2 ≠ 3",
                "/versions/1.0.0/x: 1 ≠ 2",
                "/versions/1.0.1: {} ≠ null",
            ]
        );
        assert!(diff(&a, &a, 10).is_empty());
        assert_eq!(diff(&a, &b, 1).len(), 1);
    }

    #[test]
    fn names_from_listings() {
        assert_eq!(package_name(&json!({"package": "p"})), "p");
        assert_eq!(
            package_name(&json!({"package": "p", "namespace": "s"})),
            "@s/p"
        );
    }
}
