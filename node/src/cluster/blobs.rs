//! Package bytes between members.
//!
//! - **Push before propose**: the node that receives an upload pushes it to peers until a
//!   majority of voters hold it, and only then proposes the metadata that refers to it, so
//!   an acknowledged publish survives the loss of any minority.
//! - **Pull after apply**: apply reports the digests that new versions refer to; a
//!   background task pulls those this node lacks (bounded, retried).
//! - **Pull on demand**: a request for a blob this node lacks fetches it from a peer.
//! - **Anti-entropy**: at start and then periodically, every referenced digest is checked
//!   and missing ones pulled, so a node that was away for days repairs itself.
//! - **Scrub** ([`super::scrub`]): a paced pass reads every blob back from disk; damaged
//!   copies are dropped and pulled again like missing ones.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use granary_format::body::{Body, BodyError};
use granary_format::model::{BlobInfo, Hashes};
use granary_protocol::pb;
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::peers::PeerChannel;
use crate::metrics::{Metrics, PULLS, PUSHES};
use crate::state::StateView;
use crate::store::blob::{BlobError, BlobStore, ReplicaCheck, Written};
use granary_protocol::pb::cluster_client::ClusterClient;

/// Size of the chunks streamed between nodes.
const WIRE_CHUNK: usize = 256 * 1024;
/// Blobs larger than this are pushed only after asking whether the peer has them.
const ASK_FIRST_ABOVE: u64 = 1 << 20;
/// Concurrent background pulls.
const PULL_CONCURRENCY: usize = 4;
/// Interval of the anti-entropy scan.
const SCAN_EVERY: Duration = Duration::from_secs(600);

/// Why a blob could not be replicated.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplicateError {
    /// Fewer than a majority of voters acknowledged it in time.
    #[error("the upload reached {have} of the {need} nodes it must be stored on; retry shortly")]
    NoMajority {
        /// Voters holding it.
        have: usize,
        /// Voters needed.
        need: usize,
    },
}

