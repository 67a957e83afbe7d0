//! Blob bytes in append-only segment files, made durable by group commit.
//!
//! ```text
//!   upload task ── append(chunk) ──▶ blobs/0000000007.seg   (pwrite at a reserved offset)
//!        │                                   │
//!        └── commit(sha256, meta, whole) ──▶ committer thread: fdatasync the chunks'
//!              segments, append every record to the journal (0000000008.seg) and
//!              fdatasync it, then one unsynced RocksDB write of every meta
//! ```
//!
//! A blob larger than a chunk is written chunk by chunk as it arrives, to a segment file
//! every upload appends to; a blob that fits in one chunk (most packages) is handed to
//! the committer whole. Either way its record (`sha256 → meta`: where its chunks are, its
//! digests) goes to the journal, a segment only the committer thread appends to, with the
//! bytes of a blob given whole; then to `blob_meta` in RocksDB. Keeping the bytes out of
//! RocksDB's write-ahead log matters twice over: the bytes are not written a second time
//! when the memtable flushes, and a Raft log append, which syncs that log, does not wait
//! for megabytes of concurrent uploads to reach the disk.
//!
//! - **Order on disk**: a record is written only after the segments holding its chunks
//!   are synced, so a record that survives a crash always names durable bytes. Bytes
//!   written without a record (an abandoned upload, a crash before the commit) are
//!   unreferenced space.
//! - **One sync per group of small blobs**: the journal's `fdatasync` makes a group's
//!   records durable; their RocksDB write is not synced (that was a second sync of every
//!   group, on the same disk). A crash of the machine may lose it: when the committer
//!   starts, [`recover`] reads the journal from the head recorded with the last write
//!   that survived and records what `blob_meta` lacks, before anything is read.
//! - **Group commit**: one thread takes every commit waiting, syncs the segments they
//!   wrote (each once) and the journal; concurrent uploads share the syncs.
//! - **A failed sync poisons its segment**: after a failed `fdatasync` the kernel may have
//!   dropped the dirty pages and a later sync can succeed without them, so a segment
//!   whose sync failed is never written or committed against again.
//! - **Synced bytes leave the page cache**: once a group's bytes are durable, the pages
//!   wholly inside them are dropped from the page cache (`POSIX_FADV_DONTNEED`; they are
//!   clean by then, so this is no I/O). The store keeps recent chunks in its own cache, so
//!   the kernel's copy would be a second one, growing by every byte stored and pushing out
//!   pages that are read (RocksDB's tables). Dropped pages are reused for the next writes
//!   at once, so a node's memory does not grow with what it stores. A reader finds them
//!   on disk.
//! - **Compaction** (driven by the blob collector, `cluster::gc`): a segment most of whose
//!   bytes no record names any more is emptied by writing its live blobs again (a new
//!   record replaces the old only if the blob is still recorded there), making those
//!   records durable, and deleting the file. Only segments no write may still go to are
//!   candidates: below the segment appended to and below the segment any upload in
//!   flight started in ([`Segments::hold`]), and no journal segment recovery reads (from
//!   the head's on). Recovery skips a record whose chunks were in a deleted segment: its
//!   blob was removed, or moved and recorded again. A deleted segment's open file stays
//!   with readers that looked up its blobs before the move until the next pass releases
//!   it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, mpsc};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::blob::BlobMeta;

/// The page size assumed when dropping cached pages; where pages are larger, a little
/// more stays cached.
const PAGE: u64 = 4096;

/// Drops the page cache's copy of the pages wholly inside `from..to` of `file`: bytes
/// just synced. Advice only: a failure is logged and changes nothing else.
fn drop_cached(file: &File, from: u64, to: u64) {
    let start = from.next_multiple_of(PAGE);
    let end = to / PAGE * PAGE;
    let Some(len) = end.checked_sub(start).and_then(std::num::NonZeroU64::new) else {
        return;
    };
    if let Err(e) = rustix::fs::fadvise(file, start, Some(len), rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "could not drop synced blob bytes from the page cache");
    }
}

/// The journal's synced pages are dropped from the page cache once this many bytes of
/// them have gathered.
const DROP_AFTER: u64 = 1 << 20;

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
    /// The highest segment number in use, by chunks or by the journal.
    last_id: u32,
}

/// The segment files of one node.
pub(crate) struct Segments {
    dir: PathBuf,
    max_len: u64,
    active: Mutex<Active>,
    files: RwLock<HashMap<u32, Arc<File>>>,
    poisoned: RwLock<HashSet<u32>>,
    /// Uploads in flight, by the segment each started in (see [`Segments::hold`]).
    holds: Arc<Mutex<BTreeMap<u32, usize>>>,
    /// Segments deleted whose open files readers may still use, until the next
    /// [`Segments::release_retired`].
    retired: Mutex<Vec<u32>>,
}

/// An upload in flight: no segment from the one it started in on is compacted while
/// this lives.
pub(crate) struct Hold {
    holds: Arc<Mutex<BTreeMap<u32, usize>>>,
    floor: u32,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = holds.get_mut(&self.floor) {
            *n -= 1;
            if *n == 0 {
                holds.remove(&self.floor);
            }
        }
    }
}

fn segment_name(id: u32) -> String {
    format!("{id:010}.seg")
}

