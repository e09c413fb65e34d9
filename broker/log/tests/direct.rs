//! The WAL writer's direct path. A partition that brings `DIRECT_BYTES` of
//! `SyncPolicy::Always` appends to one turn of the writer has its segment files synced
//! instead of copying its batches into the WAL; a later WAL chunk records how far that
//! sync reached (a `Synced` mark), and recovery refuses to open a partition that ends
//! below a mark. These tests read the WAL to check which appends took which path, and race
//! direct appends against truncation and deletion by holding the writer thread in a
//! durability callback (`stall_writer`) while commands queue behind it, as they would
//! behind a slow sync. A process killed at some point leaves its files as they are (the
//! page cache survives), so copying the data directory of a running storage is a kill.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use petrel_log::{
    DIRECT_BYTES, Log, PartitionConfig, RecordBatch, Storage, StorageConfig, SyncPolicy,
};

use common::{
    Rng, WAIT, append_durably, batch, copy_dir, durable, files_with, large_append,
    large_partition_config, partition_config, read_all, stall_writer, storage_config, wait,
    wal_chunks,
};

/// Test settings with a WAL that these tests never fill, so every chunk and mark stays in
/// one file.
fn one_wal_file(dir: &Path) -> StorageConfig {
    StorageConfig {
        wal_max_bytes: 4 << 20,
        ..storage_config(dir)
    }
}

/// The only WAL file of a data directory.
fn the_wal_file(data: &Path) -> PathBuf {
    let files = files_with(&data.join("wal"), "wal");
    assert_eq!(files.len(), 1, "expected one write-ahead log file");
    files[0].clone()
}

fn spans(batches: &[RecordBatch]) -> Vec<(u64, u64)> {
    batches
        .iter()
        .map(|b| (b.base_offset(), b.next_offset()))
        .collect()
}

/// Appends one small batch and waits until it is durable.
fn append_small(log: &mut Log) -> petrel_log::Result<()> {
    let b = batch(log.next_offset(), 1, 8, 0);
    append_durably(log, vec![b])
}

fn bytes(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::len).sum()
}

/// Partition 1 takes large (direct) appends, partition 2 small ones.
fn large_and_small(storage: &Storage) -> (Log, Log) {
    let large = storage
        .create_partition(1, large_partition_config())
        .expect("create");
    let small = storage
        .create_partition(2, partition_config())
        .expect("create");
    (large, small)
}

#[test]
fn appends_of_direct_bytes_in_one_turn_bypass_the_wal_which_records_only_a_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let storage = Storage::open(one_wal_file(&data)).expect("open");
    let (mut large, mut small) = large_and_small(&storage);
    let interval_config = PartitionConfig {
        sync_policy: SyncPolicy::Interval,
        ..large_partition_config()
    };
    let mut interval = storage
        .create_partition(3, interval_config)
        .expect("create");
    let mut rng = Rng::new(5);
    let mut written = Vec::new();

    // Just under the threshold: copied into the WAL.
    let mut under = large_append(0, 1, DIRECT_BYTES, &mut rng);
    under.pop();
    assert!(bytes(&under) < DIRECT_BYTES);
    let copied = spans(&under);
    written.extend(under.iter().cloned());
    append_durably(&mut large, under).expect("append");

    // At the threshold: synced directly.
    let direct = large_append(large.next_offset(), 1, DIRECT_BYTES, &mut rng);
    written.extend(direct.iter().cloned());
    append_durably(&mut large, direct).expect("append");
    let first_mark = large.next_offset();

    // Two appends of half the threshold each, taken by one turn: synced directly together.
    let stall = stall_writer(&mut small);
    let mut pending = Vec::new();
    for _ in 0..2 {
        let half = large_append(large.next_offset(), 1, DIRECT_BYTES / 2, &mut rng);
        assert!(bytes(&half) < DIRECT_BYTES);
        written.extend(half.iter().cloned());
        let (done, rx) = durable();
        large.append(half, done).expect("append");
        pending.push(rx);
    }
    drop(stall);
    for rx in &pending {
        wait(rx).expect("durable");
    }
    let second_mark = large.next_offset();

    // Large, but not `Always`: copied into the WAL.
    let lazy = large_append(0, 1, 2 * DIRECT_BYTES, &mut rng);
    let lazy_spans = spans(&lazy);
    append_durably(&mut interval, lazy).expect("append");

    // One more chunk records the last direct sync.
    append_small(&mut small).expect("append");

    let chunks = wal_chunks(&the_wal_file(&data));
    let marks: Vec<(u64, u64)> = chunks.iter().flat_map(|c| c.marks.clone()).collect();
    assert_eq!(
        marks,
        [(1, first_mark), (1, second_mark)],
        "direct sync marks"
    );
    let in_wal = |p: u64| -> Vec<(u64, u64)> {
        chunks
            .iter()
            .flat_map(|c| c.batches.iter())
            .filter(|b| b.0 == p)
            .map(|b| (b.1, b.2))
            .collect()
    };
    assert_eq!(
        in_wal(1),
        copied,
        "only the append under the threshold may be in the WAL"
    );
    assert_eq!(
        in_wal(3),
        lazy_spans,
        "an Interval append is copied whatever its size"
    );

    assert!(
        read_all(&large, 1 << 20) == written,
        "partition 1 reads back"
    );
    drop((large, small, interval));
    storage.close().expect("close");
    let storage = Storage::open(one_wal_file(&data)).expect("reopen");
    let large = storage
        .open_partition(1, large_partition_config())
        .expect("open partition");
    assert!(
        read_all(&large, 4096) == written,
        "partition 1 reads back after a restart"
    );
}

