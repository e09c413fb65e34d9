//! The WAL writer thread: gathers a turn's appends, decides per partition between copying
//! into the WAL and syncing its segment directly, syncs, completes, rolls.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{
    CHUNK_HEADER, CHUNK_MAGIC, Cmd, Completion, DIRECT_BYTES, FILE_HEADER, Poison, RECORD_BATCH,
    RECORD_SYNCED, WalPosition, new_file,
};
use crate::PartitionId;
use crate::batch::RecordBatch;
use crate::config::SyncPolicy;
use crate::error::{Error, Result};
use crate::shared::PartitionShared;

/// A turn stops gathering at this many bytes, so one turn cannot hold the disk forever.
const TURN_BYTES: usize = 8 << 20;
/// The longest a turn ever waits for more appenders before it syncs.
const MAX_LINGER: Duration = Duration::from_millis(1);

/// What the writer starts with.
pub(super) struct Settings {
    pub dir: PathBuf,
    pub seq: u64,
    pub file: File,
    pub path: PathBuf,
    pub max_bytes: u64,
    pub interval: Duration,
    pub poison: Arc<Poison>,
    pub rolled: mpsc::Sender<WalPosition>,
}

/// An append gathered in the current turn.
struct Pending {
    partition: PartitionId,
    shared: Arc<PartitionShared>,
    batches: Vec<RecordBatch>,
    policy: SyncPolicy,
    done: Option<Completion>,
    bytes: usize,
}

/// A partition whose segment is synced directly this turn.
struct Direct {
    partition: PartitionId,
    shared: Arc<PartitionShared>,
    /// The offset after its last batch in this turn.
    next: u64,
    waiters: Vec<Completion>,
    result: Result<()>,
}

pub(super) struct Writer {
    s: Settings,
    pos: u64,
    /// The chunk being built; its first bytes are reserved for the chunk header.
    buf: Vec<u8>,
    pending: Vec<Pending>,
    /// Bytes and `Always` appends gathered this turn.
    gathered: usize,
    always: usize,
    /// Appends copied into the WAL, completed by its next sync.
    waiting: Vec<Completion>,
    interval_waiting: Vec<Completion>,
    /// `Never` appends, completed once their chunk is written (a process crash then keeps them).
    written: Vec<Completion>,
    barriers: Vec<mpsc::Sender<Result<WalPosition>>>,
    /// Direct syncs to record in the next chunk: partition and offset reached.
    marks: Vec<(PartitionId, u64)>,
    sizes: HashMap<PartitionId, usize>,
    unsynced: bool,
    /// The position in the current file up to which it is synced. Each chunk records it,
    /// so recovery can tell damage before it (corruption) from unsynced writes after it
    /// that a crash left in any order (a torn tail).
    durable: u64,
    last_sync: Instant,
    /// What a WAL `fdatasync` costs beyond its bytes, the scale of the linger: the
    /// fastest recent sync (it creeps up by 1/64 per sync, so a slower disk shows).
    /// Lingering longer than that would idle the disk for more than it saves.
    sync_floor: Duration,
    /// `Always` appends the last turn completed: they are likely to come back.
    returning: usize,
    /// Bytes synced directly into segments since the last roll.
    direct_since_roll: u64,
}

impl Writer {
    pub fn new(s: Settings) -> Self {
        Self {
            s,
            pos: FILE_HEADER,
            buf: Vec::with_capacity(1 << 20),
            pending: Vec::new(),
            gathered: 0,
            always: 0,
            waiting: Vec::new(),
            interval_waiting: Vec::new(),
            written: Vec::new(),
            barriers: Vec::new(),
            marks: Vec::new(),
            sizes: HashMap::new(),
            unsynced: false,
            durable: FILE_HEADER,
            last_sync: Instant::now(),
            sync_floor: Duration::ZERO,
            returning: 0,
            direct_since_roll: 0,
        }
    }

    pub fn run(&mut self, rx: Receiver<Cmd>) {
        let mut stop: Option<mpsc::Sender<Result<WalPosition>>> = None;
        while stop.is_none() {
            // What queued up while the last turn ran...
            while stop.is_none() && self.gathered < TURN_BYTES {
                match rx.try_recv() {
                    Ok(c) => stop = self.take(c),
                    Err(_) => break,
                }
            }
            let queued = self.always;
            if self.pending.is_empty() && self.barriers.is_empty() && stop.is_none() {
                // ...or else wait for the next command (or the interval sync).
                let first = if self.unsynced || !self.interval_waiting.is_empty() {
                    let left = self.s.interval.saturating_sub(self.last_sync.elapsed());
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
                if let Some(c) = first {
                    stop = self.take(c);
                }
            }
            // The appenders the last turn completed come back a moment later. Syncing
            // without them splits the appenders into two groups that take turns, each
            // waiting for the other's sync; waiting for them merges the groups. Wait while
            // fewer than (queued + returning) have arrived, at most a sync's fixed cost.
            let expected = queued + self.returning;
            let linger_until = Instant::now() + self.sync_floor.min(MAX_LINGER);
            while stop.is_none() && self.always < expected && self.gathered < TURN_BYTES {
                // Stragglers are not worth a whole wait: stop at the first quiet gap.
                let gap = (self.sync_floor / 8).max(Duration::from_micros(10));
                let left = linger_until
                    .saturating_duration_since(Instant::now())
                    .min(gap);
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(c) => stop = self.take(c),
                    Err(_) => break,
                }
            }
            self.turn(stop.is_some());
        }
        let r = self.s.poison.check().map(|()| WalPosition {
            seq: self.s.seq,
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
                shared,
                batches,
                policy,
                done,
            } => {
                let bytes = batches.iter().map(RecordBatch::len).sum();
                self.gathered += bytes;
                self.always += usize::from(policy == SyncPolicy::Always);
                self.pending.push(Pending {
                    partition,
                    shared,
                    batches,
                    policy,
                    done,
                    bytes,
                });
                None
            }
            Cmd::Barrier(tx) => {
                self.barriers.push(tx);
                None
            }
            Cmd::Shutdown(tx) => Some(tx),
        }
    }

