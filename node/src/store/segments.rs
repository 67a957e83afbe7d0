//! Blob bytes in append-only segment files, made durable by group commit.
//!
//! ```text
//!   upload task ── append(chunk) ──▶ blobs/0000000007.seg   (pwrite at a reserved offset)
//!        │                                   │
//!        └── commit(sha256, meta) ──▶ committer thread: fdatasync the batch's segments,
//!                                      then one synced RocksDB write of every meta
//! ```
//!
//! Each blob's bytes are written once, to a segment file, and its meta (where its chunks
//! are, its digests) goes to RocksDB after them. Keeping the bytes out of RocksDB's
//! write-ahead log matters twice over: the bytes are not written a second time when the
//! memtable flushes, and a Raft log append, which syncs that log, no longer waits for
//! megabytes of concurrent uploads to reach the disk.
//!
//! - **Order on disk**: a meta is written only after the segments holding its chunks are
//!   synced, so a meta that survives a crash always names durable bytes. Bytes written
//!   without a meta (an abandoned upload, a crash before the commit) are unreferenced
//!   space.
//! - **Group commit**: one thread takes every commit waiting, syncs the segments they
//!   wrote (each once) and writes their metas in one synced batch; concurrent uploads
//!   share the two syncs.
//! - **A failed sync poisons its segment**: after a failed `fdatasync` the kernel may have
//!   dropped the dirty pages and a later sync can succeed without them, so a segment
//!   whose sync failed is never written or committed against again.
//! - Segments are only appended to; nothing deletes a blob yet, so none is compacted.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, mpsc};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A segment is closed and a new one started once it reaches this size.
pub(crate) const SEGMENT_BYTES: u64 = 1 << 30;
/// Commits taken into one group at most.
const MAX_GROUP: usize = 1024;

/// Where one chunk of a blob lies.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Extent {
    /// Segment number.
    #[serde(rename = "s")]
    pub(crate) segment: u32,
    /// Byte offset in the segment.
    #[serde(rename = "o")]
    pub(crate) offset: u64,
    /// Length in bytes.
    #[serde(rename = "l")]
    pub(crate) len: u32,
}

fn io(what: impl std::fmt::Display, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

/// The segment appended to: none until the first append after opening.
struct Active {
    id: u32,
    file: Option<Arc<File>>,
    len: u64,
}

/// The segment files of one node.
pub(crate) struct Segments {
    dir: PathBuf,
    max_len: u64,
    active: Mutex<Active>,
    files: RwLock<HashMap<u32, Arc<File>>>,
    poisoned: RwLock<HashSet<u32>>,
}

fn segment_name(id: u32) -> String {
    format!("{id:010}.seg")
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir.display(), e))
}

impl Segments {
    /// Opens the segments under `dir` (created if missing). The first append starts a new
    /// segment: the tail of an existing one may be a torn write, and is never appended to.
    pub(crate) fn open(dir: &Path, max_len: u64) -> Result<Segments, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir.display(), e))?;
        let mut last = 0u32;
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir.display(), e))? {
            let entry = entry.map_err(|e| io(dir.display(), e))?;
            let name = entry.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                last = last.max(id);
            }
        }
        Ok(Segments {
            dir: dir.to_owned(),
            max_len: max_len.max(1),
            active: Mutex::new(Active {
                id: last,
                file: None,
                len: 0,
            }),
            files: RwLock::new(HashMap::new()),
            poisoned: Default::default(),
        })
    }

    fn create(dir: &Path, id: u32) -> Result<File, StoreError> {
        let path = dir.join(segment_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io(path.display(), e))?;
        // The file's name must survive a crash as its bytes do.
        sync_dir(dir)?;
        Ok(file)
    }

    /// Appends one chunk; durable only once a commit naming it returns.
    pub(crate) fn append(&self, data: &[u8]) -> Result<Extent, StoreError> {
        let len = u32::try_from(data.len())
            .map_err(|_| StoreError::Io("chunk larger than 4 GiB".into()))?;
        let (id, file, offset) = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let full = active.len > 0 && active.len + u64::from(len) > self.max_len;
            if active.file.is_none() || full || self.is_poisoned(active.id) {
                let id = active
                    .id
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Io("segment numbers exhausted".into()))?;
                let file = Arc::new(Self::create(&self.dir, id)?);
                self.files
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, file.clone());
                *active = Active {
                    id,
                    file: Some(file),
                    len: 0,
                };
            }
            let offset = active.len;
            active.len += u64::from(len);
            let file = active
                .file
                .clone()
                .unwrap_or_else(|| unreachable!("a segment was just started"));
            (active.id, file, offset)
        };
        file.write_all_at(data, offset)
            .map_err(|e| io(segment_name(id), e))?;
        Ok(Extent {
            segment: id,
            offset,
            len,
        })
    }

    fn is_poisoned(&self, id: u32) -> bool {
        self.poisoned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    fn file(&self, id: u32) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(f.clone());
        }
        let path = self.dir.join(segment_name(id));
        let file = Arc::new(File::open(&path).map_err(|e| io(path.display(), e))?);
        Ok(self
            .files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_insert(file)
            .clone())
    }

    /// Reads one chunk back.
    pub(crate) fn read(&self, at: &Extent) -> Result<Bytes, StoreError> {
        let file = self.file(at.segment)?;
        let mut buf = BytesMut::zeroed(at.len as usize);
        file.read_exact_at(&mut buf, at.offset)
            .map_err(|e| io(segment_name(at.segment), e))?;
        Ok(buf.freeze())
    }

    /// Syncs the given segments; a segment whose sync fails is poisoned for good.
    fn sync(&self, ids: &HashSet<u32>) -> Result<(), StoreError> {
        for &id in ids {
            if self.is_poisoned(id) {
                return Err(StoreError::Io(format!(
                    "{} failed to sync earlier; its bytes are not trusted",
                    segment_name(id)
                )));
            }
            if let Err(e) = self.file(id)?.sync_data() {
                self.poisoned
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                return Err(io(segment_name(id), e));
            }
        }
        Ok(())
    }
}

