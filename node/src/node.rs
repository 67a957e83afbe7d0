//! The node: shared context of every request ([`Node`]) and [`run`], the one function that
//! starts every part and stops them in reverse order.
//!
//! ```text
//!  run: store → raft (bootstrap one voter on first start) → admin + token key
//!       → actors → gRPC server → HTTP server … shutdown signal …
//!       HTTP stops → gRPC stops → actors stop → raft shuts down
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::actors::Actors;
use crate::cluster::blobs::BlobReplicator;
use crate::cluster::peers::{Peers, Secret, TlsConfigs};
use crate::cluster::{Cluster, Standing};
use crate::config::Config;
use crate::docs::DocCache;
use crate::grpc::SelfInfo;
use crate::raft::log_store::LogStore;
use crate::raft::network::GrpcNetwork;
use crate::raft::state_machine::StateMachine;
use crate::raft::{NodeInfo, ProposeError, Raft};
use crate::state::StateView;
use crate::state::cache::ReadCache;
use crate::state::command::{Command, CommandResult};
use crate::state::model::{Principal, TokenKey};
use crate::store::blob::{BlobStore, RocksBlobBackend};
use crate::store::{CF_RAFT_META, Store};

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Local storage failed to open or failed.
    #[error(transparent)]
    Storage(#[from] crate::store::StoreError),
    /// Raft failed to start or reported a fatal error.
    #[error("raft: {0}")]
    Raft(String),
    /// A listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// First-start set-up failed.
    #[error("bootstrap: {0}")]
    Bootstrap(String),
}

/// Everything a request handler needs: shared by all of them.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) state: StateView,
    pub(crate) blobs: BlobStore,
    pub(crate) docs: DocCache,
    pub(crate) actors: Actors,
    pub(crate) cluster: Cluster,
    pub(crate) replicator: BlobReplicator,
    pub(crate) upstreams: crate::upstream::Upstreams,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) public_url: String,
    pub(crate) started: std::time::Instant,
    /// Turns for writes on the package endpoints (see `Config::max_concurrent_writes`).
    pub(crate) writes: Arc<tokio::sync::Semaphore>,
    /// Set when the node starts shutting down: `/readyz` answers 503 from then on, while
    /// requests are still served for `Config::shutdown_drain_ms`.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// When the last client request (anything but `/readyz`, `/healthz`, `/metrics` and
    /// the operators' `/admin/…`) arrived.
    last_request: crate::last_seen::LastSeen,
}

impl Node {
    /// Proposes a command and waits until it is committed and applied here.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        self.cluster.propose(cmd).await
    }

    /// `/readyz`: this node can serve requests now or after an election it takes part in,
    /// so a load balancer should send it clients: it is not shutting down, and not cut
    /// off from a majority of voters (a node cut off refuses writes and linearizable
    /// reads, while the other members could serve them). During an election every member
    /// stays ready: a request waits for the new leader and is answered then.
    pub(crate) fn ready(&self) -> Result<(), String> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        match self.cluster.cut_off_state().get() {
            None => Ok(()),
            Some(why) => Err(format!("cut off: {why}")),
        }
    }

    /// A client request arrived (see [`Node::serve_until_quiet`]).
    pub(crate) fn client_request(&self) {
        self.last_request.mark();
    }

    /// After the drain: goes on serving while clients still arrive, until none has for
    /// [`QUIET_AFTER_DRAIN`], and at most `longest` more. A load balancer slower to act
    /// on `/readyz` than the drain allowed (checks further apart, more failed checks
    /// needed, a busy machine) still sends clients here; stopping to listen would have
    /// it fail their connections instead.
    async fn serve_until_quiet(&self, longest: Duration) {
        let began = tokio::time::Instant::now();
        let mut told = false;
        loop {
            let since = self.last_request.since().unwrap_or(Duration::MAX);
            if since >= QUIET_AFTER_DRAIN {
                if told {
                    tracing::info!(extra = ?began.elapsed(), "clients stopped arriving");
                }
                return;
            }
            let left = longest.saturating_sub(began.elapsed());
            if left.is_zero() {
                tracing::info!(
                    extra = ?longest,
                    "clients still arrive; stopping anyway (a load balancer checking \
                     /readyz should have taken this node out: is its check interval times \
                     its failed checks longer than shutdown_drain_ms?)"
                );
                return;
            }
            if !told {
                tracing::info!("clients still arrive after the drain: serving on until they stop");
                told = true;
            }
            tokio::time::sleep((QUIET_AFTER_DRAIN - since).min(left)).await;
        }
    }

    /// Unix milliseconds now.
    pub(crate) fn now_ms() -> i64 {
        (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
    }
}