/// The segment files under `dir`, by number (other files are left out).
fn segment_files(dir: &Path) -> Result<Vec<(u32, std::fs::DirEntry)>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir.display(), e))? {
        let entry = entry.map_err(|e| io(dir.display(), e))?;
        let id = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(id) = id {
            out.push((id, entry));
        }
    }
    Ok(out)
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
        let last = segment_files(dir)?
            .into_iter()
            .map(|(id, _)| id)
            .max()
            .unwrap_or(0);
        Ok(Segments {
            dir: dir.to_owned(),
            max_len: max_len.max(1),
            active: Mutex::new(Active {
                id: last,
                file: None,
                len: 0,
                last_id: last,
            }),
            files: RwLock::new(HashMap::new()),
            poisoned: Default::default(),
            holds: Default::default(),
            retired: Default::default(),
        })
    }

    /// Holds every segment from the one appended to now on, for an upload about to write
    /// its chunks: they all go to that segment or later ones, and none of those is
    /// compacted until the hold is dropped (after the upload's commit, or its failure).
    pub(crate) fn hold(&self) -> Hold {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let floor = active.id;
        *self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(floor)
            .or_default() += 1;
        Hold {
            holds: self.holds.clone(),
            floor,
        }
    }

    /// Bytes of the segment files on disk (deleted ones readers still hold excluded).
    pub(crate) fn file_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for (_, entry) in segment_files(&self.dir)? {
            // A file compaction deleted since it was listed counts as gone.
            total += entry.metadata().map_or(0, |m| m.len());
        }
        Ok(total)
    }

    /// The segments that may be compacted, with their sizes: every segment file below
    /// the segment appended to and below the one any upload in flight started in, but
    /// those in `journal` (the journal's segments recovery reads: the head's and later).
    pub(crate) fn compactable(
        &self,
        journal: &HashSet<u32>,
    ) -> Result<Vec<(u32, u64)>, StoreError> {
        // Nothing appended since the node started (every blob small enough to go whole
        // to the journal): the next append starts a new segment, above every file.
        let mut below = {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if active.file.is_some() {
                active.id
            } else {
                u32::MAX
            }
        };
        if let Some((&floor, _)) = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_key_value()
        {
            below = below.min(floor);
        }
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::new();
        for (id, entry) in segment_files(&self.dir)? {
            if id < below && !retired.contains(&id) && !journal.contains(&id) {
                let len = entry.metadata().map_err(|e| io(segment_name(id), e))?.len();
                out.push((id, len));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Deletes a segment whose live blobs were all moved (and their new records made
    /// durable). A reader that looked up one of its blobs before the move still reads
    /// it through the open file, until [`Segments::release_retired`].
    pub(crate) fn retire(&self, id: u32) -> Result<(), StoreError> {
        // Open before the name goes, so that readers find it until released.
        self.file(id)?;
        let path = self.dir.join(segment_name(id));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path.display(), e)),
        }
        sync_dir(&self.dir)?;
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
        Ok(())
    }

    /// Closes the files of the segments retired so far, and returns them; their space
    /// goes back to the file system once no reader holds them.
    pub(crate) fn release_retired(&self) -> Vec<u32> {
        let ids = std::mem::take(&mut *self.retired.lock().unwrap_or_else(|p| p.into_inner()));
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        let mut poisoned = self.poisoned.write().unwrap_or_else(|p| p.into_inner());
        for id in &ids {
            files.remove(id);
            poisoned.remove(id);
        }
        ids
    }

    /// Whether segment `id` is on disk (or still open for readers after it was retired).
    fn exists(&self, id: u32) -> bool {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
            || self.dir.join(segment_name(id)).exists()
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
                let (id, file) = self.create_next(&mut active)?;
                active.id = id;
                active.file = Some(file);
                active.len = 0;
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

    /// Creates the next segment file, for chunks or for the journal.
    fn create_next(&self, active: &mut Active) -> Result<(u32, Arc<File>), StoreError> {
        let id = active
            .last_id
            .checked_add(1)
            .ok_or_else(|| StoreError::Io("segment numbers exhausted".into()))?;
        let file = Arc::new(Self::create(&self.dir, id)?);
        active.last_id = id;
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, file.clone());
        Ok((id, file))
    }

    /// Starts a new journal segment (see [`Journal`]).
    fn start_journal(&self) -> Result<(u32, Arc<File>), StoreError> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        self.create_next(&mut active)
    }

    fn poison(&self, id: u32) {
        self.poisoned
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
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

    /// Reads one chunk back for a one-off check (the scrub), leaving its pages out of the
    /// page cache, but for those it shares with its neighbours: a pass over every blob
    /// would otherwise push out the pages that are read often.
    pub(crate) fn read_uncached(&self, at: &Extent) -> Result<Bytes, StoreError> {
        let bytes = self.read(at)?;
        self.drop_cached(at);
        Ok(bytes)
    }

    /// Drops the pages wholly inside one chunk from the page cache (see [`drop_cached`]).
    fn drop_cached(&self, at: &Extent) {
        if let Ok(file) = self.file(at.segment) {
            drop_cached(&file, at.offset, at.offset + u64::from(at.len));
        }
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
                self.poison(id);
                return Err(io(segment_name(id), e));
            }
        }
        Ok(())
    }
}

/// One blob waiting to be committed.
pub(crate) struct CommitRequest {
    /// The segments holding its chunks (none for a blob given whole).
    pub(crate) segments: HashSet<u32>,
    /// Its key in `blob_meta`.
    pub(crate) key: [u8; 32],
    /// Its meta; for a blob given whole, without extents (the journal places it).
    pub(crate) meta: BlobMeta,
    /// The whole blob, when it fits in one chunk: written to the journal with its record.
    pub(crate) whole: Option<Bytes>,
    /// The meta recorded, or `None` if a blob with this key existed already.
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<Option<BlobMeta>, StoreError>>,
    /// A blob moved out of a segment being compacted: the record it replaces. The new one
    /// is written only if the blob is still recorded there (not removed, or moved, since).
    pub(crate) replaces: Option<BlobMeta>,
}

/// Where the journal has been recorded up to: segment and offset after the last record
/// whose meta is in `blob_meta` too.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JournalHead {
    #[serde(rename = "s")]
    pub(crate) segment: u32,
    #[serde(rename = "o")]
    pub(crate) offset: u64,
}

/// What the committer thread needs of the metadata store.
pub(crate) trait MetaSink: Send + 'static {
    /// Whether `key` is recorded.
    fn exists(&self, key: &[u8; 32]) -> Result<bool, StoreError>;
    /// The record of `key`, if any.
    fn current(&self, key: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError>;
    /// Records every pair and the journal head in one write, synced only if `sync`: the
    /// journal holds every record durably already.
    fn record(
        &self,
        pairs: Vec<([u8; 32], Vec<u8>)>,
        head: JournalHead,
        sync: bool,
    ) -> Result<(), StoreError>;
    /// The journal head recorded, if any.
    fn journal_head(&self) -> Result<Option<JournalHead>, StoreError>;
    /// The journal's segments, oldest first.
    fn journal_segments(&self) -> Result<Vec<u32>, StoreError>;
    /// Replaces the list of journal segments, synced.
    fn set_journal_segments(&self, ids: &[u32]) -> Result<(), StoreError>;
}

