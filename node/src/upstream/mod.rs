//! Upstream repositories and external connections: what a repository's chain offers,
//! fetching from public registries once per miss, and keeping what was served.
//!
//! ```text
//!   resolve(repo, package)
//!     walk: repo ─▶ its upstreams in order, depth-first (≤ 25 repositories searched)
//!           ─▶ its external connection (after its upstreams)
//!           a repository whose package blocks upstream versions ends its branch
//!     parts: Local{repo, package record} | External{repo, connection, document}
//!     merge: versions nearest-first, tags with upstreams winning, one stamp for all
//!
//!   fetch_asset(version, file)
//!     found locally here ──────────────────────────▶ blob
//!     found in an upstream repository ─▶ blob, and retain the version here (background)
//!     found at a public registry ─▶ flight (one per connection repo × package × file)
//!          leader: GET ─▶ stream to every joiner ─▶ verify digests ─▶ store ─▶ replicate
//!                  ─▶ RetainVersion in the connection's repository and every requester's
//! ```
//!
//! Public documents are cached by [`metadata::MetadataCache`] (TTL, stale-while-revalidate,
//! brief 404s, never a 5xx as a 404). Everything counts into `/metrics`.

pub(crate) mod fetch;
pub(crate) mod flight;
pub(crate) mod metadata;

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use granary_format::hashing::MultiHasher;
use granary_format::model::{
    AssetRecord, OriginRestrictions, OriginType, PackageKey, PackageRecord, RemoteAsset,
    VersionOrigin, VersionRecord,
};
use granary_format::{AssetBody, Body, RegistryError, UpstreamFormat};
use http_body_util::BodyExt;

use crate::metrics::Metrics;
use crate::node::Node;
use crate::state::command::{Command, CommandResult, PackageTarget};
use fetch::{Fetcher, Labels};
use flight::{Flight, Flights, Started};
use metadata::{Document, Lookup, MetadataCache};

/// CodeArtifact's limit on repositories searched for one request.
pub(crate) const MAX_SEARCHED: usize = 25;

/// The node's upstream machinery.
pub(crate) struct Upstreams {
    fetcher: Arc<Fetcher>,
    metadata: Arc<MetadataCache>,
    flights: Arc<Flights>,
    /// Versions being retained from internal upstreams (deduplicates bursts).
    retaining: Mutex<HashSet<String>>,
    metrics: Arc<Metrics>,
}

/// One request's question: a package in a repository, in a format.
pub(crate) struct Ask<'a> {
    /// Domain.
    pub(crate) domain: &'a str,
    /// The requested repository.
    pub(crate) repository: &'a str,
    /// Format name.
    pub(crate) format: &'static str,
    /// How the format reads public registries, if it can.
    pub(crate) reader: Option<&'a Arc<dyn UpstreamFormat>>,
    /// The package.
    pub(crate) key: &'a PackageKey,
}

/// What one repository of the chain contributes.
enum Part {
    /// A repository's own package.
    Local {
        repo: String,
        package: PackageRecord,
    },
    /// A public registry's document, reached through `repo`'s connection.
    External {
        repo: String,
        connection: String,
        doc: Arc<Document>,
    },
}

/// A package as a repository's chain offers it.
pub(crate) struct Resolution {
    /// The merged record (`None`: nobody has the package).
    pub(crate) package: Option<PackageRecord>,
    parts: Vec<Part>,
}

/// Where a resolved version lives.
enum Source {
    /// In a repository of the domain (maybe the requested one).
    Local(String),
    /// At a public registry, through a repository's connection.
    External { repo: String, connection: String },
}

impl Upstreams {
    /// The machinery of a node; `metadata` (and its fetcher) also serve peers.
    pub(crate) fn new(metadata: Arc<MetadataCache>, metrics: Arc<Metrics>) -> Self {
        Upstreams {
            fetcher: metadata.fetcher().clone(),
            metadata,
            flights: Arc::new(Flights::default()),
            retaining: Mutex::new(HashSet::new()),
            metrics,
        }
    }

