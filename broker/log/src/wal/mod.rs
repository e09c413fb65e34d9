//! The node-wide write-ahead log and its group commit.
//!
//! One writer thread (`writer`) owns the current WAL file. Appends from every partition
//! queue on a channel; each turn the writer takes everything queued and makes it durable
//! with as few syncs as possible:
//!
//! * small appends (most partitions, most of the time) are copied into one checksummed
//!   chunk, written with one `write`, and one `fdatasync` of the WAL covers them all;
//! * a partition that brought at least [`DIRECT_BYTES`] in the turn has its own segment
//!   file synced instead (in parallel with the WAL's sync), so large streams are written
//!   to disk once, not twice; a later chunk records how far that sync reached, so
//!   recovery can tell data that was made durable this way from a torn tail.
//!
//! Whatever arrives while a sync runs goes into the next turn. Past `wal_max_bytes`
//! (WAL bytes plus directly synced bytes) the writer rolls to a new file and hands the
//! boundary to the checkpointer, which syncs all segments and retires the old files.
//!
//! A sync of a file that grew costs a second write (its size, in the inode); a sync of
//! bytes written over an already allocated file does not. So WAL files are written in
//! place: the first is zero-filled when the storage opens, and retired files are kept as
//! spares and reused. Every chunk names its file's sequence number, so a chunk left over
//! from a file's earlier life, like the zeros, marks the end of the log.
//! `replay` reads the log back at recovery. The byte layout is in `FORMAT.md`.

mod replay;
mod writer;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, OnceLock};

use crate::PartitionId;
use crate::batch::RecordBatch;
use crate::config::{StorageConfig, SyncPolicy};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::shared::PartitionShared;

pub(crate) use replay::{WalRecord, replay};

const FILE_MAGIC: u32 = 0x4C41_5750; // "PWAL"
const CHUNK_MAGIC: u32 = 0x4B43_5750; // "PWCK"
const FILE_VERSION: u32 = 1;
/// Bytes of a WAL file header.
pub(crate) const FILE_HEADER: u64 = 16;
/// Chunk header: magic, body length, file sequence, the position in this file that was
/// durable when the chunk was written, CRC32C of those two fields and the body.
const CHUNK_HEADER: usize = 28;
const MAX_CHUNK: u32 = 1 << 30;
/// Chunk record kinds.
const RECORD_BATCH: u8 = 0;
const RECORD_SYNCED: u8 = 1;
/// A partition bringing this many bytes of `Always` appends to one turn syncs its own
/// segment rather than copying them into the WAL.
pub const DIRECT_BYTES: usize = 64 << 10;

/// A place in the write-ahead log: file sequence number and byte position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct WalPosition {
    /// Sequence number of the WAL file.
    pub seq: u64,
    /// Byte position in that file.
    pub pos: u64,
}

/// Called once when an append is durable under its partition's policy (or failed). Runs on
/// the WAL writer thread: keep it short (complete a future, send on a channel).
pub type OnDurable = Box<dyn FnOnce(Result<()>) + Send>;

/// An `OnDurable` that is called exactly once: with `Closed` if dropped uncalled.
pub(crate) struct Completion(Option<OnDurable>);

impl Completion {
    pub fn new(f: OnDurable) -> Self {
        Self(Some(f))
    }

    /// Drops the callback without calling it.
    pub fn defuse(mut self) {
        self.0 = None;
    }

    pub fn complete(mut self, r: Result<()>) {
        if let Some(f) = self.0.take() {
            f(r);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(Error::Closed));
        }
    }
}

/// The first failure of a write or sync, after which all writes are refused.
#[derive(Default)]
pub(crate) struct Poison(OnceLock<(PathBuf, Arc<std::io::Error>)>);

impl Poison {
    pub fn set(&self, path: &Path, e: std::io::Error) {
        tracing::error!(path = %path.display(), error = %e, "storage write failed; refusing writes until restart");
        let _ = self.0.set((path.to_path_buf(), Arc::new(e)));
    }

    /// Poisons with a storage error, keeping its path and I/O cause where it has them.
    pub fn set_error(&self, fallback: &Path, e: Error) {
        match e {
            Error::Io { path, source, .. } | Error::DiskFull { path, source } => {
                self.set(&path, source)
            }
            other => self.set(fallback, std::io::Error::other(other.to_string())),
        }
    }

    pub fn check(&self) -> Result<()> {
        match self.0.get() {
            None => Ok(()),
            Some((path, source)) => Err(Error::Poisoned {
                path: path.clone(),
                source: source.clone(),
            }),
        }
    }
}

/// What the writer is asked to do.
pub(crate) enum Cmd {
    /// Make batches durable that the partition has already written to its segment.
    Append {
        partition: PartitionId,
        shared: Arc<PartitionShared>,
        batches: Vec<RecordBatch>,
        policy: SyncPolicy,
        done: Option<Completion>,
    },
    /// Sync everything queued so far and report the position after it.
    Barrier(mpsc::Sender<Result<WalPosition>>),
    /// Sync, report the final position and stop.
    Shutdown(mpsc::Sender<Result<WalPosition>>),
}

