//! The node's storage: opening and recovering the data directory, handing out partition
//! logs, the checkpointer, and a clean close.
//!
//! Layout under the data directory:
//!
//! ```text
//! PETREL                      marker: "petrel-data <version>"
//! LOCK                        held (flock) while open
//! checkpoint                  per partition: start, durable end, WAL replay position
//! wal/<seq>.wal               the node-wide write-ahead log
//! partitions/<id>/<base>.log  segments, with .index and .timeindex beside sealed ones
//! ```
//!
//! Recovery first looks without changing anything: each partition's segments must hold
//! what the checkpoint vouches for; after that, whole valid batches count (synced
//! directly, or written and also in the WAL) up to the first damage or gap; and a replay
//! of the WAL on paper must reach every offset a direct sync was acknowledged for. Only
//! then are damaged or unsynced tails cut, the WAL replayed into the segments, everything
//! synced, and a new checkpoint written. Damage other than a torn tail is an error naming
//! file and byte, with the files left as they were (but for a torn WAL tail, cut).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::PartitionId;
use crate::buffer::Budget;
use crate::cache::Cache;
use crate::checkpoint::{Checkpoint, Entry};
use crate::config::{PartitionConfig, StorageConfig};
use crate::error::{Corruption, Error, Result};
use crate::fsutil;
use crate::log::{Log, LogState};
use crate::segment::{self, Segment};
use crate::shared::PartitionShared;
use crate::wal::{self, Poison, Wal, WalPosition, WalRecord};

const MARKER: &str = "PETREL";
const FORMAT_VERSION: u32 = 1;
/// How often the checkpointer writes out the partitions' write buffers.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Shared by the storage, every `Log` and the checkpointer.
pub(crate) struct Inner {
    pub config: StorageConfig,
    root: PathBuf,
    pub wal: Wal,
    pub poison: Arc<Poison>,
    pub cache: Cache,
    /// Bytes held in the partitions' write buffers.
    budget: Arc<Budget>,
    table: Mutex<Checkpoint>,
    registry: Mutex<HashMap<PartitionId, Arc<PartitionShared>>>,
    parked: Mutex<HashMap<PartitionId, LogState>>,
    /// Set by `close`: the directory may then belong to another `Storage`.
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Holders never leave these maps half-changed across a panic point that matters.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    fn wal_dir(&self) -> PathBuf {
        self.root.join("wal")
    }

    fn partition_dir(&self, id: PartitionId) -> PathBuf {
        self.root.join("partitions").join(id.to_string())
    }

    /// Refuses changes through a `Log` that outlived `close`: once the lock is released,
    /// the files may belong to the next `Storage` opened on this directory.
    pub fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Refuses writes once closed or poisoned.
    pub fn check_writable(&self) -> Result<()> {
        self.check_open()?;
        self.poison.check()
    }

    /// The checkpoint table; held while a partition changes its entry.
    pub fn table(&self) -> MutexGuard<'_, Checkpoint> {
        lock(&self.table)
    }

    pub fn save_checkpoint(&self, table: &Checkpoint) -> Result<()> {
        table.save(&self.root.join("checkpoint"))
    }

    /// Takes back the state of a `Log` that was dropped.
    pub fn park(&self, id: PartitionId, state: LogState) {
        lock(&self.parked).insert(id, state);
    }

    pub fn delete_partition(&self, id: PartitionId, dir: &Path) -> Result<()> {
        {
            let mut table = self.table();
            table.entries.remove(&id);
            self.save_checkpoint(&table)?;
        }
        if let Some(shared) = lock(&self.registry).remove(&id) {
            shared.mark_deleted();
        }
        self.cache.remove(id);
        std::fs::remove_dir_all(dir).map_err(|e| Error::io("delete", dir, e))
    }

    /// Writes every partition's buffered batches to its segment (no sync): a buffer left
    /// by a partition that went quiet is not held for long.
    fn flush_buffers(&self) {
        let registry: Vec<_> = lock(&self.registry).values().cloned().collect();
        for shared in registry {
            if let Err(e) = shared.flush() {
                tracing::warn!(error = %e, "writing buffered batches failed; they stay in the WAL");
                return;
            }
        }
    }

    /// Makes the segments hold everything written before `boundary`, records that, and
    /// deletes the WAL files before it.
    fn checkpoint(&self, boundary: WalPosition) -> Result<()> {
        {
            let mut table = self.table();
            let registry: Vec<_> = lock(&self.registry)
                .iter()
                .map(|(id, s)| (*id, s.clone()))
                .collect();
            for (id, shared) in registry {
                let Some(entry) = table.entries.get_mut(&id) else {
                    continue;
                };
                if entry.replay_from >= boundary {
                    continue; // A truncation already moved it past the boundary.
                }
                let end = shared.next.load(std::sync::atomic::Ordering::Acquire);
                // A full disk refuses the buffered batches for now: they stay in the WAL,
                // and so do its files until a later checkpoint gets them written.
                shared.flush()?;
                if let Err(e) = shared.sync_written() {
                    if let Error::Io { path, source, .. } | Error::DiskFull { path, source } = e {
                        self.poison.set(&path, source);
                    }
                    return self.poison.check();
                }
                entry.end = end;
                entry.replay_from = boundary;
            }
            self.save_checkpoint(&table)?;
        }
        let wal_dir = self.wal_dir();
        for seq in wal::list(&wal_dir)? {
            if seq < boundary.seq {
                wal::retire(&wal_dir, seq)?;
            }
        }
        Ok(())
    }
}