/// Why a new upload could not be stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreFailure {
    /// Not on this node.
    #[error(transparent)]
    Local(#[from] BlobError),
    /// Not on a majority of voters.
    #[error(transparent)]
    Replicate(#[from] ReplicateError),
}

/// What a push sends.
#[derive(Clone)]
enum Source {
    /// The blob with this SHA-256 as stored here.
    Stored(String),
    /// A blob's size, digests and CRC32C, and its bytes.
    InHand(Arc<(BlobInfo, u32)>, Bytes),
}

impl Source {
    fn sha256(&self) -> &str {
        match self {
            Source::Stored(sha256) => sha256,
            Source::InHand(head, _) => &head.0.hashes.sha256,
        }
    }
}

/// Moves blobs between this node and its peers.
#[derive(Clone)]
pub(crate) struct BlobReplicator {
    blobs: BlobStore,
    cluster: Cluster,
    limit: u64,
    metrics: Arc<Metrics>,
    /// Fetches from peers in flight, by digest: every request for a blob this node lacks
    /// waits for one pull instead of starting its own.
    fetching: Arc<std::sync::Mutex<HashMap<String, Shared<BoxFuture<'static, bool>>>>>,
}

impl BlobReplicator {
    pub(crate) fn new(
        blobs: BlobStore,
        cluster: Cluster,
        limit: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        BlobReplicator {
            blobs,
            cluster,
            limit,
            metrics,
            fetching: Default::default(),
        }
    }

    /// Returns once a majority of voters (this node included, if it votes) hold the blob;
    /// pushes to the remaining members continue in the background.
    pub(crate) async fn replicate(&self, sha256: &str) -> Result<(), ReplicateError> {
        self.replicate_from(Source::Stored(sha256.to_owned())).await
    }

    /// Makes a new upload durable here and on a majority of voters. A blob in one chunk
    /// goes to the peers from memory while this node's commit runs, so the two syncs
    /// overlap instead of following each other; a larger one is committed first and then
    /// pushed from the store, as [`BlobReplicator::replicate`] does.
    pub(crate) async fn commit_and_replicate(
        &self,
        written: Written,
    ) -> Result<BlobInfo, StoreFailure> {
        let Some(data) = written.whole() else {
            let info = written.commit().await?;
            self.replicate(&info.hashes.sha256).await?;
            return Ok(info);
        };
        let copy = Source::InHand(Arc::new((written.info().clone(), written.crc32c())), data);
        // This node's copy counts towards the majority once committed: both must succeed.
        let (committed, replicated) = tokio::join!(written.commit(), self.replicate_from(copy));
        let info = committed?;
        replicated?;
        Ok(info)
    }

    async fn replicate_from(&self, copy: Source) -> Result<(), ReplicateError> {
        let (voters, me_voter) = self.cluster.voters();
        let need = voters / 2 + 1;
        let mut have = usize::from(me_voter);
        let others = self.cluster.other_members();
        if others.is_empty() {
            return Ok(());
        }
        let (tx, mut rx) = mpsc::channel::<bool>(others.len());
        for (id, addr, voter) in others {
            let this = self.clone();
            let tx = tx.clone();
            let copy = copy.clone();
            // Each push runs to its end even after the majority answered, so every member
            // gets the bytes without waiting for its background pull.
            tokio::spawn(async move {
                let ok = match this.push(&addr, &copy).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(node = id, sha256 = %copy.sha256(), error = %e, "blob push failed");
                        false
                    }
                };
                let _ = tx.send(ok && voter).await;
            });
        }
        drop(tx);
        let deadline = Instant::now() + self.cluster.write_deadline();
        // A node cut off from a majority stops waiting for one (see `election_gate`).
        let cut_off = self.cluster.until_cut_off();
        tokio::pin!(cut_off);
        while have < need {
            let answer = tokio::select! {
                a = tokio::time::timeout_at(deadline, rx.recv()) => a,
                _ = &mut cut_off => break,
            };
            match answer {
                Ok(Some(true)) => have += 1,
                Ok(Some(false)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if have >= need {
            Ok(())
        } else {
            Err(ReplicateError::NoMajority { have, need })
        }
    }

    /// Sends a blob to one peer unless it already has it.
    async fn push(&self, addr: &str, copy: &Source) -> Result<(), String> {
        let sha256 = match copy {
            Source::InHand(head, data) => {
                return self
                    .push_small(addr, &head.0, Some(head.1), data.clone())
                    .await;
            }
            Source::Stored(sha256) => sha256,
        };
        let (info, crc32c, body) = self
            .send(sha256)?
            .ok_or_else(|| format!("blob {sha256} is not stored here"))?;
        if info.size <= ASK_FIRST_ABOVE {
            let data = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            return self.push_small(addr, &info, crc32c, data).await;
        }
        // A large blob is offered first, in case the peer has it.
        let mut client = self
            .cluster
            .peers()
            .cluster_bulk(addr)
            .map_err(|e| e.to_string())?;
        let has = client
            .has_blob(pb::BlobRef {
                sha256: sha256.to_owned(),
            })
            .await
            .map_err(|e| e.message().to_owned())?;
        if has.into_inner().present {
            return Ok(());
        }
        push_stream(&mut client, &info, crc32c, body).await
    }

    /// Sends a small blob, which is cheaper to send than to ask about (a peer that has it
    /// answers without reading it), as one message: over HTTP/1.1 where the peer takes it
    /// (see `peer_http`), else through gRPC.
    async fn push_small(
        &self,
        addr: &str,
        info: &BlobInfo,
        crc32c: Option<u32>,
        data: Bytes,
    ) -> Result<(), String> {
        let peers = self.cluster.peers();
        let head = head_chunk(info, crc32c);
        let http1 = peers.push_http1(addr, &head, data.clone()).await;
        let (pushed, transport) = peers
            .or_grpc(addr, http1, || async {
                let mut client = peers.cluster_bulk(addr).map_err(|e| e.to_string())?;
                let blob = pb::BlobChunk {
                    data: data.clone(),
                    ..head
                };
                match client.push_small_blob(blob).await {
                    Ok(reply) => stored(reply.into_inner()),
                    // A member from before the call: stream it instead.
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        let body = granary_format::body::full(data);
                        push_stream(&mut client, info, crc32c, body).await
                    }
                    Err(s) => Err(s.message().to_owned()),
                }
            })
            .await;
        if pushed.is_ok() {
            self.metrics.add(PUSHES, &[("transport", transport)], 1);
        }
        pushed
    }

    /// Stores a blob arriving from a peer, checking its size and `check` (its digests are
    /// taken from the sender).
    pub(crate) async fn receive(
        &self,
        expected: &BlobInfo,
        check: ReplicaCheck,
        body: Body,
    ) -> Result<(), String> {
        if self
            .blobs
            .has(&expected.hashes.sha256)
            .map_err(|e| e.to_string())?
        {
            // Drain nothing: the sender's stream is dropped with the request.
            return Ok(());
        }
        self.blobs
            .put_replica(body, self.limit, expected, check)
            .await
            .map_err(|e| match e {
                BlobError::TooLarge { limit } => format!("blob larger than {limit} bytes"),
                other => other.to_string(),
            })?;
        Ok(())
    }

    /// Whether this node holds a blob.
    pub(crate) fn has(&self, sha256: &str) -> Result<bool, String> {
        self.blobs.has(sha256).map_err(|e| e.to_string())
    }

    /// A blob this node holds, for a peer: its size and digests, its CRC32C if recorded,
    /// and its bytes.
    pub(crate) fn send(
        &self,
        sha256: &str,
    ) -> Result<Option<(BlobInfo, Option<u32>, Body)>, String> {
        self.blobs.open_copy(sha256).map_err(|e| e.to_string())
    }

    /// Fetches a blob this node lacks from the first peer that has it. Returns whether it
    /// is now stored here. Concurrent calls for one blob share one fetch, which runs to its
    /// end even if they all stop waiting.
    pub(crate) async fn fetch(&self, sha256: &str) -> bool {
        let flight = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            match fetching.get(sha256) {
                Some(flight) => flight.clone(),
                None => {
                    let this = self.clone();
                    let sha = sha256.to_owned();
                    let task = tokio::spawn(async move {
                        let stored = this.fetch_once(&sha).await;
                        this.fetching
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&sha);
                        stored
                    });
                    let flight = async move { task.await.unwrap_or(false) }.boxed().shared();
                    fetching.insert(sha256.to_owned(), flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    async fn fetch_once(&self, sha256: &str) -> bool {
        if self.has(sha256).unwrap_or(false) {
            return true;
        }
        for (id, addr, _) in self.cluster.other_members() {
            match self.pull_from(&addr, sha256).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(node = id, sha256, error = %e, "blob pull failed");
                }
            }
        }
        false
    }

    async fn pull_from(&self, addr: &str, sha256: &str) -> Result<bool, String> {
        let mut client = self
            .cluster
            .peers()
            .cluster_bulk(addr)
            .map_err(|e| e.to_string())?;
        let stream = match client
            .pull_blob(pb::BlobRef {
                sha256: sha256.to_owned(),
            })
            .await
        {
            Ok(r) => {
                self.metrics.add(PULLS, &[("transport", "grpc")], 1);
                r.into_inner()
            }
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(false),
            Err(s) => return Err(s.message().to_owned()),
        };
        let mut stream = stream;
        let head = stream
            .message()
            .await
            .map_err(|s| s.message().to_owned())?
            .ok_or("empty blob stream")?;
        let info = info_of(&head)?;
        let check = check_of(&head);
        if info.hashes.sha256 != sha256 {
            return Err(format!("asked for {sha256}, got {}", info.hashes.sha256));
        }
        let first = futures::stream::iter((!head.data.is_empty()).then_some(Ok(head.data)));
        let body = chunks_body(first.chain(stream.map(|r| r.map(|c| c.data))));
        self.receive(&info, check, body).await.map(|_| true)
    }

    /// Pulls, in the background, the blobs that applied versions refer to and this node
    /// lacks; runs an anti-entropy scan at start and every [`SCAN_EVERY`].
    pub(crate) fn spawn_repair(
        &self,
        state: StateView,
        mut refs: mpsc::Receiver<String>,
        cancel: CancellationToken,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(PULL_CONCURRENCY));
            let mut next_scan = Instant::now() + Duration::from_secs(2);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    digest = refs.recv() => {
                        let Some(digest) = digest else { return };
                        this.pull_later(digest, limit.clone(), cancel.clone());
                    }
                    _ = tokio::time::sleep_until(next_scan) => {
                        next_scan = Instant::now() + SCAN_EVERY;
                        this.scan(&state, &limit, &cancel).await;
                    }
                }
            }
        });
    }

    fn pull_later(&self, digest: String, limit: Arc<Semaphore>, cancel: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = limit.acquire_owned().await else {
                return;
            };
            let mut delay = Duration::from_millis(200);
            for _ in 0..8 {
                if cancel.is_cancelled() || this.blobs.has(&digest).unwrap_or(false) {
                    return;
                }
                if this.fetch(&digest).await {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            tracing::warn!(sha256 = %digest, "could not pull a referenced blob; the next scan retries");
        });
    }

    /// Pulls every referenced blob this node lacks.
    async fn scan(&self, state: &StateView, limit: &Arc<Semaphore>, cancel: &CancellationToken) {
        let digests = match state.referenced_blobs() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "anti-entropy scan failed to read the state");
                return;
            }
        };
        let mut missing = HashSet::new();
        for d in digests {
            if !self.blobs.has(&d).unwrap_or(true) {
                missing.insert(d);
            }
        }
        if !missing.is_empty() {
            tracing::info!(count = missing.len(), "anti-entropy: pulling missing blobs");
        }
        for d in missing {
            self.pull_later(d, limit.clone(), cancel.clone());
        }
    }
}

