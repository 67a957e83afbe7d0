//! A cluster of real `granary` processes on one machine, and the conditions tests wait on.
//!
//! ```text
//!   Cluster::start(seed, 3)
//!     node 1  127.0.S.11  bootstraps a one-voter cluster ── ready
//!     node 2  127.0.S.12  --join node1.grpc ─┐ learner → voter (the node promotes it)
//!     node 3  127.0.S.13  --join node1.grpc ─┘
//!     wait: every node lists voters {1,2,3}, knows one leader, same applied index
//! ```
//!
//! Node `i` binds HTTP and gRPC on `127.0.S.(10+i)` (S = 0 for the first cluster of a test
//! process) with ports chosen once, so a restarted node comes back at the same addresses
//! and faults can be injected per node ([`crate::faults`]). Each node has its own data
//! directory under one temporary directory (`GRANARY_TEST_KEEP=1` keeps it).
//!
//! Every status a test or the background observer ([`Cluster::observe`]) reads is kept as a
//! [`Snapshot`] for the single-leader invariant. When a test panics, dropping the cluster
//! prints the seed and the tail of every node's output.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{ExitStatus, Output};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{ACCESS_KEY, ClusterStatus, NodeClient, Repo, SECRET_KEY, SIGNING_REGION};
use crate::faults::{Cgroup, NodeNet};
use crate::poll;
use crate::process::{NodeProcess, NodeSpec, free_ports, granary_bin};
use crate::seed::Seed;

/// How long a node may take to start (RocksDB open, join, catch up) on a busy machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cluster may take to agree again after a change (election, catch-up).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node gets to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

static SUBNET_SEQ: AtomicU8 = AtomicU8::new(0);

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many nodes (node 1 bootstraps, the others join it).
    pub nodes: usize,
    /// Run each node in a cgroup of its own, so [`crate::faults::Firewall`] can cut it off
    /// even where its peer connections come from 127.0.0.1.
    pub faults: bool,
    /// The region label of every node.
    pub region: String,
    /// TOML given to every node with `--config` (its keys as in `configs/single.toml`).
    pub config_toml: Option<String>,
    /// The nodes' `RUST_LOG` (`GRANARY_TEST_RUST_LOG` still wins; `warn` if neither).
    pub rust_log: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            faults: false,
            region: "local".to_owned(),
            config_toml: None,
            rust_log: None,
        }
    }
}

/// A status one node reported, and when.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Milliseconds since the cluster started.
    pub at_ms: u64,
    /// The node asked.
    pub from: u64,
    /// What it said.
    pub status: ClusterStatus,
}

/// A running cluster of `granary` processes.
#[derive(Debug)]
pub struct Cluster {
    seed: Seed,
    options: Options,
    subnet: u8,
    started: Instant,
    root: PathBuf,
    nodes: BTreeMap<u64, NodeProcess>,
    clients: Arc<Mutex<BTreeMap<u64, NodeClient>>>,
    snapshots: Arc<Mutex<Vec<Snapshot>>>,
    observer: Option<tokio::task::JoinHandle<()>>,
    // Declared last: removed after the nodes are dead.
    tmp: Option<tempfile::TempDir>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Starts `n` nodes and waits until they are all voters with the same applied index.
    pub async fn start(seed: Seed, n: usize) -> Cluster {
        Cluster::start_with(
            seed,
            Options {
                nodes: n,
                ..Options::default()
            },
        )
        .await
    }

    /// Starts a cluster as `options` says; see [`Cluster::start`].
    pub async fn start_with(seed: Seed, options: Options) -> Cluster {
        assert!(
            (1..=200).contains(&options.nodes),
            "1 to 200 nodes, not {}",
            options.nodes
        );
        let tmp = tempfile::Builder::new()
            .prefix("granary-cluster-")
            .tempdir()
            .expect("tempdir");
        let subnet = SUBNET_SEQ.fetch_add(1, Ordering::Relaxed) % 200;
        let mut cluster = Cluster {
            seed,
            options: options.clone(),
            subnet,
            started: Instant::now(),
            root: tmp.path().to_owned(),
            nodes: BTreeMap::new(),
            clients: Arc::default(),
            snapshots: Arc::default(),
            observer: None,
            tmp: Some(tmp),
        };
        eprintln!(
            "cluster: {} nodes on 127.0.{subnet}.11.., data in {}",
            options.nodes,
            cluster.root.display()
        );
        let first = cluster.spawn(1, vec![], false);
        cluster.node_mut(first).wait_ready(START_TIMEOUT).await;
        let join = vec![cluster.node(first).spec().grpc];
        let others: Vec<u64> = (2..=options.nodes as u64).collect();
        for &id in &others {
            cluster.spawn(id, join.clone(), false);
        }
        for &id in &others {
            cluster.node_mut(id).wait_healthy(START_TIMEOUT).await;
        }
        let all = cluster.ids();
        cluster.wait_members(&all, &[], START_TIMEOUT).await;
        cluster.wait_converged(&all, START_TIMEOUT).await;
        cluster
    }