/// The node's storage: one write-ahead log, a cache, and every partition's log.
pub struct Storage {
    inner: Arc<Inner>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    _lock: DirLock,
    closed: bool,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("dir", &self.inner.root)
            .finish()
    }
}

impl Storage {
    /// Opens (or creates) the storage under `config.dir` and recovers it.
    pub fn open(config: StorageConfig) -> Result<Storage> {
        config.validate()?;
        let root = config.dir.clone();
        let lock_file = prepare_root(&root)?;
        let (wal_dir, parts_dir) = (root.join("wal"), root.join("partitions"));
        for d in [&wal_dir, &parts_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io("create", d, e))?;
        }
        let mut table = Checkpoint::load(&root.join("checkpoint"))?.unwrap_or_default();
        remove_orphans(&parts_dir, &table)?;

        // Look before changing anything: an open that fails leaves every file as it was.
        let mut found = BTreeMap::new();
        for (&id, entry) in &table.entries {
            let dir = parts_dir.join(id.to_string());
            found.insert(id, find_segments(&dir, entry, config.index_interval_bytes)?);
        }
        check_against_wal(&wal_dir, &table, &found)?;
        let mut states = BTreeMap::new();
        for (id, f) in found {
            states.insert(id, f.apply(&parts_dir.join(id.to_string()))?);
        }
        let mut replayed = 0u64;
        let seqs = wal::replay(&wal_dir, |at, id, record| {
            let (Some(entry), Some(state)) = (table.entries.get(&id), states.get_mut(&id)) else {
                return Ok(()); // A deleted partition.
            };
            if at < entry.replay_from {
                return Ok(());
            }
            let batch = match record {
                WalRecord::Synced(_) => return Ok(()),
                WalRecord::Batch(batch) if batch.next_offset() <= state.next => return Ok(()),
                WalRecord::Batch(batch) => batch,
            };
            if batch.base_offset() != state.next {
                let gap = Corruption::OffsetGap {
                    expected: state.next,
                    found: batch.base_offset(),
                };
                return Err(Error::corrupt(
                    wal::file_path(&wal_dir, at.seq),
                    at.pos,
                    gap,
                ));
            }
            let Some(active) = state.segments.values_mut().next_back() else {
                return Err(Error::UnknownPartition(id));
            };
            active.append(std::slice::from_ref(&batch))?;
            state.next = batch.next_offset();
            replayed += 1;
            Ok(())
        })?;
        // Everything is now in the segments: sync them, start a fresh WAL file, point the
        // checkpoint at it, and retire the old files.
        // Above every sequence ever used, spares included: a reused file's old chunks
        // must never carry the sequence of the file it becomes.
        let last_seq = seqs
            .iter()
            .copied()
            .chain(wal::spare_seqs(&wal_dir)?)
            .chain(table.entries.values().map(|e| e.replay_from.seq))
            .max()
            .unwrap_or(0);
        let fresh = WalPosition {
            seq: last_seq + 1,
            pos: wal::FILE_HEADER,
        };
        for (id, state) in &states {
            if let Some(active) = state.active() {
                active
                    .file()
                    .sync_data()
                    .map_err(|e| Error::io("sync", active.path(), e))?;
            }
            fsutil::sync_dir(&parts_dir.join(id.to_string()))?;
            if let Some(entry) = table.entries.get_mut(id) {
                entry.end = state.next;
                entry.replay_from = fresh;
                entry.cut_pending = false;
            }
        }
        let poison = Arc::new(Poison::default());
        let (rolled_tx, rolled_rx) = mpsc::channel();
        let wal = Wal::start(&wal_dir, fresh.seq, &config, poison.clone(), rolled_tx)?;
        table.save(&root.join("checkpoint"))?;
        for seq in seqs {
            wal::retire(&wal_dir, seq)?;
        }
        tracing::info!(dir = %root.display(), partitions = states.len(), replayed, "storage opened");

