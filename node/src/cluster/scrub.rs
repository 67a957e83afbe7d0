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
//!   counts as scrubbed now. A pass under way records there, every
//!   [`PROGRESS_EVERY`], when it started and the last blob it checked (blobs go in
//!   digest order), and a restarted node goes on from that blob: on a store large enough
//!   that a pass takes longer than the node stays up, every blob is still reached.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ScrubConfig;
use crate::state::StateView;
use crate::store::blob::{BlobStore, Scrubbed};

/// The file holding when the last pass started (UNIX seconds), and the pass under way
/// (see [`Progress`]).
const LAST_PASS_FILE: &str = "scrub.last";

/// How often a pass under way records how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// What `scrub.last` holds:
///
/// ```text
///   1732700000                       when the last complete pass started
///   1733300000 <sha256, 64 hex>      a pass under way: when it started, the last blob
///                                    it checked (the line is absent between passes)
/// ```
///
/// Releases before the second line read only the first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    last: SystemTime,
    under_way: Option<(SystemTime, String)>,
}

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
        let mut progress = match read_progress(&file) {
            Some(p) => p,
            None => {
                let p = Progress {
                    last: SystemTime::now(),
                    under_way: None,
                };
                write_progress(&file, &p);
                p
            }
        };
        loop {
            // A pass a restart interrupted goes on at once from where it got to.
            let (started, after) = match progress.under_way.take() {
                Some((started, after)) => {
                    tracing::info!(after = %after, "scrub: going on with the pass a restart interrupted");
                    (started, Some(after))
                }
                None => {
                    let due = progress.last + interval;
                    let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    (SystemTime::now(), None)
                }
            };
            let last = progress.last;
            let record = |digest: &str| {
                write_progress(
                    &file,
                    &Progress {
                        last,
                        under_way: Some((started, digest.to_owned())),
                    },
                )
            };
            let pass = pass(
                &blobs,
                &state,
                config.tranquility,
                after.as_deref(),
                record,
                &repair,
                &cancel,
            );
            if pass.await.is_none() {
                return;
            }
            progress = Progress {
                last: started,
                under_way: None,
            };
            write_progress(&file, &progress);
        }
    });
}

/// The digests a pass checks, in order: every one after `after`, if it goes on from there.
fn to_check(mut digests: Vec<String>, after: Option<&str>) -> Vec<String> {
    digests.sort_unstable();
    if let Some(after) = after {
        let from = digests.partition_point(|d| d.as_str() <= after);
        digests.drain(..from);
    }
    digests
}

/// One pass over every referenced blob (after `after`, going on with an interrupted
/// one), telling `record` the last blob checked every [`PROGRESS_EVERY`]; `None` if
/// cancelled.
async fn pass(
    blobs: &BlobStore,
    state: &StateView,
    tranquility: u32,
    after: Option<&str>,
    record: impl Fn(&str),
    repair: &mpsc::Sender<String>,
    cancel: &CancellationToken,
) -> Option<()> {
    let digests = match state.referenced_blobs() {
        Ok(d) => to_check(d.into_iter().collect(), after),
        Err(e) => {
            tracing::warn!(error = %e, "scrub: could not list the referenced blobs; the next pass retries");
            return Some(());
        }
    };
    let (mut checked, mut bytes, mut damaged) = (0u64, 0u64, 0u64);
    let mut recorded = tokio::time::Instant::now();
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
                let _ = repair.try_send(digest.clone());
            }
            Ok(Ok(Scrubbed::Absent)) => {}
            Ok(Err(e)) => {
                tracing::warn!(sha256 = %digest, error = %e, "scrub: could not read a blob")
            }
            Err(e) => tracing::warn!(sha256 = %digest, error = %e, "scrub: the check failed"),
        }
        if recorded.elapsed() >= PROGRESS_EVERY {
            record(&digest);
            recorded = tokio::time::Instant::now();
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

fn secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn parse_progress(text: &str) -> Option<Progress> {
    let mut lines = text.lines();
    let time = |s: &str| -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_secs(s.trim().parse().ok()?))
    };
    let last = time(lines.next()?)?;
    // A damaged second line loses only the pass under way's place.
    let under_way = lines.next().and_then(|l| {
        let (started, digest) = l.trim().split_once(' ')?;
        let digest = digest.trim();
        let hex = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
        Some((time(started)?, digest.to_owned())).filter(|_| hex)
    });
    Some(Progress { last, under_way })
}

fn read_progress(file: &Path) -> Option<Progress> {
    parse_progress(&std::fs::read_to_string(file).ok()?)
}

/// Writes `progress` whole or not at all (a new file renamed over the old one).
fn write_progress(file: &Path, progress: &Progress) {
    let mut text = format!("{}\n", secs(progress.last));
    if let Some((started, digest)) = &progress.under_way {
        text.push_str(&format!("{} {digest}\n", secs(*started)));
    }
    let tmp = file.with_extension("last.tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file)) {
        tracing::warn!(file = %file.display(), error = %e, "scrub: could not record the pass");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn a_pass_goes_on_after_the_last_blob_it_checked() {
        let all = vec![digest('c'), digest('a'), digest('e'), digest('b')];
        assert_eq!(
            to_check(all.clone(), None),
            [digest('a'), digest('b'), digest('c'), digest('e')]
        );
        assert_eq!(
            to_check(all.clone(), Some(&digest('b'))),
            [digest('c'), digest('e')]
        );
        // The blob it stopped after may be gone from the state since.
        assert_eq!(to_check(all.clone(), Some(&digest('d'))), [digest('e')]);
        assert!(to_check(all, Some(&digest('f'))).is_empty());
    }

    #[test]
    fn progress_is_kept_in_the_file_and_read_from_earlier_releases() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(LAST_PASS_FILE);
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let between = Progress {
            last: at(1_700_000_000),
            under_way: None,
        };
        write_progress(&file, &between);
        assert_eq!(read_progress(&file), Some(between.clone()));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "1700000000\n");
        let during = Progress {
            last: at(1_700_000_000),
            under_way: Some((at(1_700_600_000), digest('7'))),
        };
        write_progress(&file, &during);
        assert_eq!(read_progress(&file), Some(during));
        // What earlier releases wrote; a damaged second line loses only the place.
        assert_eq!(parse_progress("1700000000\n"), Some(between.clone()));
        assert_eq!(parse_progress("1700000000\n17006 zz\n"), Some(between));
        assert_eq!(parse_progress("garbage"), None);
        assert!(!dir.path().join("scrub.last.tmp").exists());
    }
}
