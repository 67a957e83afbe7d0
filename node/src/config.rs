//! The node's configuration: one TOML file, every field documented with its default.
//!
//! `Config::load` parses and validates; unknown keys are rejected. Secrets (the admin
//! secret key, the cluster secret) never live here: they come from the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys included).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration of one node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's Raft id, unique in the cluster. Default: `1`.
    pub node_id: u64,
    /// Directory of the node's data: `db/` (RocksDB: Raft log, state, blob records) and
    /// `blobs/` (segment files). Default: `./granary-data`.
    pub data_dir: PathBuf,
    /// Address of the HTTP front (package endpoints, CodeArtifact API, health).
    /// Default: `127.0.0.1:8080`.
    pub http_addr: SocketAddr,
    /// Address of the gRPC endpoint for peer traffic. Default: `127.0.0.1:8081`.
    pub grpc_addr: SocketAddr,
    /// The URL clients reach the cluster at (the load balancer's address); repository
    /// endpoints are built from it. Default: `http://{http_addr}`.
    pub public_url: Option<String>,
    /// The region SigV4 requests are signed for, and that ARNs carry. Default: `us-east-1`.
    pub aws_region: String,
    /// The account that owns the admin principal and, by default, new domains.
    /// Default: `000000000000`.
    pub default_account: String,
    /// This node's region label (placement and fetch routing). Default: `local`.
    pub region: String,
    /// Largest request body accepted on the package endpoints, in bytes. npm publishes
    /// carry the tarball base64-encoded (+33%). Default: 1 GiB.
    pub max_body_bytes: u64,
    /// Largest request body accepted by the CodeArtifact API (JSON documents), in bytes.
    /// Default: 1 MiB.
    pub max_api_body_bytes: u64,
    /// Writes on the package endpoints (publishes, tag and version changes) this node
    /// works on at once; more wait their turn, in arrival order, for up to
    /// `write_queue_ms`, and are then answered 503 with `Retry-After`. Past a point more
    /// writes at once only queue deeper inside the node and the cluster (each upload's
    /// bytes, pushes and Raft proposal), until they outlast their deadlines and are all
    /// work lost; this keeps a burst of publishes to what the node gets through, and
    /// turns the rest away before any of their work is done. Default: `64`.
    pub max_concurrent_writes: u64,
    /// How long a write waits for its turn (see `max_concurrent_writes`), in
    /// milliseconds. Default: `2000`.
    pub write_queue_ms: u64,
    /// On SIGTERM or Ctrl-C, how long the node goes on serving while `GET /readyz`
    /// answers 503 (`shutting down`), in milliseconds: a load balancer checking `/readyz`
    /// sends new clients to the other nodes meanwhile, and the requests already here are
    /// answered. Clients still arriving after it (a balancer slower to act on `/readyz`)
    /// are served until none has for 250 ms, at most this long again; then the node stops
    /// taking connections. Set it above the balancer's check interval times the failed
    /// checks that take a node out. Default: `0` (stop at once: a single node has nowhere
    /// else to send its clients).
    pub shutdown_drain_ms: u64,
    /// Largest clock skew accepted on SigV4 requests, in seconds. Default: `900` (AWS's).
    pub sigv4_max_skew_secs: u64,
    /// Memory for recently read package bytes, in MiB: popular artifacts are served from
    /// memory, shared with the response without a copy. `0` turns the cache off.
    /// Default: `256`.
    pub blob_cache_mib: u64,
    /// gRPC addresses of members to join through (any member will do; it forwards to the
    /// leader). Empty: on first start the node bootstraps a one-voter cluster of its own.
    /// Ignored once the node is a member. Default: `[]`.
    pub join: Vec<String>,
    /// Join as a learner and stay one (no automatic promotion to voter once caught up).
    /// Default: `false`.
    pub learner: bool,
    /// How metadata reads are served: `"linearizable"` (the node learns the leader's
    /// commit index, batched, and waits until it has applied it, so every read sees every
    /// acknowledged write) or `"local"` (the node's applied state, bounded staleness, no
    /// round trip: for regions far from the leader). Default: `"linearizable"`.
    pub read_consistency: ReadConsistency,
    /// Mutual TLS for peer traffic (gRPC between members). Unset: plain TCP, with the
    /// cluster secret on every call. Default: unset.
    pub peer_tls: Option<PeerTls>,
    /// Raft timing and log retention.
    pub raft: RaftConfig,
    /// Background checks of the package bytes on this node's disk.
    pub scrub: ScrubConfig,
    /// Removing the package bytes nothing refers to any more.
    pub blob_gc: BlobGcConfig,
    /// Repository actors.
    pub actors: ActorConfig,
    /// Base URLs of the public registries external connections reach, by connection name.
    /// Entries here replace the defaults (the registries' own addresses: `public:npmjs` =
    /// `https://registry.npmjs.org/`), so an air-gapped site or a test points a connection
    /// at a local registry: `"public:npmjs" = "http://127.0.0.1:4873/"`.
    pub external_connections: std::collections::BTreeMap<String, String>,
    /// Fetching from upstream registries: timeouts and metadata freshness.
    pub upstream: UpstreamConfig,
}