        let budget = Budget::new(config.write_buffer_bytes);
        let registry = states
            .iter()
            .map(|(id, st)| {
                let dir = parts_dir.join(id.to_string());
                (*id, Arc::new(PartitionShared::new(dir, st, budget.clone())))
            })
            .collect();
        let inner = Arc::new(Inner {
            cache: Cache::new(config.cache_bytes),
            budget,
            config,
            root,
            wal,
            poison,
            table: Mutex::new(table),
            registry: Mutex::new(registry),
            parked: Mutex::new(states.into_iter().collect()),
            closed: AtomicBool::new(false),
        });
        let for_thread = inner.clone();
        let checkpointer = std::thread::Builder::new()
            .name("petrel-checkpoint".into())
            .spawn(move || {
                loop {
                    match rolled_rx.recv_timeout(FLUSH_EVERY) {
                        Ok(boundary) => {
                            if let Err(e) = for_thread.checkpoint(boundary) {
                                tracing::error!(error = %e, "checkpoint failed");
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => for_thread.flush_buffers(),
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            })
            .map_err(|e| Error::io("spawn checkpointer for", &inner.root, e))?;
        Ok(Storage {
            inner,
            checkpointer: Some(checkpointer),
            _lock: lock_file,
            closed: false,
        })
    }

    /// Ids of every partition, open or not.
    pub fn partitions(&self) -> Vec<PartitionId> {
        self.inner.table().entries.keys().copied().collect()
    }

    /// Creates an empty partition starting at offset 0.
    pub fn create_partition(&self, id: PartitionId, config: PartitionConfig) -> Result<Log> {
        config.validate()?;
        self.inner.poison.check()?;
        // WAL records before this point belong to an earlier partition of the same id.
        let replay_from = self.inner.wal.barrier()?;
        // Held throughout, so two creations of one id cannot clobber each other's directory.
        let mut table = self.inner.table();
        if table.entries.contains_key(&id) {
            return Err(Error::PartitionExists(id));
        }
        let dir = self.inner.partition_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io("clear", &dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let seg = Segment::create(&dir, 0, self.inner.config.index_interval_bytes)?;
        fsutil::sync_dir(&dir)?;
        if let Some(parent) = dir.parent() {
            fsutil::sync_dir(parent)?;
        }
        let mut state = LogState::default();
        state.segments.insert(0, seg);
        let shared = Arc::new(PartitionShared::new(dir, &state, self.inner.budget.clone()));
        table.entries.insert(
            id,
            Entry {
                start: 0,
                end: 0,
                replay_from,
                cut_pending: false,
            },
        );
        self.inner.save_checkpoint(&table)?;
        lock(&self.inner.registry).insert(id, shared.clone());
        drop(table);
        Ok(Log::new(id, config, state, shared, self.inner.clone()))
    }

    /// Opens an existing partition for its one owner.
    pub fn open_partition(&self, id: PartitionId, config: PartitionConfig) -> Result<Log> {
        config.validate()?;
        let shared = lock(&self.inner.registry)
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownPartition(id))?;
        let state = lock(&self.inner.parked)
            .remove(&id)
            .ok_or(Error::PartitionOpen(id))?;
        Ok(Log::new(id, config, state, shared, self.inner.clone()))
    }

    /// Bytes held by the batch cache.
    pub fn cache_bytes(&self) -> usize {
        self.inner.cache.bytes()
    }

    /// Makes everything durable and checkpointed so the next open replays nothing, then
    /// stops the writer threads. Later appends through surviving `Log`s fail with `Closed`.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.inner.closed.store(true, Ordering::Release);
        let end = self.inner.wal.shutdown();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
        let end = end?;
        // Covered whole: past the current file, so it is retired too.
        self.inner.checkpoint(WalPosition {
            seq: end.seq + 1,
            pos: 0,
        })?;
        tracing::info!(dir = %self.inner.root.display(), "storage closed");
        Ok(())
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "closing storage failed");
        }
    }
}