/// Streams a blob to a peer, a chunk per message after the head.
async fn push_stream(
    client: &mut ClusterClient<PeerChannel>,
    info: &BlobInfo,
    crc32c: Option<u32>,
    body: Body,
) -> Result<(), String> {
    // The body is not `Sync`, which a client stream must be: a feeder task moves its
    // chunks through a channel. A read error ends the stream early, which fails the
    // receiver's check.
    let (mut tx, rx) = futures::channel::mpsc::channel::<pb::BlobChunk>(2);
    let first = head_chunk(info, crc32c);
    tokio::spawn(async move {
        use futures::SinkExt;
        if tx.send(first).await.is_err() {
            return;
        }
        let mut data = body.into_data_stream();
        while let Some(Ok(b)) = data.next().await {
            let chunk = pb::BlobChunk {
                data: b,
                ..Default::default()
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let reply = client
        .push_blob(rx)
        .await
        .map_err(|e| e.message().to_owned())?;
    stored(reply.into_inner())
}

fn stored(reply: pb::PushBlobReply) -> Result<(), String> {
    if reply.stored {
        Ok(())
    } else {
        Err("peer did not store the blob".into())
    }
}

/// The first message of a blob stream: the blob's size, digests and CRC32C, no data.
pub(crate) fn head_chunk(info: &BlobInfo, crc32c: Option<u32>) -> pb::BlobChunk {
    pb::BlobChunk {
        crc32c,
        sha256: info.hashes.sha256.clone(),
        data: Bytes::new(),
        size: info.size,
        md5: info.hashes.md5.clone(),
        sha1: info.hashes.sha1.clone(),
        sha512: info.hashes.sha512.clone(),
    }
}

/// The size and digests a stream's first message names, checked for shape.
pub(crate) fn info_of(head: &pb::BlobChunk) -> Result<BlobInfo, String> {
    let hex = |s: &str, len: usize, what: &str| {
        if s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(s.to_ascii_lowercase())
        } else {
            Err(format!("the first chunk must name the blob's {what}"))
        }
    };
    Ok(BlobInfo {
        size: head.size,
        hashes: Hashes {
            md5: hex(&head.md5, 32, "MD5")?,
            sha1: hex(&head.sha1, 40, "SHA-1")?,
            sha256: hex(&head.sha256, 64, "SHA-256")?,
            sha512: hex(&head.sha512, 128, "SHA-512")?,
        },
    })
}

/// How the copy a stream carries is checked: by the CRC32C its sender recorded, or by its
/// SHA-256 when the sender has none (a blob stored before CRCs were recorded, or a sender
/// that predates them).
pub(crate) fn check_of(head: &pb::BlobChunk) -> ReplicaCheck {
    head.crc32c
        .map_or(ReplicaCheck::Sha256, ReplicaCheck::Crc32c)
}

/// A body over a stream of byte chunks from a peer.
pub(crate) fn chunks_body<S>(stream: S) -> Body
where
    S: futures::Stream<Item = Result<Bytes, tonic::Status>> + Send + 'static,
{
    let frames = stream.map(|r| {
        r.map(http_body::Frame::data)
            .map_err(|s| Box::new(s) as BodyError)
    });
    BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames))
}

/// A stream of wire chunks over a blob: its head, then its bytes.
pub(crate) fn body_chunks(
    info: &BlobInfo,
    crc32c: Option<u32>,
    body: Body,
) -> impl futures::Stream<Item = Result<pb::BlobChunk, tonic::Status>> + Send + 'static {
    let head = futures::stream::iter([Ok(head_chunk(info, crc32c))]);
    head.chain(body.into_data_stream().flat_map(|r| {
        let items: Vec<Result<pb::BlobChunk, tonic::Status>> = match r {
            Ok(mut b) => {
                let mut out = Vec::new();
                while !b.is_empty() {
                    let data = b.split_to(WIRE_CHUNK.min(b.len()));
                    out.push(Ok(pb::BlobChunk {
                        data,
                        ..Default::default()
                    }));
                }
                out
            }
            Err(e) => vec![Err(tonic::Status::internal(e.to_string()))],
        };
        futures::stream::iter(items)
    }))
}
