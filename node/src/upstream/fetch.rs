//! Raw GETs of public registries' URLs, one in flight per URL in a region of the cluster.
//!
//! ```text
//!   raw(url) ─▶ owners(url): the region's members ranked by rendezvous hash of (node, url)
//!      ├─ owner is this node ─▶ raw_local(url)
//!      └─ owner is a peer ───▶ gRPC FetchUpstream(url) on it ─▶ its raw_local(url)
//!             unreachable ─▶ the next owner … finally this node
//!   raw_local(url) ─▶ flight per URL: the first asker GETs, everyone streams its bytes
//! ```
//!
//! Every member ranks the same members the same way, so concurrent misses for one URL
//! meet on one node: N misses on M nodes cost one upstream request. Members are taken
//! from the Raft membership (same `region` label); a member that cannot be reached is
//! skipped, so a dead owner costs one connection attempt, not an outage. What comes back
//! is raw: checking digests, storing and retaining are the asking node's work.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use granary_format::Body;
use granary_format::model::PackageKey;
use granary_protocol::pb;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::flight::{Flights, Started};
use crate::cluster::Cluster;
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::raft::NodeId;

/// What one upstream GET is for (counter labels).
#[derive(Debug, Clone)]
pub(crate) struct Labels {
    /// Format name.
    pub(crate) format: String,
    /// `domain/repository` holding the connection.
    pub(crate) repository: String,
    /// `metadata` or `artifact`.
    pub(crate) kind: &'static str,
    /// For `metadata`: the package.
    pub(crate) package: Option<PackageKey>,
}

/// An upstream's answer.
pub(crate) struct Raw {
    /// HTTP status.
    pub(crate) status: u16,
    /// Size, when 200 and the upstream sent one.
    pub(crate) size: Option<u64>,
    /// The bytes (empty unless 200).
    pub(crate) body: Body,
}

/// The node's upstream GETs.
pub(crate) struct Fetcher {
    client: reqwest::Client,
    timeout: Duration,
    cluster: Cluster,
    region: String,
    flights: Arc<Flights>,
    /// URLs whose last bytes an asker refused: the next GET must be a fresh one.
    refused: Mutex<HashSet<String>>,
    /// Upstream origins (`scheme://host:port`) that failed (no answer, timeout, 5xx), and
    /// until when requests to them fail at once instead of waiting on them again.
    down: Mutex<HashMap<String, (Instant, String)>>,
    /// How long an origin stays down after a failure.
    backoff: Duration,
    metrics: Arc<Metrics>,
}

/// How long a finished transfer stays in memory for late askers.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