/// How upstream (external registry) metadata is cached and fetched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// A fetched package document is fresh for this long; after it, it is still served
    /// while a background refresh runs (stale-while-revalidate), and while the upstream
    /// is down. Default: `300`.
    pub metadata_ttl_secs: u64,
    /// An upstream 404 ("no such package") is remembered this long. A 5xx or a timeout is
    /// never remembered as a 404. Default: `60`.
    pub not_found_ttl_secs: u64,
    /// Connecting to an upstream gives up after this many milliseconds. Default: `3000`.
    pub connect_timeout_ms: u64,
    /// A metadata request (or the wait for an artifact's response headers, or any pause
    /// between its chunks) gives up after this many milliseconds. Default: `10000`.
    pub request_timeout_ms: u64,
    /// Package documents kept in memory per node. Default: `10000`.
    pub metadata_cache_entries: usize,
    /// After an upstream fails (no answer, timeout, 5xx), requests to it fail at once for
    /// this many milliseconds, so what can be served without it (retained versions, stale
    /// documents) is not held up by it. `0` retries every time. Default: `5000`.
    pub unavailable_backoff_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            metadata_ttl_secs: 300,
            not_found_ttl_secs: 60,
            connect_timeout_ms: 3000,
            request_timeout_ms: 10_000,
            metadata_cache_entries: 10_000,
            unavailable_backoff_ms: 5000,
        }
    }
}

/// The public registries external connections reach unless the config says otherwise.
pub const DEFAULT_EXTERNAL_CONNECTIONS: &[(&str, &str)] = &[
    ("public:npmjs", "https://registry.npmjs.org/"),
    ("public:pypi", "https://pypi.org/"),
    (
        "public:maven-central",
        "https://repo.maven.apache.org/maven2/",
    ),
    ("public:maven-googleandroid", "https://maven.google.com/"),
    (
        "public:maven-gradleplugins",
        "https://plugins.gradle.org/m2/",
    ),
    ("public:maven-commonsware", "https://repo.commonsware.com/"),
    ("public:maven-clojars", "https://repo.clojars.org/"),
    ("public:nuget-org", "https://api.nuget.org/v3/index.json"),
    ("public:ruby-gems-org", "https://rubygems.org/"),
    ("public:crates-io", "https://index.crates.io/"),
];

/// Certificates for mutual TLS between members: each node serves with its certificate and
/// presents it when calling peers; both sides require the other's to chain to `ca_file`.
/// Certificates must name the addresses peers dial (IP SANs for `host:port` by IP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTls {
    /// This node's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// This node's private key (PEM).
    pub key_file: PathBuf,
    /// The certificate authority peers' certificates must chain to (PEM).
    pub ca_file: PathBuf,
}

/// How a node serves metadata reads (see [`Config::read_consistency`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadConsistency {
    /// Confirm with the leader's read index first.
    #[default]
    Linearizable,
    /// Serve the local applied state.
    Local,
}

/// Raft timing. The defaults suit one region (round trips of a few milliseconds).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Interval between leader heartbeats, in milliseconds. Default: `100`.
    pub heartbeat_ms: u64,
    /// Lower bound of the election timeout, in milliseconds. Default: `400`.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the election timeout, in milliseconds. Default: `800`.
    pub election_timeout_max_ms: u64,
    /// Build a state snapshot (and purge the log before it) after this many entries.
    /// Default: `20000`.
    pub snapshot_after_entries: u64,
    /// Log entries kept before the last snapshot, so a briefly lagging member catches up
    /// from the log instead of receiving a whole snapshot. Default: `1000`.
    pub logs_kept_after_snapshot: u64,
}