/// The handle appenders use.
pub(crate) struct Wal {
    tx: SyncSender<Cmd>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Commands queued before appenders block.
const QUEUE: usize = 64 << 10;

impl Wal {
    /// Starts a new WAL file `seq` in `dir` and the writer thread; boundaries of rolled
    /// files go to `rolled`.
    pub fn start(
        dir: &Path,
        seq: u64,
        config: &StorageConfig,
        poison: Arc<Poison>,
        rolled: mpsc::Sender<WalPosition>,
    ) -> Result<Self> {
        let preallocate = if config.wal_preallocate {
            config.wal_max_bytes
        } else {
            0
        };
        let (file, path) = new_file(dir, seq, preallocate)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let mut writer = writer::Writer::new(writer::Settings {
            dir: dir.to_path_buf(),
            seq,
            file,
            path,
            max_bytes: config.wal_max_bytes,
            interval: config.sync_interval,
            poison,
            rolled,
        });
        let thread = std::thread::Builder::new()
            .name("petrel-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("spawn WAL writer for", dir, e))?;
        Ok(Self {
            tx,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Queues batches already written to their segment. On `Err` the append's callback
    /// is not called: the caller hears of the failure from the result alone.
    pub fn append(&self, cmd: Cmd) -> Result<()> {
        match self.tx.send(cmd) {
            Ok(()) => Ok(()),
            Err(mpsc::SendError(Cmd::Append { done, .. })) => {
                if let Some(d) = done {
                    d.defuse();
                }
                Err(Error::Closed)
            }
            Err(_) => Err(Error::Closed),
        }
    }

    /// Waits until everything queued so far is durable; returns the position after it.
    pub fn barrier(&self) -> Result<WalPosition> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Cmd::Barrier(tx)).map_err(|_| Error::Closed)?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Syncs, stops the writer and returns the final position.
    pub fn shutdown(&self) -> Result<WalPosition> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Cmd::Shutdown(tx)).map_err(|_| Error::Closed)?;
        let r = rx.recv().map_err(|_| Error::Closed)?;
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = handle {
            let _ = t.join();
        }
        r
    }
}

/// Path of WAL file `seq`.
pub(crate) fn file_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// How many retired files are kept for reuse.
const SPARES: usize = 2;
const SPARE_PREFIX: &str = "spare-";

/// Opens WAL file `seq` for writing at `FILE_HEADER`: a spare if there is one, else a
/// new file, zero-filled to `preallocate` bytes (0: grown as written).
fn new_file(dir: &Path, seq: u64, preallocate: u64) -> Result<(File, PathBuf)> {
    let path = file_path(dir, seq);
    let reused = match spares(dir)?.first() {
        Some(spare) => {
            std::fs::rename(spare, &path).map_err(|e| Error::io("reuse", spare, e))?;
            true
        }
        None => false,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(!reused)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    let mut header = [0u8; FILE_HEADER as usize];
    header[0..4].copy_from_slice(&FILE_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&FILE_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    file.write_all_at(&header, 0)
        .map_err(|e| Error::io("write", &path, e))?;
    if !reused && preallocate > FILE_HEADER {
        let zeros = vec![0u8; 1 << 20];
        let mut at = FILE_HEADER;
        while at < preallocate {
            let n = zeros.len().min((preallocate - at) as usize);
            file.write_all_at(&zeros[..n], at)
                .map_err(|e| Error::io("preallocate", &path, e))?;
            at += n as u64;
        }
    }
    file.sync_data().map_err(|e| Error::io("sync", &path, e))?;
    fsutil::sync_dir(dir)?;
    Ok((file, path))
}

/// Retires WAL file `seq`: kept as a spare while there are few, else deleted.
pub(crate) fn retire(dir: &Path, seq: u64) -> Result<()> {
    let path = file_path(dir, seq);
    if spares(dir)?.len() < SPARES {
        let spare = dir.join(format!("{SPARE_PREFIX}{seq:020}"));
        std::fs::rename(&path, &spare).map_err(|e| Error::io("retire", &path, e))
    } else {
        std::fs::remove_file(&path).map_err(|e| Error::io("delete", &path, e))
    }
}

/// The sequence numbers the spares had.
pub(crate) fn spare_seqs(dir: &Path) -> Result<Vec<u64>> {
    Ok(spares(dir)?
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()?
                .strip_prefix(SPARE_PREFIX)?
                .parse()
                .ok()
        })
        .collect())
}

fn spares(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(SPARE_PREFIX)
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Sequence numbers of the WAL files in `dir`, ascending; other files are ignored.
pub(crate) fn list(dir: &Path) -> Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(seq) => seqs.push(seq),
            None if name.starts_with(SPARE_PREFIX) => {}
            None => {
                tracing::warn!(file = %entry.path().display(), "ignoring unexpected file in the WAL directory")
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}
