//! Clusters inside this test process: three nodes started with `granary_node::run_embedded`
//! on free loopback ports and temporary directories, every peer call going through one
//! seeded [`Faults`] (partition, isolate, drop, delay). Every random choice — which node is
//! cut off, which calls are dropped, how long delays are, where each publish goes — comes
//! from the seed printed at the start (`GRANARY_TEST_SEED` replays it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_node::faults::Faults;
use granary_node::{Config, Embedded};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::harness::{ACCESS_KEY, Client, SECRET_KEY, fake_tgz, npm_publish_body};

pub(crate) struct Member {
    pub(crate) http: String,
    pub(crate) grpc: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), granary_node::Error>>>,
    _dir: tempfile::TempDir,
}

/// A cluster in this process.
pub(crate) struct InprocCluster {
    pub(crate) faults: Arc<Faults>,
    pub(crate) members: Vec<Member>,
    pub(crate) rng: StdRng,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn seed() -> u64 {
    let seed = std::env::var("GRANARY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("in-process cluster: seed {seed} (replay with GRANARY_TEST_SEED={seed})");
    seed
}

/// Polls `probe` until it returns `Some`, at most `timeout`.
pub(crate) async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts one member of `base` (its id, join list and settings) on free ports in a
/// temporary directory, and waits until it is ready; the node's own error if it stops
/// first.
async fn start_member(base: &Config, faults: &Arc<Faults>) -> Result<Member, granary_node::Error> {
    let id = base.node_id;
    let dir = tempfile::tempdir().expect("tempdir");
    let http = format!("127.0.0.1:{}", free_port());
    let grpc = format!("127.0.0.1:{}", free_port());
    let config = Config {
        data_dir: dir.path().join("data"),
        http_addr: http.parse().expect("addr"),
        grpc_addr: grpc.parse().expect("addr"),
        public_url: None,
        ..base.clone()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let embedded = Embedded {
        faults: Some(faults.clone()),
        admin_key: Some((ACCESS_KEY.to_owned(), SECRET_KEY.to_owned())),
    };
    let mut task = tokio::spawn(granary_node::run_embedded(
        config,
        async move {
            let _ = stopped.await;
        },
        embedded,
    ));
    let ready = format!("http://{http}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if task.is_finished() {
            return match (&mut task).await.expect("node task") {
                Err(e) => Err(e),
                Ok(()) => panic!("node {id} stopped before it was ready"),
            };
        }
        if let Ok(r) = reqwest::get(&ready).await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for node {id} ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Member {
        http,
        grpc,
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    })
}

impl InprocCluster {
    /// `n` nodes with the default settings, each joining through the first.
    async fn start(n: u64) -> InprocCluster {
        let configs = (1..=n)
            .map(|id| Config {
                node_id: id,
                ..Config::default()
            })
            .collect();
        InprocCluster::start_with(configs, Faults::new, |_| {}).await
    }

    /// A node per config, in order, each with its settings; the first bootstraps the
    /// cluster and every other joins through the first (its `join` list is replaced).
    /// `shape` runs after each node is ready, with the members so far (to give their
    /// links latency, by their gRPC addresses): a node's own join request may go out
    /// before, and everything after it crosses the network as shaped.
    pub(crate) async fn start_with(
        configs: Vec<Config>,
        faults: impl FnOnce(u64) -> Faults,
        shape: impl Fn(&InprocCluster),
    ) -> InprocCluster {
        let seed = seed();
        let n = configs.len();
        let mut cluster = InprocCluster {
            faults: Arc::new(faults(seed)),
            members: Vec::new(),
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        };
        for base in configs {
            let id = base.node_id;
            let join: Vec<String> = cluster
                .members
                .first()
                .map(|m| m.grpc.clone())
                .into_iter()
                .collect();
            let base = Config { join, ..base };
            // A port found free can be taken by another test before the node binds it:
            // then start again on other ports.
            let mut attempt = 0;
            let member = loop {
                attempt += 1;
                match start_member(&base, &cluster.faults).await {
                    Ok(m) => break m,
                    Err(e @ granary_node::Error::Bind { .. }) if attempt < 3 => {
                        eprintln!("node {id}: {e}; trying other ports");
                    }
                    Err(e) => panic!("node {id} did not start: {e}"),
                }
            };
            cluster.members.push(member);
            shape(&cluster);
        }
        until("every node a voter", Duration::from_secs(60), || async {
            let s = cluster.status(1).await?;
            let voters = s["members"]
                .as_array()?
                .iter()
                .filter(|m| m["role"] == "voter")
                .count();
            (voters == n).then_some(())
        })
        .await;
        cluster
    }

    pub(crate) fn client(&self, id: u64) -> Client {
        Client {
            base: format!("http://{}", self.members[id as usize - 1].http),
        }
    }

    pub(crate) fn grpc(&self, id: u64) -> &str {
        &self.members[id as usize - 1].grpc
    }

    pub(crate) fn ids(&self) -> Vec<u64> {
        (1..=self.members.len() as u64).collect()
    }

    pub(crate) async fn status(&self, id: u64) -> Option<Value> {
        let r = self
            .client(id)
            .api("GET", "/admin/v1/cluster/status", None)
            .await;
        (r.status == 200).then(|| r.json())
    }

    /// The leader as `among` agree on it.
    pub(crate) async fn leader(&self, among: &[u64]) -> u64 {
        until("a leader", Duration::from_secs(30), || async {
            let mut seen = None;
            for id in among {
                let l = self.status(*id).await?["leaderId"].as_u64()?;
                if seen.is_some_and(|s| s != l) {
                    return None;
                }
                seen = Some(l);
            }
            seen.filter(|l| among.contains(l))
        })
        .await
    }

    pub(crate) async fn stop(mut self) {
        for m in &mut self.members {
            if let Some(s) = m.stop.take() {
                let _ = s.send(());
            }
        }
        for m in &mut self.members {
            if let Some(t) = m.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
            }
        }
    }
}

/// Publishes one version through `via`; `Ok` once acknowledged, `Err` with what the node
/// said otherwise.
pub(crate) async fn publish(c: &Client, token: &str, name: &str, tgz: &[u8]) -> Result<(), String> {
    publish_in(c, token, "inproc", name, tgz).await
}

/// [`publish`] to the repository `repo` of `domain`.
pub(crate) async fn publish_in(
    c: &Client,
    token: &str,
    domain: &str,
    name: &str,
    tgz: &[u8],
) -> Result<(), String> {
    publish_version(c, token, domain, name, "1.0.0", tgz).await
}

/// [`publish_in`] of `version`.
pub(crate) async fn publish_version(
    c: &Client,
    token: &str,
    domain: &str,
    name: &str,
    version: &str,
    tgz: &[u8],
) -> Result<(), String> {
    let body = npm_publish_body(name, version, tgz, json!({}));
    let r = c.npm_put(token, domain, "repo", name, &body).await;
    match r.status {
        201 => Ok(()),
        503 => Err(format!("retryable: {}", r.text())),
        other => panic!(
            "publish {name}@{version}: unexpected HTTP {other}: {}",
            r.text()
        ),
    }
}

/// Publishes `name` (random bytes) through one of `via`, chosen by the seed, again until
/// acknowledged, for at most `timeout`; returns the bytes.
pub(crate) async fn publish_until_acknowledged(
    cluster: &mut InprocCluster,
    via: &[u64],
    token: &str,
    name: &str,
    timeout: Duration,
) -> Vec<u8> {
    let via = via[cluster.rng.random_range(0..via.len())];
    let tgz = fake_tgz(cluster.rng.random(), 4096);
    let c = cluster.client(via);
    until(&format!("{name} acknowledged"), timeout, || {
        let (c, token, name, tgz) = (c.clone(), token.to_owned(), name.to_owned(), tgz.clone());
        async move { publish(&c, &token, &name, &tgz).await.ok() }
    })
    .await;
    tgz
}

/// A GET of `path` with the token.
pub(crate) async fn get(c: &Client, token: &str, path: &str) -> crate::harness::Resp {
    c.raw(
        "GET",
        path,
        &[("authorization", format!("Bearer {token}"))],
        vec![],
    )
    .await
}

pub(crate) async fn tarball(c: &Client, token: &str, name: &str) -> (u16, Vec<u8>) {
    let r = get(
        c,
        token,
        &format!("/npm/inproc/repo/{name}/-/{name}-1.0.0.tgz"),
    )
    .await;
    (r.status, r.body)
}

/// Every acknowledged publish is readable, bytes identical, from every node in `ids`.
pub(crate) async fn all_readable(
    cluster: &InprocCluster,
    ids: &[u64],
    token: &str,
    acked: &[(String, Vec<u8>)],
) {
    for id in ids {
        let c = cluster.client(*id);
        for (name, tgz) in acked {
            let got = until(
                &format!("{name} on node {id}"),
                Duration::from_secs(30),
                || {
                    let c = c.clone();
                    async move {
                        let (status, body) = tarball(&c, token, name).await;
                        (status == 200).then_some(body)
                    }
                },
            )
            .await;
            assert_eq!(&got, tgz, "{name} on node {id}");
        }
    }
}

/// The leader is cut off from both followers: they elect a new leader and keep taking
/// publishes; the isolated node serves no metadata (its lease has run out and it cannot
/// confirm a read index) and takes no write; after healing it converges and serves every
/// acknowledged publish. Before the fault, reads are confirmed by the leader's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolating_the_leader_in_process() {
    let mut cluster = InprocCluster::start(3).await;
    let token = cluster.client(1).setup("inproc", "repo").await;
    let old = cluster.leader(&cluster.ids()).await;
    let mut acked = Vec::new();
    let tgz = fake_tgz(cluster.rng.random(), 4096);
    publish(&cluster.client(old), &token, "before", &tgz)
        .await
        .expect("publish before the fault");
    // Reads through any node confirm the leader's read index by its lease, without a
    // heartbeat round, while a quorum acknowledges it.
    let by_lease = "by=\"lease\"";
    let before = counter(&cluster, "granary_leader_read_index_total", by_lease).await;
    for id in cluster.ids() {
        let (status, body) = tarball(&cluster.client(id), &token, "before").await;
        assert_eq!((status, body), (200, tgz.clone()), "read through node {id}");
    }
    assert!(
        counter(&cluster, "granary_leader_read_index_total", by_lease).await >= before + 3,
        "every read was confirmed by the leader's lease"
    );
    acked.push(("before".to_owned(), tgz));