    /// The address node `id` binds.
    pub fn ip(&self, id: u64) -> Ipv4Addr {
        assert!((1..=240).contains(&id), "node id {id} out of range");
        Ipv4Addr::new(127, 0, self.subnet, 10 + id as u8)
    }

    fn spawn(&mut self, id: u64, join: Vec<SocketAddr>, learner: bool) -> u64 {
        assert!(!self.nodes.contains_key(&id), "node {id} exists");
        let ip = IpAddr::V4(self.ip(id));
        let data_dir = self.root.join(format!("node{id}"));
        let [http, grpc] = free_ports(ip);
        let spec = NodeSpec {
            node_id: id,
            data_dir,
            http: SocketAddr::new(ip, http),
            grpc: SocketAddr::new(ip, grpc),
            region: self.options.region.clone(),
            join,
            learner,
            config: self.options.config_toml.as_ref().map(|toml| {
                let path = self.root.join("node.toml");
                std::fs::write(&path, toml).expect("write node config");
                path
            }),
            rust_log: self.options.rust_log.clone(),
        };
        let cgroup = if self.options.faults {
            let cg = Cgroup::create(&format!("{}-n{id}", self.subnet));
            if cg.is_none() && id == 1 {
                eprintln!(
                    "note: cgroup v2 is not writable here; isolation relies on nodes binding \
                     their peer connections to their own IP"
                );
            }
            cg
        } else {
            None
        };
        let node = NodeProcess::spawn(spec, cgroup);
        lock(&self.clients).insert(id, node.client());
        self.nodes.insert(id, node);
        id
    }

    /// The seed the test runs with.
    pub fn seed(&self) -> Seed {
        self.seed
    }

    /// Every node's id (running or not, removed ones included until dropped).
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Ids of every node but `id`.
    pub fn ids_except(&self, id: u64) -> Vec<u64> {
        self.nodes.keys().copied().filter(|&i| i != id).collect()
    }

