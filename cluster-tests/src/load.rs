//! Client load that runs while a test breaks things: publishers (npm publish of fresh
//! versions) and readers (what `npm install` does: the packument, then the tarball), each
//! worker sending its requests to the cluster's nodes in turn.
//!
//! Every request ends in one [`Kind`], counted in a [`Tally`]. Publishers feed the
//! [`Oracle`]: a 201 is acknowledged; anything else may or may not have committed, so it
//! is recorded as unknown, and the version is never tried again (a retry of an ambiguous
//! publish could meet its own earlier success). Readers only ask for acknowledged
//! versions, so a 404, a packument without the version or other bytes is [`Kind::Stale`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{NodeClient, Repo, Resp, TransportError, fake_tgz};
use crate::oracle::{Oracle, Publish, check_packument, check_tarball};
use crate::seed::TestRng;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// 200/201.
    Ok,
    /// 503 with `Retry-After`: the contract's answer when a node cannot serve right now.
    Unavailable,
    /// Connection refused: the node is down.
    Refused,
    /// The connection broke before a response.
    Closed,
    /// No response in time.
    Timeout,
    /// Any other 5xx (including a 503 without `Retry-After`).
    ServerError,
    /// A 4xx.
    ClientError,
    /// A read that missed an acknowledged write, or returned other bytes.
    Stale,
}

impl Kind {
    /// What a client may retry per the contract: 503 with `Retry-After`, a refused
    /// connection (the node is down) and a connection closed under it (the node is
    /// going down; npm retries ECONNRESET).
    pub const RETRYABLE: &'static [Kind] = &[Kind::Unavailable, Kind::Refused, Kind::Closed];

    /// The kind of an HTTP response.
    pub fn of_response(r: &Resp) -> Kind {
        match r.status {
            200 | 201 => Kind::Ok,
            503 if r.headers.contains_key("retry-after") => Kind::Unavailable,
            500..=599 => Kind::ServerError,
            _ => Kind::ClientError,
        }
    }

    /// The kind of a transport failure.
    pub fn of_transport(e: &TransportError) -> Kind {
        match e {
            TransportError::Refused(_) => Kind::Refused,
            TransportError::Closed(_) => Kind::Closed,
            TransportError::Timeout(_) => Kind::Timeout,
        }
    }
}

/// Counts of outcomes, with a sample of what went wrong.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    counts: BTreeMap<Kind, u64>,
    samples: BTreeMap<Kind, Vec<String>>,
}

const SAMPLES_PER_KIND: usize = 10;

impl Tally {
    /// Counts one outcome; `detail` is kept for the first few of each non-`Ok` kind.
    pub fn add(&mut self, kind: Kind, detail: impl FnOnce() -> String) {
        *self.counts.entry(kind).or_default() += 1;
        if kind != Kind::Ok {
            let s = self.samples.entry(kind).or_default();
            if s.len() < SAMPLES_PER_KIND {
                s.push(detail());
            }
        }
    }

    /// How many requests ended as `kind`.
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// Every outcome not in `allowed`, as failure-message lines (empty if none).
    pub fn unexpected(&self, allowed: &[Kind]) -> Vec<String> {
        self.counts
            .iter()
            .filter(|(k, _)| **k != Kind::Ok && !allowed.contains(k))
            .map(|(k, n)| {
                let samples = self.samples.get(k).cloned().unwrap_or_default();
                format!("{n} × {k:?}, e.g. {samples:#?}")
            })
            .collect()
    }

    /// Panics, naming `what` and the counts, if any outcome is not `Ok` or in `allowed`.
    pub fn assert_only(&self, what: &str, allowed: &[Kind]) {
        let bad = self.unexpected(allowed);
        assert!(
            bad.is_empty(),
            "{what}: outcomes other than Ok and {allowed:?}:\n{}\nall counts: {:?}",
            bad.join("\n"),
            self.counts
        );
    }

    /// Adds another tally's counts to this one.
    pub fn merge(&mut self, other: &Tally) {
        for (k, n) in &other.counts {
            *self.counts.entry(*k).or_default() += n;
        }
        for (k, v) in &other.samples {
            let s = self.samples.entry(*k).or_default();
            s.extend(
                v.iter()
                    .take(SAMPLES_PER_KIND.saturating_sub(s.len()))
                    .cloned(),
            );
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.counts)
    }
}