    // Cut off, the old leader's lease runs out before the others can elect a new leader
    // (they refuse votes for election_timeout_max after its last AppendEntries): below,
    // once the new leader has acknowledged writes, the old one answers no read.
    cluster.faults.isolate(cluster.grpc(old));
    let rest: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != old).collect();
    let new = cluster.leader(&rest).await;
    assert_ne!(new, old);
    for i in 0..5 {
        let name = format!("during-{i}");
        let tgz =
            publish_until_acknowledged(&mut cluster, &rest, &token, &name, Duration::from_secs(30))
                .await;
        acked.push((name, tgz));
    }
    // The isolated node: no stale read, no write.
    let isolated = cluster.client(old);
    let (status, _) = tarball(&isolated, &token, "during-0").await;
    assert_eq!(
        status, 503,
        "an isolated node serves no metadata it cannot confirm"
    );
    let refused = publish(&isolated, &token, "isolated", &fake_tgz(1, 4096)).await;
    assert!(refused.is_err(), "an isolated node acknowledges no write");

    cluster.faults.heal();
    all_readable(&cluster, &cluster.ids(), &token, &acked).await;
    cluster.stop().await;
}

/// Publishes through random nodes while a seeded tenth of all peer calls fail and every
/// call is delayed by 1–20 ms: every acknowledged publish is readable from every node,
/// bytes identical, once the faults are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_survive_dropped_and_delayed_peer_calls() {
    let mut cluster = InprocCluster::start(3).await;
    let token = cluster.client(1).setup("inproc", "repo").await;
    cluster.faults.drop_rate(0.1);
    cluster
        .faults
        .delay(Duration::from_millis(1), Duration::from_millis(20));
    let mut acked = Vec::new();
    let mut retryable = 0;
    for i in 0..20 {
        let via = cluster.rng.random_range(1..=3);
        let name = format!("lossy-{i}");
        let tgz = fake_tgz(cluster.rng.random(), 8192);
        match publish(&cluster.client(via), &token, &name, &tgz).await {
            Ok(()) => acked.push((name, tgz)),
            Err(_) => retryable += 1,
        }
    }
    eprintln!(
        "{} acknowledged, {retryable} refused as retryable",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "some publishes get through a lossy network"
    );
    cluster.faults.heal();
    all_readable(&cluster, &cluster.ids(), &token, &acked).await;
    cluster.stop().await;
}

