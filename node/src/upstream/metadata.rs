//! Package documents of public registries, cached per node: fresh for a TTL, then served
//! stale while one background refresh runs (stale-while-revalidate), and kept serving
//! while the registry is down. A 404 is remembered briefly; a 5xx, a timeout or an
//! unreadable document is never remembered at all.
//!
//! ```text
//!   get(url) ─▶ fresh entry ─────────────────────────────▶ hit
//!         │  ─▶ stale entry ─▶ spawn refresh (one per url) ─▶ stale
//!         │  ─▶ none/expired 404 ─▶ join the fetch for url ─▶ Found / NotFound
//!         │                              └─ failed: stale entry if any, else the error
//! ```
//!
//! Concurrent misses for one document share one request (the fetch is spawned, so it
//! completes even if the request that started it goes away).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use granary_format::UpstreamFormat;
use granary_format::model::{PackageKey, UpstreamPackage};

use super::fetch::{Fetcher, Labels, Raw};
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

/// Largest package document accepted from an upstream (npm's largest packuments are tens
/// of MiB).
const MAX_DOCUMENT_BYTES: usize = 128 << 20;

/// A package document as fetched.
pub(crate) struct Document {
    /// What it says.
    pub(crate) package: UpstreamPackage,
    /// What it is: served to members that ask this node, the URL's owner, for it.
    pub(crate) raw: bytes::Bytes,
    /// Changes when the document's bytes change: rendered documents are cached under it.
    pub(crate) digest: u64,
}

/// A lookup's answer.
#[derive(Clone)]
pub(crate) enum Lookup {
    /// The registry has the package.
    Found(Arc<Document>),
    /// The registry says it has no such package.
    NotFound,
}

struct Entry {
    fetched: Instant,
    lookup: Lookup,
}

type Fetch = Shared<BoxFuture<'static, Result<Lookup, String>>>;

/// What a metadata lookup is about, for fetching and for the counters.
pub(crate) struct Request<'a> {
    /// Full document URL.
    pub(crate) url: String,
    /// The package.
    pub(crate) key: &'a PackageKey,
    /// The format's reader.
    pub(crate) reader: Arc<dyn UpstreamFormat>,
    /// Counter labels: format and connection repository.
    pub(crate) format: &'a str,
    /// `domain/repository` holding the connection.
    pub(crate) repository: &'a str,
    /// Fetch from this node, not through the URL's owner (this node is the owner,
    /// serving a member).
    pub(crate) local_only: bool,
}

/// The cache of one node.
pub(crate) struct MetadataCache {
    fetcher: Arc<Fetcher>,
    config: UpstreamConfig,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<String, Entry>>,
    inflight: Mutex<HashMap<String, Fetch>>,
}

