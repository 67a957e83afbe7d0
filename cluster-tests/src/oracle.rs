//! The oracle: what the cluster promised. Every publish a client saw acknowledged (201)
//! is recorded with its bytes; so is every publish whose fate is unknown (a timeout, a
//! broken connection, a 503 — it may or may not have committed). The invariants then ask
//! any node for them: every acknowledged version must be there with the same bytes; an
//! unknown one may be absent, but if present, it must have our bytes too.
//!
//! Shared between the load tasks (`Clone` is a handle) and the checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::client::integrity;
use crate::seed::TestRng;

/// One published version: what the oracle knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The package (npm, unscoped).
    pub package: String,
    /// The version.
    pub version: String,
    /// `sha512-<base64>` of the tarball.
    pub integrity: String,
    /// The tarball.
    pub bytes: Arc<Vec<u8>>,
    /// The node the client sent it to.
    pub via: u64,
}

impl Publish {
    /// A publish of `bytes` as `package@version`, sent to node `via`.
    pub fn new(package: &str, version: &str, bytes: Vec<u8>, via: u64) -> Publish {
        Publish {
            package: package.to_owned(),
            version: version.to_owned(),
            integrity: integrity(&bytes),
            bytes: Arc::new(bytes),
            via,
        }
    }

    /// `package@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.package, self.version)
    }
}

#[derive(Debug, Default)]
struct Inner {
    acked: BTreeMap<(String, String), Publish>,
    unknown: BTreeMap<(String, String), Publish>,
    conflicts: Vec<String>,
}

/// The record of acknowledged (and unknown) publishes.
#[derive(Debug, Clone, Default)]
pub struct Oracle {
    inner: Arc<Mutex<Inner>>,
}