    /// The process of node `id`.
    pub fn node(&self, id: u64) -> &NodeProcess {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The bytes of node `id`'s blob segment files (`<data_dir>/blobs/*.seg`).
    pub fn blob_file_bytes(&self, id: u64) -> u64 {
        let dir = self.node(id).spec().data_dir.join("blobs");
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            // A segment deleted under the listing counts for nothing.
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum()
    }

    /// The process of node `id`, mutably.
    pub fn node_mut(&mut self, id: u64) -> &mut NodeProcess {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// A client for node `id`.
    pub fn client(&self, id: u64) -> NodeClient {
        self.node(id).client()
    }

    /// Clients for `ids`.
    pub fn clients(&self, ids: &[u64]) -> Vec<NodeClient> {
        ids.iter().map(|&id| self.client(id)).collect()
    }

    /// What the firewall needs to know about node `id`.
    pub fn net(&self, id: u64) -> NodeNet {
        NodeNet {
            node_id: id,
            ip: self.ip(id),
            cgroup: self.node(id).cgroup().map(|c| c.path().to_owned()),
        }
    }

    /// [`Cluster::net`] of each of `ids`.
    pub fn nets(&self, ids: &[u64]) -> Vec<NodeNet> {
        ids.iter().map(|&id| self.net(id)).collect()
    }

    // ---- status ----

    fn record(&self, from: u64, status: &ClusterStatus) {
        record(&self.snapshots, self.started, from, status);
    }

    /// Node `id`'s view of the cluster (recorded as a [`Snapshot`]).
    pub async fn status(&self, id: u64) -> Result<ClusterStatus, String> {
        let s = self.client(id).status().await?;
        if s.node_id != id {
            return Err(format!("node {id} answered as node {}", s.node_id));
        }
        self.record(id, &s);
        Ok(s)
    }

    /// Polls every node's status every 200 ms in the background, until the cluster is
    /// dropped, so [`Cluster::snapshots`] sees the terms and leaders in between.
    pub fn observe(&mut self) {
        if self.observer.is_some() {
            return;
        }
        let clients = self.clients.clone();
        let snapshots = self.snapshots.clone();
        let started = self.started;
        self.observer = Some(tokio::spawn(async move {
            loop {
                let nodes: Vec<NodeClient> = lock(&clients).values().cloned().collect();
                let statuses = futures::future::join_all(nodes.iter().map(|c| c.status())).await;
                for (c, s) in nodes.iter().zip(statuses) {
                    if let Ok(s) = s {
                        record(&snapshots, started, c.node_id, &s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    /// Every status read so far.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        lock(&self.snapshots).clone()
    }

    /// Waits until every node of `among` names the same leader, itself one of `among`;
    /// returns it.
    pub async fn wait_leader(&self, among: &[u64], timeout: Duration) -> u64 {
        let what = format!("nodes {among:?} to agree on a leader among them");
        poll::until(&what, timeout, || async move {
            let mut leader = None;
            for &id in among {
                let s = self.status(id).await?;
                let l = s
                    .leader_id
                    .ok_or_else(|| format!("node {id} knows no leader (term {})", s.term))?;
                if !among.contains(&l) {
                    return Err(format!("node {id} follows node {l}, outside {among:?}"));
                }
                match leader {
                    Some(prev) if prev != l => {
                        return Err(format!("leaders disagree: {prev} and {l}"));
                    }
                    _ => leader = Some(l),
                }
            }
            leader.ok_or_else(|| "no nodes to ask".to_owned())
        })
        .await
    }

    /// The leader, as every running node sees it.
    pub async fn leader(&mut self) -> u64 {
        let running = self.running_ids();
        self.wait_leader(&running, SETTLE_TIMEOUT).await
    }

    /// Ids of the nodes whose process is running.
    pub fn running_ids(&mut self) -> Vec<u64> {
        self.nodes
            .iter_mut()
            .filter_map(|(&id, n)| n.is_running().then_some(id))
            .collect()
    }

    /// Waits until every node of `voters` and `learners` lists exactly those voters and
    /// learners.
    pub async fn wait_members(&self, voters: &[u64], learners: &[u64], timeout: Duration) {
        let mut voters = voters.to_vec();
        voters.sort_unstable();
        let mut learners = learners.to_vec();
        learners.sort_unstable();
        let what = format!("membership voters {voters:?} learners {learners:?}");
        let (voters, learners) = (&voters, &learners);
        poll::until(&what, timeout, || async move {
            for &id in voters.iter().chain(learners) {
                let s = self.status(id).await?;
                if &s.voters() != voters || &s.learners() != learners {
                    return Err(format!(
                        "node {id} sees voters {:?} learners {:?}",
                        s.voters(),
                        s.learners()
                    ));
                }
            }
            Ok(())
        })
        .await;
    }

    /// Waits until every node of `ids` knows the same leader and has applied the same
    /// index; returns that index.
    pub async fn wait_converged(&self, ids: &[u64], timeout: Duration) -> u64 {
        let what = format!("nodes {ids:?} to apply the same index");
        poll::until(&what, timeout, || async move {
            let mut seen = BTreeMap::new();
            for &id in ids {
                let s = self.status(id).await?;
                if s.leader_id.is_none() {
                    return Err(format!("node {id} knows no leader"));
                }
                seen.insert(id, s.applied_index);
            }
            let mut indexes: Vec<u64> = seen.values().copied().collect();
            indexes.dedup();
            match indexes.as_slice() {
                [one] => Ok(*one),
                _ => Err(format!("applied indexes differ: {seen:?}")),
            }
        })
        .await
    }

    /// Waits until node `id` has applied at least what its leader had applied when this
    /// was called.
    pub async fn wait_caught_up(&self, id: u64, timeout: Duration) {
        let target = poll::until("the leader's applied index", timeout, || async move {
            let s = self.status(id).await?;
            let leader = s
                .leader_id
                .ok_or_else(|| format!("node {id} knows no leader"))?;
            self.status(leader).await.map(|s| s.applied_index)
        })
        .await;
        let what = format!("node {id} to apply index {target}");
        poll::until(&what, timeout, || async move {
            let s = self.status(id).await?;
            if s.applied_index >= target {
                Ok(())
            } else {
                Err(format!("node {id} applied {}", s.applied_index))
            }
        })
        .await;
    }

    // ---- process control ----

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        eprintln!("cluster: SIGKILL node {id}");
        self.node_mut(id).kill();
    }

    /// SIGTERM node `id` and wait for it to exit.
    pub async fn terminate(&mut self, id: u64) -> Result<ExitStatus, String> {
        eprintln!("cluster: SIGTERM node {id}");
        self.node_mut(id).terminate(STOP_TIMEOUT).await
    }

    /// SIGTERM node `id` and wait for it to exit; panics, with its last output, unless it
    /// exits cleanly within [`STOP_TIMEOUT`].
    pub async fn stop_cleanly(&mut self, id: u64) {
        let status = self
            .terminate(id)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.node(id).output_tail(40)));
        assert!(
            status.success(),
            "node {id} exited with {status} on SIGTERM:\n{}",
            self.node(id).output_tail(40)
        );
    }

    /// Starts node `id` again on its data directory and addresses; waits until ready.
    pub async fn restart(&mut self, id: u64) {
        eprintln!("cluster: restart node {id}");
        let node = self.node_mut(id);
        node.start();
        node.wait_ready(START_TIMEOUT).await;
    }

    /// Starts a new node that joins through `via` (their gRPC addresses); waits until it
    /// serves HTTP. Returns its id.
    pub async fn add_node(&mut self, via: &[u64], learner: bool) -> u64 {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        let join = via.iter().map(|&v| self.node(v).spec().grpc).collect();
        eprintln!("cluster: start node {id} joining through {via:?}");
        self.spawn(id, join, learner);
        self.node_mut(id).wait_healthy(START_TIMEOUT).await;
        id
    }

    /// Forgets node `id` (after it was removed from the membership): kills its process
    /// and stops observing it.
    pub fn forget(&mut self, id: u64) {
        lock(&self.clients).remove(&id);
        if let Some(mut n) = self.nodes.remove(&id) {
            n.kill();
        }
    }

    /// Runs the `granary` binary (the operator CLI) with the admin's credentials in the
    /// environment, as the AWS credential chain reads them.
    pub async fn cli(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(granary_bin())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", SIGNING_REGION)
            .env("AWS_DEFAULT_REGION", SIGNING_REGION)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", self.root.join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.root.join("no-aws-credentials"),
            )
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("run the granary CLI")
    }

    /// `granary cluster remove-node --endpoint <node via> --node-id <id>`; panics unless
    /// it succeeds.
    pub async fn remove_node_with_cli(&self, via: u64, id: u64) {
        let endpoint = self.node(via).spec().url();
        let id_text = id.to_string();
        let args = [
            "cluster",
            "remove-node",
            "--endpoint",
            &endpoint,
            "--node-id",
            &id_text,
        ];
        eprintln!("cluster: granary {}", args.join(" "));
        let out = self.cli(&args).await;
        assert!(
            out.status.success(),
            "granary {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // ---- data ----

    /// Creates a domain and a repository through node `via` (retrying while the cluster
    /// settles) and returns it with a token.
    pub async fn setup(&self, via: u64, domain: &str, repo: &str) -> Repo {
        let client = self.client(via);
        let what = format!("domain {domain} and repository {repo} through node {via}");
        poll::until(&what, SETTLE_TIMEOUT, || {
            let client = client.clone();
            async move { client.try_setup(domain, repo).await }
        })
        .await
    }
}

fn record(snapshots: &Mutex<Vec<Snapshot>>, started: Instant, from: u64, status: &ClusterStatus) {
    lock(snapshots).push(Snapshot {
        at_ms: started.elapsed().as_millis() as u64,
        from,
        status: status.clone(),
    });
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(o) = self.observer.take() {
            o.abort();
        }
        if std::thread::panicking() {
            eprintln!(
                "\n==== the test failed with seed {} (replay: GRANARY_TEST_SEED={}) ====",
                self.seed, self.seed
            );
            for (id, node) in &self.nodes {
                eprintln!(
                    "---- node {id} ({}), last output:\n{}",
                    node.spec().url(),
                    node.output_tail(60)
                );
            }
            let snapshots = lock(&self.snapshots);
            if let Some(last) = snapshots.last() {
                eprintln!("---- last status ({} snapshots): {last:?}", snapshots.len());
            }
        }
        for node in self.nodes.values_mut() {
            node.kill();
        }
        if std::env::var_os("GRANARY_TEST_KEEP").is_some()
            && let Some(tmp) = self.tmp.take()
        {
            eprintln!("cluster: kept data in {}", tmp.keep().display());
        }
    }
}
