//! Process crashes and damaged files.
//!
//! The crash tests run this test binary again as a child process (the ignored test
//! `child_process_runs_a_workload_until_killed`), which opens the data directory and
//! writes to two partitions with `SyncPolicy::Always` (appends, truncations, purges) while
//! deleting and re-creating a third, printing a line before each operation and one once
//! it is durable. The parent kills it with SIGKILL at a point chosen by a seed, reopens
//! the directory in-process and checks it against what the child reported: every
//! acknowledged batch is there and intact, offsets run contiguously from the start, and
//! an operation that was in flight either happened whole or not at all. In the `direct`
//! workload the first partition's appends are large enough that the WAL writer syncs
//! its segments directly instead of copying them into the WAL.
//!
//! The file tests then cut and flip bytes in what such a child (or a cleanly closed
//! storage) left behind: a torn write-ahead log or segment recovers; damage anywhere
//! else is reported as `Error::Corrupt` naming the file and byte, never served as data.
//! For directly synced data, the segments are the only copy: losing any of it below an
//! offset the WAL records as synced fails the open with `Corruption::Missing`, while a
//! lost or cut WAL loses none of it.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use petrel_log::{
    Corruption, DIRECT_BYTES, Error, Log, PartitionConfig, PartitionId, RecordBatch, Storage,
    SyncPolicy,
};

use common::{
    Rng, SegmentEntry, WAIT, append_durably, batch, copy_dir, cut, files_with, flip_bit,
    large_append, large_partition_config, open_or_create_with, partition_config, partition_dir,
    read_all, segment_base, segment_entries, storage_config, wal_chunks,
};

const CHILD: &str = "child_process_runs_a_workload_until_killed";
const DIR_VAR: &str = "PETREL_CRASH_DIR";
const MODE_VAR: &str = "PETREL_CRASH_MODE";
/// Every line of the protocol starts with this (libtest may print before it on the same line).
const TAG: &str = "petrel|";
/// The partitions every workload writes to; they exist from the first run on.
const PARTITIONS: [PartitionId; 2] = [1, 2];
/// The partition the `mixed` workload deletes and creates again and again.
const CHURNED: PartitionId = 3;
/// The partition that takes large appends in the `direct` workloads, and the one that
/// keeps taking small ones.
const LARGE: PartitionId = 1;
const SMALL: PartitionId = 2;

// ---------------------------------------------------------------------------------------
// The child process.

/// Not a test of its own: the crash tests run it in a child process and kill it.
///
/// Modes: `mixed:<seed>` appends, truncates, purges and reopens on two partitions and
/// deletes and re-creates a third until killed (tiny write-ahead log, so checkpoints run
/// all the time); `truncating:<seed>` is the same with far more truncations; `direct:<seed>`
/// is `mixed` with appends of at least `DIRECT_BYTES` on the first partition, so they are
/// synced directly, and (for even seeds) a write-ahead log large enough that direct data
/// piles up past the checkpointed end; `fill:<n>` appends `n` batches to each of two
/// partitions, closes the storage cleanly, reopens it, appends `n` more (all in one
/// write-ahead log file, never checkpointed), reports `done` and waits to be killed;
/// `direct-fill:<n>` is `fill` with large appends on the first partition; `never:<seed>`
/// appends to both partitions under `SyncPolicy::Never` until killed.
#[test]
#[ignore = "run by the crash tests in a child process"]
fn child_process_runs_a_workload_until_killed() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mode = std::env::var(MODE_VAR).expect("mode");
    let (kind, arg) = mode.split_once(':').expect("mode is kind:arg");
    let arg: u64 = arg.parse().expect("numeric mode argument");
    match kind {
        "mixed" | "truncating" | "direct" => {
            let truncate_percent = if kind == "truncating" { 45 } else { 8 };
            let mut config = storage_config(&dir);
            if kind == "direct" && arg.is_multiple_of(2) {
                // Odd seeds roll the WAL (and checkpoint) after every direct append; even
                // ones let directly synced data pile up past the checkpointed end.
                config.wal_max_bytes = 2 << 20;
            }
            say("opening");
            let storage = Storage::open(config).expect("open");
            say("ready");
            std::thread::scope(|s| {
                for p in PARTITIONS {
                    let storage = &storage;
                    let large = kind == "direct" && p == LARGE;
                    s.spawn(move || mixed_workload(storage, p, arg, truncate_percent, large));
                }
                s.spawn(|| churn_workload(&storage, arg));
            });
        }
        "fill" | "direct-fill" => {
            let large = kind == "direct-fill";
            let mut config = storage_config(&dir);
            // Large enough not to roll while filling (direct appends count towards it too).
            config.wal_max_bytes = 2 << 20;
            // Every batch reaches its segment file at once, so that the tests cutting the
            // WAL of a killed child can count on the segments holding all of it.
            config.write_buffer_bytes = 0;
            let storage = Storage::open(config.clone()).expect("open");
            fill(&storage, arg, large);
            let ends: Vec<(PartitionId, u64)> = PARTITIONS
                .iter()
                .map(|&p| {
                    (
                        p,
                        storage
                            .open_partition(p, partition_config())
                            .expect("open")
                            .next_offset(),
                    )
                })
                .collect();
            storage.close().expect("close");
            for (p, end) in ends {
                say(&format!("closed|{p}|{end}"));
            }
            let storage = Storage::open(config).expect("reopen");
            fill(&storage, arg, large);
            say("done");
            loop {
                std::thread::park();
            }
        }
        "never" => {
            // Appends under `SyncPolicy::Never` until killed: each is acknowledged once it
            // is written to the WAL, which a killed process's page cache keeps.
            let storage = Storage::open(storage_config(&dir)).expect("open");
            let config = PartitionConfig {
                sync_policy: SyncPolicy::Never,
                ..partition_config()
            };
            let mut logs: Vec<Log> = PARTITIONS
                .iter()
                .map(|&p| open_or_create_with(&storage, p, config.clone()))
                .collect();
            loop {
                for log in &mut logs {
                    let base = log.next_offset();
                    let len = ((base + arg) * 37 % 600) as usize;
                    let b = batch(base, 1 + (base % 4) as u32, len, 1);
                    let next = b.next_offset();
                    append_durably(log, vec![b]).expect("append");
                    say(&format!("ack|{}|{base}|{next}", log.id()));
                }
            }
        }
        other => panic!("unknown mode {other}"),
    }
}