/// Background workers; stop them with [`Load::stop`].
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tally: Arc<Mutex<Tally>>,
    targets: Arc<Mutex<Vec<NodeClient>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Load {
    fn new(targets: Vec<NodeClient>) -> Load {
        assert!(!targets.is_empty(), "load with no nodes to send to");
        Load {
            stop: Arc::default(),
            tasks: Vec::new(),
            tally: Arc::default(),
            targets: Arc::new(Mutex::new(targets)),
        }
    }

    /// `workers` publishers, each of its own package (`load-<w>`) with versions `1.0.<i>`,
    /// sending publish `i` to target `(w + i) mod n`.
    pub fn publishers(
        targets: Vec<NodeClient>,
        repo: &Repo,
        oracle: &Oracle,
        rng: &TestRng,
        workers: usize,
    ) -> Load {
        Load::publishers_of("load", targets, repo, oracle, rng, workers)
    }

    /// [`Load::publishers`] of packages `<prefix>-<w>`: a later load in the same
    /// repository does not meet an earlier one's versions.
    pub fn publishers_of(
        prefix: &str,
        targets: Vec<NodeClient>,
        repo: &Repo,
        oracle: &Oracle,
        rng: &TestRng,
        workers: usize,
    ) -> Load {
        let mut load = Load::new(targets);
        // One stream per worker, in worker order.
        let mut base = rng.clone();
        for w in 0..workers {
            let (stop, tally, targets) =
                (load.stop.clone(), load.tally.clone(), load.targets.clone());
            let (repo, oracle) = (repo.clone(), oracle.clone());
            let mut rng = base.fork();
            let package = format!("{prefix}-{w}");
            load.tasks.push(tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let target = {
                        let t = lock(&targets);
                        t[(w + i) % t.len()].clone()
                    };
                    let version = format!("1.0.{i}");
                    i += 1;
                    let len = if rng.percent(10) {
                        rng.range(32 << 10, 128 << 10)
                    } else {
                        rng.range(512, 8 << 10)
                    } as usize;
                    let tgz = fake_tgz(&rng.bytes(len));
                    let publish = Publish::new(&package, &version, tgz, target.node_id);
                    let r = target
                        .npm_publish(&repo, &package, &version, &publish.bytes)
                        .await;
                    let kind = match &r {
                        Ok(resp) => Kind::of_response(resp),
                        Err(e) => Kind::of_transport(e),
                    };
                    let detail = || match &r {
                        Ok(resp) => format!(
                            "publish {} via node {}: {}",
                            publish.id(),
                            target.node_id,
                            resp.describe()
                        ),
                        Err(e) => {
                            format!("publish {} via node {}: {e}", publish.id(), target.node_id)
                        }
                    };
                    lock(&tally).add(kind, detail);
                    if kind == Kind::Ok {
                        oracle.acked(publish);
                    } else {
                        oracle.unknown(publish);
                        // Client pacing, as npm backs off: not a wait on a condition.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
        load
    }

    /// `workers` readers: each picks an acknowledged version, asks a node for its
    /// packument and then its tarball.
    pub fn readers(
        targets: Vec<NodeClient>,
        repo: &Repo,
        oracle: &Oracle,
        rng: &TestRng,
        workers: usize,
    ) -> Load {
        let mut load = Load::new(targets);
        // One stream per worker, in worker order.
        let mut base = rng.clone();
        for _ in 0..workers {
            let (stop, tally, targets) =
                (load.stop.clone(), load.tally.clone(), load.targets.clone());
            let (repo, oracle) = (repo.clone(), oracle.clone());
            let mut rng = base.fork();
            load.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Some(p) = oracle.pick(&mut rng) else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let target = {
                        let t = lock(&targets);
                        t[rng.below(t.len() as u64) as usize].clone()
                    };
                    let (kind, detail) = read_once(&target, &repo, &p).await;
                    lock(&tally).add(kind, || detail);
                    if kind != Kind::Ok {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
        load
    }

    /// Sends the following requests to `targets` instead.
    pub fn set_targets(&self, targets: Vec<NodeClient>) {
        assert!(!targets.is_empty(), "load with no nodes to send to");
        *lock(&self.targets) = targets;
    }

    /// The outcomes so far.
    pub fn tally(&self) -> Tally {
        lock(&self.tally).clone()
    }

    /// Stops the workers (each finishes its request in flight) and returns the outcomes.
    pub async fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            if let Err(e) = t.await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        self.tally()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One install-like read of an acknowledged publish `p` from `node`.
pub async fn read_once(node: &NodeClient, repo: &Repo, p: &Publish) -> (Kind, String) {
    let at = |what: &str| format!("{what} {} from node {}", p.id(), node.node_id);
    let doc = match node.npm_packument(repo, &p.package).await {
        Err(e) => return (Kind::of_transport(&e), format!("{}: {e}", at("packument"))),
        Ok(r) if r.status == 404 => {
            return (
                Kind::Stale,
                format!("{}: 404, the package is missing", at("packument")),
            );
        }
        Ok(r) if Kind::of_response(&r) != Kind::Ok => {
            return (
                Kind::of_response(&r),
                format!("{}: {}", at("packument"), r.describe()),
            );
        }
        Ok(r) => match serde_json::from_slice::<serde_json::Value>(&r.body) {
            Ok(doc) => doc,
            Err(e) => {
                return (
                    Kind::ServerError,
                    format!("{}: not JSON: {e}", at("packument")),
                );
            }
        },
    };
    let problems = check_packument(&[p], &[], &doc);
    if !problems.is_empty() {
        return (Kind::Stale, format!("{}: {problems:?}", at("packument")));
    }
    match node.npm_tarball(repo, &p.package, &p.version).await {
        Err(e) => (Kind::of_transport(&e), format!("{}: {e}", at("tarball"))),
        Ok(r) if r.status == 200 || r.status == 404 => match check_tarball(p, r.status, &r.body) {
            Ok(()) => (Kind::Ok, String::new()),
            Err(why) => (Kind::Stale, format!("{}: {why}", at("tarball"))),
        },
        Ok(r) => (
            Kind::of_response(&r),
            format!("{}: {}", at("tarball"), r.describe()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, retry_after: bool) -> Resp {
        let mut headers = reqwest::header::HeaderMap::new();
        if retry_after {
            headers.insert("retry-after", "1".parse().unwrap());
        }
        Resp {
            status,
            headers,
            body: vec![],
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(Kind::of_response(&resp(201, false)), Kind::Ok);
        assert_eq!(Kind::of_response(&resp(503, true)), Kind::Unavailable);
        assert_eq!(Kind::of_response(&resp(503, false)), Kind::ServerError);
        assert_eq!(Kind::of_response(&resp(500, true)), Kind::ServerError);
        assert_eq!(Kind::of_response(&resp(409, false)), Kind::ClientError);
        assert_eq!(
            Kind::of_transport(&TransportError::Refused(String::new())),
            Kind::Refused
        );
    }

    #[test]
    fn tally_reports_only_what_is_not_allowed() {
        let mut t = Tally::default();
        t.add(Kind::Ok, String::new);
        t.add(Kind::Refused, || "node 2 down".to_owned());
        t.add(Kind::Unavailable, || "503".to_owned());
        assert!(t.unexpected(Kind::RETRYABLE).is_empty());
        t.assert_only("ok", Kind::RETRYABLE);
        t.add(Kind::ClientError, || {
            "HTTP 409 on a fresh version".to_owned()
        });
        let bad = t.unexpected(Kind::RETRYABLE);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].contains("409"), "{bad:?}");
        let mut all = Tally::default();
        all.merge(&t);
        all.merge(&t);
        assert_eq!(all.count(Kind::Refused), 2);
        assert_eq!(all.count(Kind::Ok), 2);
    }

    #[test]
    #[should_panic(expected = "outcomes other than Ok")]
    fn tally_assert_panics_on_other_errors() {
        let mut t = Tally::default();
        t.add(Kind::Timeout, || "20 s".to_owned());
        t.assert_only("rolling restart", Kind::RETRYABLE);
    }
}