/// One blob waiting to be committed.
pub(crate) struct CommitRequest {
    /// The segments holding its chunks.
    pub(crate) segments: HashSet<u32>,
    /// Its key in `blob_meta`.
    pub(crate) key: [u8; 32],
    /// Its encoded meta.
    pub(crate) value: Vec<u8>,
    /// True if recorded, false if a blob with this key existed already.
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
}

/// What the committer thread needs of the metadata store: whether a key is recorded,
/// and a durable write of several at once.
pub(crate) trait MetaSink: Send + 'static {
    /// Whether `key` is recorded.
    fn exists(&self, key: &[u8; 32]) -> Result<bool, StoreError>;
    /// Records every pair in one synced write.
    fn write_synced(&self, pairs: Vec<([u8; 32], Vec<u8>)>) -> Result<(), StoreError>;
}

/// Starts the committer thread; it ends when every sender is dropped.
pub(crate) fn spawn_committer(
    segments: Arc<Segments>,
    sink: impl MetaSink,
) -> Result<(mpsc::Sender<CommitRequest>, std::thread::JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel::<CommitRequest>();
    let handle = std::thread::Builder::new()
        .name("blob-commit".into())
        .spawn(move || {
            while let Some(group) = super::next_group(&rx, MAX_GROUP) {
                commit_group(&segments, &sink, group);
            }
        })
        .map_err(|e| io("starting the blob committer", e))?;
    Ok((tx, handle))
}

/// What a commit request came to, before the group's write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Its record goes into this group's write.
    Written,
    /// An earlier request of this group writes the same blob's record.
    Shared,
    /// The blob was stored before.
    Stored,
}