/// Makes every member refuse the HTTP/1.1 peer routes, as members from before them do.
fn lack_http1_routes(cluster: &InprocCluster) {
    for route in ["PushBlob", "Propose", "ReadIndex", "AppendEntries", "Vote"] {
        cluster
            .faults
            .unimplemented(&format!("/granary.v1.PeerHttp/{route}"));
    }
}

/// Members that predate both the HTTP/1.1 push and the one-message gRPC push of small
/// blobs refuse the first and answer the second UNIMPLEMENTED, as they would during a
/// rolling upgrade: the sender streams the blob instead, so every publish is acknowledged
/// and readable from every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_blobs_are_streamed_to_members_that_predate_the_one_message_push() {
    let mut cluster = InprocCluster::start(3).await;
    let token = cluster.client(1).setup("inproc", "repo").await;
    lack_http1_routes(&cluster);
    cluster
        .faults
        .unimplemented("/granary.v1.Cluster/PushSmallBlob");
    let mut acked = Vec::new();
    for i in 0..6u64 {
        let name = format!("older-peer-{i}");
        let tgz = fake_tgz(cluster.rng.random(), 8192);
        publish(&cluster.client(i % 3 + 1), &token, &name, &tgz)
            .await
            .unwrap_or_else(|e| panic!("publish {name} through an older peer: {e}"));
        acked.push((name, tgz));
    }
    assert!(
        cluster.faults.unimplemented_answers() >= 6,
        "the one-message push was tried first: {} answers",
        cluster.faults.unimplemented_answers()
    );
    all_readable(&cluster, &cluster.ids(), &token, &acked).await;
    cluster.stop().await;
}