/// Prints one protocol line with one `write` (so a kill cannot tear it) and flushes it,
/// so the parent sees it before any later effect.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{TAG}{line}\n").as_bytes())
        .expect("stdout");
    out.flush().expect("flush");
}

/// Settings of a workload partition: large segments for the one taking large appends.
fn config_of(p: PartitionId, large: bool) -> PartitionConfig {
    if large && p == LARGE {
        large_partition_config()
    } else {
        partition_config()
    }
}

/// Appends `n` times to each partition, alternating, each acknowledged before the next:
/// one batch, or (with `large`, on the first partition) one large append of many. The
/// last append of all is a small one, so the WAL chunk recording the last direct sync is
/// written and synced too.
fn fill(storage: &Storage, n: u64, large: bool) {
    let mut logs: Vec<Log> = PARTITIONS
        .iter()
        .map(|&p| open_or_create_with(storage, p, config_of(p, large)))
        .collect();
    let mut rng = Rng::new(n);
    for _ in 0..n {
        for log in &mut logs {
            let base = log.next_offset();
            let batches = if large && log.id() == LARGE {
                let bytes = DIRECT_BYTES + rng.range(0..32 << 10) as usize;
                large_append(base, 1, bytes, &mut rng)
            } else {
                vec![batch(
                    base,
                    1 + (base % 4) as u32,
                    (base * 37 % 600) as usize,
                    1,
                )]
            };
            let spans: Vec<(u64, u64)> = batches
                .iter()
                .map(|b| (b.base_offset(), b.next_offset()))
                .collect();
            append_durably(log, batches).expect("append");
            for (base, next) in spans {
                say(&format!("ack|{}|{base}|{next}", log.id()));
            }
        }
    }
}

/// One partition's share of the `mixed` workload: mostly appends of one to three
/// batches (or with `large`, of `DIRECT_BYTES` to twice that), some truncations near the
/// end, some purges, some reopens of the partition.
fn mixed_workload(
    storage: &Storage,
    p: PartitionId,
    seed: u64,
    truncate_percent: u64,
    large: bool,
) {
    let mut rng = Rng::new(seed * 1000 + p);
    let config = config_of(p, large);
    let mut log = open_or_create_with(storage, p, config.clone());
    // Terms differ between runs and after each truncation, so re-written offsets differ.
    let mut term = seed << 16;
    // Percentiles of a roll below which an operation is an append, a truncation, a purge
    // (else a reopen). The large partition purges more, to keep its data in bounds.
    let (appends, truncations, purges) = if large {
        (72, 84, 97)
    } else {
        (92 - truncate_percent, 92, 97)
    };
    // Truncations reach back over about one append.
    let reach = if large { 400 } else { 30 };
    loop {
        let (start, next) = (log.start_offset(), log.next_offset());
        let roll = rng.range(0..100);
        if roll < appends || next == start {
            if large {
                let bytes = DIRECT_BYTES + rng.range(0..64 << 10) as usize;
                let batches = large_append(next, term, bytes, &mut rng);
                append_announced(&mut log, batches, term);
            } else {
                append_some(&mut log, &mut rng, term);
            }
        } else if roll < truncations {
            let offset = rng.range(next.saturating_sub(reach).max(start)..next);
            say(&format!("begin|{p}|truncate|{offset}"));
            log.truncate_from(offset).expect("truncate");
            term += 1;
        } else if roll < purges {
            let offset = start + rng.range(0..(next - start) / 2 + 1);
            say(&format!("begin|{p}|purge|{offset}"));
            log.purge_to(offset).expect("purge");
        } else {
            drop(log);
            log = storage
                .open_partition(p, config.clone())
                .expect("reopen partition");
            continue;
        }
        say(&format!("ok|{p}"));
    }
}

/// Appends one to three batches in one call, announced before and acknowledged by the caller.
fn append_some(log: &mut Log, rng: &mut Rng, term: u64) {
    let mut batches = Vec::new();
    let mut at = log.next_offset();
    for _ in 0..rng.range(1..4) {
        let b = batch(at, rng.range(1..5) as u32, rng.range(0..900) as usize, term);
        at = b.next_offset();
        batches.push(b);
    }
    append_announced(log, batches, term);
}

/// Announces an append of `batches` (of `term`), appends them and waits until durable.
fn append_announced(log: &mut Log, batches: Vec<RecordBatch>, term: u64) {
    let spans: Vec<String> = batches
        .iter()
        .map(|b| format!("{}-{}", b.base_offset(), b.next_offset()))
        .collect();
    say(&format!(
        "begin|{}|append|{term}|{}",
        log.id(),
        spans.join(",")
    ));
    append_durably(log, batches).expect("append");
}

/// The `mixed` workload's third partition, deleted and created again and again with a
/// few appends in each incarnation (each with its own term, so data of an earlier
/// incarnation cannot pass for a later one's).
fn churn_workload(storage: &Storage, seed: u64) {
    let mut rng = Rng::new(seed * 1000 + CHURNED);
    let mut log = storage.partitions().contains(&CHURNED).then(|| {
        storage
            .open_partition(CHURNED, partition_config())
            .expect("open partition")
    });
    for incarnation in 0.. {
        if let Some(log) = log.take() {
            say(&format!("begin|{CHURNED}|delete"));
            log.delete().expect("delete");
            say(&format!("ok|{CHURNED}"));
        }
        say(&format!("begin|{CHURNED}|create"));
        let mut created = storage
            .create_partition(CHURNED, partition_config())
            .expect("create");
        say(&format!("ok|{CHURNED}"));
        for _ in 0..rng.range(0..6) {
            append_some(&mut created, &mut rng, (seed << 16) + 0x8000 + incarnation);
            say(&format!("ok|{CHURNED}"));
        }
        log = Some(created);
    }
}

// ---------------------------------------------------------------------------------------
// The parent's side.