impl Oracle {
    /// An empty record.
    pub fn new() -> Oracle {
        Oracle::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A 201 for `p`. Two acknowledgements of one version with different bytes are a
    /// violation in themselves (the server let a version be overwritten).
    pub fn acked(&self, p: Publish) {
        let mut inner = self.lock();
        let key = (p.package.clone(), p.version.clone());
        inner.unknown.remove(&key);
        if let Some(prev) = inner.acked.get(&key)
            && prev.integrity != p.integrity
        {
            let msg = format!(
                "{} acknowledged twice with different bytes (via node {} then node {})",
                p.id(),
                prev.via,
                p.via
            );
            inner.conflicts.push(msg);
            return;
        }
        inner.acked.insert(key, p);
    }

    /// A publish whose outcome the client does not know.
    pub fn unknown(&self, p: Publish) {
        let mut inner = self.lock();
        let key = (p.package.clone(), p.version.clone());
        if !inner.acked.contains_key(&key) {
            inner.unknown.insert(key, p);
        }
    }

    /// Every acknowledged publish, by package then version.
    pub fn acknowledged(&self) -> Vec<Publish> {
        self.lock().acked.values().cloned().collect()
    }

    /// Every publish with an unknown outcome.
    pub fn unknowns(&self) -> Vec<Publish> {
        self.lock().unknown.values().cloned().collect()
    }

    /// How many publishes were acknowledged.
    pub fn len(&self) -> usize {
        self.lock().acked.len()
    }

    /// True before the first acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Packages with at least one acknowledged or unknown publish.
    pub fn packages(&self) -> BTreeSet<String> {
        let inner = self.lock();
        inner
            .acked
            .keys()
            .chain(inner.unknown.keys())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// One acknowledged publish, chosen with `rng` (for readers).
    pub fn pick(&self, rng: &mut TestRng) -> Option<Publish> {
        let inner = self.lock();
        if inner.acked.is_empty() {
            return None;
        }
        let i = rng.below(inner.acked.len() as u64) as usize;
        inner.acked.values().nth(i).cloned()
    }

    /// Violations the oracle saw while recording.
    pub fn conflicts(&self) -> Vec<String> {
        self.lock().conflicts.clone()
    }
}

/// Checks a tarball fetched for `p`: status 200 and the same bytes. `Err` says what is
/// wrong.
pub fn check_tarball(p: &Publish, status: u16, body: &[u8]) -> Result<(), String> {
    if status != 200 {
        return Err(format!("{}: tarball answered HTTP {status}", p.id()));
    }
    if body != p.bytes.as_slice() {
        return Err(format!(
            "{}: tarball has other bytes ({} bytes, {}; expected {} bytes, {})",
            p.id(),
            body.len(),
            integrity(body),
            p.bytes.len(),
            p.integrity
        ));
    }
    Ok(())
}

/// Checks a packument against the publishes of its package: every acknowledged version
/// is listed with our integrity; an unknown one, if listed, has our integrity. Returns
/// every problem found.
pub fn check_packument(acked: &[&Publish], unknown: &[&Publish], doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let integrity_of = |v: &str| doc["versions"][v]["dist"]["integrity"].as_str();
    for p in acked {
        match integrity_of(&p.version) {
            None => problems.push(format!("{}: acknowledged but not in the packument", p.id())),
            Some(i) if i != p.integrity => problems.push(format!(
                "{}: packument integrity {i}, acknowledged {}",
                p.id(),
                p.integrity
            )),
            Some(_) => {}
        }
    }
    for p in unknown {
        if let Some(i) = integrity_of(&p.version)
            && i != p.integrity
        {
            problems.push(format!(
                "{}: packument integrity {i}, but the only publish of it had {}",
                p.id(),
                p.integrity
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::Seed;
    use serde_json::json;

    fn publish(v: &str, bytes: &[u8]) -> Publish {
        Publish::new("pkg", v, bytes.to_vec(), 1)
    }

    #[test]
    fn records_acks_and_unknowns() {
        let o = Oracle::new();
        assert!(o.is_empty());
        o.unknown(publish("1.0.0", b"a"));
        o.acked(publish("1.0.1", b"b"));
        assert_eq!(o.len(), 1);
        assert_eq!(o.unknowns().len(), 1);
        // A later ack of an unknown publish promotes it.
        o.acked(publish("1.0.0", b"a"));
        assert_eq!(o.len(), 2);
        assert!(o.unknowns().is_empty());
        // An unknown after an ack changes nothing.
        o.unknown(publish("1.0.0", b"a"));
        assert!(o.unknowns().is_empty());
        assert_eq!(o.packages().into_iter().collect::<Vec<_>>(), ["pkg"]);
        assert!(o.conflicts().is_empty());
        let mut rng = Seed::new(1).rng("pick");
        assert_eq!(o.pick(&mut rng).unwrap().package, "pkg");
    }

    #[test]
    fn two_acks_with_different_bytes_are_a_conflict() {
        let o = Oracle::new();
        o.acked(publish("1.0.0", b"a"));
        o.acked(publish("1.0.0", b"a"));
        assert!(o.conflicts().is_empty());
        o.acked(publish("1.0.0", b"other"));
        assert_eq!(o.conflicts().len(), 1, "{:?}", o.conflicts());
        assert_eq!(o.acknowledged()[0].bytes.as_slice(), b"a");
    }

    #[test]
    fn tarball_check() {
        let p = publish("1.0.0", b"bytes");
        assert_eq!(check_tarball(&p, 200, b"bytes"), Ok(()));
        assert!(check_tarball(&p, 404, b"").unwrap_err().contains("404"));
        assert!(
            check_tarball(&p, 200, b"bytez")
                .unwrap_err()
                .contains("other bytes")
        );
    }

    #[test]
    fn packument_check() {
        let a = publish("1.0.0", b"a");
        let b = publish("1.0.1", b"b");
        let u = publish("1.0.2", b"u");
        let doc = |versions: Value| json!({ "name": "pkg", "versions": versions });
        let good = doc(json!({
            "1.0.0": {"dist": {"integrity": a.integrity}},
            "1.0.1": {"dist": {"integrity": b.integrity}},
        }));
        assert!(check_packument(&[&a, &b], &[&u], &good).is_empty());
        let missing = doc(json!({ "1.0.0": {"dist": {"integrity": a.integrity}} }));
        let problems = check_packument(&[&a, &b], &[], &missing);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("pkg@1.0.1"), "{problems:?}");
        let wrong = doc(json!({
            "1.0.0": {"dist": {"integrity": b.integrity}},
            "1.0.1": {"dist": {"integrity": b.integrity}},
            "1.0.2": {"dist": {"integrity": a.integrity}},
        }));
        assert_eq!(check_packument(&[&a, &b], &[&u], &wrong).len(), 2);
    }
}
