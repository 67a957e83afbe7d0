//! The scrub: damage to package bytes nobody downloads, found while a good copy exists.
//!
//! A read checks the bytes it takes from disk (see [`BlobStore::open_copy`]), but a
//! package that is rarely downloaded could rot on two members' disks before anyone
//! noticed, and then no good copy would be left. So every `interval_secs` each node reads
//! back every blob the state refers to and it holds, and checks it ([`BlobStore::scrub`]);
//! a damaged copy's record is dropped and its digest handed to the repair task, which
//! fetches a good copy from a peer, as it does for a blob applied before it arrived.
//!
//! - **Paced**: after each blob the scrub sleeps `tranquility` times as long as the blob
//!   took, so it never takes more than a fraction of the disk from requests.
//! - **Out of the page cache**: what it reads is dropped from the page cache again, so a
//!   pass does not push out the pages requests use.
//! - **Kept across restarts**: the start of the last pass is kept in `scrub.last` in the
//!   data directory; a node restarted daily still scrubs weekly. A new data directory
//!   counts as scrubbed now.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ScrubConfig;
use crate::state::StateView;
use crate::store::blob::{BlobStore, Scrubbed};

/// The file holding when the last pass started (UNIX seconds).
const LAST_PASS_FILE: &str = "scrub.last";

/// Starts the scrub task, unless `config.interval_secs` is 0. Damaged blobs' digests go
/// to `repair`.
pub(crate) fn spawn(
    blobs: BlobStore,
    state: StateView,
    config: ScrubConfig,
    data_dir: PathBuf,
    repair: mpsc::Sender<String>,
    cancel: CancellationToken,
) {
    if config.interval_secs == 0 {
        return;
    }
    tokio::spawn(async move {
        let file = data_dir.join(LAST_PASS_FILE);
        let interval = Duration::from_secs(config.interval_secs);
        let mut last = match read_last(&file) {
            Some(t) => t,
            None => {
                let now = SystemTime::now();
                write_last(&file, now);
                now
            }
        };
        loop {
            let due = last + interval;
            let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            last = SystemTime::now();
            if pass(&blobs, &state, config.tranquility, &repair, &cancel)
                .await
                .is_none()
            {
                return;
            }
            write_last(&file, last);
        }
    });
}

/// One pass over every referenced blob; `None` if cancelled.
async fn pass(
    blobs: &BlobStore,
    state: &StateView,
    tranquility: u32,
    repair: &mpsc::Sender<String>,
    cancel: &CancellationToken,
) -> Option<()> {
    let mut digests: Vec<String> = match state.referenced_blobs() {
        Ok(d) => d.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "scrub: could not list the referenced blobs; the next pass retries");
            return Some(());
        }
    };
    digests.sort_unstable();
    let (mut checked, mut bytes, mut damaged) = (0u64, 0u64, 0u64);
    for digest in digests {
        if cancel.is_cancelled() {
            return None;
        }
        let started = tokio::time::Instant::now();
        let store = blobs.clone();
        let d = digest.clone();
        let found = tokio::task::spawn_blocking(move || store.scrub(&d)).await;
        match found {
            Ok(Ok(Scrubbed::Intact { bytes: n })) => {
                checked += 1;
                bytes += n;
            }
            Ok(Ok(Scrubbed::Damaged)) => {
                checked += 1;
                damaged += 1;
                // The repair task fetches it from a peer; a full queue is caught by its
                // periodic scan instead.
                let _ = repair.try_send(digest);
            }
            Ok(Ok(Scrubbed::Absent)) => {}
            Ok(Err(e)) => {
                tracing::warn!(sha256 = %digest, error = %e, "scrub: could not read a blob")
            }
            Err(e) => tracing::warn!(sha256 = %digest, error = %e, "scrub: the check failed"),
        }
        let pause = started.elapsed() * tranquility;
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    if damaged > 0 {
        tracing::error!(
            checked,
            bytes,
            damaged,
            "scrub: damaged blobs found on this node's disk; fetching good copies from peers"
        );
    } else {
        tracing::info!(
            checked,
            bytes,
            "scrub: every blob on this node's disk is intact"
        );
    }
    Some(())
}

fn read_last(file: &Path) -> Option<SystemTime> {
    let text = std::fs::read_to_string(file).ok()?;
    let secs: u64 = text.trim().parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn write_last(file: &Path, at: SystemTime) {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if let Err(e) = std::fs::write(file, format!("{secs}\n")) {
        tracing::warn!(file = %file.display(), error = %e, "scrub: could not record the pass");
    }
}
