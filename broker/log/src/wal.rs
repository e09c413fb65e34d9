//! The node-wide write-ahead log and its group commit.
//!
//! One writer thread owns the current WAL file. Appends from every partition queue on a
//! channel; each turn the writer takes everything queued, writes it as one checksummed
//! chunk with one `write`, and — if any waiter needs it — one `fdatasync` covers them
//! all. Whatever arrives while a sync runs goes into the next chunk. Past
//! `wal_max_bytes` the writer rolls to a new file and hands the boundary to the
//! checkpointer, which syncs segments and then deletes the old files.
//!
//! File: `u32 magic "PWAL", u32 version, u64 sequence`, then chunks:
//! `u32 magic "PWCK", u32 body length, u32 CRC32C of body`, body = records of
//! `u64 partition id` followed by one record batch (which carries its own length).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::PartitionId;
use crate::batch::RecordBatch;
use crate::config::SyncPolicy;
use crate::error::{BatchError, Corruption, Error, Result};
use crate::fsutil::{self, le_u32, le_u64};

const FILE_MAGIC: u32 = 0x4C41_5750; // "PWAL"
const CHUNK_MAGIC: u32 = 0x4B43_5750; // "PWCK"
const FILE_VERSION: u32 = 1;
/// Bytes of a WAL file header.
pub(crate) const FILE_HEADER: u64 = 16;
const CHUNK_HEADER: usize = 12;
const MAX_CHUNK: u32 = 1 << 30;
/// A turn stops gathering once its chunk is this large, so one turn cannot hold the disk forever.
const TURN_BYTES: usize = 8 << 20;
/// The longest a turn waits for more appenders before it syncs.
const MAX_LINGER: Duration = Duration::from_micros(500);
/// Commands queued before appenders block.
const QUEUE: usize = 64 << 10;

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