/// A running child and the protocol lines it printed.
struct ChildProcess {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl ChildProcess {
    fn spawn(dir: &Path, mode: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .args([
                "--ignored",
                "--exact",
                CHILD,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir)
            .env(MODE_VAR, mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(TAG)
                    && tx.send(line[i + TAG.len()..].to_string()).is_err()
                {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line; `None` once the child's output ended.
    fn next_line(&self) -> Option<String> {
        match self.lines.recv_timeout(WAIT) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the child printed nothing for {WAIT:?}")
            }
        }
    }

    /// SIGKILLs the child and returns the lines it printed that were not read yet.
    fn kill(mut self) -> Vec<String> {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        std::iter::from_fn(|| self.next_line()).collect()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A batch as the parent knows it: base, next and term.
type Span = (u64, u64, u64);

/// What a partition holds: the start offset and the batches ending after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PartitionState {
    start: u64,
    next: u64,
    batches: Vec<Span>,
}

#[derive(Debug, Clone)]
enum PendingOp {
    Append(Vec<Span>),
    Truncate(u64),
    Purge(u64),
    Create,
    Delete,
}

impl PartitionState {
    fn read(log: &Log) -> Self {
        let batches = read_all(log, 4096)
            .iter()
            .map(|b| (b.base_offset(), b.next_offset(), b.term()))
            .collect();
        Self {
            start: log.start_offset(),
            next: log.next_offset(),
            batches,
        }
    }

    fn apply(&mut self, op: &PendingOp) {
        match op {
            PendingOp::Append(spans) => {
                for &span in spans {
                    assert_eq!(
                        span.0, self.next,
                        "the child appended at an unexpected offset"
                    );
                    self.next = span.1;
                    self.batches.push(span);
                }
            }
            PendingOp::Truncate(offset) => {
                if let Some(i) = self.batches.iter().position(|b| b.1 > *offset) {
                    self.next = self.batches[i].0;
                    self.batches.truncate(i);
                    self.start = self.start.min(self.next);
                }
            }
            PendingOp::Purge(offset) => {
                let offset = (*offset).min(self.next);
                if offset > self.start {
                    self.start = offset;
                    self.batches.retain(|b| b.1 > offset);
                }
            }
            PendingOp::Create | PendingOp::Delete => unreachable!("applied to the partition map"),
        }
    }
}

/// The states (`None`: no such partition) an in-flight operation may leave: not applied,
/// or applied whole (for a multi-batch append, any prefix of its batches, each whole).
fn outcomes(
    acked: Option<&PartitionState>,
    pending: Option<&PendingOp>,
) -> Vec<Option<PartitionState>> {
    let mut out = vec![acked.cloned()];
    match (acked, pending) {
        (_, None) => {}
        (_, Some(PendingOp::Create)) => out.push(Some(PartitionState::default())),
        (_, Some(PendingOp::Delete)) => out.push(None),
        (Some(acked), Some(PendingOp::Append(spans))) => {
            for k in 1..=spans.len() {
                let mut s = acked.clone();
                s.apply(&PendingOp::Append(spans[..k].to_vec()));
                out.push(Some(s));
            }
        }
        (Some(acked), Some(op)) => {
            let mut s = acked.clone();
            s.apply(op);
            out.push(Some(s));
        }
        (None, Some(op)) => panic!("{op:?} on a partition that does not exist"),
    }
    out
}

/// The parent's record of the `mixed` workload: acknowledged state and in-flight operation.
#[derive(Debug)]
struct Tracker {
    /// Every partition that exists, as acknowledged.
    acked: BTreeMap<PartitionId, PartitionState>,
    pending: BTreeMap<PartitionId, PendingOp>,
}

impl Default for Tracker {
    fn default() -> Self {
        // The workload's fixed partitions are created without a protocol line: take them
        // as existing and empty from the start.
        let acked = PARTITIONS
            .iter()
            .map(|&p| (p, PartitionState::default()))
            .collect();
        Self {
            acked,
            pending: BTreeMap::new(),
        }
    }
}

impl Tracker {
    /// Applies one line; returns true for an acknowledgement.
    fn on_line(&mut self, line: &str) -> bool {
        let fields: Vec<&str> = line.split('|').collect();
        let num = |s: &str| -> u64 { s.parse().expect("number") };
        match fields.as_slice() {
            ["begin", p, "append", term, spans] => {
                let term = num(term);
                let spans = spans
                    .split(',')
                    .map(|s| {
                        let (b, n) = s.split_once('-').expect("span");
                        (num(b), num(n), term)
                    })
                    .collect();
                self.pending.insert(num(p), PendingOp::Append(spans));
                false
            }
            ["begin", p, "truncate", offset] => {
                self.pending
                    .insert(num(p), PendingOp::Truncate(num(offset)));
                false
            }
            ["begin", p, "purge", offset] => {
                self.pending.insert(num(p), PendingOp::Purge(num(offset)));
                false
            }
            ["begin", p, "create"] => {
                self.pending.insert(num(p), PendingOp::Create);
                false
            }
            ["begin", p, "delete"] => {
                self.pending.insert(num(p), PendingOp::Delete);
                false
            }
            ["ok", p] => {
                let p = num(p);
                match self.pending.remove(&p).expect("an ok without a begin") {
                    PendingOp::Create => {
                        self.acked.insert(p, PartitionState::default());
                    }
                    PendingOp::Delete => {
                        self.acked.remove(&p);
                    }
                    op => self
                        .acked
                        .get_mut(&p)
                        .expect("an existing partition")
                        .apply(&op),
                }
                true
            }
            _ => false,
        }
    }

    /// Opens `dir` (recovering it) and checks every partition against what was acknowledged;
    /// then takes what recovery kept as the new acknowledged state.
    fn check_recovery(&mut self, dir: &Path, context: &str) {
        let storage = Storage::open(storage_config(dir))
            .unwrap_or_else(|e| panic!("{context}: reopen failed: {e}"));
        let present = storage.partitions();
        for p in PARTITIONS.into_iter().chain([CHURNED]) {
            let acked = self.acked.get(&p);
            let allowed = outcomes(acked, self.pending.get(&p));
            let found = if present.contains(&p) {
                let log = storage
                    .open_partition(p, partition_config())
                    .expect("open partition");
                Some(PartitionState::read(&log))
            } else if PARTITIONS.contains(&p) {
                // Killed before it created them: the same as created and empty.
                Some(PartitionState::default())
            } else {
                None
            };
            assert!(
                allowed.contains(&found),
                "{context}: partition {p} recovered to {found:?}\nacknowledged: {acked:?}\nin flight: {:?}",
                self.pending.get(&p)
            );
            match found {
                Some(state) => self.acked.insert(p, state),
                None => self.acked.remove(&p),
            };
        }
        self.pending.clear();
        storage.close().expect("close");
    }
}

/// When the parent kills a `mixed` child.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// As soon as it starts opening the storage (so, usually, while it recovers).
    Opening,
    /// Once this many operations were acknowledged.
    Acks(u64),
    /// As soon as a truncation begins, once this many operations were acknowledged.
    Truncating(u64),
    /// As soon as an append to the `LARGE` partition begins, once this many operations
    /// were acknowledged (in the `direct` workload: while a direct append is in flight).
    Appending(u64),
}

/// Runs `mixed` children on one directory again and again, each killed where `kill_at`
/// says for its iteration, and checks a copy of what each leaves (recovering the copy);
/// the next child recovers the original, so recoveries run on top of earlier ones.
/// Returns in how many iterations the WAL a child left recorded a direct sync of the
/// `LARGE` partition.
fn kill_repeatedly(workload: &str, iterations: u64, kill_at: impl Fn(u64) -> KillAt) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut tracker = Tracker::default();
    let mut direct = 0;
    let appending = format!("begin|{LARGE}|append|");
    for iteration in 0..iterations {
        let kill_at = kill_at(iteration);
        let child = ChildProcess::spawn(&data, &format!("{workload}:{}", iteration + 1));
        let mut acks = 0;
        while let Some(line) = child.next_line() {
            let acked = tracker.on_line(&line);
            acks += u64::from(acked);
            let now = match kill_at {
                KillAt::Opening => line == "opening",
                KillAt::Acks(n) => acks >= n,
                KillAt::Truncating(n) => acks >= n && line.contains("|truncate|"),
                KillAt::Appending(n) => acks >= n && line.starts_with(&appending),
            };
            if now {
                break;
            }
        }
        for line in child.kill() {
            tracker.on_line(&line);
        }
        let copy = dir.path().join(format!("copy-{iteration}"));
        copy_dir(&data, &copy);
        let marks = direct_marks(&copy.join("wal"));
        direct += u64::from(marks.iter().any(|(p, _)| *p == LARGE));
        tracker.check_recovery(
            &copy,
            &format!("iteration {iteration} (killed at {kill_at:?})"),
        );
        std::fs::remove_dir_all(&copy).expect("remove copy");
    }
    tracker.check_recovery(&data, "the original directory");
    direct
}

/// The `(partition, next offset)` of every direct sync recorded in the WAL files in
/// `wal_dir` (up to a torn chunk).
fn direct_marks(wal_dir: &Path) -> Vec<(PartitionId, u64)> {
    files_with(wal_dir, "wal")
        .iter()
        .flat_map(|f| wal_chunks(f))
        .flat_map(|c| c.marks)
        .collect()
}

#[test]
fn every_acknowledged_direct_append_survives_repeated_kills_amid_truncations_and_purges() {
    let direct = kill_repeatedly("direct", 12, |iteration| {
        let mut rng = Rng::new(iteration + 1000);
        match rng.range(0..4) {
            0 if iteration > 0 => KillAt::Opening,
            1 => KillAt::Truncating(rng.range(0..40)),
            2 => KillAt::Appending(rng.range(0..60)),
            _ => KillAt::Acks(rng.range(10..120)),
        }
    });
    assert!(
        direct > 0,
        "no WAL a child left recorded a direct sync of partition {LARGE}: the workload never took the direct path"
    );
}

#[test]
fn every_acknowledged_operation_survives_repeated_kills_and_none_is_half_done() {
    kill_repeatedly("mixed", 12, |iteration| {
        let mut rng = Rng::new(iteration);
        match rng.range(0..4) {
            0 if iteration > 0 => KillAt::Opening,
            1 => KillAt::Truncating(rng.range(0..40)),
            _ => KillAt::Acks(rng.range(5..150)),
        }
    });
}

/// Regression: `truncate_from` cut and deleted segment files before it saved the
/// checkpoint, so a crash in between left a checkpoint vouching for offsets no file held
/// any more, and the next open failed with `Corrupt` (`durable data missing`).
#[test]
fn every_append_acknowledged_under_policy_never_survives_a_kill() {
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let child = ChildProcess::spawn(&data, &format!("never:{seed}"));
        let mut acked: BTreeMap<PartitionId, Vec<(u64, u64)>> = BTreeMap::new();
        let mut record = |line: &str| {
            let ack = parse_ack(line);
            if let Some((p, base, next)) = ack {
                acked.entry(p).or_default().push((base, next));
            }
            ack.is_some()
        };
        let mut seen = 0;
        while seen < 40 + seed * 150 {
            let line = child.next_line().expect("the child exited early");
            seen += u64::from(record(&line));
        }
        for line in child.kill() {
            record(&line);
        }
        let storage = Storage::open(storage_config(&data)).expect("open after the kill");
        let found = spans(&storage);
        for (p, acked) in &acked {
            let found = &found[p];
            assert!(
                found.len() >= acked.len() && found[..acked.len()] == acked[..],
                "seed {seed}: partition {p} lost acknowledged appends ({} acknowledged, {} found)",
                acked.len(),
                found.len()
            );
        }
    }
}

#[test]
fn a_kill_during_truncate_from_never_leaves_a_checkpoint_vouching_for_cut_data() {
    kill_repeatedly("truncating", 24, |iteration| {
        KillAt::Truncating(Rng::new(iteration).range(3..30))
    });
}

// ---------------------------------------------------------------------------------------
// Cut files: what a `fill` child leaves, damaged as a torn write would.

/// What a `fill` child wrote: every acknowledged batch, and where the clean close left
/// each partition's checkpointed end.
struct Filled {
    dir: tempfile::TempDir,
    acked: BTreeMap<PartitionId, Vec<(u64, u64)>>,
    closed_end: BTreeMap<PartitionId, u64>,
}

impl Filled {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn wal_file(&self) -> PathBuf {
        let files = files_with(&self.data().join("wal"), "wal");
        assert_eq!(files.len(), 1, "expected one write-ahead log file");
        files[0].clone()
    }