impl Fetcher {
    pub(crate) fn new(
        config: &UpstreamConfig,
        cluster: Cluster,
        region: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .user_agent(concat!("granary/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))?;
        Ok(Fetcher {
            client,
            timeout: Duration::from_millis(config.request_timeout_ms),
            cluster,
            region,
            flights: Arc::new(Flights::default()),
            refused: Mutex::new(HashSet::new()),
            down: Mutex::new(HashMap::new()),
            backoff: Duration::from_millis(config.unavailable_backoff_ms),
            metrics,
        })
    }

    /// How long an upstream may keep us waiting for its answer or its next chunk.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The members that may fetch `url`, best first: this region's, by rendezvous hash.
    fn owners(&self, url: &str) -> Vec<(NodeId, Option<String>)> {
        let me = self.cluster.id();
        let mut members: Vec<(NodeId, Option<String>)> = vec![(me, None)];
        for (id, addr, region) in self.cluster.members_with_regions() {
            if id != me && region == self.region {
                members.push((id, Some(addr)));
            }
        }
        members.sort_by_cached_key(|(id, _)| {
            let mut h = DefaultHasher::new();
            (id, url).hash(&mut h);
            std::cmp::Reverse(h.finish())
        });
        members
    }

    /// The bytes last fetched from `url` were refused (digest mismatch): the next GET,
    /// here or on the URL's owner, goes to the upstream again.
    pub(crate) fn refused(&self, url: &str) {
        self.flights.forget_ended(url);
        self.refused
            .lock()
            .expect("refused lock")
            .insert(url.to_owned());
    }

    /// GETs `url` through its owner in this region (see the module's diagram). An
    /// upstream that just failed fails again at once for `unavailable_backoff_ms`, here
    /// and on the owner, so requests that can be served without it (retained versions,
    /// stale documents) never wait on it.
    pub(crate) async fn raw(self: &Arc<Self>, url: &str, labels: &Labels) -> Result<Raw, String> {
        if let Some(why) = self.is_down(url) {
            return Err(why);
        }
        let fresh = self.refused.lock().expect("refused lock").remove(url);
        for (id, addr) in self.owners(url) {
            let Some(addr) = addr else {
                return self.raw_local(url, labels, fresh).await;
            };
            match self.raw_peer(&addr, url, labels, fresh).await {
                Ok(raw) => return Ok(raw),
                Err(PeerFailure::Unreachable(e)) => {
                    tracing::debug!(node = id, url, error = %e, "upstream owner unreachable; next");
                }
                Err(PeerFailure::Upstream(e)) => return Err(e),
            }
        }
        self.raw_local(url, labels, fresh).await
    }

    /// GETs `url` from this node, sharing a GET already in flight.
    pub(crate) async fn raw_local(
        self: &Arc<Self>,
        url: &str,
        labels: &Labels,
        fresh: bool,
    ) -> Result<Raw, String> {
        if fresh {
            self.flights.forget_ended(url);
        }
        let (flight, lead) = self.flights.join(url);
        if lead {
            let this = self.clone();
            let url = url.to_owned();
            let labels = labels.clone();
            let f = flight.clone();
            tokio::spawn(async move {
                let outcome = this.get(&url, &f).await;
                let label = match &outcome {
                    Ok(200) => "ok",
                    Ok(404 | 410) => "not_found",
                    Ok(_) | Err(_) => "error",
                };
                this.metrics.inc(
                    "granary_upstream_requests_total",
                    &[
                        ("format", &labels.format),
                        ("repository", &labels.repository),
                        ("kind", labels.kind),
                        ("outcome", label),
                    ],
                );
                let ok = matches!(outcome, Ok(200));
                f.finish(outcome.map(|_| ()));
                if ok {
                    this.flights.remove_after(&url, &f, GRACE);
                } else {
                    this.flights.remove(&url);
                }
            });
        } else {
            self.metrics.inc(
                "granary_upstream_coalesced_total",
                &[
                    ("format", &labels.format),
                    ("repository", &labels.repository),
                    ("kind", labels.kind),
                ],
            );
        }
        match flight.wait_started().await {
            Started::Ok(size) => Ok(Raw {
                status: 200,
                size,
                body: flight.body(),
            }),
            Started::Status(status) => Ok(Raw {
                status,
                size: None,
                body: granary_format::body::empty(),
            }),
            Started::Failed(why) => Err(why),
        }
    }

    /// Why requests to `url`'s upstream fail at once for now, if they do.
    fn is_down(&self, url: &str) -> Option<String> {
        let mut down = self.down.lock().expect("down lock");
        let origin = origin(url);
        match down.get(origin) {
            Some((until, why)) if Instant::now() < *until => Some(format!(
                "upstream {origin} is unavailable ({why}); retrying in {} ms",
                until.saturating_duration_since(Instant::now()).as_millis()
            )),
            Some(_) => {
                down.remove(origin);
                None
            }
            None => None,
        }
    }

    /// Records how a GET of `url` went: a failure marks its upstream down for a while.
    fn record(&self, url: &str, outcome: &Result<u16, String>) {
        let failed = match outcome {
            Ok(status) => *status >= 500,
            Err(_) => true,
        };
        let mut down = self.down.lock().expect("down lock");
        if failed && !self.backoff.is_zero() {
            let why = match outcome {
                Ok(status) => format!("it answered {status}"),
                Err(e) => e.clone(),
            };
            down.insert(origin(url).to_owned(), (Instant::now() + self.backoff, why));
        } else if !failed {
            down.remove(origin(url));
        }
    }

    /// The leader's GET: status first, then every chunk into the flight.
    async fn get(&self, url: &str, flight: &super::flight::Flight) -> Result<u16, String> {
        if let Some(why) = self.is_down(url) {
            return Err(why);
        }
        let outcome = self.get_once(url, flight).await;
        self.record(url, &outcome);
        outcome
    }

    async fn get_once(&self, url: &str, flight: &super::flight::Flight) -> Result<u16, String> {
        let mut resp = tokio::time::timeout(self.timeout, self.client.get(url).send())
            .await
            .map_err(|_| format!("upstream {url} did not answer in time"))?
            .map_err(|e| format!("upstream {url} did not answer: {}", crate::error_chain(&e)))?;
        let status = resp.status().as_u16();
        if status != 200 {
            flight.start(Started::Status(status));
            return Ok(status);
        }
        flight.start(Started::Ok(resp.content_length()));
        loop {
            match tokio::time::timeout(self.timeout, resp.chunk()).await {
                Err(_) => return Err(format!("upstream {url} stalled")),
                Ok(Err(e)) => {
                    return Err(format!(
                        "upstream {url} failed mid-transfer: {}",
                        crate::error_chain(&e)
                    ));
                }
                Ok(Ok(None)) => return Ok(200),
                Ok(Ok(Some(chunk))) => flight.push(chunk),
            }
        }
    }

    /// Asks the peer at `addr` to GET `url`.
    async fn raw_peer(
        &self,
        addr: &str,
        url: &str,
        labels: &Labels,
        fresh: bool,
    ) -> Result<Raw, PeerFailure> {
        let mut client = self
            .cluster
            .peers()
            .cluster_bulk(addr)
            .map_err(|e| PeerFailure::Unreachable(e.to_string()))?;
        let req = pb::UpstreamRequest {
            url: url.to_owned(),
            format: labels.format.clone(),
            repository: labels.repository.clone(),
            kind: labels.kind.to_owned(),
            namespace: labels
                .package
                .as_ref()
                .and_then(|k| k.namespace.clone())
                .unwrap_or_default(),
            name: labels
                .package
                .as_ref()
                .map(|k| k.name.clone())
                .unwrap_or_default(),
            fresh,
        };
        // The owner waits for the upstream's answer before its first message.
        let wait = self.timeout + Duration::from_secs(2);
        let mut stream = tokio::time::timeout(wait, client.fetch_upstream(req))
            .await
            .map_err(|_| PeerFailure::Unreachable("no answer in time".to_owned()))?
            .map_err(classify)?
            .into_inner();
        let first = tokio::time::timeout(wait, stream.message())
            .await
            .map_err(|_| PeerFailure::Unreachable("no answer in time".to_owned()))?
            .map_err(classify)?
            .ok_or_else(|| PeerFailure::Unreachable("empty answer".to_owned()))?;
        let status = u16::try_from(first.status).unwrap_or(502);
        let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
        let rest = stream.map(|r| r.map(|c| c.data));
        let body = StreamBody::new(head.chain(rest).map(|r| {
            r.map(Frame::data)
                .map_err(|s| -> granary_format::body::BodyError {
                    format!("upstream owner: {}", s.message()).into()
                })
        }))
        .boxed_unsync();
        Ok(Raw {
            status,
            size: first.has_size.then_some(first.size),
            body,
        })
    }
}

/// Serves a peer's FetchUpstream: the first message, then the bytes.
pub(crate) fn to_stream(
    raw: Raw,
) -> impl futures::Stream<Item = Result<pb::UpstreamChunk, tonic::Status>> + Send + 'static {
    let first = pb::UpstreamChunk {
        status: u32::from(raw.status),
        has_size: raw.size.is_some(),
        size: raw.size.unwrap_or(0),
        data: Bytes::new(),
    };
    let body = futures::stream::unfold(raw.body, |mut body| async move {
        loop {
            match body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        let chunk = pb::UpstreamChunk {
                            data,
                            ..Default::default()
                        };
                        return Some((Ok(chunk), body));
                    }
                }
                Err(e) => return Some((Err(tonic::Status::aborted(e.to_string())), body)),
            }
        }
    });
    futures::stream::iter([Ok(first)]).chain(body)
}

/// `scheme://host:port` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

enum PeerFailure {
    /// The owner could not be asked: try the next one.
    Unreachable(String),
    /// The owner asked the upstream, which failed: the answer for everyone.
    Upstream(String),
}

fn classify(s: tonic::Status) -> PeerFailure {
    match s.code() {
        tonic::Code::Unavailable if s.message().starts_with("upstream") => {
            PeerFailure::Upstream(s.message().to_owned())
        }
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Unimplemented
        | tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied => PeerFailure::Unreachable(s.to_string()),
        _ => PeerFailure::Upstream(s.message().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(
            origin("https://registry.npmjs.org/express"),
            "https://registry.npmjs.org"
        );
        assert_eq!(
            origin("http://127.0.0.1:4873/@a%2fb"),
            "http://127.0.0.1:4873"
        );
        assert_eq!(origin("http://h"), "http://h");
    }
}