/// The data directory's lock (`flock` on `LOCK`), released explicitly when dropped: a
/// child process forked meanwhile holds a copy of the descriptor until it execs, and
/// merely closing ours would leave the directory locked until then.
struct DirLock(File);

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Replays the WAL on paper against what the segments hold: every partition must reach
/// the offsets its segments were synced to directly (`Synced` marks), and the WAL's
/// batches must continue each log without a gap.
fn check_against_wal(
    wal_dir: &Path,
    table: &Checkpoint,
    found: &BTreeMap<PartitionId, Found>,
) -> Result<()> {
    let mut next: HashMap<PartitionId, u64> = found.iter().map(|(id, f)| (*id, f.next)).collect();
    let mut required: HashMap<PartitionId, u64> = HashMap::new();
    wal::replay(wal_dir, |at, id, record| {
        let (Some(entry), Some(next)) = (table.entries.get(&id), next.get_mut(&id)) else {
            return Ok(());
        };
        if at < entry.replay_from {
            return Ok(());
        }
        match record {
            WalRecord::Synced(to) => {
                let r = required.entry(id).or_default();
                *r = (*r).max(to);
            }
            WalRecord::Batch(b) if b.next_offset() <= *next => {}
            WalRecord::Batch(b) if b.base_offset() == *next => *next = b.next_offset(),
            WalRecord::Batch(b) => {
                let gap = Corruption::OffsetGap {
                    expected: *next,
                    found: b.base_offset(),
                };
                return Err(Error::corrupt(wal::file_path(wal_dir, at.seq), at.pos, gap));
            }
        }
        Ok(())
    })?;
    for (id, needed) in required {
        let (Some(f), Some(reached)) = (found.get(&id), next.get(&id)) else {
            continue;
        };
        if *reached < needed {
            let last = f.tail.last();
            let path = last.map_or_else(PathBuf::new, |s| s.path().to_path_buf());
            let missing = Corruption::Missing {
                expected: needed,
                found: *reached,
            };
            return Err(Error::corrupt(path, last.map_or(0, Segment::size), missing));
        }
    }
    Ok(())
}