/// A counter summed over every member's `/metrics`: `name{labels}`.
pub(crate) async fn counter(cluster: &InprocCluster, name: &str, labels: &str) -> u64 {
    let series = format!("{name}{{{labels}}}");
    let mut total = 0;
    for id in cluster.ids() {
        total += metric(cluster, id, &series).await;
    }
    total
}

/// One node's value of a counter or gauge (`name{labels}`, or `name` alone); 0 if absent.
pub(crate) async fn metric(cluster: &InprocCluster, id: u64, series: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", cluster.client(id).base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |n| n.parse().expect("a number"))
}

async fn pushes(cluster: &InprocCluster, transport: &str) -> u64 {
    let labels = format!("transport=\"{transport}\"");
    counter(cluster, "granary_peer_blob_pushes_total", &labels).await
}

async fn calls(cluster: &InprocCluster, call: &str, transport: &str) -> u64 {
    let labels = format!("call=\"{call}\",transport=\"{transport}\"");
    counter(cluster, "granary_peer_calls_total", &labels).await
}

/// The peer calls a publish makes (blob pushes, forwarded proposals, read index rounds,
/// AppendEntries) go over HTTP/1.1. Members that predate those routes do not speak
/// HTTP/1.1 on the peer port: calls to them fail before reaching them and go through gRPC
/// instead, and later calls to them take gRPC at once. Every publish is acknowledged and
/// readable from every node either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_calls_go_over_http1_and_through_grpc_to_members_that_predate_it() {
    let mut cluster = InprocCluster::start(3).await;
    let token = cluster.client(1).setup("inproc", "repo").await;
    let mut acked = Vec::new();
    let mut publish_round = async |cluster: &mut InprocCluster, prefix: &str| {
        for i in 0..3u64 {
            let name = format!("{prefix}-{i}");
            let tgz = fake_tgz(cluster.rng.random(), 8192);
            publish(&cluster.client(i % 3 + 1), &token, &name, &tgz)
                .await
                .unwrap_or_else(|e| panic!("publish {name}: {e}"));
            acked.push((name, tgz));
        }
    };
    publish_round(&mut cluster, "http1").await;
    // Each publish goes to both other members; one copy may still be on its way.
    until(
        "the pushes of three publishes",
        Duration::from_secs(10),
        || async { (pushes(&cluster, "http1").await >= 6).then_some(()) },
    )
    .await;
    for call in ["propose", "read_index", "append_entries"] {
        assert!(
            calls(&cluster, call, "http1").await > 0,
            "{call} over HTTP/1.1"
        );
    }
    assert_eq!(pushes(&cluster, "grpc").await, 0, "no push took gRPC");
    for call in ["propose", "read_index", "append_entries", "vote"] {
        assert_eq!(
            calls(&cluster, call, "grpc").await,
            0,
            "no {call} took gRPC"
        );
    }

    lack_http1_routes(&cluster);
    publish_round(&mut cluster, "older").await;
    until("pushes through gRPC", Duration::from_secs(10), || async {
        (pushes(&cluster, "grpc").await >= 6).then_some(())
    })
    .await;
    assert!(calls(&cluster, "append_entries", "grpc").await > 0);
    assert!(calls(&cluster, "propose", "grpc").await > 0);
    // Each member remembered which peers take only gRPC: more publishes try HTTP/1.1 no
    // more.
    let refusals = cluster.faults.unimplemented_answers();
    assert!(refusals > 0, "HTTP/1.1 was tried first");
    publish_round(&mut cluster, "older-again").await;
    assert_eq!(
        cluster.faults.unimplemented_answers(),
        refusals,
        "no HTTP/1.1 attempt once a peer answered only through gRPC"
    );
    all_readable(&cluster, &cluster.ids(), &token, &acked).await;
    cluster.stop().await;
}