    /// Walks the chain of `ask.repository` and merges what it offers.
    pub(crate) async fn resolve(
        &self,
        node: &Node,
        ask: &Ask<'_>,
    ) -> Result<Resolution, RegistryError> {
        let steps = walk(node, ask)?;
        let mut parts = Vec::with_capacity(steps.len());
        let mut failure = None;
        for step in steps {
            match step {
                Step::Local { repo, package } => parts.push(Part::Local { repo, package }),
                Step::External { repo, connection } => {
                    let Some(reader) = ask.reader else { continue };
                    let Some(base) = node.config.external_connection_url(&connection) else {
                        continue;
                    };
                    let label = format!("{}/{repo}", ask.domain);
                    let req = metadata::Request {
                        url: format!("{base}{}", reader.metadata_path(ask.key)),
                        key: ask.key,
                        reader: reader.clone(),
                        format: ask.format,
                        repository: &label,
                        local_only: false,
                    };
                    match self.metadata.get(req).await {
                        Ok(Lookup::Found(doc)) => parts.push(Part::External {
                            repo,
                            connection,
                            doc,
                        }),
                        Ok(Lookup::NotFound) => {}
                        Err(e) => failure = Some(e),
                    }
                }
            }
        }
        if parts.is_empty()
            && let Some(e) = failure
        {
            return Err(RegistryError::Unavailable(e));
        }
        Ok(Resolution {
            package: merge(ask, &parts),
            parts,
        })
    }

