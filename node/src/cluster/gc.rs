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
//! The candidates are kept across restarts in `blob-gc.candidates` in the data
//! directory, written after every pass (a new file renamed over the old one). A node
//! restarted more often than its interval would otherwise never remove anything. This
//! is safe because the first pass after a start runs a whole interval after it: a
//! write that touched a candidate only in memory before the restart has had the grace
//! to commit, and the pass then finds its blob referenced. A file lost or damaged only
//! delays removal by a pass.
//!
//! A node that misses a removal elsewhere keeps its copies longer. A node whose copy
//! was removed while a publish it was not asked about referenced the blob again (it
//! lagged) fetches it back after apply, as for any blob it lacks.
//!
//! A pass during which a snapshot was installed here is dropped: the state it read may
//! have been half replaced.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
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

/// Where the candidates are kept across restarts, in the data directory.
const CANDIDATES_FILE: &str = "blob-gc.candidates";

/// The first line of [`CANDIDATES_FILE`]; one SHA-256 in hex per line follows.
const CANDIDATES_HEADER: &str = "granary blob collector candidates v1";

/// Starts the collector, unless `config.interval_secs` is 0. The candidates an earlier
/// run left in `data_dir` are taken back first; the first pass runs an interval later.
pub(crate) fn spawn(
    blobs: BlobStore,
    state: StateView,
    cluster: Cluster,
    config: BlobGcConfig,
    data_dir: PathBuf,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    if config.interval_secs == 0 {
        return;
    }
    let interval = Duration::from_secs(config.interval_secs);
    let file = data_dir.join(CANDIDATES_FILE);
    let mut saved = read_candidates(&file);
    if !saved.is_empty() {
        tracing::info!(
            candidates = saved.len(),
            "blob collector: candidates of the run before taken back; the first pass removes those still unreferenced"
        );
    }
    blobs.restore_candidates(saved.iter().copied());
    metrics.set(crate::metrics::BLOB_GC_CANDIDATES, saved.len() as u64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let started = std::time::Instant::now();
            let done = pass(&blobs, &state, &cluster, interval, config.tranquility).await;
            // Also after a pass that failed part way: its removals are done.
            let candidates = blobs.candidates();
            if candidates != saved {
                write_candidates(&file, &candidates);
                saved = candidates;
            }
            metrics.set(crate::metrics::BLOB_GC_CANDIDATES, saved.len() as u64);
            match done {
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
                    metrics.set(crate::metrics::BLOBS_STORED, c.stored as u64);
                    metrics.set(crate::metrics::BLOB_BYTES_STORED, c.stored_bytes);
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

/// The candidates kept in `file`, sorted; none if it is missing or damaged (which
/// only delays their removal by a pass).
fn read_candidates(file: &Path) -> Vec<[u8; 32]> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "blob collector: candidates not read; found again by the next pass");
            return Vec::new();
        }
    };
    match parse_candidates(&text) {
        Some(keys) => keys,
        None => {
            tracing::warn!(file = %file.display(), "blob collector: candidates file damaged; found again by the next pass");
            Vec::new()
        }
    }
}

/// `None` unless every line after the header is a SHA-256 in hex and the file ends
/// with a newline (a file cut short by a crash is not taken).
fn parse_candidates(text: &str) -> Option<Vec<[u8; 32]>> {
    let body = text.strip_prefix(CANDIDATES_HEADER)?.strip_prefix('\n')?;
    if !body.is_empty() && !body.ends_with('\n') {
        return None;
    }
    let mut keys = body
        .lines()
        .map(parse_sha256)
        .collect::<Option<Vec<[u8; 32]>>>()?;
    keys.sort_unstable();
    keys.dedup();
    Some(keys)
}

/// Writes `keys` whole or not at all (a new file renamed over the old one); none
/// removes the file.
fn write_candidates(file: &Path, keys: &[[u8; 32]]) {
    let done = if keys.is_empty() {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    } else {
        let mut text = String::with_capacity(CANDIDATES_HEADER.len() + 1 + keys.len() * 65);
        text.push_str(CANDIDATES_HEADER);
        text.push('\n');
        for key in keys {
            text.push_str(&hex::encode(key));
            text.push('\n');
        }
        let tmp = file.with_extension("candidates.tmp");
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file))
    };
    if let Err(e) = done {
        tracing::warn!(file = %file.display(), error = %e, "blob collector: could not keep the candidates");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_kept_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(CANDIDATES_FILE);
        assert!(
            read_candidates(&file).is_empty(),
            "none before the first pass"
        );

        let keys = vec![[1u8; 32], [7u8; 32], [200u8; 32]];
        write_candidates(&file, &keys);
        assert_eq!(read_candidates(&file), keys);
        assert!(!file.with_extension("candidates.tmp").exists());

        // Cut short, a stray line, another format: none taken (removal waits a pass).
        let text = std::fs::read_to_string(&file).unwrap();
        for damaged in [
            &text[..text.len() - 1],
            &text[..text.len() - 20],
            &format!("{text}not a digest\n"),
            &text.replace(CANDIDATES_HEADER, "granary blob collector candidates v2"),
            "",
        ] {
            std::fs::write(&file, damaged).unwrap();
            assert!(read_candidates(&file).is_empty(), "{damaged:?}");
        }

        // None left: the file goes.
        write_candidates(&file, &keys);
        write_candidates(&file, &[]);
        assert!(!file.exists());
        assert!(read_candidates(&file).is_empty());
    }
}