    /// One turn: route, write the chunk, sync, complete, maybe roll.
    fn turn(&mut self, stopping: bool) {
        let mut direct = self.route();
        self.write_chunk();
        let written = self.s.poison.check();
        for d in self.written.drain(..) {
            d.complete(written.as_ref().map_err(clone_error).copied());
        }
        let sync_wal = !self.waiting.is_empty()
            || !self.barriers.is_empty()
            || stopping
            || ((self.unsynced || !self.interval_waiting.is_empty())
                && self.last_sync.elapsed() >= self.s.interval);
        self.sync(sync_wal, &mut direct);
        for d in direct {
            let r = d.result.and_then(|()| self.s.poison.check());
            if r.is_ok() {
                self.marks.push((d.partition, d.next));
            }
            for w in d.waiters {
                w.complete(r.as_ref().map_err(clone_error).copied());
            }
        }
        if sync_wal {
            if !self.barriers.is_empty() && !self.marks.is_empty() {
                // A barrier's position must come after the marks of every direct sync
                // before it: a truncation replays its partition from there.
                self.begin_chunk();
                self.write_chunk();
                self.sync_wal();
            }
            self.complete_wal_waiters();
        }
        self.returning = self.always;
        self.always = 0;
        self.gathered = 0;
        if self.pos + self.direct_since_roll >= self.s.max_bytes && self.s.poison.check().is_ok() {
            self.roll();
        }
    }

    /// Copies small appends into the chunk and sets aside the partitions that sync directly.
    fn route(&mut self) -> Vec<Direct> {
        self.begin_chunk();
        self.sizes.clear();
        for p in &self.pending {
            if p.policy == SyncPolicy::Always {
                *self.sizes.entry(p.partition).or_default() += p.bytes;
            }
        }
        let poisoned = self.s.poison.check().err();
        let mut direct: Vec<Direct> = Vec::new();
        // Taken out so that a long append can write chunks midway; put back to keep its capacity.
        let mut pending = std::mem::take(&mut self.pending);
        for p in pending.drain(..) {
            if let Some(e) = &poisoned {
                if let Some(d) = p.done {
                    d.complete(Err(clone_error(e)));
                }
                continue;
            }
            let mut big = self
                .sizes
                .get(&p.partition)
                .is_some_and(|b| *b >= DIRECT_BYTES);
            if big
                && p.policy == SyncPolicy::Always
                && !direct.iter().any(|d| d.partition == p.partition)
                && p.shared.flush().is_err()
            {
                // Its buffered batches cannot be written (a full disk): copy them instead.
                self.sizes.remove(&p.partition);
                big = false;
            }
            if p.policy == SyncPolicy::Always && big {
                let next = p.batches.last().map_or(0, RecordBatch::next_offset);
                self.direct_since_roll += p.bytes as u64;
                match direct.iter_mut().find(|d| d.partition == p.partition) {
                    Some(d) => {
                        d.next = next;
                        d.waiters.extend(p.done);
                    }
                    None => direct.push(Direct {
                        partition: p.partition,
                        shared: p.shared,
                        next,
                        waiters: p.done.into_iter().collect(),
                        result: Ok(()),
                    }),
                }
                continue;
            }
            for b in &p.batches {
                if self.buf.len() >= TURN_BYTES {
                    // One append may carry more than a chunk holds: continue in the next.
                    self.write_chunk();
                    self.begin_chunk();
                }
                self.buf.push(RECORD_BATCH);
                self.buf.extend_from_slice(&p.partition.to_le_bytes());
                self.buf.extend_from_slice(b.as_bytes());
            }
            if let Some(d) = p.done {
                match p.policy {
                    SyncPolicy::Always => self.waiting.push(d),
                    SyncPolicy::Interval => self.interval_waiting.push(d),
                    SyncPolicy::Never => self.written.push(d),
                }
            }
        }
        self.pending = pending;
        direct
    }

