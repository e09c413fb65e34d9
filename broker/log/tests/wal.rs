//! Where the write-ahead log ends: a crash may leave unsynced chunks in any order, and
//! only damage to what was synced is corruption.

mod common;

use std::time::{Duration, Instant};

use common::*;
use petrel_log::{PartitionConfig, Storage, SyncPolicy};

/// Regression: recovery called any damaged chunk followed by a valid one corruption, but
/// chunks written without a sync between them may reach the disk in any order, so a
/// crash can leave a damaged chunk before valid ones that were never acknowledged as
/// durable either. Only a later chunk written after a sync past the damage proves loss.
#[test]
fn damage_followed_only_by_unsynced_chunks_is_a_torn_tail_not_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut config = storage_config(&data);
    config.wal_max_bytes = 1 << 20;
    config.sync_interval = Duration::from_secs(3600);
    let storage = Storage::open(config.clone()).expect("open");
    let never = PartitionConfig {
        sync_policy: SyncPolicy::Never,
        ..partition_config()
    };
    // Creation syncs the WAL; from here on every chunk is written and not synced.
    let mut log = storage.create_partition(1, never).expect("create");
    let wal = files_with(&data.join("wal"), "wal")
        .pop()
        .expect("a WAL file");
    let mut written = Vec::new();
    for i in 0..3 {
        let b = batch(log.next_offset(), 2, 300, 1);
        written.push(b.clone());
        log.append(vec![b], Box::new(|_| {})).expect("append");
        // One chunk per append: wait for the writer to write this one.
        let deadline = Instant::now() + Duration::from_secs(10);
        while wal_chunks(&wal).len() < i + 1 {
            assert!(Instant::now() < deadline, "the writer wrote no chunk");
            std::thread::yield_now();
        }
    }
    // What a crash leaves (the storage is still open): then the first chunk is damaged.
    let copy = dir.path().join("copy");
    copy_dir(&data, &copy);
    drop(log);
    storage.close().expect("close");
    let copied_wal = copy.join("wal").join(wal.file_name().expect("name"));
    let chunks = wal_chunks(&copied_wal);
    assert_eq!(chunks.len(), 3);
    flip_bit(&copied_wal, chunks[0].position + chunks[0].len - 1, 0);

    config.dir = copy.clone();
    let storage = Storage::open(config).expect("a torn tail of unsynced chunks opens");
    let log = storage
        .open_partition(1, partition_config())
        .expect("partition");
    let recovered = read_all(&log, 1 << 20);
    assert!(
        written.starts_with(&recovered),
        "what is there is a prefix of what was written"
    );
}