/// The scrub: a background pass that reads every blob this node holds back from disk and
/// checks it against the CRC32C recorded at upload, so damage to a package nobody
/// downloads is found while a member still holds a good copy. A damaged copy is dropped
/// and fetched again from a peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubConfig {
    /// Seconds from the start of one pass to the start of the next; the time of the last
    /// pass is kept in the data directory (`scrub.last`), so restarts do not delay it. `0`
    /// turns the scrub off. Default: `604800` (a week).
    pub interval_secs: u64,
    /// After each blob the scrub pauses this many times as long as reading and checking
    /// it took, so it takes at most 1/(1 + tranquility) of the disk. Default: `4`.
    pub tranquility: u32,
}

/// The blob collector: a background pass that removes the package bytes no package
/// version refers to any more (after an unpublish, a repository's or a domain's
/// deletion, a refused publish) and gives their disk space back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlobGcConfig {
    /// Seconds between passes. A blob is removed once passes at least this far apart
    /// have found it unreferenced, with no write looking at it in between, so this is
    /// also the grace a publish has between finding its bytes stored already and its
    /// metadata being committed: keep it well above the longest push of a package to a
    /// peer. Segment files at most half of which still hold live blobs are compacted in
    /// the same pass. `0` turns the collector off. Default: `3600`.
    pub interval_secs: u64,
    /// Size at which a blob segment file is closed and the next started, in MiB. Space is
    /// given back a segment at a time, so smaller segments give it back sooner, at the
    /// cost of more files. Default: `1024`.
    pub segment_mib: u64,
    /// After each live blob it moves out of a segment being compacted, the collector
    /// pauses this many times as long as the move took, so compaction takes at most
    /// 1/(1 + tranquility) of the disk from requests. Default: `2`.
    pub tranquility: u32,
}

/// Repository actor lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorConfig {
    /// Stop a repository actor after this many seconds without a message. Default: `300`.
    pub idle_stop_secs: u64,
    /// How many restarts a failing actor gets within `restart_window_secs` before the
    /// failure is escalated. Default: `5`.
    pub max_restarts: u32,
    /// The window for `max_restarts`, in seconds. Default: `60`.
    pub restart_window_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./granary-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            public_url: None,
            aws_region: "us-east-1".to_owned(),
            default_account: "000000000000".to_owned(),
            region: "local".to_owned(),
            max_body_bytes: 1 << 30,
            max_api_body_bytes: 1 << 20,
            max_concurrent_writes: 64,
            write_queue_ms: 2000,
            shutdown_drain_ms: 0,
            sigv4_max_skew_secs: 900,
            blob_cache_mib: 256,
            join: Vec::new(),
            learner: false,
            read_consistency: ReadConsistency::Linearizable,
            peer_tls: None,
            raft: RaftConfig::default(),
            scrub: ScrubConfig::default(),
            blob_gc: BlobGcConfig::default(),
            actors: ActorConfig::default(),
            external_connections: Default::default(),
            upstream: UpstreamConfig::default(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_after_entries: 20_000,
            logs_kept_after_snapshot: 1000,
        }
    }
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            interval_secs: 7 * 24 * 3600,
            tranquility: 4,
        }
    }
}

