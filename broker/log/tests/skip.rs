//! `skip_to`: an emptied log moves forward to its leader's offsets, durably, and what a
//! crash midway leaves behind recovers to a consistent log.

mod common;

use petrel_log::{Error, Log, RecordBatch};

use common::{
    append_durably, batch, copy_dir, files_with, open, open_or_create, partition_dir, read_all,
};

fn fill(log: &mut Log, n: u64) -> Vec<RecordBatch> {
    (0..n)
        .map(|i| {
            let b = batch(log.next_offset(), 1 + (i % 3) as u32, 200, 1);
            append_durably(log, vec![b.clone()]).expect("append");
            b
        })
        .collect()
}

#[test]
fn only_an_empty_log_skips_and_only_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = open_or_create(&storage, 1);
    let written = fill(&mut log, 5);
    let next = log.next_offset();
    for offset in [next + 10, next.saturating_sub(1)] {
        assert!(matches!(
            log.skip_to(offset),
            Err(Error::OffsetOutOfRange { .. })
        ));
    }
    assert_eq!(
        read_all(&log, 4096),
        written,
        "a refused skip changes nothing"
    );
    log.purge_to(next).expect("purge all");
    assert!(matches!(
        log.skip_to(next - 1),
        Err(Error::OffsetOutOfRange { .. })
    ));
    log.skip_to(next)
        .expect("skipping to where it is does nothing");
}

#[test]
fn a_skipped_log_takes_appends_at_its_new_offset_and_keeps_them_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = open_or_create(&storage, 1);
    fill(&mut log, 20);
    log.purge_to(log.next_offset()).expect("purge all");
    log.skip_to(5_000).expect("skip");
    assert_eq!((log.start_offset(), log.next_offset()), (5_000, 5_000));
    assert_eq!(log.segment_count(), 1, "the old segments are gone");
    let after = fill(&mut log, 4);
    assert_eq!(after[0].base_offset(), 5_000);
    assert_eq!(read_all(&log, 4096), after);
    drop(log);
    drop(storage);

    let storage = open(dir.path());
    let mut log = storage
        .open_partition(1, common::partition_config())
        .expect("reopen");
    assert_eq!(log.start_offset(), 5_000);
    assert_eq!(read_all(&log, 4096), after);
    let more = fill(&mut log, 2);
    assert_eq!(more[0].base_offset(), after[3].next_offset());
}

/// The two states a crash inside `skip_to` can leave, rebuilt by hand from a copy.
#[test]
fn a_crash_inside_skip_to_recovers_to_before_or_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let storage = open(&data);
    let mut log = open_or_create(&storage, 1);
    let before = fill(&mut log, 12);
    let end = log.next_offset();
    log.purge_to(end).expect("purge all");
    drop(log);
    drop(storage);
    let emptied = dir.path().join("emptied");
    copy_dir(&data, &emptied);

    // Before the checkpoint: a new empty segment far past the end. It is dropped.
    let segments = partition_dir(&emptied, 1);
    std::fs::write(segments.join(format!("{:020}.log", 9_000)), b"").expect("stray segment");
    let storage = open(&emptied);
    let log = storage
        .open_partition(1, common::partition_config())
        .expect("open");
    assert_eq!((log.start_offset(), log.next_offset()), (end, end));
    assert_eq!(
        files_with(&segments, "log").len(),
        1,
        "the stray segment is deleted"
    );
    drop(log);
    drop(storage);

    // After the checkpoint, before the old segments are deleted: they are dropped.
    let storage = open(&data);
    let mut log = storage
        .open_partition(1, common::partition_config())
        .expect("open");
    log.skip_to(9_000).expect("skip");
    drop(log);
    drop(storage);
    let old = files_with(&partition_dir(&emptied, 1), "log");
    for f in &old {
        std::fs::copy(
            f,
            partition_dir(&data, 1).join(f.file_name().expect("name")),
        )
        .expect("put an old segment back");
    }
    let storage = open(&data);
    let mut log = storage
        .open_partition(1, common::partition_config())
        .expect("open");
    assert_eq!((log.start_offset(), log.next_offset()), (9_000, 9_000));
    assert_eq!(files_with(&partition_dir(&data, 1), "log").len(), 1);
    assert!(before.iter().all(|b| b.next_offset() <= end));
    let after = fill(&mut log, 2);
    assert_eq!(read_all(&log, 4096), after);
}