fn commit_group(segments: &Segments, sink: &impl MetaSink, group: Vec<CommitRequest>) {
    let ids: HashSet<u32> = group
        .iter()
        .flat_map(|r| r.segments.iter().copied())
        .collect();
    if let Err(e) = segments.sync(&ids) {
        // Requests whose segments synced before the failure could still succeed; failing
        // the whole group keeps this rare path simple, and every caller may retry.
        for r in group {
            let _ = r.reply.send(Err(StoreError::Io(e.to_string())));
        }
        return;
    }
    // `Ok(true)`: this request's record is written by this group; `Ok(false)`: the blob
    // is stored already; a second request for a blob in the same group shares the first
    // one's write, so it learns of that write's failure too.
    let mut outcomes = Vec::with_capacity(group.len());
    let mut pairs = Vec::new();
    let mut seen = HashSet::new();
    for r in &group {
        let outcome = match sink.exists(&r.key) {
            Ok(true) => Ok(Outcome::Stored),
            Ok(false) if !seen.insert(r.key) => Ok(Outcome::Shared),
            Ok(false) => {
                pairs.push((r.key, r.value.clone()));
                Ok(Outcome::Written)
            }
            Err(e) => Err(e),
        };
        outcomes.push(outcome);
    }
    let written = if pairs.is_empty() {
        Ok(())
    } else {
        sink.write_synced(pairs)
    };
    for (r, outcome) in group.into_iter().zip(outcomes) {
        let answer = match (&written, outcome) {
            (Err(e), Ok(Outcome::Written | Outcome::Shared)) => Err(StoreError::Io(e.to_string())),
            (_, Ok(outcome)) => Ok(outcome == Outcome::Written),
            (_, Err(e)) => Err(e),
        };
        let _ = r.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Clone)]
    struct MemSink(Arc<Mutex<HashMap<[u8; 32], Vec<u8>>>>, Arc<Mutex<usize>>);

    impl MetaSink for MemSink {
        fn exists(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
            Ok(self.0.lock().unwrap().contains_key(key))
        }
        fn write_synced(&self, pairs: Vec<([u8; 32], Vec<u8>)>) -> Result<(), StoreError> {
            *self.1.lock().unwrap() += 1;
            self.0.lock().unwrap().extend(pairs);
            Ok(())
        }
    }

    #[test]
    fn appends_roll_over_and_read_back_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path(), 100).unwrap();
        drop(segs);
        // Opening writes nothing: no empty segment per start.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let segs = Segments::open(dir.path(), 100).unwrap();
        let a = segs.append(&[1u8; 60]).unwrap();
        let b = segs.append(&[2u8; 60]).unwrap();
        // The second chunk does not fit in the first segment's 100 bytes.
        assert_eq!((a.segment, a.offset), (1, 0));
        assert_eq!((b.segment, b.offset), (2, 0));
        // A chunk larger than a segment gets a segment of its own.
        let c = segs.append(&[3u8; 250]).unwrap();
        assert_eq!((c.segment, c.offset, c.len), (3, 0, 250));
        assert_eq!(&segs.read(&b).unwrap()[..], &[2u8; 60][..]);
        drop(segs);
        // Reopened: a new segment is started; the old ones are still readable.
        let segs = Segments::open(dir.path(), 100).unwrap();
        assert_eq!(&segs.read(&a).unwrap()[..], &[1u8; 60][..]);
        assert_eq!(&segs.read(&c).unwrap()[..], &[3u8; 250][..]);
        assert_eq!(segs.append(b"x").unwrap().segment, 4);
    }

    #[tokio::test]
    async fn concurrent_commits_share_a_group_and_duplicates_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let sink = MemSink::default();
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        let mut waits = Vec::new();
        for i in 0..200u32 {
            let e = segs.append(&i.to_be_bytes()).unwrap();
            let (reply, rx) = tokio::sync::oneshot::channel();
            // Keys 0..100, each twice.
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&(i % 100).to_be_bytes());
            tx.send(CommitRequest {
                segments: HashSet::from([e.segment]),
                key,
                value: vec![1],
                reply,
            })
            .unwrap();
            waits.push(rx);
        }
        let mut recorded = 0;
        for w in waits {
            if w.await.unwrap().unwrap() {
                recorded += 1;
            }
        }
        assert_eq!(recorded, 100, "each key recorded once");
        assert_eq!(sink.0.lock().unwrap().len(), 100);
        assert!(
            *sink.1.lock().unwrap() < 200,
            "commits sent together share synced writes"
        );
        drop(tx);
        handle.join().unwrap();
    }

    /// A failed write fails every request of the group that counted on it, the second
    /// request for the same blob too (it used to be told the blob was stored).
    #[tokio::test]
    async fn a_failed_write_fails_a_duplicate_in_the_same_group() {
        struct Failing;
        impl MetaSink for Failing {
            fn exists(&self, _: &[u8; 32]) -> Result<bool, StoreError> {
                Ok(false)
            }
            fn write_synced(&self, _: Vec<([u8; 32], Vec<u8>)>) -> Result<(), StoreError> {
                Err(StoreError::Io("injected".into()))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path(), SEGMENT_BYTES).unwrap();
        let e = segs.append(b"bytes").unwrap();
        let mut group = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..2 {
            let (reply, rx) = tokio::sync::oneshot::channel();
            group.push(CommitRequest {
                segments: HashSet::from([e.segment]),
                key: [7u8; 32],
                value: vec![1],
                reply,
            });
            answers.push(rx);
        }
        commit_group(&segs, &Failing, group);
        for a in answers {
            assert!(a.await.unwrap().is_err());
        }
    }

    #[test]
    fn a_poisoned_segment_is_not_written_or_committed_again() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path(), SEGMENT_BYTES).unwrap();
        let a = segs.append(b"before").unwrap();
        segs.poisoned.write().unwrap().insert(a.segment);
        assert!(segs.sync(&HashSet::from([a.segment])).is_err());
        let b = segs.append(b"after").unwrap();
        assert_eq!(b.segment, a.segment + 1, "appends moved to a new segment");
        segs.sync(&HashSet::from([b.segment])).unwrap();
    }
}