/// A repository made through the leader takes publishes at once through a follower that
/// has not applied it yet. Every peer call is delayed, so a follower learns that an entry
/// committed only with the leader's next message, after the client already has its
/// answer. A write does not wait for a read index before it starts, so one that finds its
/// repository missing catches up with the leader and looks again: never a 404 for a
/// repository whose creation was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_through_a_lagging_follower_sees_what_was_just_created() {
    let mut cluster = InprocCluster::start(3).await;
    let leader = cluster.leader(&cluster.ids()).await;
    let followers: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    cluster
        .faults
        .delay(Duration::from_millis(20), Duration::from_millis(50));
    for round in 0..8 {
        let via = followers[cluster.rng.random_range(0..followers.len())];
        let domain = format!("lag{round}");
        let token = cluster.client(leader).setup(&domain, "repo").await;
        let tgz = fake_tgz(cluster.rng.random(), 4096);
        publish_in(&cluster.client(via), &token, &domain, "fresh", &tgz)
            .await
            .unwrap_or_else(|e| panic!("publish through node {via} right after setup: {e}"));
    }
    cluster.faults.heal();
    cluster.stop().await;
}

/// Three members with `inproc/repo` set up through the leader, then every peer call
/// delayed 20-60 ms, so the followers apply each entry well after the leader: the
/// cluster, the leader, the followers and a token.
async fn lagging_followers() -> (InprocCluster, u64, Vec<u64>, String) {
    let cluster = InprocCluster::start(3).await;
    let leader = cluster.leader(&cluster.ids()).await;
    let followers = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    let token = cluster.client(leader).setup("inproc", "repo").await;
    cluster
        .faults
        .delay(Duration::from_millis(20), Duration::from_millis(60));
    (cluster, leader, followers, token)
}