/// After its drain a node stops once no client request has arrived for this long.
const QUIET_AFTER_DRAIN: Duration = Duration::from_millis(250);

/// Runs a node until `shutdown` completes, then stops it cleanly.
///
/// Prints the bound addresses (`http: …`, `grpc: …`) on stdout once listening, so a
/// caller that asked for port 0 learns the ports.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    run_embedded(config, shutdown, Embedded::default()).await
}

/// What a program running nodes inside itself (tests running a whole cluster in one
/// process) gives [`run_embedded`] instead of the environment.
#[derive(Default)]
pub struct Embedded {
    /// Every peer call goes through these faults (see [`crate::faults`]).
    pub faults: Option<Arc<crate::faults::Faults>>,
    /// The admin's access key id and secret (otherwise `GRANARY_ADMIN_ACCESS_KEY_ID` and
    /// `GRANARY_ADMIN_SECRET_ACCESS_KEY`, or generated and printed on the first start).
    pub admin_key: Option<(String, String)>,
}

/// [`run`] for a node embedded in another program.
pub async fn run_embedded(
    config: Config,
    shutdown: impl Future<Output = ()>,
    embedded: Embedded,
) -> Result<(), Error> {
    let Embedded { faults, admin_key } = embedded;
    config.validate()?;
    let store = Store::open(&config.data_dir)?;

    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: config.http_addr,
            source,
        })?;
    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: config.grpc_addr,
            source,
        })?;
    let http_addr = http_listener.local_addr().map_err(|source| Error::Bind {
        addr: config.http_addr,
        source,
    })?;
    let grpc_addr = grpc_listener.local_addr().map_err(|source| Error::Bind {
        addr: config.grpc_addr,
        source,
    })?;
    let public_url = match &config.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => format!("http://{http_addr}"),
    };

    check_node_id(&store, config.node_id)?;
    let secret = Secret::from_env();
    if !secret.is_set() && !config.join.is_empty() {
        tracing::warn!(
            "GRANARY_CLUSTER_SECRET is not set: peer traffic is unauthenticated; set the same \
             secret on every member"
        );
    }
    let tls = match &config.peer_tls {
        Some(t) => Some(TlsConfigs::load(t).map_err(Error::Bootstrap)?),
        None => None,
    };
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let mut peers = Peers::new(
        secret.clone(),
        tls.as_ref().map(|t| t.client.clone()),
        Some(grpc_addr.ip()),
    );
    peers = peers.with_metrics(metrics.clone());
    if let Some(f) = faults {
        peers = peers.with_faults(f, &grpc_addr.to_string());
    }

    // Raft.
    let read_cache = Arc::new(ReadCache::default());
    let (blob_refs_tx, blob_refs_rx) = tokio::sync::mpsc::channel(4096);
    // The scrub hands damaged blobs to the same repair task.
    let scrub_repair = blob_refs_tx.clone();
    let state_machine =
        StateMachine::new(store.clone(), read_cache.clone()).with_blob_refs(blob_refs_tx);
    state_machine
        .finish_interrupted_install()
        .map_err(|e| Error::Raft(e.to_string()))?;
    let applied = state_machine.subscribe();
    let installs = state_machine.installs();
    let standing = Standing::new(
        config.raft.election_timeout_min_ms,
        config.raft.election_timeout_max_ms,
    );
    let raft_config = openraft::Config {
        cluster_name: "granary".into(),
        heartbeat_interval: config.raft.heartbeat_ms,
        election_timeout_min: config.raft.election_timeout_min_ms,
        election_timeout_max: config.raft.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            config.raft.snapshot_after_entries,
        ),
        max_in_snapshot_log_to_keep: config.raft.logs_kept_after_snapshot,
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::Raft(e.to_string()))?;
    let log = LogStore::new(store.clone());
    let appends = log.progress();
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config),
        GrpcNetwork::new(peers.clone(), standing.clone()),
        log,
        state_machine,
    )
    .await
    .map_err(|e| Error::Raft(e.to_string()))?;
    let me = NodeInfo {
        grpc_addr: grpc_addr.to_string(),
        http_addr: http_addr.to_string(),
        region: config.region.clone(),
    };
    let cluster = Cluster::new(
        raft.clone(),
        peers,
        config.node_id,
        config.read_consistency,
        standing,
        crate::cluster::StorageProgress {
            applied,
            installs,
            appends,
        },
    );
    let blobs = BlobStore::new(
        Arc::new(RocksBlobBackend::open_sized(
            store.clone(),
            &config.data_dir.join("blobs"),
            config.blob_gc.segment_mib << 20,
        )?),
        (config.blob_cache_mib << 20) as usize,
    );
    let replicator = BlobReplicator::new(
        blobs.clone(),
        cluster.clone(),
        config.max_body_bytes,
        metrics.clone(),
    );
    let fetcher = Arc::new(
        crate::upstream::fetch::Fetcher::new(
            &config.upstream,
            cluster.clone(),
            config.region.clone(),
            metrics.clone(),
        )
        .map_err(Error::Bootstrap)?,
    );
    let public_docs = Arc::new(crate::upstream::metadata::MetadataCache::new(
        fetcher,
        config.upstream.clone(),
        metrics.clone(),
    ));

    // Peers must reach this node's Raft before it can join or be elected.
    let cancel = CancellationToken::new();
    // From the start: a node restarted while it reaches no majority does not raise its
    // term meanwhile.
    crate::cluster::election_gate::spawn(
        cluster.clone(),
        crate::cluster::election_gate::Timing::of(&config.raft),
        metrics.clone(),
        cancel.clone(),
    );
    let grpc = tokio::spawn(crate::grpc::serve(
        crate::cluster::service::ClusterService {
            cluster: cluster.clone(),
            blobs: replicator.clone(),
            public_docs: public_docs.clone(),
        },
        secret,
        tls.map(|t| t.server),
        SelfInfo {
            region: config.region.clone(),
            http_addr: http_addr.to_string(),
            grpc_addr: grpc_addr.to_string(),
        },
        grpc_listener,
        cancel.clone(),
    ));
    println!("granary: grpc: {grpc_addr}");

    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
    if !initialized && config.join.is_empty() {
        let members = std::collections::BTreeMap::from([(config.node_id, me.clone())]);
        raft.initialize(members)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        tracing::info!(node_id = config.node_id, "bootstrapped a one-voter cluster");
    } else if !initialized {
        tracing::info!(node_id = config.node_id, seeds = ?config.join, "joining the cluster");
        cluster
            .join(&config.join, &me, config.learner)
            .await
            .map_err(|e| Error::Bootstrap(format!("join: {e}")))?;
        tracing::info!(node_id = config.node_id, "joined the cluster");
    }
    // A restarted member waits for the cluster to elect a leader (its peers may be
    // restarting too); it serves once one is known.
    let mut waited = 0u64;
    while raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await
        .is_err()
    {
        waited += 10;
        tracing::warn!(
            waited_secs = waited,
            "no leader known yet; waiting for a quorum"
        );
    }

    let actors = Actors::start(&config, cluster.clone())
        .await
        .map_err(|e| Error::Bootstrap(format!("actors: {e}")))?;
    let state = StateView::cached(store.clone(), read_cache);
    replicator.spawn_repair(state.clone(), blob_refs_rx, cancel.clone());
    crate::cluster::scrub::spawn(
        blobs.clone(),
        state.clone(),
        config.scrub.clone(),
        config.data_dir.clone(),
        scrub_repair,
        cancel.clone(),
    );
    crate::cluster::gc::spawn(
        blobs.clone(),
        state.clone(),
        cluster.clone(),
        config.blob_gc.clone(),
        config.data_dir.clone(),
        metrics.clone(),
        cancel.clone(),
    );
    let upstreams = crate::upstream::Upstreams::new(public_docs, metrics.clone());
    let node = Arc::new(Node {
        state,
        blobs,
        docs: DocCache::new(),
        actors,
        cluster,
        replicator,
        upstreams,
        metrics,
        public_url,
        writes: Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_writes as usize,
        )),
        config,
        started: std::time::Instant::now(),
        draining: Default::default(),
        last_request: Default::default(),
    });
    if !node.config.join.is_empty() {
        // A node that joined reads the replicated credentials, so wait until it has applied
        // everything the leader has committed.
        let _ = node.cluster.linearize().await;
    }
    bootstrap_credentials(&node, admin_key).await?;

    let http = tokio::spawn(crate::http::serve(
        node.clone(),
        http_listener,
        cancel.clone(),
    ));
    println!("granary: http: {http_addr}");
    println!("granary: public url: {}", node.public_url);
    tracing::info!(%http_addr, %grpc_addr, "node is serving");

    tokio::select! {
        _ = shutdown => {
            let drain = Duration::from_millis(node.config.shutdown_drain_ms);
            if drain.is_zero() {
                tracing::info!("shutting down");
            } else {
                // A load balancer checking `/readyz` takes this node out meanwhile; what
                // it already sent here is answered.
                tracing::info!(?drain, "shutting down: draining, /readyz answers 503");
                node.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                // A leader names its successor meanwhile, which then takes over sooner
                // than an election after this node stops would.
                tokio::join!(node.cluster.hand_over(), tokio::time::sleep(drain));
                node.serve_until_quiet(drain).await;
            }
        }
        _ = node.cluster.removed() => {
            // Serving on would answer clients from a state that no longer follows the
            // cluster, and its elections would disturb the members. (A removed node is
            // not replicated the config that removes it: the leader says so instead.)
            eprintln!(
                "granary: node {} was removed from the cluster; stopping (remove its data \
                 directory before adding it again)",
                node.config.node_id
            );
        }
    }
    cancel.cancel();
    // Reverse order of start: front first, then peers, then actors, then Raft.
    let _ = http.await;
    let _ = grpc.await;
    node.actors.stop().await;
    raft.shutdown()
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
    Ok(())
}

