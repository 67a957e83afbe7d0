//! The blob collector: package bytes nothing refers to any more are removed, and the
//! segment files they leave mostly dead are compacted.
//!
//! ```text
//!   every interval_secs:  linearizable read point (the leader's commit index, applied)
//!     ─▶ referenced = every asset digest in the state (one RocksDB snapshot)
//!     ─▶ BlobStore::collect: unreferenced blobs become candidates; a candidate still
//!        unreferenced a whole interval later, untouched by writes, is removed (synced)
//!     ─▶ BlobStore::compact: segments at most half live are written out and deleted,
//!        pausing `tranquility` times as long as each move took
//! ```
//!
//! Each node collects its own copies: which blobs are referenced is decided by the
//! replicated state, so every node comes to the same answer, each from a read point at
//! least as new as every write committed before its pass. What could go wrong is a blob
//! referenced by a write under way: a publish that found its bytes stored already (on
//! the node it reached, or on the peers it pushed to) and whose metadata commits after
//! the state was read. Two things keep those bytes:
//!
//! - **Touches**: a write that finds a blob stored ([`BlobStore::has`], asked before a
//!   push and by the receiving peer) or stores it takes it off the candidates, under the
//!   lock removal happens under, so it either finds the blob gone (and stores it again)
//!   or keeps it.
//! - **The grace**: a blob is removed only after passes an interval apart found it
//!   unreferenced; a write that touched it before it became a candidate has committed
//!   (or failed) long before the next pass, which then finds it referenced.
//!
//! A node that misses a removal elsewhere or restarts keeps its copies longer (the
//! candidates are in memory: after a restart nothing is removed for an interval). A
//! node whose copy was removed while a publish it was not asked about referenced the
//! blob again (it lagged) fetches it back after apply, as for any blob it lacks.
//!
//! A pass during which a snapshot was installed here is dropped: the state it read may
//! have been half replaced.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::config::BlobGcConfig;
use crate::metrics::Metrics;
use crate::state::StateView;
use crate::store::blob::{BlobStore, Collected, Compacted, parse_sha256};

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass {
    pub(crate) collected: Collected,
    pub(crate) compacted: Compacted,
}

/// Starts the collector, unless `config.interval_secs` is 0.
pub(crate) fn spawn(
    blobs: BlobStore,
    state: StateView,
    cluster: Cluster,
    config: BlobGcConfig,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    if config.interval_secs == 0 {
        return;
    }
    let interval = Duration::from_secs(config.interval_secs);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let started = std::time::Instant::now();
            match pass(&blobs, &state, &cluster, interval, config.tranquility).await {
                Ok(p) => {
                    let took = started.elapsed();
                    let (c, k) = (p.collected, p.compacted);
                    metrics.add(
                        crate::metrics::BLOB_GC_MILLISECONDS,
                        &[],
                        took.as_millis() as u64,
                    );
                    metrics.add(crate::metrics::BLOBS_COLLECTED, &[], c.removed as u64);
                    metrics.add(crate::metrics::SEGMENTS_COMPACTED, &[], k.segments as u64);
                    metrics.add(crate::metrics::BLOB_BYTES_RECLAIMED, &[], k.bytes);
                    metrics.add(crate::metrics::BLOBS_MOVED, &[], k.moved as u64);
                    metrics.add(crate::metrics::BLOB_GC_PASSES, &[], 1);
                    if c.removed > 0 || k.segments > 0 {
                        tracing::info!(
                            removed = c.removed,
                            removed_bytes = c.removed_bytes,
                            candidates = c.candidates,
                            segments_deleted = k.segments,
                            segment_bytes = k.bytes,
                            blobs_moved = k.moved,
                            took_ms = took.as_millis() as u64,
                            "blob collector: unreferenced blobs removed, segments compacted"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "blob collector: pass skipped"),
            }
        }
    });
}

/// One pass: see the module's doc. `grace` is how long a blob must have been a
/// candidate to be removed; compaction paces itself by `tranquility`.
pub(crate) async fn pass(
    blobs: &BlobStore,
    state: &StateView,
    cluster: &Cluster,
    grace: Duration,
    tranquility: u32,
) -> Result<Pass, String> {
    cluster
        .linearize_strictly()
        .await
        .map_err(|e| format!("no read point: {e}"))?;
    let mut installs = cluster.installs();
    installs.borrow_and_update();
    let view = state.clone();
    let referenced = tokio::task::spawn_blocking(move || view.referenced_blobs())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the referenced blobs: {e}"))?;
    if installs.has_changed().unwrap_or(true) || *installs.borrow() {
        return Err("a snapshot was installed while the state was read".into());
    }
    let referenced: HashSet<[u8; 32]> = referenced.iter().filter_map(|d| parse_sha256(d)).collect();
    let store = blobs.clone();
    let collected = tokio::task::spawn_blocking(move || store.collect(&referenced, grace))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("removing unreferenced blobs: {e}"))?;
    // Compaction reads and writes whole segments' worth of blobs: off the runtime's
    // workers, like the scans.
    let store = blobs.clone();
    let runtime = tokio::runtime::Handle::current();
    let compacted =
        tokio::task::spawn_blocking(move || runtime.block_on(store.compact(tranquility)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("compacting segments: {e}"))?;
    Ok(Pass {
        collected,
        compacted,
    })
}