/// A journal record: `MAGIC`, payload length and CRC32C (u32 LE each), then the payload:
/// the blob's key, its meta's length (u32 LE), its meta (JSON), and the blob's bytes when
/// it was given whole.
const MAGIC: u32 = 0x4c4e_4a47;
const HEADER: usize = 12;
/// Bytes of a payload before the meta.
const PREFIX: usize = 32 + 4;

/// The journal: the blob records, appended by the committer thread alone, in segments of
/// their own.
///
/// A group's records (each blob's meta, and the bytes of a blob that fits in one chunk)
/// are written one after another, then the segment is synced once; their metas go to
/// `blob_meta` after that, unsynced. So a group of small blobs costs one `fdatasync`
/// instead of two (the segment's, then RocksDB's write-ahead log's). A crash may lose
/// the latest unsynced RocksDB writes; [`recover`] reads the journal from the recorded
/// head on and records what is missing.
///
/// Journal segments are named like the others (`NNNNNNNNNN.seg`), so an extent is read
/// the same way wherever it lies; which segments are the journal's is recorded in
/// RocksDB (synced) before the first record is written to one. Only the committer thread
/// appends to a journal segment, in order, so its records lie end to end from offset
/// zero: a reader finds each by the length before it, and a torn write is found at the
/// tail only. Nothing else is ever read as a record.
struct Journal {
    segments: Vec<u32>,
    /// Segment, file and length: none until the first write after opening, and after a
    /// failed write or sync (the next group starts a new segment).
    active: Option<(u32, Arc<File>, u64)>,
    /// Where the bytes of the active segment that may still be in the page cache start.
    cached_from: u64,
}

impl Journal {
    fn new(segments: Vec<u32>) -> Journal {
        Journal {
            segments,
            active: None,
            cached_from: 0,
        }
    }

    /// Drops the synced records' pages from the page cache once there are at least
    /// `min` bytes of them (each call costs a system call and a walk of the pages). The
    /// page the next group goes on with stays.
    fn drop_synced(&mut self, min: u64) {
        if let Some((_, file, len)) = &self.active
            && len.saturating_sub(self.cached_from) >= min
        {
            drop_cached(file, self.cached_from, *len);
            self.cached_from = len / PAGE * PAGE;
        }
    }

    /// Where the next record goes; only called after a write.
    fn head(&self) -> JournalHead {
        let (segment, _, offset) = self
            .active
            .as_ref()
            .unwrap_or_else(|| unreachable!("records were just written"));
        JournalHead {
            segment: *segment,
            offset: *offset,
        }
    }
}

/// One encoded record.
struct Record {
    /// Header, key, meta length and meta.
    head: Vec<u8>,
    /// The blob's bytes, when given whole.
    body: Option<Bytes>,
}

impl Record {
    fn new(key: &[u8; 32], meta: &[u8], body: Option<Bytes>) -> Result<Record, StoreError> {
        let body_len = body.as_ref().map_or(0, |b| b.len());
        let len = u32::try_from(PREFIX + meta.len() + body_len)
            .map_err(|_| StoreError::Io("journal record larger than 4 GiB".into()))?;
        let mut head = Vec::with_capacity(HEADER + PREFIX + meta.len());
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&[0; 4]);
        head.extend_from_slice(key);
        head.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        head.extend_from_slice(meta);
        let mut crc = crc32c::crc32c(&head[HEADER..]);
        if let Some(b) = &body {
            // One hardware pass over the bytes (~5 µs per 100 KiB here) costs less than
            // combining the upload's CRC of them with this one (`crc32c_combine`, ~22 µs).
            crc = crc32c::crc32c_append(crc, b);
        }
        head[8..12].copy_from_slice(&crc.to_le_bytes());
        Ok(Record { head, body })
    }

    fn len(&self) -> u64 {
        (self.head.len() + self.body.as_ref().map_or(0, |b| b.len())) as u64
    }
}