/// On first start: a token-signing key, and the admin principal (from the environment, or
/// generated and printed once).
async fn bootstrap_credentials(
    node: &Node,
    admin_key: Option<(String, String)>,
) -> Result<(), Error> {
    let propose = |cmd: Command| async move {
        match node.propose(cmd).await {
            Ok(CommandResult::Failed(e)) => Err(Error::Bootstrap(e.to_string())),
            Ok(_) => Ok(()),
            Err(e) => Err(Error::Bootstrap(e.to_string())),
        }
    };
    if node.state.token_keys()?.is_empty() {
        let key: [u8; 32] = rand::random();
        propose(Command::PutTokenKey(TokenKey {
            kid: format!("k{}", hex::encode(rand::random::<[u8; 4]>())),
            key_hex: hex::encode(key),
            created_ms: Node::now_ms(),
        }))
        .await?;
    }
    let env_id = std::env::var("GRANARY_ADMIN_ACCESS_KEY_ID")
        .ok()
        .filter(|s| !s.is_empty());
    let env_secret = std::env::var("GRANARY_ADMIN_SECRET_ACCESS_KEY")
        .ok()
        .filter(|s| !s.is_empty());
    let (env_id, env_secret) = match admin_key {
        Some((id, secret)) => (Some(id), Some(secret)),
        None => (env_id, env_secret),
    };
    let (id, secret, print) = match (env_id, env_secret) {
        (Some(id), Some(secret)) => {
            if let Some(p) = node.state.principal(&id)?
                && p.secret_access_key == secret
            {
                return Ok(());
            }
            (id, secret, false)
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::Bootstrap(
                "set both GRANARY_ADMIN_ACCESS_KEY_ID and GRANARY_ADMIN_SECRET_ACCESS_KEY, or neither".into(),
            ));
        }
        (None, None) => {
            if node.state.has_principals()? {
                return Ok(());
            }
            let id = format!("GRAN{}", hex::encode_upper(rand::random::<[u8; 8]>()));
            let secret = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                rand::random::<[u8; 30]>(),
            )
            .replace(['+', '/'], "x");
            (id, secret, true)
        }
    };
    propose(Command::PutPrincipal(Principal {
        account: node.config.default_account.clone(),
        name: "admin".into(),
        access_key_id: id.clone(),
        secret_access_key: secret.clone(),
        created_ms: Node::now_ms(),
    }))
    .await?;
    if print {
        println!("granary: created the admin principal; this secret is shown only once:");
        println!("  AWS_ACCESS_KEY_ID={id}");
        println!("  AWS_SECRET_ACCESS_KEY={secret}");
    }
    Ok(())
}

/// The data directory remembers the node id it was created with; starting it under another
/// id would make it a different Raft member with the old one's log.
fn check_node_id(store: &Store, node_id: u64) -> Result<(), Error> {
    const KEY: &[u8] = b"node_id";
    let cf = store.cf(CF_RAFT_META);
    match store
        .db()
        .get_cf(cf, KEY)
        .map_err(|e| Error::Storage(e.into()))?
    {
        Some(v) => {
            let stored = <[u8; 8]>::try_from(v.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Bootstrap("corrupt node id in the data directory".into()))?;
            if stored != node_id {
                return Err(Error::Bootstrap(format!(
                    "the data directory belongs to node {stored}, not {node_id}: start it with \
                     --node-id {stored} or use another --data-dir"
                )));
            }
        }
        None => store
            .db()
            .put_cf(cf, KEY, node_id.to_be_bytes())
            .map_err(|e| Error::Storage(e.into()))?,
    }
    Ok(())
}