    /// Every version the chain offers, nearest first wins.
    pub(crate) fn versions(
        &self,
        node: &Node,
        ask: &Ask<'_>,
        res: &Resolution,
    ) -> Result<Vec<VersionRecord>, RegistryError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for part in &res.parts {
            match part {
                Part::Local { repo, .. } => {
                    for v in node
                        .state
                        .versions(ask.domain, repo, ask.format, ask.key)
                        .map_err(internal)?
                    {
                        if seen.insert(v.version.clone()) {
                            out.push(v);
                        }
                    }
                }
                Part::External {
                    repo,
                    connection,
                    doc,
                } => {
                    for v in &doc.package.versions {
                        if seen.insert(v.version.clone()) {
                            out.push(external_version(v, repo, connection));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// One version and where it lives.
    fn find(
        &self,
        node: &Node,
        ask: &Ask<'_>,
        res: &Resolution,
        version: &str,
    ) -> Result<Option<(Arc<VersionRecord>, Source)>, RegistryError> {
        for part in &res.parts {
            match part {
                Part::Local { repo, .. } => {
                    if let Some(v) = node
                        .state
                        .version(ask.domain, repo, ask.format, ask.key, version)
                        .map_err(internal)?
                    {
                        return Ok(Some((v, Source::Local(repo.clone()))));
                    }
                }
                Part::External {
                    repo,
                    connection,
                    doc,
                } => {
                    if let Some(v) = doc.package.versions.iter().find(|v| v.version == version) {
                        return Ok(Some((
                            Arc::new(external_version(v, repo, connection)),
                            Source::External {
                                repo: repo.clone(),
                                connection: connection.clone(),
                            },
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    /// One version as the chain offers it.
    pub(crate) fn version(
        &self,
        node: &Node,
        ask: &Ask<'_>,
        res: &Resolution,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        Ok(self.find(node, ask, res, version)?.map(|(v, _)| v))
    }

    /// Where a version other than the requested repository's own offers it, if anywhere:
    /// publishing it here is then refused (CodeArtifact's 409).
    pub(crate) async fn reachable_upstream(
        &self,
        node: &Node,
        ask: &Ask<'_>,
        version: &str,
    ) -> Result<Option<String>, RegistryError> {
        let res = match self.resolve(node, ask).await {
            Ok(r) => r,
            // An unreachable public registry does not block publishing.
            Err(RegistryError::Unavailable(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(match self.find(node, ask, &res, version)? {
            Some((_, Source::Local(repo))) if repo != ask.repository => Some(repo),
            Some((_, Source::External { connection, .. })) => Some(connection),
            _ => None,
        })
    }

    /// Opens one file of a version the chain offers (see the module's diagram).
    pub(crate) async fn fetch_asset(
        &self,
        node: &Arc<Node>,
        ask: &Ask<'_>,
        res: &Resolution,
        version: &str,
        asset: &str,
    ) -> Result<Option<AssetBody>, RegistryError> {
        let Some((record, source)) = self.find(node, ask, res, version)? else {
            tracing::debug!(
                repository = ask.repository,
                version,
                "no repository of the chain offers the version"
            );
            return Ok(None);
        };
        match source {
            Source::Local(repo) => {
                let Some(a) = record.asset(asset) else {
                    tracing::debug!(repo, version, asset, "resolved version has no such asset");
                    return Ok(None);
                };
                let sha256 = a.hashes.sha256.clone();
                if repo != ask.repository {
                    self.retain_from_upstream(node, ask, &record);
                }
                Ok(open_blob(node, &sha256)
                    .await?
                    .map(|(size, body)| AssetBody {
                        size: Some(size),
                        body,
                    }))
            }
            Source::External { repo, .. } => {
                let Some(remote) = record.remote.iter().find(|r| r.name == asset).cloned() else {
                    tracing::debug!(repo, version, asset, "upstream version has no such file");
                    return Ok(None);
                };
                let flight = self.join_flight(node, ask, &repo, &record, remote);
                match flight.wait_started().await {
                    Started::Ok(size) => Ok(Some(AssetBody {
                        size,
                        body: flight.body(),
                    })),
                    Started::Failed(why) => Err(RegistryError::Unavailable(why)),
                    Started::Status(status) => Err(RegistryError::Unavailable(format!(
                        "upstream answered {status}"
                    ))),
                }
            }
        }
    }

    /// Joins (or starts) the fetch of a public file.
    fn join_flight(
        &self,
        node: &Arc<Node>,
        ask: &Ask<'_>,
        repo: &str,
        record: &VersionRecord,
        remote: RemoteAsset,
    ) -> Arc<Flight> {
        let key = format!(
            "{}\0{repo}\0{}\0{}\0{}\0{}\0{}",
            ask.domain,
            ask.format,
            ask.key.namespace.as_deref().unwrap_or(""),
            ask.key.name,
            record.version,
            remote.name
        );
        let (flight, lead) = self.flights.join(&key);
        flight.requested_by(ask.repository);
        let label = format!("{}/{repo}", ask.domain);
        if !lead {
            self.metrics.inc(
                "granary_upstream_coalesced_total",
                &[
                    ("format", ask.format),
                    ("repository", &label),
                    ("kind", "artifact"),
                ],
            );
            return flight;
        }
        let job = Job {
            key,
            label,
            domain: ask.domain.to_owned(),
            repo: repo.to_owned(),
            format: ask.format,
            package: ask.key.clone(),
            version: record.clone(),
            remote,
        };
        let node = node.clone();
        let f = flight.clone();
        tokio::spawn(async move { node.upstreams.lead(&node, f, job).await });
        flight
    }

    /// Fetches, verifies, stores, replicates and retains one public file.
    async fn lead(&self, node: &Arc<Node>, flight: Arc<Flight>, job: Job) {
        // Upstream requests are counted where they are made (`fetch`); here, what the
        // bytes were found to be.
        let info = match self.download(node, &flight, &job).await {
            Ok(info) => info,
            Err(failure) => {
                let why = match failure {
                    Failure::Rejected(why) => {
                        self.fetcher.refused(&job.remote.url);
                        self.metrics.inc(
                            "granary_upstream_rejected_total",
                            &[("format", job.format), ("repository", &job.label)],
                        );
                        why
                    }
                    Failure::Failed(why) => why,
                };
                tracing::warn!(url = %job.remote.url, "upstream file not taken: {why}");
                flight.finish(Err(why));
                self.flights.remove(&job.key);
                return;
            }
        };
        // The bytes are kept only where the metadata will point at them: first on a
        // majority of voters, then in the state through Raft.
        if let Err(e) = node.replicator.replicate(&info.hashes.sha256).await {
            tracing::warn!(sha256 = %info.hashes.sha256, "upstream file not replicated, not retained: {e}");
            self.flights.remove(&job.key);
            return;
        }
        let mut repos = vec![job.repo.clone()];
        for r in flight.requesters() {
            if !repos.contains(&r) {
                repos.push(r);
            }
        }
        let mut version = job.version.clone();
        version.assets = vec![AssetRecord {
            name: job.remote.name.clone(),
            size: info.size,
            hashes: info.hashes.clone(),
        }];
        version.modified_ms = Node::now_ms();
        self.retain(node, &job.domain, &repos, job.format, &job.package, version)
            .await;
        self.flights.remove_after(&job.key, &flight, fetch::GRACE);
    }

    /// The leader's transfer: streams to the flight and the blob store at once; the
    /// flight ends only after the digests are checked, the store keeps only checked bytes.
    async fn download(
        &self,
        node: &Arc<Node>,
        flight: &Arc<Flight>,
        job: &Job,
    ) -> Result<granary_format::model::BlobInfo, Failure> {
        let timeout = self.fetcher.timeout();
        let url = &job.remote.url;
        let labels = Labels {
            format: job.format.to_owned(),
            repository: job.label.clone(),
            kind: "artifact",
            package: None,
        };
        let raw = self
            .fetcher
            .raw(url, &labels)
            .await
            .map_err(Failure::Failed)?;
        if raw.status != 200 {
            return Err(Failure::Failed(format!(
                "upstream {url} answered {}",
                raw.status
            )));
        }
        let size = raw.size;
        let mut body = raw.body;
        if let (Some(have), Some(want)) = (size, job.remote.size)
            && have != want
        {
            return Err(Failure::Rejected(format!(
                "upstream {url} sends {have} bytes, its metadata says {want}"
            )));
        }
        flight.start(Started::Ok(size));
        let mut hasher = MultiHasher::new();
        let transfer: Result<(), String> = async {
            loop {
                match tokio::time::timeout(timeout, body.frame()).await {
                    Err(_) => return Err(format!("upstream {url} stalled")),
                    Ok(Some(Err(e))) => return Err(format!("upstream {url} failed mid-file: {e}")),
                    Ok(None) => return Ok(()),
                    Ok(Some(Ok(frame))) => {
                        if let Ok(chunk) = frame.into_data() {
                            hasher.update(&chunk);
                            flight.push(chunk);
                        }
                    }
                }
            }
        }
        .await;
        let len = hasher.len();
        let hashes = hasher.finish();
        match transfer {
            Err(why) => return Err(Failure::Failed(why)),
            Ok(()) if size.is_some_and(|s| s != len) => {
                return Err(Failure::Failed(format!(
                    "upstream {url} ended after {len} bytes"
                )));
            }
            Ok(()) if !job.remote.matches(len, &hashes) => {
                return Err(Failure::Rejected(format!(
                    "{} from {url} does not match the digests its registry published",
                    job.remote.name
                )));
            }
            Ok(()) => {}
        }
        flight.finish(Ok(()));
        // Only checked bytes reach the store, replayed from the flight's memory; the four
        // digests are known, so the store recomputes only the SHA-256 that names them.
        let info = granary_format::model::BlobInfo { size: len, hashes };
        node.blobs
            .put_replica(
                flight.body(),
                node.config.max_body_bytes,
                &info,
                crate::store::blob::ReplicaCheck::Sha256,
            )
            .await
            .map_err(|e| Failure::Failed(format!("storing {url} failed: {e}")))
    }

    /// Keeps a version served from an upstream repository in the requested one, in the
    /// background (the download does not wait for it).
    fn retain_from_upstream(&self, node: &Arc<Node>, ask: &Ask<'_>, record: &VersionRecord) {
        let key = format!(
            "{}\0{}\0{}\0{}\0{}\0{}",
            ask.domain,
            ask.repository,
            ask.format,
            ask.key.namespace.as_deref().unwrap_or(""),
            ask.key.name,
            record.version
        );
        if !self
            .retaining
            .lock()
            .expect("retaining lock")
            .insert(key.clone())
        {
            return;
        }
        let node = node.clone();
        let domain = ask.domain.to_owned();
        let repo = ask.repository.to_owned();
        let format = ask.format;
        let package = ask.key.clone();
        let mut version = record.clone();
        version.modified_ms = Node::now_ms();
        tokio::spawn(async move {
            node.upstreams
                .retain(&node, &domain, &[repo], format, &package, version)
                .await;
            node.upstreams
                .retaining
                .lock()
                .expect("retaining lock")
                .remove(&key);
        });
    }

    async fn retain(
        &self,
        node: &Node,
        domain: &str,
        repos: &[String],
        format: &'static str,
        package: &PackageKey,
        version: VersionRecord,
    ) {
        let targets = repos
            .iter()
            .map(|r| PackageTarget {
                domain: domain.to_owned(),
                repository: r.clone(),
                format: format.to_owned(),
                package: package.clone(),
            })
            .collect();
        let cmd = Command::RetainVersion {
            targets,
            version: Box::new(version),
        };
        match node.propose(cmd).await {
            Ok(CommandResult::Failed(e)) => tracing::warn!("retaining a version failed: {e}"),
            Ok(_) => {
                for r in repos {
                    let label = format!("{domain}/{r}");
                    self.metrics.inc(
                        "granary_upstream_retained_total",
                        &[("format", format), ("repository", &label)],
                    );
                }
            }
            Err(e) => tracing::warn!("retaining a version failed: {e}"),
        }
    }
}

/// The reader of public registries of a format, by name (peers name the format).
pub(crate) fn reader_for(format: &str) -> Option<Arc<dyn UpstreamFormat>> {
    use granary_format::Format as _;
    match format {
        "npm" => granary_format_npm::NpmFormat::default().upstream(),
        _ => None,
    }
}

/// Opens a stored blob, fetching it from a peer if this node lacks it: its size and body.
pub(crate) async fn open_blob(
    node: &Node,
    sha256: &str,
) -> Result<Option<(u64, Body)>, RegistryError> {
    let open = |node: &Node| -> Result<Option<(u64, Body)>, RegistryError> {
        Ok(node
            .blobs
            .open(sha256)
            .map_err(internal)?
            .map(|(info, body)| (info.size, body)))
    };
    if let Some(found) = open(node)? {
        return Ok(Some(found));
    }
    if node.cluster.other_members().is_empty() {
        // Every caller asks for a blob a version refers to: with no member to fetch it
        // from, its bytes here were damaged (the node's log names the blob) or lost.
        return Err(RegistryError::Internal(format!(
            "the package's bytes (blob {sha256}) are not readable on this node and no other \
             member holds them; see the node's log"
        )));
    }
    // Referenced but not here yet (this node is catching up): fetch it from a peer. One
    // that no peer could send now is not gone, and the request may be retried.
    if !node.replicator.fetch(sha256).await {
        return Err(RegistryError::Unavailable(
            "the package's bytes are not on this node yet and no peer sent them; retry shortly"
                .into(),
        ));
    }
    let opened = open(node)?;
    if opened.is_none() {
        tracing::warn!(sha256, "a blob fetched from a peer is not readable here");
    }
    Ok(opened)
}

enum Failure {
    /// The transfer failed (status, timeout, connection): nothing learned.
    Failed(String),
    /// The bytes are not what the registry's metadata promised.
    Rejected(String),
}

struct Job {
    key: String,
    label: String,
    domain: String,
    repo: String,
    format: &'static str,
    package: PackageKey,
    version: VersionRecord,
    remote: RemoteAsset,
}

enum Step {
    Local {
        repo: String,
        package: PackageRecord,
    },
    External {
        repo: String,
        connection: String,
    },
}

/// The search order: the repository, its upstreams depth-first, each repository's
/// external connection after its upstreams; at most [`MAX_SEARCHED`] repositories; a
/// package whose origin controls block upstream versions ends its branch.
fn walk(node: &Node, ask: &Ask<'_>) -> Result<Vec<Step>, RegistryError> {
    fn visit(
        node: &Node,
        ask: &Ask<'_>,
        repo: &str,
        seen: &mut HashSet<String>,
        steps: &mut Vec<Step>,
    ) -> Result<(), RegistryError> {
        if seen.len() >= MAX_SEARCHED || !seen.insert(repo.to_owned()) {
            return Ok(());
        }
        let Some(record) = node
            .state
            .repository_cached(ask.domain, repo)
            .map_err(internal)?
        else {
            return Ok(());
        };
        let package = node
            .state
            .package(ask.domain, repo, ask.format, ask.key)
            .map_err(internal)?;
        let blocked = package
            .as_ref()
            .is_some_and(|p| p.origin.upstream == granary_format::model::Allow::Block);
        if let Some(package) = package {
            steps.push(Step::Local {
                repo: repo.to_owned(),
                package,
            });
        }
        if blocked {
            return Ok(());
        }
        for u in &record.upstreams {
            visit(node, ask, u, seen, steps)?;
        }
        if let Some(reader) = ask.reader {
            for c in &record.external_connections {
                if reader.serves(c) {
                    steps.push(Step::External {
                        repo: repo.to_owned(),
                        connection: c.clone(),
                    });
                }
            }
        }
        Ok(())
    }
    let mut steps = Vec::new();
    visit(node, ask, ask.repository, &mut HashSet::new(), &mut steps)?;
    Ok(steps)
}

/// The merged package record: tags from every part, upstreams winning on conflict
/// (CodeArtifact's npm rule); a stamp that moves when any part moves.
fn merge(ask: &Ask<'_>, parts: &[Part]) -> Option<PackageRecord> {
    let first = parts.first()?;
    if let [Part::Local { package, .. }] = parts {
        return Some(package.clone());
    }
    let mut tags = BTreeMap::new();
    let mut created = i64::MAX;
    let mut modified = 0;
    let mut h = DefaultHasher::new();
    for part in parts {
        match part {
            Part::Local { repo, package } => {
                (0u8, repo, package.stamp).hash(&mut h);
                tags.extend(package.tags.clone());
                created = created.min(package.created_ms);
                modified = modified.max(package.modified_ms);
            }
            Part::External { repo, doc, .. } => {
                (1u8, repo, doc.digest).hash(&mut h);
                tags.extend(doc.package.tags.clone());
                if doc.package.created_ms > 0 {
                    created = created.min(doc.package.created_ms);
                }
                modified = modified.max(doc.package.modified_ms);
            }
        }
    }
    let origin = match first {
        Part::Local { repo, package } if repo == ask.repository => package.origin,
        _ => OriginRestrictions::INGESTED_FIRST,
    };
    Some(PackageRecord {
        key: ask.key.clone(),
        created_ms: if created == i64::MAX {
            modified
        } else {
            created
        },
        modified_ms: modified,
        stamp: h.finish() >> 1,
        tags,
        origin,
    })
}

fn external_version(v: &VersionRecord, repo: &str, connection: &str) -> VersionRecord {
    let mut v = v.clone();
    v.origin = VersionOrigin {
        origin_type: OriginType::External,
        repository: Some(repo.to_owned()),
        external_connection: Some(connection.to_owned()),
    };
    v
}

fn internal(e: crate::store::StoreError) -> RegistryError {
    RegistryError::Internal(e.to_string())
}