impl MetadataCache {
    pub(crate) fn new(
        fetcher: Arc<Fetcher>,
        config: UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        MetadataCache {
            fetcher,
            config,
            metrics,
            entries: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn ttl(&self, lookup: &Lookup) -> Duration {
        match lookup {
            Lookup::Found(_) => Duration::from_secs(self.config.metadata_ttl_secs),
            Lookup::NotFound => Duration::from_secs(self.config.not_found_ttl_secs),
        }
    }

    /// The document for `req.url`, as fresh as the rules above allow.
    pub(crate) async fn get(self: &Arc<Self>, req: Request<'_>) -> Result<Lookup, String> {
        let count = |result: &str| {
            self.metrics.inc(
                "granary_upstream_cache_total",
                &[
                    ("format", req.format),
                    ("repository", req.repository),
                    ("result", result),
                ],
            );
        };
        let stale = {
            let entries = self.entries.lock().expect("metadata lock");
            match entries.get(&req.url) {
                Some(e) if e.fetched.elapsed() < self.ttl(&e.lookup) => {
                    let hit = e.lookup.clone();
                    drop(entries);
                    count("hit");
                    return Ok(hit);
                }
                Some(Entry {
                    lookup: Lookup::Found(doc),
                    ..
                }) => Some(doc.clone()),
                _ => None,
            }
        };
        if let Some(doc) = stale {
            // Serve what we have; the refresh (a spawned task) runs on its own.
            count("stale");
            self.stale_served(&req);
            let _refresh = self.fetch(&req, false);
            return Ok(Lookup::Found(doc));
        }
        count("miss");
        self.fetch(&req, true).await
    }

    fn stale_served(&self, req: &Request<'_>) {
        self.metrics.inc(
            "granary_upstream_stale_served_total",
            &[("format", req.format), ("repository", req.repository)],
        );
    }

    /// The shared fetch of `req.url`, started if none is running; `waiter` counts a
    /// caller that joins one already running as coalesced.
    fn fetch(self: &Arc<Self>, req: &Request<'_>, waiter: bool) -> Fetch {
        let mut inflight = self.inflight.lock().expect("metadata lock");
        if let Some(f) = inflight.get(&req.url) {
            if !waiter {
                return f.clone();
            }
            self.metrics.inc(
                "granary_upstream_coalesced_total",
                &[
                    ("format", req.format),
                    ("repository", req.repository),
                    ("kind", "metadata"),
                ],
            );
            return f.clone();
        }
        let this = self.clone();
        let url = req.url.clone();
        let key = req.key.clone();
        let reader = req.reader.clone();
        let format = req.format.to_owned();
        let repository = req.repository.to_owned();
        let local_only = req.local_only;
        let task = tokio::spawn(async move {
            let labels = Labels {
                format,
                repository,
                kind: "metadata",
                package: Some(key.clone()),
            };
            let result = this
                .fetch_once(&url, &key, reader, &labels, local_only)
                .await;
            match &result {
                Ok(lookup) => this.store(url.clone(), lookup.clone()),
                Err(e) => tracing::warn!(url, error = %e, "upstream metadata fetch failed"),
            }
            this.inflight.lock().expect("metadata lock").remove(&url);
            result
        });
        let shared = async move {
            task.await
                .unwrap_or_else(|e| Err(format!("upstream fetch task failed: {e}")))
        }
        .boxed()
        .shared();
        inflight.insert(req.url.clone(), shared.clone());
        shared
    }

    async fn fetch_once(
        &self,
        url: &str,
        key: &PackageKey,
        reader: Arc<dyn UpstreamFormat>,
        labels: &Labels,
        local_only: bool,
    ) -> Result<Lookup, String> {
        let raw = if local_only {
            self.fetcher.raw_local(url, labels, false).await?
        } else {
            self.fetcher.raw(url, labels).await?
        };
        if raw.status == 404 || raw.status == 410 {
            return Ok(Lookup::NotFound);
        }
        if raw.status != 200 {
            return Err(format!("upstream {url} answered {}", raw.status));
        }
        if raw.size.is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64) {
            return Err(format!(
                "upstream document {url} exceeds {MAX_DOCUMENT_BYTES} bytes"
            ));
        }
        let body = granary_format::body::read_to_bytes(raw.body, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| format!("upstream document {url}: {e}"))?;
        let url = url.to_owned();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let package = reader
                .parse_metadata(&key, &url, &body)
                .map_err(|e| e.to_string())?;
            let digest = {
                use sha2::Digest as _;
                let d = sha2::Sha256::digest(&body);
                u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]))
            };
            Ok(Lookup::Found(Arc::new(Document {
                package,
                digest,
                raw: body,
            })))
        })
        .await
        .map_err(|e| format!("parsing the upstream document failed: {e}"))?
    }

    /// The fetcher this cache uses (and peers' raw fetches go through).
    pub(crate) fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// A member asks this node, the URL's owner, for a package document: served from
    /// this node's cache, fetched (once, however many ask) when it has none.
    pub(crate) async fn serve_peer(
        self: &Arc<Self>,
        url: &str,
        key: &PackageKey,
        reader: Arc<dyn UpstreamFormat>,
        format: &str,
        repository: &str,
    ) -> Result<Raw, String> {
        let lookup = self
            .get(Request {
                url: url.to_owned(),
                key,
                reader,
                format,
                repository,
                local_only: true,
            })
            .await?;
        Ok(match lookup {
            Lookup::Found(doc) => Raw {
                status: 200,
                size: Some(doc.raw.len() as u64),
                body: granary_format::body::full(doc.raw.clone()),
            },
            Lookup::NotFound => Raw {
                status: 404,
                size: None,
                body: granary_format::body::empty(),
            },
        })
    }

    fn store(&self, url: String, lookup: Lookup) {
        let mut entries = self.entries.lock().expect("metadata lock");
        if entries.len() >= self.config.metadata_cache_entries && !entries.contains_key(&url) {
            // Drop the oldest tenth: amortized, and a full cache stays useful.
            let mut ages: Vec<(Instant, String)> = entries
                .iter()
                .map(|(k, e)| (e.fetched, k.clone()))
                .collect();
            ages.sort();
            for (_, k) in ages.iter().take((entries.len() / 10).max(1)) {
                entries.remove(k);
            }
        }
        entries.insert(
            url,
            Entry {
                fetched: Instant::now(),
                lookup,
            },
        );
    }
}