impl Default for BlobGcConfig {
    fn default() -> Self {
        BlobGcConfig {
            interval_secs: 3600,
            segment_mib: crate::store::segments::SEGMENT_BYTES >> 20,
            tranquility: 2,
        }
    }
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            idle_stop_secs: 300,
            max_restarts: 5,
            restart_window_secs: 60,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.node_id == 0 {
            return invalid("node_id must be at least 1");
        }
        if self.max_concurrent_writes == 0 || self.max_concurrent_writes > 1 << 20 {
            return invalid("max_concurrent_writes must be between 1 and 1048576");
        }
        if self.default_account.len() != 12
            || !self.default_account.bytes().all(|b| b.is_ascii_digit())
        {
            return invalid("default_account must be 12 digits");
        }
        if self.aws_region.is_empty() || self.region.is_empty() {
            return invalid("aws_region and region must not be empty");
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid("public_url must start with http:// or https://");
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms {
            return invalid("raft.election_timeout_min_ms must exceed raft.heartbeat_ms > 0");
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return invalid(
                "raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms",
            );
        }
        if let Some(bad) = self
            .join
            .iter()
            .find(|a| a.parse::<SocketAddr>().is_err() && !a.contains(':'))
        {
            return Err(ConfigError::Invalid(format!(
                "join: {bad:?} is not a host:port gRPC address"
            )));
        }
        if self.max_body_bytes < 1024 || self.max_api_body_bytes < 1024 {
            return invalid("body limits must be at least 1024 bytes");
        }
        for (name, url) in &self.external_connections {
            if !DEFAULT_EXTERNAL_CONNECTIONS.iter().any(|(n, _)| n == name) {
                let known: Vec<&str> = DEFAULT_EXTERNAL_CONNECTIONS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect();
                return Err(ConfigError::Invalid(format!(
                    "external_connections: {name:?} is not an external connection; known: {}",
                    known.join(", ")
                )));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "external_connections.{name:?}: {url:?} must start with http:// or https://"
                )));
            }
        }
        let u = &self.upstream;
        if u.connect_timeout_ms == 0 || u.request_timeout_ms == 0 || u.metadata_cache_entries == 0 {
            return invalid("upstream timeouts and metadata_cache_entries must be positive");
        }
        if self.scrub.tranquility > 1000 {
            return invalid("scrub.tranquility must be at most 1000");
        }
        if self.blob_gc.tranquility > 1000 {
            return invalid("blob_gc.tranquility must be at most 1000");
        }
        if !(1..=65536).contains(&self.blob_gc.segment_mib) {
            return invalid("blob_gc.segment_mib must be between 1 and 65536");
        }
        Ok(())
    }

    /// The base URL of an external connection (with a trailing `/`), if it is known.
    pub fn external_connection_url(&self, name: &str) -> Option<String> {
        let url = self
            .external_connections
            .get(name)
            .map(String::as_str)
            .or_else(|| {
                DEFAULT_EXTERNAL_CONNECTIONS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, u)| *u)
            })?;
        Some(if url.ends_with('/') || url.ends_with(".json") {
            url.to_owned()
        } else {
            format!("{url}/")
        })
    }

    /// The public base URL without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.http_addr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.aws_region, "us-east-1");
        assert_eq!(c.default_account, "000000000000");
        assert_eq!(c.public_url(), "http://127.0.0.1:8080");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("htp_addr = \"1.2.3.4:5\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = Config::parse("[raft]\nheartbeat = 5").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(Config::parse("default_account = \"12\"").is_err());
        assert!(Config::parse("public_url = \"ftp://x\"").is_err());
        assert!(Config::parse("[raft]\nelection_timeout_min_ms = 50").is_err());
        let err =
            Config::parse("[external_connections]\n\"public:nope\" = \"http://x/\"").unwrap_err();
        assert!(err.to_string().contains("public:npmjs"), "{err}");
        assert!(Config::parse("[external_connections]\n\"public:npmjs\" = \"ftp://x/\"").is_err());
    }

    #[test]
    fn external_connections_default_to_the_public_registries() {
        let c =
            Config::parse("[external_connections]\n\"public:npmjs\" = \"http://127.0.0.1:4873\"")
                .unwrap();
        assert_eq!(
            c.external_connection_url("public:npmjs").as_deref(),
            Some("http://127.0.0.1:4873/")
        );
        assert_eq!(
            c.external_connection_url("public:pypi").as_deref(),
            Some("https://pypi.org/")
        );
        assert_eq!(c.external_connection_url("public:nope"), None);
    }

    #[test]
    fn every_shipped_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in walk(&dir) {
            if entry.extension().is_some_and(|e| e == "toml") {
                Config::load(&entry).unwrap_or_else(|e| panic!("{}: {e}", entry.display()));
                seen += 1;
            }
        }
        assert!(seen >= 1, "no configs found in {}", dir.display());
        // `single.toml` documents every key at its default.
        let single = Config::load(&dir.join("single.toml")).unwrap();
        assert_eq!(format!("{single:?}"), format!("{:?}", Config::default()));
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