pub(crate) enum Cmd {
    Append {
        partition: PartitionId,
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

impl Wal {
    /// Starts a new WAL file `seq` in `dir` and the writer thread; boundaries of rolled files go to `rolled`.
    pub fn start(
        dir: &Path,
        seq: u64,
        max_bytes: u64,
        interval: Duration,
        poison: Arc<Poison>,
        rolled: mpsc::Sender<WalPosition>,
    ) -> Result<Self> {
        let (file, path) = create_file(dir, seq)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            seq,
            file,
            path,
            pos: FILE_HEADER,
            max_bytes,
            interval,
            poison,
            rolled,
            buf: Vec::with_capacity(1 << 20),
            waiting: Vec::new(),
            interval_waiting: Vec::new(),
            barriers: Vec::new(),
            unsynced: false,
            last_sync: Instant::now(),
            last_sync_took: Duration::ZERO,
            expected_waiters: 0,
        };
        let thread = std::thread::Builder::new()
            .name("petrel-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("spawn WAL writer for", dir, e))?;
        Ok(Self {
            tx,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Queues batches already written to their segment.
    pub fn append(&self, cmd: Cmd) -> Result<()> {
        self.tx.send(cmd).map_err(|_| Error::Closed)
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
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
        r
    }
}

struct Writer {
    dir: PathBuf,
    seq: u64,
    file: File,
    path: PathBuf,
    pos: u64,
    max_bytes: u64,
    interval: Duration,
    poison: Arc<Poison>,
    rolled: mpsc::Sender<WalPosition>,
    /// The chunk being gathered; its first bytes are reserved for the chunk header.
    buf: Vec<u8>,
    waiting: Vec<Completion>,
    interval_waiting: Vec<Completion>,
    barriers: Vec<mpsc::Sender<Result<WalPosition>>>,
    unsynced: bool,
    last_sync: Instant,
    /// How long the last `fdatasync` took: the scale of the linger below.
    last_sync_took: Duration,
    /// About how many appenders wait on each sync lately (a decaying maximum).
    expected_waiters: usize,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Cmd>) {
        let mut stop: Option<mpsc::Sender<Result<WalPosition>>> = None;
        while stop.is_none() {
            let first = if self.unsynced || !self.interval_waiting.is_empty() {
                let left = self.interval.saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(left) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            };
            self.buf.clear();
            self.buf.resize(CHUNK_HEADER, 0);
            if let Some(c) = first {
                stop = self.take(c);
            }
            while stop.is_none() && self.buf.len() < TURN_BYTES {
                match rx.try_recv() {
                    Ok(c) => stop = self.take(c),
                    Err(_) => break,
                }
            }
            // Appenders acknowledged by the last sync come back a moment later; without a
            // short wait for them, syncs alternate between a few waiters and many. Wait at
            // most half a sync's time, and only while fewer than usual have arrived.
            let linger_until = Instant::now() + (self.last_sync_took / 2).min(MAX_LINGER);
            while stop.is_none()
                && !self.waiting.is_empty()
                && self.waiting.len() < self.expected_waiters
                && self.buf.len() < TURN_BYTES
            {
                let left = linger_until.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(c) => stop = self.take(c),
                    Err(_) => break,
                }
            }
            self.turn(stop.is_some());
        }
        let r = self.poison.check().map(|()| WalPosition {
            seq: self.seq,
            pos: self.pos,
        });
        if let Some(s) = stop {
            let _ = s.send(r);
        }
        // Whatever is still queued is completed with `Closed` as it drops.
        while rx.try_recv().is_ok() {}
    }

    fn take(&mut self, cmd: Cmd) -> Option<mpsc::Sender<Result<WalPosition>>> {
        match cmd {
            Cmd::Append {
                partition,
                batches,
                policy,
                done,
            } => {
                if let Err(e) = self.poison.check() {
                    if let Some(d) = done {
                        d.complete(Err(e));
                    }
                    return None;
                }
                for b in &batches {
                    self.buf.extend_from_slice(&partition.to_le_bytes());
                    self.buf.extend_from_slice(b.as_bytes());
                }
                if let Some(d) = done {
                    match policy {
                        SyncPolicy::Always => self.waiting.push(d),
                        SyncPolicy::Interval => self.interval_waiting.push(d),
                        SyncPolicy::Never => d.complete(Ok(())),
                    }
                }
                None
            }
            Cmd::Barrier(tx) => {
                self.barriers.push(tx);
                None
            }
            Cmd::Shutdown(tx) => Some(tx),
        }
    }

    /// Writes the gathered chunk, syncs if anyone needs it, completes waiters, rolls.
    fn turn(&mut self, stopping: bool) {
        if self.buf.len() > CHUNK_HEADER && self.poison.check().is_ok() {
            let body_len = (self.buf.len() - CHUNK_HEADER) as u32;
            let crc = crc32c::crc32c(&self.buf[CHUNK_HEADER..]);
            self.buf[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
            self.buf[4..8].copy_from_slice(&body_len.to_le_bytes());
            self.buf[8..12].copy_from_slice(&crc.to_le_bytes());
            match self.file.write_all(&self.buf) {
                Ok(()) => {
                    self.pos += self.buf.len() as u64;
                    self.unsynced = true;
                }
                Err(e) => {
                    // Cut the partial chunk so the file stays clean; the poison stops all writes.
                    let _ = self.file.set_len(self.pos);
                    self.poison.set(&self.path, e);
                }
            }
        }
        let due = self.unsynced && self.last_sync.elapsed() >= self.interval;
        if !self.waiting.is_empty() || !self.barriers.is_empty() || due || stopping {
            self.sync();
        }
        if self.pos >= self.max_bytes && self.poison.check().is_ok() {
            self.roll();
        }
    }

    fn sync(&mut self) {
        if self.unsynced && self.poison.check().is_ok() {
            let started = Instant::now();
            if let Err(e) = self.file.sync_data() {
                self.poison.set(&self.path, e);
            }
            self.last_sync_took = started.elapsed();
            self.unsynced = false;
        }
        let waiters = self.waiting.len();
        self.expected_waiters = waiters.max(self.expected_waiters - self.expected_waiters / 8);
        self.last_sync = Instant::now();
        let result = || self.poison.check();
        for d in self
            .waiting
            .drain(..)
            .chain(self.interval_waiting.drain(..))
        {
            d.complete(result());
        }
        let here = WalPosition {
            seq: self.seq,
            pos: self.pos,
        };
        for b in self.barriers.drain(..) {
            let _ = b.send(result().map(|()| here));
        }
    }

    fn roll(&mut self) {
        self.sync();
        match create_file(&self.dir, self.seq + 1) {
            Ok((file, path)) => {
                self.seq += 1;
                self.file = file;
                self.path = path;
                self.pos = FILE_HEADER;
                let _ = self.rolled.send(WalPosition {
                    seq: self.seq,
                    pos: FILE_HEADER,
                });
            }
            Err(Error::Io { path, source, .. } | Error::DiskFull { path, source }) => {
                self.poison.set(&path, source)
            }
            Err(other) => self
                .poison
                .set(&self.path, std::io::Error::other(other.to_string())),
        }
    }
}

/// Path of WAL file `seq`.
pub(crate) fn file_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

fn create_file(dir: &Path, seq: u64) -> Result<(File, PathBuf)> {
    let path = file_path(dir, seq);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    let mut header = [0u8; FILE_HEADER as usize];
    header[0..4].copy_from_slice(&FILE_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&FILE_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    file.write_all(&header)
        .map_err(|e| Error::io("write", &path, e))?;
    file.sync_data().map_err(|e| Error::io("sync", &path, e))?;
    fsutil::sync_dir(dir)?;
    Ok((file, path))
}

/// Sequence numbers of the WAL files in `dir`, ascending; other files are an error.
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
            None => {
                tracing::warn!(file = %entry.path().display(), "ignoring unexpected file in the WAL directory")
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Reads every record of the WAL files in `dir` in order, calling `apply` with the
/// position of its chunk. A torn tail of the last file is cut off; damage anywhere else
/// is an error naming the file and position.
pub(crate) fn replay(
    dir: &Path,
    mut apply: impl FnMut(WalPosition, PartitionId, RecordBatch) -> Result<()>,
) -> Result<Vec<u64>> {
    let seqs = list(dir)?;
    for (i, &seq) in seqs.iter().enumerate() {
        let last = i + 1 == seqs.len();
        replay_file(&file_path(dir, seq), seq, last, &mut apply)?;
    }
    Ok(seqs)
}

fn replay_file(
    path: &Path,
    seq: u64,
    last: bool,
    apply: &mut impl FnMut(WalPosition, PartitionId, RecordBatch) -> Result<()>,
) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let mut header = [0u8; FILE_HEADER as usize];
    let n = fsutil::read_at_most(&file, &mut header, 0).map_err(|e| Error::io("read", path, e))?;
    if n < FILE_HEADER as usize {
        if last {
            // Crashed while creating it: nothing was acknowledged from this file.
            tracing::warn!(file = %path.display(), "WAL file with a torn header; discarding it");
            return Ok(());
        }
        return Err(Error::corrupt(
            path,
            0,
            Corruption::Batch(BatchError::Truncated {
                needed: 16,
                available: n,
            }),
        ));
    }
    if le_u32(&header, 0) != FILE_MAGIC {
        return Err(Error::corrupt(
            path,
            0,
            Corruption::BadMagic {
                found: le_u32(&header, 0),
            },
        ));
    }
    if le_u32(&header, 4) != FILE_VERSION {
        return Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            found: le_u32(&header, 4),
            supported: FILE_VERSION,
        });
    }
    if le_u64(&header, 8) != seq {
        return Err(Error::corrupt(
            path,
            8,
            Corruption::OffsetGap {
                expected: seq,
                found: le_u64(&header, 8),
            },
        ));
    }
    let mut pos = FILE_HEADER;
    while pos < len {
        let Some(body) = read_chunk(&file, path, pos, len)? else {
            if !last || valid_chunk_after(&file, path, pos, len)? {
                return Err(Error::corrupt(path, pos, Corruption::WalChunk));
            }
            tracing::warn!(file = %path.display(), position = pos, "cutting a torn WAL tail");
            file.set_len(pos)
                .map_err(|e| Error::io("truncate", path, e))?;
            file.sync_data().map_err(|e| Error::io("sync", path, e))?;
            break;
        };
        let chunk_at = WalPosition { seq, pos };
        let body_len = body.len() as u64;
        let mut at = 0usize;
        while at < body.len() {
            let rest = body.slice(at..);
            if rest.len() < 8 {
                return Err(Error::corrupt(
                    path,
                    pos,
                    Corruption::Batch(BatchError::Truncated {
                        needed: 8,
                        available: rest.len(),
                    }),
                ));
            }
            let partition = le_u64(&rest, 0);
            let batch = RecordBatch::from_prefix(&rest.slice(8..))
                .map_err(|e| Error::corrupt(path, pos + CHUNK_HEADER as u64 + at as u64, e))?;
            at += 8 + batch.len();
            apply(chunk_at, partition, batch)?;
        }
        pos += CHUNK_HEADER as u64 + body_len;
    }
    Ok(())
}

/// The body of a valid chunk at `pos`, or `None` if the bytes there are not one.
fn read_chunk(file: &File, path: &Path, pos: u64, len: u64) -> Result<Option<Bytes>> {
    if len - pos < CHUNK_HEADER as u64 {
        return Ok(None);
    }
    let mut head = [0u8; CHUNK_HEADER];
    fsutil::read_at_most(file, &mut head, pos).map_err(|e| Error::io("read", path, e))?;
    let body_len = le_u32(&head, 4);
    if le_u32(&head, 0) != CHUNK_MAGIC
        || body_len > MAX_CHUNK
        || pos + CHUNK_HEADER as u64 + u64::from(body_len) > len
    {
        return Ok(None);
    }
    let mut body = BytesMut::zeroed(body_len as usize);
    let n = fsutil::read_at_most(file, &mut body, pos + CHUNK_HEADER as u64)
        .map_err(|e| Error::io("read", path, e))?;
    if n != body.len() || crc32c::crc32c(&body) != le_u32(&head, 8) {
        return Ok(None);
    }
    Ok(Some(body.freeze()))
}

/// Whether any valid chunk starts after `pos`: then the damage at `pos` is not a torn
/// final write but corruption in the middle.
fn valid_chunk_after(file: &File, path: &Path, pos: u64, len: u64) -> Result<bool> {
    let mut rest = vec![0u8; (len - pos) as usize];
    let n = fsutil::read_at_most(file, &mut rest, pos).map_err(|e| Error::io("read", path, e))?;
    rest.truncate(n);
    let magic = CHUNK_MAGIC.to_le_bytes();
    for (i, w) in rest.windows(4).enumerate().skip(1) {
        if w == magic && read_chunk(file, path, pos + i as u64, len)?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}
