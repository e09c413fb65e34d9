//! `retention_point`: where time and size retention let a log start, in whole sealed
//! segments, never into the active one.

mod common;

use common::{append_durably, batch, open, open_or_create, read_all, timestamp};

#[test]
fn retention_drops_whole_sealed_segments_older_or_beyond_the_size_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = open_or_create(&storage, 1);
    // 4 KiB segments (the test partition setting): 1 KiB batches roll one every few.
    for _ in 0..40 {
        let b = batch(log.next_offset(), 2, 500, 1);
        append_durably(&mut log, vec![b]).expect("append");
    }
    let next = log.next_offset();
    assert!(log.segment_count() > 4, "several segments to retain from");
    assert_eq!(
        log.retention_point(i64::MAX, None, None),
        0,
        "nothing asked"
    );

    // Time: with `now` just after the newest record, only the active segment is young.
    let newest = timestamp(next - 1);
    let point = log.retention_point(newest + 1, Some(1), None);
    assert!(point > 0 && point < next, "{point}");
    assert_eq!(
        log.retention_point(newest + 1_000_000, Some(1), None),
        point,
        "the active segment stays however old"
    );
    // Keeping a long time keeps everything.
    assert_eq!(log.retention_point(newest, Some(1 << 40), None), 0);

    // Size: keeping about two segments' worth drops the older ones.
    let by_size = log.retention_point(0, None, Some(8 << 10));
    assert!(by_size > 0 && by_size <= point, "{by_size} vs {point}");
    assert_eq!(log.retention_point(0, None, Some(1 << 30)), 0);

    // What the point says goes is what a purge removes, whole segments.
    let before = log.segment_count();
    log.purge_to(by_size).expect("purge");
    assert!(log.segment_count() < before);
    assert_eq!(log.start_offset(), by_size);
    let left: usize = read_all(&log, 64 << 10).iter().map(|b| b.len()).sum();
    assert!(
        left >= 8 << 10,
        "at least the size kept stays: {left} bytes"
    );
    assert_eq!(
        log.retention_point(0, None, Some(8 << 10)),
        by_size,
        "stable once applied"
    );
}