/// A publish through a follower is acknowledged once the leader has applied it, before
/// the follower has (it learns of the commit from the next AppendEntries, delayed here);
/// a read through that follower right after still sees it, bytes and document, because
/// every read first catches up with the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_through_a_follower_is_read_back_from_it_at_once() {
    let (mut cluster, _, followers, token) = lagging_followers().await;
    for round in 0..6 {
        let via = followers[round % followers.len()];
        let c = cluster.client(via);
        let name = format!("rb{round}");
        let tgz = fake_tgz(cluster.rng.random(), 4096);
        publish(&c, &token, &name, &tgz)
            .await
            .unwrap_or_else(|e| panic!("publish {name} through node {via}: {e}"));
        let (status, body) = tarball(&c, &token, &name).await;
        assert_eq!(status, 200, "{name} read back through node {via}");
        assert_eq!(body, tgz, "{name} read back through node {via}");
        let doc = get(&c, &token, &format!("/npm/inproc/repo/{name}")).await;
        assert_eq!(doc.status, 200, "{name}'s document through node {via}");
        assert!(doc.text().contains("\"1.0.0\""), "{name}: {}", doc.text());
    }
    cluster.faults.heal();
    cluster.stop().await;
}

/// A publish checks the package against the receiving node's state without waiting for
/// the request to catch up with the leader (so the tarball is stored meanwhile), and
/// again, caught up, before it proposes the version. Through a follower that lags (peer
/// calls delayed), a publish right after another node's is decided on what that one
/// published: a second `1.0.0` is refused, and a version sent with `--tag beta` gets only
/// that tag, not `latest` as the package's first version would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_through_a_lagging_follower_is_decided_on_what_was_just_published() {
    let (mut cluster, leader, followers, token) = lagging_followers().await;
    for round in 0..6 {
        let name = format!("race{round}");
        let (via, other) = (followers[round % 2], followers[(round + 1) % 2]);
        let tgz = fake_tgz(cluster.rng.random(), 4096);
        publish(&cluster.client(leader), &token, &name, &tgz)
            .await
            .unwrap_or_else(|e| panic!("publish {name} 1.0.0 through the leader: {e}"));

        let beta = "2.0.0-beta.1";
        let mut body = npm_publish_body(&name, beta, &tgz, json!({}));
        body["dist-tags"] = json!({ "beta": beta });
        let r = cluster
            .client(via)
            .npm_put(&token, "inproc", "repo", &name, &body)
            .await;
        assert_eq!(
            r.status,
            201,
            "{name}@{beta} through node {via}: {}",
            r.text()
        );

        let again = npm_publish_body(
            &name,
            "1.0.0",
            &fake_tgz(cluster.rng.random(), 4096),
            json!({}),
        );
        let r = cluster
            .client(other)
            .npm_put(&token, "inproc", "repo", &name, &again)
            .await;
        assert_eq!(
            r.status,
            403,
            "{name}@1.0.0 again through node {other}: {}",
            r.text()
        );
        assert!(r.text().contains("cannot publish over"), "{}", r.text());

        let doc = get(
            &cluster.client(leader),
            &token,
            &format!("/npm/inproc/repo/{name}"),
        )
        .await;
        assert_eq!(doc.status, 200, "{name}'s document");
        let doc: serde_json::Value = serde_json::from_slice(&doc.body).expect("a JSON packument");
        assert_eq!(
            doc["dist-tags"],
            json!({ "latest": "1.0.0", "beta": beta }),
            "{name}'s tags after 1.0.0 through the leader, then {beta} --tag beta through node {via}"
        );
        let (status, body) = tarball(&cluster.client(via), &token, &name).await;
        assert_eq!(
            (status, body == tgz),
            (200, true),
            "{name}@1.0.0 is the first upload"
        );
    }
    cluster.faults.heal();
    cluster.stop().await;
}