    /// A fresh copy of the data directory to damage.
    fn scratch(&self, name: &str) -> PathBuf {
        let to = self.dir.path().join(name);
        if to.exists() {
            std::fs::remove_dir_all(&to).expect("remove old scratch");
        }
        copy_dir(&self.data(), &to);
        to
    }

    /// The same path inside a scratch copy.
    fn in_scratch(&self, scratch: &Path, path: &Path) -> PathBuf {
        scratch.join(
            path.strip_prefix(self.data())
                .expect("inside the data directory"),
        )
    }
}

/// Runs a `fill` child writing `n` batches per partition before and after a clean close,
/// and kills it once it reports them all acknowledged.
fn fill_in_child(n: u64) -> Filled {
    run_filling_child("fill", n)
}

/// Runs a `fill` or `direct-fill` child and kills it once it reports everything acknowledged.
fn run_filling_child(mode: &str, n: u64) -> Filled {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = ChildProcess::spawn(&dir.path().join("data"), &format!("{mode}:{n}"));
    let mut acked: BTreeMap<PartitionId, Vec<(u64, u64)>> = BTreeMap::new();
    let mut closed_end = BTreeMap::new();
    loop {
        let line = child.next_line().expect("the fill child exited early");
        if let Some((p, base, next)) = parse_ack(&line) {
            acked.entry(p).or_default().push((base, next));
        }
        let num = |s: &str| -> u64 { s.parse().expect("number") };
        match line.split('|').collect::<Vec<_>>().as_slice() {
            ["closed", p, end] => {
                closed_end.insert(num(p), num(end));
            }
            ["done"] => break,
            _ => {}
        }
    }
    child.kill();
    Filled {
        dir,
        acked,
        closed_end,
    }
}

/// An `ack|<partition>|<base>|<next>` line.
fn parse_ack(line: &str) -> Option<(PartitionId, u64, u64)> {
    match line.split('|').collect::<Vec<_>>().as_slice() {
        ["ack", p, base, next] => Some((p.parse().ok()?, base.parse().ok()?, next.parse().ok()?)),
        _ => None,
    }
}

/// Every partition's batches as `(base, next)`, read after recovery.
fn spans(storage: &Storage) -> BTreeMap<PartitionId, Vec<(u64, u64)>> {
    PARTITIONS
        .iter()
        .map(|&p| {
            let log = storage
                .open_partition(p, partition_config())
                .expect("open partition");
            assert_eq!(log.start_offset(), 0);
            let spans = read_all(&log, 4096)
                .iter()
                .map(|b| (b.base_offset(), b.next_offset()))
                .collect();
            (p, spans)
        })
        .collect()
}

#[test]
fn a_wal_cut_at_any_byte_recovers_what_the_segments_and_the_chunks_before_the_cut_hold() {
    let filled = fill_in_child(40);
    let wal = filled.wal_file();
    let chunks = wal_chunks(&wal);
    let len = std::fs::metadata(&wal).expect("stat").len();
    // The file is preallocated: cut where the log is (and once in the zeros after it).
    let log_end = chunks.last().map_or(16, |c| c.position + c.len);
    let mut cuts = vec![0, 7, 16, 17, log_end - 1, log_end, len - 1];
    cuts.extend(chunks.iter().take(3).map(|c| c.position + c.len));
    let mut rng = Rng::new(7);
    cuts.extend((0..24).map(|_| rng.range(0..log_end)));
    for at in cuts {
        // The segments still hold every batch (a killed process loses no page cache):
        // nothing is lost, whatever the WAL lost.
        let scratch = filled.scratch("cut-wal");
        cut(&filled.in_scratch(&scratch, &wal), at);
        let storage = Storage::open(storage_config(&scratch))
            .unwrap_or_else(|e| panic!("open after cutting the WAL at byte {at}: {e}"));
        assert_eq!(
            spans(&storage),
            filled.acked,
            "after cutting the WAL at byte {at} of {len}"
        );
        drop(storage);

        // As after a power loss: the unsynced segment tails are gone too.
        let scratch = filled.scratch("cut-wal-and-tails");
        cut(&filled.in_scratch(&scratch, &wal), at);
        lose_segment_tails_past_checkpoint(&filled, &scratch);
        // What must survive: everything the clean close checkpointed, then every batch
        // of the chunks wholly before the cut.
        let mut expected: BTreeMap<PartitionId, Vec<(u64, u64)>> = filled
            .acked
            .iter()
            .map(|(p, acked)| {
                (
                    *p,
                    acked
                        .iter()
                        .copied()
                        .filter(|s| s.1 <= filled.closed_end[p])
                        .collect(),
                )
            })
            .collect();
        for chunk in chunks.iter().filter(|c| c.position + c.len <= at) {
            for &(p, base, next) in &chunk.batches {
                expected
                    .get_mut(&p)
                    .expect("known partition")
                    .push((base, next));
            }
        }
        let storage = Storage::open(storage_config(&scratch))
            .unwrap_or_else(|e| panic!("open after cutting the WAL at byte {at}: {e}"));
        assert_eq!(
            spans(&storage),
            expected,
            "after cutting the WAL at byte {at} of {len} and losing the unsynced segment tails"
        );
    }
}

/// Cuts every partition's segments back to the checkpointed end and deletes later
/// segments: what a power loss leaves of data written but never synced.
fn lose_segment_tails_past_checkpoint(filled: &Filled, scratch: &Path) {
    lose_unsynced_segment_tails(filled, scratch, &PARTITIONS);
}

/// Cuts the segments of `partitions` back to the checkpointed end and deletes later ones.
fn lose_unsynced_segment_tails(filled: &Filled, scratch: &Path, partitions: &[PartitionId]) {
    for &p in partitions {
        let end = filled.closed_end[&p];
        for segment in files_with(&partition_dir(scratch, p), "log") {
            let base = segment_base(&segment);
            if base > end {
                std::fs::remove_file(&segment).expect("remove segment");
                for ext in ["index", "timeindex"] {
                    let _ = std::fs::remove_file(segment.with_extension(ext));
                }
                continue;
            }
            if let Some(e) = segment_entries(&segment).iter().find(|e| e.base >= end) {
                cut(&segment, e.position);
            }
        }
    }
}

#[test]
fn a_cut_segment_past_the_checkpoint_is_recovered_from_the_wal() {
    let filled = fill_in_child(40);
    let mut rng = Rng::new(11);
    for p in PARTITIONS {
        let end = filled.closed_end[&p];
        let segments = files_with(&partition_dir(&filled.data(), p), "log");
        // The segment holding the checkpointed end, and the active one (the last).
        let holding_end = segments
            .iter()
            .rev()
            .find(|s| segment_base(s) <= end)
            .expect("a segment holds the checkpointed end")
            .clone();
        let active = segments.last().expect("segments").clone();
        for segment in [holding_end, active] {
            let entries = segment_entries(&segment);
            let len = std::fs::metadata(&segment).expect("stat").len();
            // Bytes the checkpoint vouches for are not the WAL's to restore: cut after them.
            let floor = entries
                .iter()
                .find(|e| e.base >= end)
                .map_or(len, |e| e.position);
            for _ in 0..6 {
                let at = rng.range(floor..len + 1);
                let scratch = filled.scratch("cut-segment");
                cut(&filled.in_scratch(&scratch, &segment), at);
                let storage = Storage::open(storage_config(&scratch)).unwrap_or_else(|e| {
                    panic!("open after cutting {} at byte {at}: {e}", segment.display())
                });
                assert_eq!(
                    spans(&storage),
                    filled.acked,
                    "after cutting {} at byte {at}",
                    segment.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Flipped bits: damage that is not a torn tail.

#[test]
fn a_flipped_bit_before_the_last_wal_chunk_fails_open_naming_the_wal_file_and_chunk() {
    let filled = fill_in_child(20);
    let wal = filled.wal_file();
    let chunks = wal_chunks(&wal);
    assert!(chunks.len() > 2);
    let mut rng = Rng::new(3);
    for _ in 0..16 {
        let chunk = &chunks[rng.range(0..chunks.len() as u64 - 1) as usize];
        let byte = chunk.position + rng.range(0..chunk.len);
        let scratch = filled.scratch("flip-wal");
        let damaged = filled.in_scratch(&scratch, &wal);
        flip_bit(&damaged, byte, rng.range(0..8) as u8);
        match Storage::open(storage_config(&scratch)) {
            Err(Error::Corrupt { path, position, .. }) => {
                assert_eq!(
                    (path, position),
                    (damaged, chunk.position),
                    "flip at byte {byte}"
                );
            }
            other => panic!("a flipped bit at byte {byte} of the WAL gave {other:?}"),
        }
    }
}

/// A cleanly closed storage with one partition of many small segments, all checkpointed.
/// Returns the temporary directory and the data directory inside it.
fn closed_storage_with_sealed_segments() -> (tempfile::TempDir, PathBuf, Vec<(u64, u64)>) {
    closed_storage_with_sealed_segments_indexed_every(
        storage_config(Path::new("")).index_interval_bytes,
    )
}

fn closed_storage_with_sealed_segments_indexed_every(
    index_interval_bytes: u32,
) -> (tempfile::TempDir, PathBuf, Vec<(u64, u64)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut config = storage_config(&data);
    config.index_interval_bytes = index_interval_bytes;
    let storage = Storage::open(config).expect("open");
    let mut log = storage
        .create_partition(1, partition_config())
        .expect("create");
    let mut written = Vec::new();
    for i in 0..60u64 {
        let base = log.next_offset();
        let b = batch(base, 1 + (i % 3) as u32, (i * 53 % 500) as usize, 1);
        written.push((base, b.next_offset()));
        append_durably(&mut log, vec![b]).expect("append");
    }
    assert!(log.segment_count() > 4);
    drop(log);
    storage.close().expect("close");
    (dir, data, written)
}

#[test]
fn a_flipped_bit_in_a_sealed_segment_fails_reads_of_that_batch_and_never_returns_wrong_data() {
    let (dir, data, written) = closed_storage_with_sealed_segments();
    let segments = files_with(&partition_dir(&data, 1), "log");
    let mut rng = Rng::new(5);
    for trial in 0..12 {
        let scratch = dir.path().join(format!("flip-{trial}"));
        copy_dir(&data, &scratch);
        let segments_here = files_with(&partition_dir(&scratch, 1), "log");
        let k = rng.range(0..segments.len() as u64 - 1) as usize; // sealed: not the last
        let segment = &segments_here[k];
        let entries = segment_entries(segment);
        let len = std::fs::metadata(segment).expect("stat").len();
        let byte = rng.range(0..len);
        let hit = *entries
            .iter()
            .find(|e| e.position <= byte && byte < e.position + e.len)
            .expect("entry");
        flip_bit(segment, byte, rng.range(0..8) as u8);

        let storage = Storage::open(storage_config(&scratch)).expect("open trusts a valid index");
        let log = storage
            .open_partition(1, partition_config())
            .expect("open partition");
        for &(base, next) in &written {
            match log.read(base, 1, u64::MAX) {
                Ok(got) => {
                    assert_ne!(base, hit.base, "the damaged batch at {base} was served");
                    assert_eq!((got[0].base_offset(), got[0].next_offset()), (base, next));
                    common::verify(&got[0]);
                }
                Err(Error::Corrupt { path, position, .. }) => {
                    assert_eq!(
                        (&path, position),
                        (segment, hit.position),
                        "reading offset {base}"
                    );
                }
                Err(e) => panic!("reading offset {base}: {e}"),
            }
        }
        assert!(
            log.read(hit.base, 1, u64::MAX).is_err(),
            "the damaged batch must not be readable"
        );
        drop(log);
        drop(storage);

        // Without its index the segment is scanned at open, which finds the damage.
        std::fs::remove_file(segment.with_extension("index")).expect("remove index");
        match Storage::open(storage_config(&scratch)) {
            Err(Error::Corrupt { path, position, .. }) => {
                assert_eq!((&path, position), (segment, hit.position))
            }
            other => panic!("open with a damaged, unindexed segment gave {other:?}"),
        }
        std::fs::remove_dir_all(&scratch).expect("remove scratch");
    }
}

#[test]
fn a_flipped_bit_anywhere_in_the_checkpoint_fails_open_naming_the_checkpoint() {
    let (_dir, data, _) = closed_storage_with_sealed_segments();
    let checkpoint = data.join("checkpoint");
    let len = std::fs::metadata(&checkpoint).expect("stat").len();
    for byte in 0..len {
        for bit in 0..8 {
            flip_bit(&checkpoint, byte, bit);
            match Storage::open(storage_config(&data)) {
                Err(Error::Corrupt { path, .. }) => assert_eq!(path, checkpoint),
                // Bytes 4..8 hold the format version: a flip there reads as another version.
                Err(Error::UnsupportedFormat { path, .. }) if (4..8).contains(&byte) => {
                    assert_eq!(path, checkpoint)
                }
                other => panic!("a flipped bit {bit} of checkpoint byte {byte} gave {other:?}"),
            }
            flip_bit(&checkpoint, byte, bit);
        }
    }
    Storage::open(storage_config(&data)).expect("the restored checkpoint opens");
}

/// Regression: a sealed segment opened from its index is trusted to reach its successor's
/// base offset; when batches were missing from its end, reads walked off the end of the
/// file and carried on in the next segment, handing readers a gap instead of an error.
#[test]
fn a_sealed_segment_missing_its_last_batches_fails_reads_instead_of_returning_a_gap() {
    // One index point per segment (its first batch), so cutting whole batches off the end
    // leaves an index that still fits.
    let sparse = 1 << 20;
    let (dir, data, written) = closed_storage_with_sealed_segments_indexed_every(sparse);
    let segments = files_with(&partition_dir(&data, 1), "log");
    let mut rng = Rng::new(13);
    for trial in 0..8 {
        let scratch = dir.path().join(format!("cut-{trial}"));
        copy_dir(&data, &scratch);
        let segments_here = files_with(&partition_dir(&scratch, 1), "log");
        let k = rng.range(0..segments.len() as u64 - 1) as usize;
        let segment = &segments_here[k];
        let entries = segment_entries(segment);
        let last = *entries.last().expect("a sealed segment holds batches");
        // Cut just before the last batch or inside it.
        let at = if trial % 2 == 0 {
            last.position
        } else {
            rng.range(last.position..last.position + last.len)
        };
        cut(segment, at);

        let mut config = storage_config(&scratch);
        config.index_interval_bytes = sparse;
        let storage = match Storage::open(config) {
            Ok(storage) => storage,
            Err(Error::Corrupt { path, .. }) => {
                assert_eq!(&path, segment, "cut at byte {at}");
                continue;
            }
            Err(e) => panic!("open after cutting a sealed segment at byte {at}: {e}"),
        };
        let log = storage
            .open_partition(1, partition_config())
            .expect("open partition");
        for &(base, next) in &written {
            match log.read(base, usize::MAX, u64::MAX) {
                Ok(got) => {
                    assert!(
                        next <= last.base || base >= last.next,
                        "the missing batch at {} was skipped",
                        last.base
                    );
                    let mut expected = base;
                    for b in &got {
                        assert_eq!(b.base_offset(), expected, "reading from {base}: a gap");
                        common::verify(b);
                        expected = b.next_offset();
                    }
                }
                Err(Error::Corrupt { path, .. }) => {
                    assert_eq!(&path, segment, "reading offset {base}")
                }
                Err(e) => panic!("reading offset {base}: {e}"),
            }
        }
        assert!(
            log.read(last.base, 1, u64::MAX).is_err(),
            "the missing batch must not read as nothing"
        );
        drop(log);
        drop(storage);
        std::fs::remove_dir_all(&scratch).expect("remove scratch");
    }
}

// ---------------------------------------------------------------------------------------
// Directly synced data: what a `direct-fill` child leaves, damaged. Past the checkpointed
// end, the large partition's batches are only in its segments, and the WAL records how
// far each direct sync reached.

/// Large appends per phase of the `direct-fill` child.
const DIRECT_FILL: u64 = 5;

/// Runs a `direct-fill` child and checks the path its appends took: the WAL holds a mark
/// for each large append after the reopen, the last at the end of the large partition,
/// and none of the large partition's batches.
fn direct_fill_in_child() -> Filled {
    let filled = run_filling_child("direct-fill", DIRECT_FILL);
    let chunks = wal_chunks(&filled.wal_file());
    let marks: Vec<u64> = chunks
        .iter()
        .flat_map(|c| c.marks.iter())
        .filter(|m| m.0 == LARGE)
        .map(|m| m.1)
        .collect();
    assert_eq!(marks.len() as u64, DIRECT_FILL, "one mark per large append");
    assert_eq!(marks.last().copied(), Some(acked_end(&filled, LARGE)));
    assert!(
        chunks
            .iter()
            .flat_map(|c| c.batches.iter())
            .all(|b| b.0 != LARGE),
        "a large append was copied into the WAL"
    );
    filled
}

fn acked_end(filled: &Filled, p: PartitionId) -> u64 {
    filled.acked[&p].last().expect("acknowledged batches").1
}

/// The large partition's segments holding batches past the checkpointed end, each with
/// the position of the first such batch.
fn direct_segments(filled: &Filled) -> Vec<(PathBuf, u64)> {
    let end = filled.closed_end[&LARGE];
    let segments: Vec<(PathBuf, u64)> = files_with(&partition_dir(&filled.data(), LARGE), "log")
        .into_iter()
        .filter_map(|s| {
            let first = segment_entries(&s).into_iter().find(|e| e.base >= end)?;
            Some((s, first.position))
        })
        .collect();
    assert!(segments.len() > 3, "large appends roll segments");
    segments
}

/// Opening `scratch` fails because `damaged` lost the batch `lost`, below the last
/// direct sync of the large partition.
fn assert_open_misses(
    filled: &Filled,
    scratch: &Path,
    damaged: &Path,
    lost: SegmentEntry,
    context: &str,
) {
    match Storage::open(storage_config(scratch)) {
        Err(Error::Corrupt {
            path,
            position,
            reason: Corruption::Missing { expected, found },
        }) => assert_eq!(
            (path.as_path(), position, expected, found),
            (damaged, lost.position, acked_end(filled, LARGE), lost.base),
            "{context}: the error names the damaged segment, the lost batch and the last direct sync"
        ),
        Ok(storage) => panic!(
            "{context}: the open succeeded, the large partition ending at {:?}",
            spans(&storage)[&LARGE].last()
        ),
        Err(e) => panic!("{context}: {e}"),
    }
}

#[test]
fn a_segment_cut_below_an_acknowledged_direct_sync_fails_open_as_missing_naming_that_segment() {
    let filled = direct_fill_in_child();
    let segments = direct_segments(&filled);
    let mut rng = Rng::new(19);
    for trial in 0..8 {
        let (segment, floor) = &segments[rng.range(0..segments.len() as u64) as usize];
        let entries = segment_entries(segment);
        let len = std::fs::metadata(segment).expect("stat").len();
        // Half the cuts at a batch boundary (the segment then scans clean), half anywhere.
        let at = if trial % 2 == 0 {
            let whole: Vec<_> = entries.iter().filter(|e| e.position >= *floor).collect();
            whole[rng.range(0..whole.len() as u64) as usize].position
        } else {
            rng.range(*floor..len)
        };
        let lost = *entries
            .iter()
            .find(|e| e.position + e.len > at)
            .expect("a batch at the cut");
        let scratch = filled.scratch("cut-direct");
        let damaged = filled.in_scratch(&scratch, segment);
        cut(&damaged, at);
        assert_open_misses(
            &filled,
            &scratch,
            &damaged,
            lost,
            &format!("cutting {} at byte {at}", segment.display()),
        );
    }
}

#[test]
fn a_flipped_bit_in_directly_synced_data_fails_open_as_missing_and_never_serves_less() {
    let filled = direct_fill_in_child();
    let segments = direct_segments(&filled);
    let mut rng = Rng::new(23);
    for _ in 0..8 {
        let (segment, floor) = &segments[rng.range(0..segments.len() as u64) as usize];
        let len = std::fs::metadata(segment).expect("stat").len();
        let byte = rng.range(*floor..len);
        let hit = *segment_entries(segment)
            .iter()
            .find(|e| e.position <= byte && byte < e.position + e.len)
            .expect("a batch at the flipped byte");
        let scratch = filled.scratch("flip-direct");
        let damaged = filled.in_scratch(&scratch, segment);
        flip_bit(&damaged, byte, rng.range(0..8) as u8);
        assert_open_misses(
            &filled,
            &scratch,
            &damaged,
            hit,
            &format!("flipping a bit of {} at byte {byte}", segment.display()),
        );
    }
}

/// The log files of a partition directory and their bytes.
fn segment_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_with(dir, "log")
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).expect("read");
            (f, bytes)
        })
        .collect()
}

/// When the open refuses damaged direct data, the acknowledged batches after the damage
/// are intact and in no other file: an open that fails must not have destroyed them.
/// Regression: recovery cut the damaged segment and deleted every later one before it
/// found the `Synced` mark they fell short of.
#[test]
fn an_open_refusing_damaged_direct_data_leaves_the_batches_after_the_damage_in_place() {
    let filled = direct_fill_in_child();
    let (segment, floor) = direct_segments(&filled)[0].clone();
    let scratch = filled.scratch("flip-first-direct");
    // The base offset of the first batch synced directly.
    flip_bit(&filled.in_scratch(&scratch, &segment), floor + 16, 0);
    let dir = partition_dir(&scratch, LARGE);
    let before = segment_files(&dir);
    assert!(matches!(
        Storage::open(storage_config(&scratch)),
        Err(Error::Corrupt { .. })
    ));
    let after = segment_files(&dir);
    let changed: Vec<String> = before
        .iter()
        .filter(|(f, bytes)| after.get(*f) != Some(*bytes))
        .map(|(f, bytes)| {
            let now = after.get(f).map(Vec::len);
            format!("{} ({} bytes, now {now:?})", f.display(), bytes.len())
        })
        .collect();
    assert!(
        changed.is_empty(),
        "the failed open changed or deleted {} segment files: {changed:#?}",
        changed.len()
    );
}

#[test]
fn without_its_wal_a_killed_storage_still_recovers_every_direct_append() {
    let filled = direct_fill_in_child();
    let wal = filled.wal_file();

    // No WAL at all: the segments (a kill loses no page cache) still hold everything.
    let scratch = filled.scratch("no-wal");
    for f in std::fs::read_dir(scratch.join("wal")).expect("list WAL directory") {
        std::fs::remove_file(f.expect("entry").path()).expect("remove WAL file");
    }
    let storage = Storage::open(storage_config(&scratch)).expect("open without a WAL");
    assert_eq!(spans(&storage), filled.acked, "after deleting the WAL");
    drop(storage);

    // A power loss too: the WAL is cut anywhere, the small partition loses its unsynced
    // segment tails and the large one its index files. The large partition's appends past
    // the checkpointed end were all synced directly: none of them is lost.
    let chunks = wal_chunks(&wal);
    let len = std::fs::metadata(&wal).expect("stat").len();
    // The file may be preallocated: cut where the log is, or leave it whole.
    let log_end = chunks.last().map_or(16, |c| c.position + c.len);
    let mut rng = Rng::new(29);
    let mut cuts = vec![0, 16, log_end, len];
    cuts.extend((0..4).map(|_| rng.range(16..log_end)));
    for at in cuts {
        let scratch = filled.scratch("cut-wal-direct");
        cut(&filled.in_scratch(&scratch, &wal), at);
        lose_unsynced_segment_tails(&filled, &scratch, &[SMALL]);
        for ext in ["index", "timeindex"] {
            for f in files_with(&partition_dir(&scratch, LARGE), ext) {
                std::fs::remove_file(f).expect("remove index");
            }
        }
        let mut expected = filled.acked.clone();
        let closed = filled.closed_end[&SMALL];
        let small = expected.get_mut(&SMALL).expect("small partition");
        small.retain(|s| s.1 <= closed);
        for chunk in chunks.iter().filter(|c| c.position + c.len <= at) {
            for &(p, base, next) in &chunk.batches {
                assert_eq!(
                    p, SMALL,
                    "only the small partition's batches are in the WAL"
                );
                small.push((base, next));
            }
        }
        let storage = Storage::open(storage_config(&scratch))
            .unwrap_or_else(|e| panic!("open after cutting the WAL at byte {at}: {e}"));
        assert_eq!(
            spans(&storage),
            expected,
            "after cutting the WAL at byte {at} of {len} and a power loss"
        );
    }
}