/// Starts the committer thread, after recording what the journal holds beyond the
/// recorded head ([`recover`]); the thread ends when every sender is dropped.
pub(crate) fn spawn_committer(
    segments: Arc<Segments>,
    sink: impl MetaSink,
) -> Result<(mpsc::Sender<CommitRequest>, std::thread::JoinHandle<()>), StoreError> {
    let recovered = recover(&segments, &sink)?;
    if recovered > 0 {
        tracing::info!(
            records = recovered,
            "blob records recovered from the journal"
        );
    }
    let mut journal = Journal::new(sink.journal_segments()?);
    let (tx, rx) = mpsc::channel::<CommitRequest>();
    let handle = std::thread::Builder::new()
        .name("blob-commit".into())
        .spawn(move || {
            while let Some(group) = super::next_group(&rx, MAX_GROUP) {
                // A panic (a bug) fails its group's requests, whose answers are dropped,
                // not every later commit on this node. What the journal's segment holds
                // past its last complete group is unknown then: the next group starts a
                // new one.
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    commit_group(&segments, &sink, &mut journal, group)
                }));
                if caught.is_err() {
                    tracing::error!("a blob commit panicked; its uploads failed");
                    journal.active = None;
                }
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

fn commit_group(
    segments: &Segments,
    sink: &impl MetaSink,
    journal: &mut Journal,
    group: Vec<CommitRequest>,
) {
    let ids: HashSet<u32> = group
        .iter()
        .flat_map(|r| r.segments.iter().copied())
        .collect();
    // The chunks first: a record names only durable bytes.
    if let Err(e) = segments.sync(&ids) {
        // Requests whose segments synced before the failure could still succeed; failing
        // the whole group keeps this rare path simple, and every caller may retry.
        for r in group {
            let _ = r.reply.send(Err(StoreError::Io(e.to_string())));
        }
        return;
    }
    // Synced chunks, to drop from the page cache once the group is answered.
    let synced: Vec<Extent> = group
        .iter()
        .filter(|r| !r.segments.is_empty())
        .flat_map(|r| r.meta.extents.iter().copied())
        .collect();
    // A second request for a blob in the same group shares the first one's write, so it
    // learns of that write's failure too.
    let mut outcomes = Vec::with_capacity(group.len());
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    for r in &group {
        // A blob moved by compaction replaces its record only where that still names the
        // place it was moved from; any other request writes only a missing record.
        let wanted = match &r.replaces {
            Some(old) => sink
                .current(&r.key)
                .map(|m| m.is_some_and(|m| m.same_place(old))),
            None => sink.exists(&r.key).map(|stored| !stored),
        };
        let outcome = match wanted {
            Ok(false) => Ok(Outcome::Stored),
            Ok(true) if !seen.insert(r.key) => Ok(Outcome::Shared),
            Ok(true) => serde_json::to_vec(&r.meta)
                .map_err(|e| StoreError::Corrupt(e.to_string()))
                .and_then(|meta| Record::new(&r.key, &meta, r.whole.clone()))
                .map(|record| {
                    records.push(record);
                    Outcome::Written
                }),
            Err(e) => Err(e),
        };
        outcomes.push(outcome);
    }
    // Per request, the meta recorded: a blob given whole lies where its record put it.
    let recorded: Result<Vec<Option<BlobMeta>>, StoreError> = if records.is_empty() {
        // Every blob was stored before: nothing to write.
        Ok(group.iter().map(|_| None).collect())
    } else {
        write_records(segments, sink, journal, &records).and_then(|places| {
            let mut places = places.into_iter();
            let mut pairs = Vec::with_capacity(records.len());
            let mut metas = Vec::with_capacity(group.len());
            for (r, outcome) in group.iter().zip(&outcomes) {
                if !matches!(outcome, Ok(Outcome::Written)) {
                    metas.push(None);
                    continue;
                }
                let place = places
                    .next()
                    .unwrap_or_else(|| unreachable!("a place per record"));
                let mut meta = r.meta.clone();
                if r.whole.as_ref().is_some_and(|b| !b.is_empty()) {
                    meta.extents = vec![place];
                }
                let value =
                    serde_json::to_vec(&meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                pairs.push((r.key, value));
                metas.push(Some(meta));
            }
            sink.record(pairs, journal.head(), false)?;
            Ok(metas)
        })
    };
    match recorded {
        Ok(metas) => {
            for ((r, outcome), meta) in group.into_iter().zip(outcomes).zip(metas) {
                let _ = r.reply.send(outcome.map(|_| meta));
            }
        }
        Err(e) => {
            for (r, outcome) in group.into_iter().zip(outcomes) {
                let answer = match outcome {
                    Ok(Outcome::Written | Outcome::Shared) => Err(StoreError::Io(e.to_string())),
                    Ok(Outcome::Stored) => Ok(None),
                    Err(e) => Err(e),
                };
                let _ = r.reply.send(answer);
            }
        }
    }
    // Off the answers' path: durable bytes leave the page cache (see the module's doc);
    // of a chunk, only its own pages, since uploads in flight may share those at its ends.
    for at in &synced {
        segments.drop_cached(at);
    }
    journal.drop_synced(DROP_AFTER);
}

/// Appends `records` to the journal and syncs it; returns where each record's body lies.
fn write_records(
    segments: &Segments,
    sink: &impl MetaSink,
    journal: &mut Journal,
    records: &[Record],
) -> Result<Vec<Extent>, StoreError> {
    let total: u64 = records.iter().map(Record::len).sum();
    let full = journal
        .active
        .as_ref()
        .is_some_and(|(_, _, len)| *len > 0 && len + total > segments.max_len);
    if journal.active.is_none() || full {
        // The full segment's last synced pages first.
        journal.drop_synced(1);
        let (id, file) = segments.start_journal()?;
        let mut ids = journal.segments.clone();
        ids.push(id);
        // Recorded before anything is written to it: recovery reads only these.
        sink.set_journal_segments(&ids)?;
        journal.segments = ids;
        journal.active = Some((id, file, 0));
        journal.cached_from = 0;
    }
    let (id, file, start) = journal
        .active
        .clone()
        .unwrap_or_else(|| unreachable!("a journal segment was just started"));
    let mut offset = start;
    let mut places = Vec::with_capacity(records.len());
    let result = (|| {
        for r in records {
            file.write_all_at(&r.head, offset)?;
            let body_at = offset + r.head.len() as u64;
            let body_len = r.body.as_ref().map_or(0, |b| b.len());
            if let Some(b) = &r.body {
                file.write_all_at(b, body_at)?;
            }
            places.push(Extent {
                segment: id,
                offset: body_at,
                len: body_len as u32,
            });
            offset = body_at + body_len as u64;
        }
        file.sync_data()
    })();
    if let Err(e) = result {
        // As with chunks: after a failed write or sync the segment is not trusted again.
        segments.poison(id);
        journal.active = None;
        return Err(io(segment_name(id), e));
    }
    journal.active = Some((id, file, offset));
    Ok(places)
}

/// One record read back from the journal.
struct Found {
    key: [u8; 32],
    meta: BlobMeta,
    /// Where the record ends.
    end: u64,
}

/// Reads the record at `offset` of a journal segment of `size` bytes: `None` at its end
/// or at a torn or unwritten tail.
fn read_record(file: &File, size: u64, offset: u64, id: u32) -> Result<Option<Found>, StoreError> {
    if offset + HEADER as u64 > size {
        return Ok(None);
    }
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, offset)
        .map_err(|e| io(segment_name(id), e))?;
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap_or_default());
    let (magic, len, crc) = (word(0), word(4) as usize, word(8));
    let body_at = offset + HEADER as u64;
    if magic != MAGIC || len < PREFIX || body_at + len as u64 > size {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    file.read_exact_at(&mut payload, body_at)
        .map_err(|e| io(segment_name(id), e))?;
    if crc32c::crc32c(&payload) != crc {
        return Ok(None);
    }
    let key: [u8; 32] = payload[..32].try_into().unwrap_or_default();
    let meta_len = u32::from_le_bytes(payload[32..36].try_into().unwrap_or_default()) as usize;
    let Some(meta) = payload.get(PREFIX..PREFIX + meta_len) else {
        return Err(StoreError::Corrupt(format!(
            "{} at {offset}: a journal record's meta overruns it",
            segment_name(id)
        )));
    };
    let mut meta: BlobMeta = serde_json::from_slice(meta)
        .map_err(|e| StoreError::Corrupt(format!("{} at {offset}: {e}", segment_name(id))))?;
    let whole = len - PREFIX - meta_len;
    if meta.extents.is_empty() && whole > 0 {
        meta.extents = vec![Extent {
            segment: id,
            offset: body_at + (PREFIX + meta_len) as u64,
            len: whole as u32,
        }];
    }
    Ok(Some(Found {
        key,
        meta,
        end: body_at + len as u64,
    }))
}

/// Records every blob of the journal beyond the recorded head that `blob_meta` lacks
/// (written before a crash that lost RocksDB's unsynced writes), then the new head,
/// synced. Returns how many it recorded.
///
/// A record naming chunks in a segment that is gone is skipped: its blob was collected
/// and its segment compacted after the record was written (on a node that committed
/// nothing since, so the head had not moved past it).
pub(crate) fn recover(segments: &Segments, sink: &impl MetaSink) -> Result<usize, StoreError> {
    let head = sink.journal_head()?;
    let mut pairs = Vec::new();
    let mut keys = HashSet::new();
    let mut last = None;
    for id in sink.journal_segments()? {
        let mut offset = match head {
            Some(h) if id < h.segment => continue,
            Some(h) if id == h.segment => h.offset,
            _ => 0,
        };
        let file = segments.file(id)?;
        let size = file.metadata().map_err(|e| io(segment_name(id), e))?.len();
        while let Some(found) = read_record(&file, size, offset, id)? {
            let whole = found
                .meta
                .extents
                .iter()
                .all(|e| segments.exists(e.segment));
            if whole && !keys.contains(&found.key) && !sink.exists(&found.key)? {
                keys.insert(found.key);
                let value = serde_json::to_vec(&found.meta)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                pairs.push((found.key, value));
            }
            offset = found.end;
            last = Some(JournalHead {
                segment: id,
                offset,
            });
        }
    }
    let recovered = pairs.len();
    if let Some(head) = last.filter(|l| Some(*l) != head) {
        sink.record(pairs, head, true)?;
    }
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a [`MemSink`] holds.
    #[derive(Default, Clone)]
    struct Data {
        metas: HashMap<[u8; 32], Vec<u8>>,
        head: Option<JournalHead>,
        journal: Vec<u32>,
    }

    /// `blob_meta` in memory, with RocksDB's durability: an unsynced write is lost in a
    /// crash unless a synced one follows it.
    #[derive(Default, Clone)]
    struct MemSink {
        live: Arc<Mutex<Data>>,
        durable: Arc<Mutex<Data>>,
        writes: Arc<Mutex<usize>>,
        /// Injected: every record write fails.
        fail_records: bool,
        /// Injected: asking for this key panics.
        panic_on: Option<[u8; 32]>,
    }

    impl MemSink {
        fn write(&self, sync: bool, f: impl FnOnce(&mut Data)) {
            let mut live = self.live.lock().unwrap();
            f(&mut live);
            if sync {
                *self.durable.lock().unwrap() = live.clone();
            }
            *self.writes.lock().unwrap() += 1;
        }

        /// What survives a crash of the machine.
        fn crashed(&self) -> MemSink {
            let data = self.durable.lock().unwrap().clone();
            MemSink {
                live: Arc::new(Mutex::new(data.clone())),
                durable: Arc::new(Mutex::new(data)),
                ..MemSink::default()
            }
        }

        fn meta(&self, key: &[u8; 32]) -> Option<BlobMeta> {
            let live = self.live.lock().unwrap();
            live.metas
                .get(key)
                .map(|v| serde_json::from_slice(v).unwrap())
        }
    }

    impl MetaSink for MemSink {
        fn exists(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
            assert_ne!(Some(*key), self.panic_on, "injected");
            Ok(self.live.lock().unwrap().metas.contains_key(key))
        }
        fn current(&self, key: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError> {
            Ok(self.meta(key))
        }
        fn record(
            &self,
            pairs: Vec<([u8; 32], Vec<u8>)>,
            head: JournalHead,
            sync: bool,
        ) -> Result<(), StoreError> {
            if self.fail_records {
                return Err(StoreError::Io("injected".into()));
            }
            self.write(sync, |d| {
                d.metas.extend(pairs);
                d.head = Some(head);
            });
            Ok(())
        }
        fn journal_head(&self) -> Result<Option<JournalHead>, StoreError> {
            Ok(self.live.lock().unwrap().head)
        }
        fn journal_segments(&self) -> Result<Vec<u32>, StoreError> {
            Ok(self.live.lock().unwrap().journal.clone())
        }
        fn set_journal_segments(&self, ids: &[u32]) -> Result<(), StoreError> {
            self.write(true, |d| d.journal = ids.to_vec());
            Ok(())
        }
    }

    fn meta(size: u64, extents: Vec<Extent>) -> BlobMeta {
        BlobMeta {
            extents,
            data_id: None,
            chunks: 0,
            info: granary_format::model::BlobInfo {
                size,
                hashes: granary_format::model::Hashes {
                    md5: String::new(),
                    sha1: String::new(),
                    sha256: String::new(),
                    sha512: String::new(),
                },
            },
            crc32c: None,
        }
    }

    fn key(i: u32) -> [u8; 32] {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        key
    }

    /// Commits blob `i` given whole (`bytes`) and waits for the answer.
    async fn commit_whole(
        tx: &mpsc::Sender<CommitRequest>,
        i: u32,
        bytes: &[u8],
    ) -> Result<Option<BlobMeta>, StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(CommitRequest {
            segments: HashSet::new(),
            key: key(i),
            // With its CRC32C, as uploads record it.
            meta: BlobMeta {
                crc32c: Some(crc32c::crc32c(bytes)),
                ..meta(bytes.len() as u64, Vec::new())
            },
            whole: Some(Bytes::copy_from_slice(bytes)),
            reply,
            replaces: None,
        })
        .unwrap();
        rx.await.unwrap()
    }

    /// The bytes blob `i`'s recorded meta points at.
    fn read_blob(segs: &Segments, sink: &MemSink, i: u32) -> Vec<u8> {
        let meta = sink
            .meta(&key(i))
            .unwrap_or_else(|| panic!("blob {i} recorded"));
        let mut out = Vec::new();
        for e in &meta.extents {
            out.extend_from_slice(&segs.read(e).unwrap());
        }
        out
    }

    /// How many bytes of `path` the page cache holds, by util-linux's `fincore`
    /// (`scripts/install-test-deps.sh` installs it).
    fn cached_bytes(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| {
                panic!("fincore (util-linux-extra; scripts/install-test-deps.sh): {e}")
            });
        assert!(out.status.success(), "fincore: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("fincore said {text:?}: {e}"))
    }

    fn noise(len: usize, i: u32) -> Vec<u8> {
        super::super::noise(len, u64::from(i))
    }

    /// Stored bytes do not stay in the page cache once synced: the journal's are dropped
    /// a megabyte at a time, a large blob's chunks once committed. They read back intact,
    /// from disk.
    #[tokio::test]
    async fn synced_bytes_leave_the_page_cache() {
        // Beside the test binary, not in the temporary directory: that may be a tmpfs,
        // whose pages are the files themselves and cannot be dropped.
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let sink = MemSink::default();
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        let blobs: Vec<Vec<u8>> = (0..40).map(|i| noise(100_000, i)).collect();
        for (i, b) in blobs.iter().enumerate() {
            commit_whole(&tx, i as u32, b).await.unwrap().unwrap();
        }
        let journal = dir
            .path()
            .join(segment_name(sink.journal_segments().unwrap()[0]));
        let written = std::fs::metadata(&journal).unwrap().len();
        assert!(written > 4_000_000, "{written} bytes in the journal");
        let cached = cached_bytes(&journal);
        assert!(
            cached <= DROP_AFTER + 2 * PAGE,
            "{cached} of the journal's {written} bytes are cached"
        );

        // A blob in chunks, each written at once (uploads write as bytes arrive).
        let chunks: Vec<Vec<u8>> = (100..104).map(|i| noise(300_000, i)).collect();
        let extents: Vec<Extent> = chunks.iter().map(|c| segs.append(c).unwrap()).collect();
        let chunked = dir.path().join(segment_name(extents[0].segment));
        assert!(
            cached_bytes(&chunked) >= 1_200_000,
            "written, not yet synced"
        );
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(CommitRequest {
            segments: HashSet::from([extents[0].segment]),
            key: key(100),
            meta: meta(1_200_000, extents),
            whole: None,
            reply,
            replaces: None,
        })
        .unwrap();
        rx.await.unwrap().unwrap().unwrap();
        // Answered first, dropped after: waiting on the committer's next group (which
        // writes nothing) orders this after the drop.
        commit_whole(&tx, 0, &blobs[0]).await.unwrap();
        // The pages where one chunk ends and the next begins stay, and the last one.
        let cached = cached_bytes(&chunked);
        assert!(
            cached <= 4 * PAGE,
            "{cached} bytes of the committed chunks are cached"
        );

        for (i, b) in blobs.iter().enumerate() {
            assert!(
                read_blob(&segs, &sink, i as u32) == *b,
                "blob {i} read back"
            );
        }
        assert!(read_blob(&segs, &sink, 100) == chunks.concat());
        drop(tx);
        handle.join().unwrap();
    }

    /// A chunk read for a check leaves the page cache.
    #[test]
    fn a_chunk_read_uncached_leaves_the_page_cache() {
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let segs = Segments::open(dir.path(), SEGMENT_BYTES).unwrap();
        let data = noise(1_000_000, 7);
        let at = segs.append(&data).unwrap();
        segs.sync(&HashSet::from([at.segment])).unwrap();
        let path = dir.path().join(segment_name(at.segment));
        assert!(segs.read(&at).unwrap() == data);
        assert!(cached_bytes(&path) >= 1_000_000, "written and read: cached");
        assert!(segs.read_uncached(&at).unwrap() == data);
        let cached = cached_bytes(&path);
        assert!(cached <= PAGE, "{cached} bytes still cached");
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
            let (reply, rx) = tokio::sync::oneshot::channel();
            // Keys 0..100, each twice; odd ones in a chunk segment, even ones given whole.
            let bytes = Bytes::from(format!("blob {}", i % 100));
            let (segments, extents, whole) = if i % 2 == 1 {
                let e = segs.append(&bytes).unwrap();
                (HashSet::from([e.segment]), vec![e], None)
            } else {
                (HashSet::new(), Vec::new(), Some(bytes.clone()))
            };
            tx.send(CommitRequest {
                segments,
                key: key(i % 100),
                meta: meta(bytes.len() as u64, extents),
                whole,
                reply,
                replaces: None,
            })
            .unwrap();
            waits.push(rx);
        }
        let mut recorded = 0;
        for w in waits {
            if w.await.unwrap().unwrap().is_some() {
                recorded += 1;
            }
        }
        assert_eq!(recorded, 100, "each key recorded once");
        assert_eq!(sink.live.lock().unwrap().metas.len(), 100);
        for i in 0..100 {
            assert_eq!(read_blob(&segs, &sink, i), format!("blob {i}").as_bytes());
        }
        assert!(
            *sink.writes.lock().unwrap() < 100,
            "commits sent together share writes"
        );
        drop(tx);
        handle.join().unwrap();
    }

    /// A failed write fails every request of the group that counted on it, the second
    /// request for the same blob too (it used to be told the blob was stored).
    #[tokio::test]
    async fn a_failed_write_fails_a_duplicate_in_the_same_group() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path(), SEGMENT_BYTES).unwrap();
        let mut journal = Journal::new(Vec::new());
        let mut group = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..2 {
            let (reply, rx) = tokio::sync::oneshot::channel();
            group.push(CommitRequest {
                segments: HashSet::new(),
                key: [7u8; 32],
                meta: meta(5, Vec::new()),
                whole: Some(Bytes::from_static(b"bytes")),
                reply,
                replaces: None,
            });
            answers.push(rx);
        }
        let sink = MemSink {
            fail_records: true,
            ..MemSink::default()
        };
        commit_group(&segs, &sink, &mut journal, group);
        for a in answers {
            assert!(a.await.unwrap().is_err());
        }
    }

    /// The journal makes a group durable with one sync: metas whose unsynced RocksDB
    /// write a crash lost are recorded again from it when the committer starts, and a
    /// torn record at its tail is left out.
    #[tokio::test]
    async fn records_lost_by_a_crash_are_recovered_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let sink = MemSink::default();
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        // Given whole, in a chunk segment, and empty.
        let small = vec![1u8; 3000];
        commit_whole(&tx, 1, &small).await.unwrap().unwrap();
        let large = segs.append(&[2u8; 500]).unwrap();
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(CommitRequest {
            segments: HashSet::from([large.segment]),
            key: key(2),
            meta: meta(500, vec![large]),
            whole: None,
            reply,
            replaces: None,
        })
        .unwrap();
        rx.await.unwrap().unwrap().unwrap();
        commit_whole(&tx, 3, b"").await.unwrap().unwrap();
        drop(tx);
        handle.join().unwrap();
        let crashed = sink.crashed();
        assert!(
            !crashed.exists(&key(1)).unwrap(),
            "the metas were written unsynced"
        );
        // A torn record after the last whole one.
        let journal = crashed.journal_segments().unwrap();
        assert_eq!(journal.len(), 1);
        let path = dir.path().join(segment_name(journal[0]));
        let torn = Record::new(&key(4), b"{}", Some(Bytes::from_static(b"lost")))
            .unwrap()
            .head;
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut file, &torn[..torn.len() - 1]).unwrap();
        drop(file);

        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let (tx, handle) = spawn_committer(segs.clone(), crashed.clone()).unwrap();
        assert_eq!(read_blob(&segs, &crashed, 1), small);
        assert_eq!(read_blob(&segs, &crashed, 2), vec![2u8; 500]);
        assert_eq!(read_blob(&segs, &crashed, 3), b"");
        assert!(!crashed.exists(&key(4)).unwrap(), "the torn record is not");
        assert_eq!(crashed.meta(&key(1)).unwrap().info.size, 3000);
        // Recovered durably; new records go to a new journal segment, after the torn one.
        let head = crashed.durable.lock().unwrap().head.unwrap();
        assert_eq!(head.segment, journal[0]);
        commit_whole(&tx, 5, b"after").await.unwrap().unwrap();
        let journal = crashed.journal_segments().unwrap();
        assert_eq!(journal.len(), 2);
        drop(tx);
        handle.join().unwrap();
        // A second crash: both segments read, from the head on.
        let again = crashed.crashed();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        assert_eq!(recover(&segs, &again).unwrap(), 1);
        assert_eq!(read_blob(&segs, &again, 5), b"after");
        assert_eq!(read_blob(&segs, &again, 1), small);
        // Nothing left to recover.
        assert_eq!(recover(&segs, &again).unwrap(), 0);
    }

    /// A blob collected and its segment compacted on a node that committed nothing
    /// since, so that its record is still after the journal's head: a crash then loses
    /// the unsynced records, and recovery must not record the blob again, naming a
    /// segment that is gone.
    #[tokio::test]
    async fn recovery_skips_a_record_whose_segment_was_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let sink = MemSink::default();
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        let chunk = segs.append(&[2u8; 500]).unwrap();
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(CommitRequest {
            segments: HashSet::from([chunk.segment]),
            key: key(2),
            meta: meta(500, vec![chunk]),
            whole: None,
            reply,
            replaces: None,
        })
        .unwrap();
        rx.await.unwrap().unwrap().unwrap();
        commit_whole(&tx, 3, b"small").await.unwrap().unwrap();
        drop(tx);
        handle.join().unwrap();
        segs.retire(chunk.segment).unwrap();
        assert!(!dir.path().join(segment_name(chunk.segment)).exists());

        let crashed = sink.crashed();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        assert_eq!(recover(&segs, &crashed).unwrap(), 1);
        assert!(!crashed.exists(&key(2)).unwrap(), "its chunks are gone");
        assert_eq!(read_blob(&segs, &crashed, 3), b"small");
    }

    /// Compaction never takes a segment an upload in flight may still be writing to or
    /// commit against, the segment appended to, or a journal segment recovery reads;
    /// a retired segment stays readable through its open file until released.
    #[test]
    fn only_segments_below_every_write_are_compactable() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path(), 100).unwrap();
        let first = segs.append(&[1u8; 100]).unwrap();
        let held = segs.hold();
        let second = segs.append(&[2u8; 100]).unwrap();
        let third = segs.append(&[3u8; 100]).unwrap();
        let _ = segs.append(&[4u8; 100]).unwrap();
        assert_eq!(
            (first.segment, second.segment, third.segment),
            (1, 2, 3),
            "one chunk per segment"
        );
        // The hold was taken while segment 1 was appended to.
        let none = HashSet::new();
        assert_eq!(segs.compactable(&none).unwrap(), vec![]);
        drop(held);
        let ids = |v: Vec<(u32, u64)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(segs.compactable(&none).unwrap()), vec![1, 2, 3]);
        let journal = HashSet::from([2]);
        assert_eq!(ids(segs.compactable(&journal).unwrap()), vec![1, 3]);
        assert_eq!(segs.compactable(&none).unwrap()[0], (1, 100));

        segs.retire(2).unwrap();
        assert!(!dir.path().join(segment_name(2)).exists());
        assert_eq!(&segs.read(&second).unwrap()[..], &[2u8; 100][..]);
        assert_eq!(ids(segs.compactable(&none).unwrap()), vec![1, 3]);
        segs.release_retired();
        assert!(segs.read(&second).is_err());
        assert!(!segs.exists(2) && segs.exists(1));

        // Reopened, with nothing appended yet: the next append goes to a new segment,
        // so every file may be compacted (but the journal's).
        drop(segs);
        let segs = Segments::open(dir.path(), 100).unwrap();
        assert_eq!(ids(segs.compactable(&journal).unwrap()), vec![1, 3, 4]);
        let held = segs.hold();
        assert_eq!(segs.append(&[5u8; 100]).unwrap().segment, 5);
        assert_eq!(
            ids(segs.compactable(&none).unwrap()),
            vec![1, 3],
            "held from 4"
        );
        drop(held);
        assert_eq!(ids(segs.compactable(&none).unwrap()), vec![1, 3, 4]);
    }

    /// A blob moved out of a segment replaces its record only while that still names the
    /// place it was moved from.
    #[tokio::test]
    async fn a_move_replaces_only_the_record_it_was_made_from() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let sink = MemSink::default();
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        commit_whole(&tx, 1, b"bytes").await.unwrap().unwrap();
        let old = sink.meta(&key(1)).unwrap();
        let moved = |replaces: BlobMeta| {
            let (reply, rx) = tokio::sync::oneshot::channel();
            tx.send(CommitRequest {
                segments: HashSet::new(),
                key: key(1),
                meta: BlobMeta {
                    extents: Vec::new(),
                    ..old.clone()
                },
                whole: Some(Bytes::from_static(b"bytes")),
                reply,
                replaces: Some(replaces),
            })
            .unwrap();
            rx
        };
        let new = moved(old.clone()).await.unwrap().unwrap().unwrap();
        assert_ne!(new.extents, old.extents);
        assert_eq!(sink.meta(&key(1)).unwrap(), new);
        // Moved again from where it no longer is: nothing written.
        assert!(moved(old.clone()).await.unwrap().unwrap().is_none());
        assert_eq!(sink.meta(&key(1)).unwrap(), new);
        assert_eq!(read_blob(&segs, &sink, 1), b"bytes");
        drop(tx);
        handle.join().unwrap();
    }

    /// A group with nothing new to record writes nothing, first thing after a start too
    /// (it used to stop the committer thread there).
    #[tokio::test]
    async fn a_group_of_stored_blobs_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sink = MemSink::default();
        for _ in 0..2 {
            let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
            let (tx, handle) = spawn_committer(segs, sink.clone()).unwrap();
            commit_whole(&tx, 1, b"one").await.unwrap();
            assert!(commit_whole(&tx, 1, b"one").await.unwrap().is_none());
            drop(tx);
            handle.join().unwrap();
        }
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        assert!(commit_whole(&tx, 1, b"one").await.unwrap().is_none());
        assert!(commit_whole(&tx, 2, b"two").await.unwrap().is_some());
        drop(tx);
        handle.join().unwrap();
        assert_eq!(read_blob(&segs, &sink, 1), b"one");
        assert_eq!(read_blob(&segs, &sink, 2), b"two");
        assert_eq!(
            sink.journal_segments().unwrap().len(),
            2,
            "a journal segment is started only to be written to"
        );
    }

    /// A panic in a group fails that group's commits, not the later ones.
    #[tokio::test]
    async fn the_committer_outlives_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), SEGMENT_BYTES).unwrap());
        let sink = MemSink {
            panic_on: Some(key(13)),
            ..MemSink::default()
        };
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        commit_whole(&tx, 1, b"one").await.unwrap().unwrap();
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(CommitRequest {
            segments: HashSet::new(),
            key: key(13),
            meta: meta(3, Vec::new()),
            whole: Some(Bytes::from_static(b"bad")),
            reply,
            replaces: None,
        })
        .unwrap();
        assert!(rx.await.is_err(), "the panicking group gets no answer");
        commit_whole(&tx, 2, b"two").await.unwrap().unwrap();
        drop(tx);
        handle.join().unwrap();
        assert_eq!(read_blob(&segs, &sink, 1), b"one");
        assert_eq!(read_blob(&segs, &sink, 2), b"two");
        assert_eq!(sink.journal_segments().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_journal_rolls_over_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Arc::new(Segments::open(dir.path(), 200).unwrap());
        let sink = MemSink::default();
        let (tx, handle) = spawn_committer(segs.clone(), sink.clone()).unwrap();
        for i in 0..4 {
            commit_whole(&tx, i, &[i as u8; 100])
                .await
                .unwrap()
                .unwrap();
        }
        // A chunk segment started meanwhile takes the next number.
        let chunk = segs.append(b"chunk").unwrap();
        commit_whole(&tx, 4, &[4u8; 100]).await.unwrap().unwrap();
        drop(tx);
        handle.join().unwrap();
        let journal = sink.journal_segments().unwrap();
        assert_eq!(journal.len(), 5, "one record of ~200 bytes per segment");
        assert!(!journal.contains(&chunk.segment));
        for i in 0..5 {
            assert_eq!(read_blob(&segs, &sink, i), vec![i as u8; 100]);
        }
        // The synced write naming each new segment made the metas before it durable too.
        let crashed = sink.crashed();
        assert_eq!(recover(&segs, &crashed).unwrap(), 1);
        // With no head recorded, every journal segment is read.
        let bare = MemSink::default();
        bare.set_journal_segments(&journal).unwrap();
        assert_eq!(recover(&segs, &bare).unwrap(), 5);
        for i in 0..5 {
            assert_eq!(read_blob(&segs, &crashed, i), vec![i as u8; 100]);
            assert_eq!(read_blob(&segs, &bare, i), vec![i as u8; 100]);
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