    /// Starts a chunk with the marks of earlier direct syncs.
    fn begin_chunk(&mut self) {
        self.buf.clear();
        self.buf.resize(CHUNK_HEADER, 0);
        for (partition, next) in self.marks.drain(..) {
            self.buf.push(RECORD_SYNCED);
            self.buf.extend_from_slice(&partition.to_le_bytes());
            self.buf.extend_from_slice(&next.to_le_bytes());
        }
    }

    fn write_chunk(&mut self) {
        if self.buf.len() <= CHUNK_HEADER || self.s.poison.check().is_err() {
            return;
        }
        let body_len = (self.buf.len() - CHUNK_HEADER) as u32;
        self.buf[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
        self.buf[4..8].copy_from_slice(&body_len.to_le_bytes());
        self.buf[8..16].copy_from_slice(&self.s.seq.to_le_bytes());
        self.buf[16..24].copy_from_slice(&self.durable.to_le_bytes());
        let crc =
            crc32c::crc32c_append(crc32c::crc32c(&self.buf[8..24]), &self.buf[CHUNK_HEADER..]);
        self.buf[24..28].copy_from_slice(&crc.to_le_bytes());
        match self.s.file.write_all_at(&self.buf, self.pos) {
            Ok(()) => {
                self.pos += self.buf.len() as u64;
                self.unsynced = true;
            }
            Err(e) => {
                // Cut the partial chunk so the file stays clean; the poison stops all writes.
                let _ = self.s.file.set_len(self.pos);
                self.s.poison.set(&self.s.path, e);
            }
        }
    }

    /// Syncs the WAL (if `sync_wal`) and every direct partition's segments, in parallel
    /// when there is more than one.
    fn sync(&mut self, sync_wal: bool, direct: &mut [Direct]) {
        match (sync_wal, &mut *direct) {
            (_, []) => {
                if sync_wal {
                    self.sync_wal();
                }
            }
            (false, [one]) => one.result = one.shared.sync_written(),
            (_, many) => {
                let results: Vec<Result<()>> = std::thread::scope(|scope| {
                    let handles: Vec<_> = many
                        .iter()
                        .map(|d| {
                            let shared = d.shared.clone();
                            scope.spawn(move || shared.sync_written())
                        })
                        .collect();
                    if sync_wal {
                        self.sync_wal();
                    }
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or(Err(Error::Closed)))
                        .collect()
                });
                for (d, r) in many.iter_mut().zip(results) {
                    d.result = r;
                }
            }
        }
        for d in direct.iter() {
            if let Err(e) = &d.result {
                self.s.poison.set_error(&d.shared.dir, clone_error(e));
            }
        }
    }

    /// Completes what waits on the WAL's sync: appends copied into it and barriers.
    fn complete_wal_waiters(&mut self) {
        let result = || self.s.poison.check();
        for d in self
            .waiting
            .drain(..)
            .chain(self.interval_waiting.drain(..))
        {
            d.complete(result());
        }
        let here = WalPosition {
            seq: self.s.seq,
            pos: self.pos,
        };
        for b in self.barriers.drain(..) {
            let _ = b.send(result().map(|()| here));
        }
    }

    fn sync_wal(&mut self) {
        if self.unsynced && self.s.poison.check().is_ok() {
            let started = Instant::now();
            if let Err(e) = self.s.file.sync_data() {
                self.s.poison.set(&self.s.path, e);
            }
            let took = started.elapsed();
            self.sync_floor = if self.sync_floor.is_zero() {
                took
            } else {
                took.min(self.sync_floor + self.sync_floor / 64)
            };
            self.unsynced = false;
            self.durable = self.pos;
        }
        self.last_sync = Instant::now();
    }

    fn roll(&mut self) {
        // A reused file holds older bytes past the last chunk: end the log there with a
        // zeroed chunk header (keeping the file's size for its next reuse), so that only
        // the newest file ever needs its end told from a torn write.
        if let Err(e) = self.s.file.write_all_at(&[0u8; CHUNK_HEADER], self.pos) {
            self.s.poison.set(&self.s.path, e);
        }
        self.unsynced = true;
        self.sync(true, &mut []);
        self.complete_wal_waiters();
        // Not preallocated here: zero-filling would stall every append. Spares come from
        // files the checkpointer retires.
        match new_file(&self.s.dir, self.s.seq + 1, 0) {
            Ok((file, path)) => {
                self.s.seq += 1;
                self.s.file = file;
                self.s.path = path;
                self.pos = FILE_HEADER;
                self.durable = FILE_HEADER;
                self.direct_since_roll = 0;
                let _ = self.s.rolled.send(WalPosition {
                    seq: self.s.seq,
                    pos: FILE_HEADER,
                });
            }
            Err(e) => self.s.poison.set_error(&self.s.dir, e),
        }
    }
}

/// Errors fan out to many waiters; the poison error is the one that matters and clones.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Poisoned { path, source } => Error::Poisoned {
            path: path.clone(),
            source: source.clone(),
        },
        Error::Io { op, path, source } => Error::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::DiskFull { path, source } => Error::DiskFull {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        _ => Error::Closed,
    }
}