/// Creates or validates the data directory and locks it.
fn prepare_root(root: &Path) -> Result<DirLock> {
    std::fs::create_dir_all(root).map_err(|e| Error::io("create data directory", root, e))?;
    let marker = root.join(MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(text) => {
            let found = text
                .trim()
                .strip_prefix("petrel-data ")
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| Error::NotADataDir {
                    path: root.to_path_buf(),
                })?;
            if found != FORMAT_VERSION {
                return Err(Error::UnsupportedFormat {
                    path: root.to_path_buf(),
                    found,
                    supported: FORMAT_VERSION,
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut entries = std::fs::read_dir(root).map_err(|e| Error::io("list", root, e))?;
            if entries.next().is_some() {
                return Err(Error::NotADataDir {
                    path: root.to_path_buf(),
                });
            }
            fsutil::write_atomic(
                &marker,
                format!("petrel-data {FORMAT_VERSION}\n").as_bytes(),
            )?;
        }
        Err(e) => return Err(Error::io("read", &marker, e)),
    }
    let lock_path = root.join("LOCK");
    let file = File::create(&lock_path).map_err(|e| Error::io("create", &lock_path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: root.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &lock_path, e)),
    }
}

/// Deletes partition directories the checkpoint does not know: a creation that crashed
/// before it was recorded, or a deletion that crashed after.
fn remove_orphans(parts_dir: &Path, table: &Checkpoint) -> Result<()> {
    for entry in std::fs::read_dir(parts_dir).map_err(|e| Error::io("list", parts_dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", parts_dir, e))?;
        let path = entry.path();
        match entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<PartitionId>().ok())
        {
            Some(id) if table.entries.contains_key(&id) => {}
            Some(_) => {
                tracing::warn!(dir = %path.display(), "removing a partition directory the checkpoint does not know");
                std::fs::remove_dir_all(&path).map_err(|e| Error::io("delete", &path, e))?;
            }
            None => {
                tracing::warn!(path = %path.display(), "ignoring unexpected file in the partitions directory")
            }
        }
    }
    Ok(())
}

/// A partition's segments as recovery found them, before anything is changed on disk.
struct Found {
    state: LogState,
    /// Segments from the one holding the checkpoint's end on, valid batches only; the
    /// last takes appends.
    tail: Vec<Segment>,
    /// Segments to delete: purged ones whose deletion did not finish, and those after
    /// damage or a gap.
    doomed: Vec<u64>,
    /// An interrupted truncation to finish: cut everything from this offset.
    cut_from: Option<u64>,
    /// Where the log ends once that is done.
    next: u64,
}

impl Found {
    /// Changes the files as planned: cut damaged or unsynced tails, delete what goes.
    fn apply(mut self, dir: &Path) -> Result<LogState> {
        for base in self.doomed {
            segment::remove_files(dir, base)?;
        }
        let last = self.tail.len().saturating_sub(1);
        for (i, mut seg) in self.tail.into_iter().enumerate() {
            seg.discard_tail()?;
            if i == last {
                if let Some(end) = self.cut_from {
                    seg.truncate_from(end)?;
                }
            } else {
                seg.seal()?;
            }
            // The checkpoint written after recovery vouches for all of it, and the WAL
            // that also holds some of it is about to be retired.
            seg.file()
                .sync_data()
                .map_err(|e| Error::io("sync", seg.path(), e))?;
            self.state.segments.insert(seg.base, seg);
        }
        self.state.next = self.next;
        Ok(self.state)
    }
}

/// Finds a partition's segments as the checkpoint left them, changing nothing: everything
/// before the checkpoint's `end` must be there; after it, whole valid batches count
/// (synced directly, or written and also in the WAL) up to the first damage or gap.
fn find_segments(dir: &Path, entry: &Entry, index_interval: u32) -> Result<Found> {
    let mut bases = Vec::new();
    let listing =
        std::fs::read_dir(dir).map_err(|e| Error::io("list partition directory", dir, e))?;
    for f in listing {
        let f = f.map_err(|e| Error::io("list", dir, e))?;
        let name = f.file_name();
        let name = name.to_string_lossy();
        if let Some(base) = segment::parse_name(&name) {
            bases.push(base);
        } else if !(name.ends_with(".index") || name.ends_with(".timeindex")) {
            tracing::warn!(file = %f.path().display(), "ignoring a file that is not a segment");
        }
    }
    bases.sort_unstable();
    let missing = |found| {
        Error::corrupt(
            dir,
            0,
            Corruption::Missing {
                expected: entry.end,
                found,
            },
        )
    };
    // The segment holding `end`: the last one starting at or before it.
    let Some(k) = bases.iter().rposition(|b| *b <= entry.end) else {
        return Err(missing(bases.first().copied().unwrap_or(0)));
    };
    let mut found = Found {
        state: LogState {
            segments: BTreeMap::new(),
            start: entry.start,
            next: entry.end,
        },
        tail: Vec::new(),
        doomed: Vec::new(),
        cut_from: None,
        next: entry.end,
    };
    for i in 0..k {
        if bases[i + 1] <= entry.start {
            found.doomed.push(bases[i]);
            continue;
        }
        let seg = Segment::open_sealed(dir, bases[i], bases[i + 1], index_interval)?;
        found.state.segments.insert(seg.base, seg);
    }
    let (first, scan) = Segment::open_scan(dir, bases[k], index_interval)?;
    if first.next_offset() < entry.end {
        return Err(match scan.invalid {
            Some(reason) => Error::corrupt(first.path(), scan.position, reason),
            None => missing(first.next_offset()),
        });
    }
    let mut damaged = scan.invalid.is_some();
    if entry.cut_pending {
        // A truncation to `end` was interrupted: finish it.
        found.cut_from = Some(entry.end);
        damaged = true;
    }
    found.next = if entry.cut_pending {
        entry.end
    } else {
        first.next_offset()
    };
    found.tail.push(first);
    for &base in &bases[k + 1..] {
        if damaged || base != found.next {
            found.doomed.push(base);
            continue;
        }
        let (seg, scan) = Segment::open_scan(dir, base, index_interval)?;
        damaged = scan.invalid.is_some();
        found.next = seg.next_offset();
        found.tail.push(seg);
    }
    Ok(found)
}
