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
use crate::config::Config;
use crate::docs::DocCache;
use crate::raft::log_store::LogStore;
use crate::raft::network::GrpcNetwork;
use crate::raft::state_machine::StateMachine;
use crate::raft::{NodeInfo, ProposeError, Raft};
use crate::state::StateView;
use crate::state::cache::ReadCache;
use crate::state::command::{Command, CommandResult};
use crate::state::model::{Principal, TokenKey};
use crate::store::Store;
use crate::store::blob::{BlobStore, RocksBlobBackend};

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
    pub(crate) raft: Raft,
    pub(crate) state: StateView,
    pub(crate) blobs: BlobStore,
    pub(crate) docs: DocCache,
    pub(crate) actors: Actors,
    pub(crate) public_url: String,
    /// The bound HTTP address (the configured one may have port 0).
    pub(crate) http_addr: SocketAddr,
    /// The bound gRPC address.
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) started: std::time::Instant,
}

impl Node {
    /// Proposes a command and waits until it is committed and applied here.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        crate::raft::propose(&self.raft, cmd).await
    }

    /// Whether this node serves requests: it knows a leader.
    pub(crate) fn ready(&self) -> bool {
        self.raft.metrics().borrow().current_leader.is_some()
    }

    /// Unix milliseconds now.
    pub(crate) fn now_ms() -> i64 {
        (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
    }
}

/// Runs a node until `shutdown` completes, then stops it cleanly.
///
/// Prints the bound addresses (`http: …`, `grpc: …`) on stdout once listening, so a
/// caller that asked for port 0 learns the ports.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
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

    // Raft.
    let read_cache = Arc::new(ReadCache::default());
    let state_machine = StateMachine::new(store.clone(), read_cache.clone());
    let raft_config = openraft::Config {
        cluster_name: "granary".into(),
        heartbeat_interval: config.raft.heartbeat_ms,
        election_timeout_min: config.raft.election_timeout_min_ms,
        election_timeout_max: config.raft.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            config.raft.snapshot_after_entries,
        ),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::Raft(e.to_string()))?;
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config),
        GrpcNetwork,
        LogStore::new(store.clone()),
        state_machine,
    )
    .await
    .map_err(|e| Error::Raft(e.to_string()))?;
    let me = NodeInfo {
        grpc_addr: grpc_addr.to_string(),
        http_addr: http_addr.to_string(),
        region: config.region.clone(),
    };
    if !raft
        .is_initialized()
        .await
        .map_err(|e| Error::Raft(e.to_string()))?
    {
        let members = std::collections::BTreeMap::from([(config.node_id, me.clone())]);
        raft.initialize(members)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        tracing::info!(node_id = config.node_id, "bootstrapped a one-voter cluster");
    }
    raft.wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;

    let cancel = CancellationToken::new();
    let actors = Actors::start(&config, raft.clone())
        .await
        .map_err(|e| Error::Bootstrap(format!("actors: {e}")))?;
    let node = Arc::new(Node {
        state: StateView::cached(store.clone(), read_cache),
        blobs: BlobStore::new(
            Arc::new(RocksBlobBackend::new(store.clone())),
            (config.blob_cache_mib << 20) as usize,
        ),
        docs: DocCache::new(),
        actors,
        raft: raft.clone(),
        public_url,
        http_addr,
        grpc_addr,
        config,
        started: std::time::Instant::now(),
    });
    bootstrap_credentials(&node).await?;

    let grpc = tokio::spawn(crate::grpc::serve(
        node.clone(),
        grpc_listener,
        cancel.clone(),
    ));
    let http = tokio::spawn(crate::http::serve(
        node.clone(),
        http_listener,
        cancel.clone(),
    ));
    println!("granary: http: {http_addr}");
    println!("granary: grpc: {grpc_addr}");
    println!("granary: public url: {}", node.public_url);
    tracing::info!(%http_addr, %grpc_addr, "node is serving");

    shutdown.await;
    tracing::info!("shutting down");
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
async fn bootstrap_credentials(node: &Node) -> Result<(), Error> {
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