/// A node that lacks a blob its metadata names (it was cut off when the package was
/// published) fetches it from a peer once, however many requests ask for it at the same
/// moment: its background pull and every request share one pull, and every request gets
/// the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_a_missing_blob_share_one_pull() {
    let mut cluster = InprocCluster::start(3).await;
    let token = cluster.client(1).setup("inproc", "repo").await;
    let leader = cluster.leader(&cluster.ids()).await;
    let lagging = cluster
        .ids()
        .into_iter()
        .find(|i| *i != leader)
        .expect("a follower");
    cluster.faults.isolate(cluster.grpc(lagging));
    let tgz = fake_tgz(cluster.rng.random(), 2 << 20);
    publish(&cluster.client(leader), &token, "missing-here", &tgz)
        .await
        .expect("publish while a follower is cut off");
    let pulls_before = counter(
        &cluster,
        "granary_peer_blob_pulls_total",
        "transport=\"grpc\"",
    )
    .await;

    // Every peer call takes a while from now on, so the pull is still running when the
    // requests, released together once the entry is applied there, look for the blob.
    cluster.faults.heal();
    cluster
        .faults
        .delay(Duration::from_millis(40), Duration::from_millis(40));
    let c = cluster.client(lagging);
    let gets = (0..40).map(|_| {
        let (c, token) = (c.clone(), token.clone());
        async move { tarball(&c, &token, "missing-here").await }
    });
    for (status, body) in futures::future::join_all(gets).await {
        assert_eq!(status, 200, "a request on the node that lacked the blob");
        assert!(body == tgz, "the bytes the package was published with");
    }
    cluster.faults.heal();
    assert_eq!(
        counter(
            &cluster,
            "granary_peer_blob_pulls_total",
            "transport=\"grpc\""
        )
        .await
            - pulls_before,
        1,
        "one pull for the background fetch and 40 requests"
    );
    cluster.stop().await;
}

/// Members of the release before batch entries (played by a test fault: they answer
/// without the bit and fail every AppendEntries carrying a batch) get none, so a burst of
/// publishes through the leader, which would otherwise share entries, is acknowledged and
/// readable from every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_of_the_release_before_batch_entries_get_none() {
    let mut cluster = InprocCluster::start(3).await;
    let leader = cluster.leader(&cluster.ids()).await;
    let token = cluster.client(leader).setup("inproc", "repo").await;
    cluster
        .faults
        .unimplemented(granary_node::raft::batch::PREDATES_BATCHES);
    let packages: Vec<(String, Vec<u8>)> = (0..24)
        .map(|i| (format!("burst-{i}"), fake_tgz(cluster.rng.random(), 4096)))
        .collect();
    let client = cluster.client(leader);
    let results = futures::future::join_all(
        packages
            .iter()
            .map(|(name, tgz)| publish(&client, &token, name, tgz)),
    )
    .await;
    for ((name, _), r) in packages.iter().zip(&results) {
        if let Err(e) = r {
            panic!("publish {name} through the leader: {e}");
        }
    }
    all_readable(&cluster, &cluster.ids(), &token, &packages).await;
    cluster.stop().await;
}