/// This thread's id in `/proc/self/task`.
fn thread_id() -> String {
    let link = std::fs::read_link("/proc/thread-self").expect("read /proc/thread-self");
    link.file_name()
        .and_then(|n| n.to_str())
        .expect("a thread id")
        .to_string()
}

/// Waits until thread `tid` of this process sleeps (state `S`): for a thread that sends
/// on a channel and then blocks on the reply, until its request is queued.
fn wait_until_sleeping(tid: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .expect("read the thread's stat");
        // "tid (name) S ...": the name may hold anything, the state follows its last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if state == Some('S') {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never blocked (state {state:?})"
        );
        std::thread::yield_now();
    }
}

/// A Raft follower appends the leader's entries and, before they are durable, learns of a
/// conflict and truncates them. Regression: when the writer took the truncation's barrier
/// in the same turn as the direct append, the append's `Synced` mark went into the chunk
/// after the barrier's position, where the replay of the truncated partition starts: a
/// kill then left a WAL demanding the truncated offsets, and every open failed.
#[test]
fn a_truncation_of_an_in_flight_direct_append_leaves_a_directory_that_opens_after_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let storage = Storage::open(one_wal_file(&data)).expect("open");
    let (mut large, mut small) = large_and_small(&storage);
    let mut rng = Rng::new(9);
    let kept = large_append(0, 1, DIRECT_BYTES, &mut rng);
    append_durably(&mut large, kept.clone()).expect("append");
    let end = large.next_offset();

    let stall = stall_writer(&mut small);
    let (done, in_flight) = durable();
    let conflicting = large_append(end, 1, DIRECT_BYTES, &mut rng);
    large.append(conflicting, done).expect("append");
    std::thread::scope(|s| {
        let (tid_tx, tid_rx) = mpsc::channel();
        let large = &mut large;
        let truncating = s.spawn(move || {
            tid_tx.send(thread_id()).expect("send");
            large.truncate_from(end)
        });
        // Release the writer once the truncation's barrier is queued behind the append.
        wait_until_sleeping(&tid_rx.recv_timeout(WAIT).expect("thread id"));
        drop(stall);
        truncating.join().expect("join").expect("truncate");
    });
    let _ = wait(&in_flight);
    assert_eq!(large.next_offset(), end);
    // The next turn writes the mark of the truncated append.
    append_small(&mut small).expect("append");

    let killed = dir.path().join("killed");
    copy_dir(&data, &killed);
    let recovered = Storage::open(storage_config(&killed))
        .unwrap_or_else(|e| panic!("open after a kill following the truncation: {e}"));
    let log = recovered
        .open_partition(1, large_partition_config())
        .expect("open partition");
    assert_eq!(log.next_offset(), end);
    assert!(read_all(&log, 1 << 20) == kept);
}

/// A partition deleted while its direct append waits for the writer. Regression: the
/// writer then synced the partition's directory, which was gone; the failure poisoned the
/// whole storage, refusing every partition's writes until a restart.
#[test]
fn deleting_a_partition_with_a_direct_append_in_flight_leaves_the_storage_writable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(storage_config(dir.path())).expect("open");
    let (mut doomed, mut small) = large_and_small(&storage);
    let mut rng = Rng::new(4);

    let stall = stall_writer(&mut small);
    let (done, in_flight) = durable();
    doomed
        .append(large_append(0, 1, DIRECT_BYTES, &mut rng), done)
        .expect("append");
    doomed.delete().expect("delete");
    drop(stall);
    // The deleted partition's append may succeed or fail; it must not take the others down.
    let _ = wait(&in_flight);

    append_small(&mut small).expect("an append to another partition after the delete");
    let mut again = storage
        .create_partition(1, large_partition_config())
        .expect("create the deleted partition again");
    append_durably(&mut again, large_append(0, 2, DIRECT_BYTES, &mut rng))
        .expect("a direct append to the new partition");
}
