//! Bad input and hostile surroundings: data directories that are not directories, not
//! ours or already in use; stray and damaged side files; appends and reads that break
//! the log's rules; and a disk that fills up under appends.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use petrel_log::{DIRECT_BYTES, Error, Log, RecordBatch, Storage};

use common::{
    append_durably, batch, durable, files_with, open, partition_config, partition_dir, read_all,
    storage_config, timestamp, verify, wal_chunks,
};

/// Appends `n` batches of a few records each and returns them.
fn fill(log: &mut Log, n: u64) -> Vec<petrel_log::RecordBatch> {
    (0..n)
        .map(|i| {
            let b = batch(
                log.next_offset(),
                1 + (i % 4) as u32,
                (i * 71 % 700) as usize,
                1,
            );
            append_durably(log, vec![b.clone()]).expect("append");
            b
        })
        .collect()
}

#[test]
fn a_data_dir_that_is_a_regular_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("data");
    std::fs::write(&file, b"not a directory").expect("write");
    let err = Storage::open(storage_config(&file)).expect_err("a file is not a data directory");
    let Error::Io { path, .. } = &err else {
        panic!("expected an I/O error, got {err:?}")
    };
    assert_eq!(path, &file);
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"not a directory",
        "the file is left alone"
    );
}

#[test]
fn a_data_dir_under_a_regular_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let data = file.join("data");
    let err =
        Storage::open(storage_config(&data)).expect_err("no directory can be made under a file");
    let Error::Io { path, .. } = &err else {
        panic!("expected an I/O error, got {err:?}")
    };
    assert_eq!(path, &data);
    assert!(
        err.to_string().contains(&data.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_non_empty_directory_without_the_marker_is_not_a_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), b"someone else's").expect("write");
    match Storage::open(storage_config(dir.path())) {
        Err(Error::NotADataDir { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected NotADataDir, got {other:?}"),
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec!["notes.txt"],
        "nothing was written into a foreign directory"
    );

    // A marker that does not say what ours says is not ours either.
    let marked = tempfile::tempdir().expect("tempdir");
    std::fs::write(marked.path().join("PETREL"), b"something else\n").expect("write");
    assert!(matches!(
        Storage::open(storage_config(marked.path())),
        Err(Error::NotADataDir { .. })
    ));
}

#[test]
fn a_data_dir_opened_twice_is_locked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = open(dir.path());
    match Storage::open(storage_config(dir.path())) {
        Err(Error::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    first.close().expect("close");
    open(dir.path())
        .close()
        .expect("the lock is released on close");
}

/// A forked child that holds copies of every descriptor of this process until dropped.
struct ForkedChild(libc::pid_t);

impl ForkedChild {
    fn fork() -> Self {
        // SAFETY: the child only calls `pause` (async-signal-safe) until it is killed.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: as above.
                unsafe { libc::pause() };
            }
        }
        assert!(pid > 0, "fork failed");
        Self(pid)
    }
}

impl Drop for ForkedChild {
    fn drop(&mut self) {
        // SAFETY: plain system calls on the pid this value owns.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// Regression: the lock was released only by closing its descriptor, so a child process
/// forked while the storage was open (which holds a copy of the descriptor until it
/// execs, or for good if it never does) kept the directory locked after `close`.
#[test]
fn closing_releases_the_lock_even_while_a_forked_child_holds_a_copy_of_its_descriptor() {
    let _exclusive = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let _child = ForkedChild::fork();
    storage.close().expect("close");
    open(dir.path())
        .close()
        .expect("the directory is free after close");
}

#[test]
fn stray_files_in_the_data_directory_are_ignored_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = storage
        .create_partition(1, partition_config())
        .expect("create");
    let written = fill(&mut log, 30);
    drop(log);
    storage.close().expect("close");

    let part = partition_dir(dir.path(), 1);
    let strays: Vec<PathBuf> = vec![
        part.join("notes.txt"),
        part.join("foo.log"),
        part.join("00000000000000000001.log.bak"),
        part.join("123.index"),
        dir.path().join("wal").join("README"),
        dir.path().join("partitions").join("README"),
    ];
    for stray in &strays {
        std::fs::write(stray, b"stray").expect("write stray");
    }
    let storage = open(dir.path());
    let mut log = storage.open_partition(1, partition_config()).expect("open");
    assert!(read_all(&log, 4096) == written);
    fill(&mut log, 3);
    drop(log);
    storage.close().expect("close");
    for stray in &strays {
        assert_eq!(
            std::fs::read(stray).expect("the stray file is still there"),
            b"stray"
        );
    }
}

#[test]
fn corrupt_or_missing_index_files_of_a_sealed_segment_are_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = storage
        .create_partition(1, partition_config())
        .expect("create");
    let written = fill(&mut log, 60);
    drop(log);
    storage.close().expect("close");

    let part = partition_dir(dir.path(), 1);
    let segments = files_with(&part, "log");
    assert!(segments.len() > 3);
    let sealed = &segments[1];
    let (index, timeindex) = (
        sealed.with_extension("index"),
        sealed.with_extension("timeindex"),
    );
    let originals = (
        std::fs::read(&index).expect("index"),
        std::fs::read(&timeindex).expect("timeindex"),
    );
    let damages: [(&str, &dyn Fn()); 5] = [
        ("both files missing", &|| {
            std::fs::remove_file(&index).expect("rm");
            std::fs::remove_file(&timeindex).expect("rm");
        }),
        ("the time index missing", &|| {
            std::fs::remove_file(&timeindex).expect("rm")
        }),
        ("a flipped bit in the offset index", &|| {
            common::flip_bit(&index, 13, 2)
        }),
        ("a cut time index", &|| common::cut(&timeindex, 5)),
        ("an empty offset index", &|| {
            std::fs::write(&index, b"").expect("write")
        }),
    ];
    for (what, damage) in damages {
        damage();
        let storage = open(dir.path());
        let log = storage.open_partition(1, partition_config()).expect("open");
        assert!(read_all(&log, 1) == written, "{what}: content");
        for b in &written {
            let got = log.read(b.base_offset(), 1, u64::MAX).expect("read");
            assert_eq!(&got[0], b, "{what}: read at {}", b.base_offset());
            let first_at = log
                .offset_for_timestamp(timestamp(b.base_offset()))
                .expect("time lookup");
            let expected =
                (0..log.next_offset()).find(|&o| timestamp(o) >= timestamp(b.base_offset()));
            assert_eq!(
                first_at,
                expected,
                "{what}: time lookup of offset {}",
                b.base_offset()
            );
        }
        drop(log);
        storage.close().expect("close");
        assert_eq!(
            std::fs::read(&index).expect("index rewritten"),
            originals.0,
            "{what}: offset index"
        );
        assert_eq!(
            std::fs::read(&timeindex).expect("time index rewritten"),
            originals.1,
            "{what}: time index"
        );
    }
}

#[test]
fn an_append_with_the_wrong_base_offset_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = storage
        .create_partition(7, partition_config())
        .expect("create");
    let first = batch(0, 3, 10, 1);
    append_durably(&mut log, vec![first.clone()]).expect("append");

    for batches in [
        vec![batch(5, 1, 10, 1)],
        vec![batch(2, 1, 10, 1)],
        vec![batch(3, 2, 10, 1), batch(4, 1, 10, 1)],
    ] {
        let (done, rx) = durable();
        match log.append(batches, done) {
            Err(Error::OffsetMismatch { partition: 7, .. }) => {}
            other => panic!("expected OffsetMismatch, got {other:?}"),
        }
        assert!(
            rx.try_recv().is_err(),
            "the callback of a refused append is not called"
        );
        assert_eq!(log.next_offset(), 3);
    }
    match log.append(vec![batch(5, 1, 10, 1)], durable().0) {
        Err(Error::OffsetMismatch {
            partition,
            expected,
            got,
        }) => assert_eq!((partition, expected, got), (7, 3, 5)),
        other => panic!("expected OffsetMismatch, got {other:?}"),
    }
    assert!(read_all(&log, 4096) == vec![first.clone()]);
    drop(log);
    storage.close().expect("close");
    let storage = open(dir.path());
    let log = storage.open_partition(7, partition_config()).expect("open");
    assert!(
        read_all(&log, 4096) == vec![first],
        "nothing of the refused appends reached the disk"
    );
}

#[test]
fn a_batch_above_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = storage
        .create_partition(1, partition_config())
        .expect("create");
    let limit = storage_config(dir.path()).max_batch_bytes;
    let big = batch(0, 2, limit, 1);
    match log.append(vec![big.clone()], durable().0) {
        Err(Error::BatchTooLarge { size, limit: l }) => assert_eq!((size, l), (big.len(), limit)),
        other => panic!("expected BatchTooLarge, got {other:?}"),
    }
    assert_eq!(log.next_offset(), 0);
    append_durably(&mut log, vec![batch(0, 2, 100, 1)]).expect("a batch within the limit");
}

#[test]
fn reads_outside_the_log_are_out_of_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = storage
        .create_partition(1, partition_config())
        .expect("create");
    fill(&mut log, 20);
    let next = log.next_offset();
    log.purge_to(10).expect("purge");
    for offset in [0, 9, next + 1, u64::MAX] {
        match log.read(offset, 4096, u64::MAX) {
            Err(Error::OffsetOutOfRange {
                partition: 1,
                offset: o,
                start: 10,
                next: n,
            }) => assert_eq!((o, n), (offset, next)),
            other => panic!("read at {offset}: expected OffsetOutOfRange, got {other:?}"),
        }
    }
    assert!(
        log.read(next, 4096, u64::MAX)
            .expect("read at the end")
            .is_empty()
    );
    let at_start = log.read(10, 1, u64::MAX).expect("read at the start");
    assert!(at_start[0].base_offset() <= 10 && 10 < at_start[0].next_offset());
}

#[test]
fn reads_never_return_a_batch_past_the_high_watermark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let mut log = storage
        .create_partition(1, partition_config())
        .expect("create");
    let written = fill(&mut log, 40);
    let check = |log: &Log, when: &str| {
        let next = log.next_offset();
        for offset in (0..next).step_by(3) {
            for high_watermark in (0..=next + 1).step_by(2) {
                let got = log.read(offset, usize::MAX, high_watermark).expect("read");
                let expected: Vec<_> = written
                    .iter()
                    .filter(|b| b.next_offset() > offset && b.next_offset() <= high_watermark)
                    .cloned()
                    .collect();
                assert!(
                    got == expected,
                    "{when}: read({offset}, hw {high_watermark}) gave {got:?}, expected {expected:?}"
                );
            }
        }
    };
    check(&log, "warm cache");
    drop(log);
    storage.close().expect("close");
    let storage = open(dir.path());
    let log = storage.open_partition(1, partition_config()).expect("open");
    check(&log, "from disk");
}

// ---------------------------------------------------------------------------------------
// A full disk.

/// Serialises the tests that fork or fill a disk: a forked child holds copies of every
/// descriptor in the process, and one it held on a filled tmpfs would keep it full.
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static EXCLUSIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    EXCLUSIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A small tmpfs mounted for one test and unmounted when dropped, even on failure.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        Self {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Fills the file system holding `path` with a file there, then frees `slack` bytes.
fn fill_disk(path: &Path, slack: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0xA5u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    f.set_len(written.saturating_sub(slack))
        .expect("free slack");
}

/// Appends small batches until one fails; returns the acknowledged ones and the error.
/// Every failure must say "no space left"; a refused append (`DiskFull`) must leave
/// nothing behind, so appending goes on (a smaller batch may still fit) until the storage
/// is poisoned or fifty appends in a row were refused.
fn append_until_full(
    log: &mut Log,
    value_len: impl Fn(u64) -> usize,
) -> (Vec<RecordBatch>, Vec<Error>) {
    let mut acked = Vec::new();
    let mut failures = Vec::new();
    for i in 0..100_000u64 {
        let next = log.next_offset();
        let b = batch(next, 1 + (i % 3) as u32, value_len(i), 1);
        let (done, rx) = durable();
        match log
            .append(vec![b.clone()], done)
            .and_then(|()| common::wait(&rx))
        {
            Ok(()) => acked.push(b),
            Err(e) => {
                assert!(
                    e.to_string().to_lowercase().contains("no space left"),
                    "{e}"
                );
                let poisoned = matches!(e, Error::Poisoned { .. });
                match &e {
                    Error::DiskFull { .. } => {
                        assert_eq!(log.next_offset(), next, "a refused append left something")
                    }
                    Error::Poisoned { .. } => {}
                    other => panic!("expected DiskFull or Poisoned, got {other:?}"),
                }
                failures.push(e);
                if poisoned || failures.len() >= 50 {
                    break;
                }
            }
        }
    }
    assert!(!failures.is_empty(), "appends to a full disk never failed");
    (acked, failures)
}

/// Reopens the storage and checks that every acknowledged batch is there, that whatever
/// else is there is whole, and that appends work again.
fn reopen_and_check(data: &Path, acked: &[RecordBatch]) {
    let storage = open(data);
    let mut log = storage
        .open_partition(1, partition_config())
        .expect("open after the disk was freed");
    let found = read_all(&log, 4096);
    assert!(
        found.len() >= acked.len(),
        "acknowledged batches are missing"
    );
    assert!(
        found[..acked.len()] == acked[..],
        "the acknowledged batches differ"
    );
    let more = fill(&mut log, 5);
    drop(log);
    storage.close().expect("close");

    let storage = open(data);
    let log = storage.open_partition(1, partition_config()).expect("open");
    let all = read_all(&log, 4096);
    all.iter().for_each(verify);
    assert!(all.ends_with(&more), "appends after recovery are kept");
    drop(log);
    storage.close().expect("close");
}

#[test]
fn a_disk_filling_up_amid_rolls_and_checkpoints_loses_no_acknowledged_batch() {
    let _exclusive = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = Tmpfs::mount(&dir.path().join("mnt"), "4m");
    let (data, filler) = (mount.path.join("data"), mount.path.join("filler"));
    let storage = open(&data);
    let mut log = storage
        .create_partition(1, partition_config())
        .expect("create");
    let mut acked = fill(&mut log, 10);

    // With 4 KiB segments and write-ahead log files, the space runs out in a segment, an
    // index, a new WAL file or a checkpoint, whichever comes first.
    fill_disk(&filler, 48 << 10);
    let (more, _) = append_until_full(&mut log, |i| 500 + (i * 97 % 900) as usize);
    acked.extend(more);
    drop(log);
    drop(storage);
    std::fs::remove_file(&filler).expect("free the disk");
    reopen_and_check(&data, &acked);
}

/// A storage on a fresh tmpfs whose write-ahead log and segment never roll, so on a full
/// disk each can only fill the rest of its last page; `first_full` says which of the two
/// is to run out first, and appends go on until the other has less room left.
fn without_rolls_on_a_full_disk(
    mount: &Tmpfs,
    first_full: &str,
) -> (Storage, Log, Vec<RecordBatch>) {
    let data = mount.path.join("data");
    let mut config = storage_config(&data);
    config.wal_max_bytes = 1 << 20;
    // Grown as written, so that it can be the one to run out.
    config.wal_preallocate = false;
    // Every append reaches its segment file at once, so the two files can be lined up.
    config.write_buffer_bytes = 0;
    let storage = Storage::open(config).expect("open");
    let mut partition = partition_config();
    partition.segment_bytes = 1 << 20;
    let mut log = storage.create_partition(1, partition).expect("create");
    let mut acked = fill(&mut log, 5);
    let wal = files_with(&data.join("wal"), "wal")
        .pop()
        .expect("a WAL file");
    let segment = files_with(&partition_dir(&data, 1), "log")
        .pop()
        .expect("a segment");
    let (first, other) = match first_full {
        "wal" => (&wal, &segment),
        _ => (&segment, &wal),
    };
    for i in 0.. {
        if room_in_last_page(first) + 400 <= room_in_last_page(other) {
            break;
        }
        assert!(i < 1000, "could not align the files");
        let b = batch(log.next_offset(), 1, (i * 37 % 300) as usize, 1);
        append_durably(&mut log, vec![b.clone()]).expect("append");
        acked.push(b);
    }
    fill_disk(&mount.path.join("filler"), 0);
    (storage, log, acked)
}

#[test]
fn a_full_disk_under_a_segment_refuses_appends_until_space_is_freed() {
    let _exclusive = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = Tmpfs::mount(&dir.path().join("mnt"), "4m");
    let (storage, mut log, mut acked) = without_rolls_on_a_full_disk(&mount, "segment");
    let (more, failures) = append_until_full(&mut log, |_| 10);
    acked.extend(more);
    assert_refused_by_a_segment(&failures);
    assert!(
        read_all(&log, 4096) == acked,
        "nothing of a refused append is visible"
    );
    free_the_disk_and_check(&mount, storage, log, acked);
}

/// Every failure is a `DiskFull` naming a segment file.
fn assert_refused_by_a_segment(failures: &[Error]) {
    assert_eq!(failures.len(), 50);
    for failure in failures {
        match failure {
            Error::DiskFull { path, .. } => {
                assert_eq!(path.extension().and_then(|e| e.to_str()), Some("log"))
            }
            other => panic!("a segment that cannot be written refuses the append: {other:?}"),
        }
    }
}

/// Frees the disk, appends again, and checks that a reopen finds every acknowledged batch.
fn free_the_disk_and_check(
    mount: &Tmpfs,
    storage: Storage,
    mut log: Log,
    mut acked: Vec<RecordBatch>,
) {
    std::fs::remove_file(mount.path.join("filler")).expect("free the disk");
    acked.extend(fill(&mut log, 3));
    drop(log);
    drop(storage);
    reopen_and_check(&mount.path.join("data"), &acked);
}

#[test]
fn a_full_disk_under_buffered_appends_refuses_them_once_they_must_be_written() {
    let _exclusive = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = Tmpfs::mount(&dir.path().join("mnt"), "4m");
    let data = mount.path.join("data");
    let mut config = storage_config(&data);
    // Preallocated: the write-ahead log never needs more space, only the segments do.
    config.wal_max_bytes = 1 << 20;
    let storage = Storage::open(config).expect("open");
    let mut partition = partition_config();
    partition.segment_bytes = 1 << 20;
    let mut log = storage.create_partition(1, partition).expect("create");
    let mut acked = fill(&mut log, 5);
    fill_disk(&mount.path.join("filler"), 0);

    // An append big enough to have its segment synced directly: the segment cannot take
    // it, so the WAL does, and it is acknowledged all the same.
    let mut large: Vec<RecordBatch> = Vec::new();
    while large.iter().map(RecordBatch::len).sum::<usize>() < DIRECT_BYTES {
        let base = large
            .last()
            .map_or(log.next_offset(), RecordBatch::next_offset);
        large.push(batch(base, 1, 15_000, 3));
    }
    append_durably(&mut log, large.clone()).expect("a large append goes through the WAL");
    let wal = files_with(&data.join("wal"), "wal")
        .pop()
        .expect("a WAL file");
    let in_wal: Vec<(u64, u64)> = wal_chunks(&wal)
        .iter()
        .flat_map(|c| c.batches.iter())
        .map(|&(_, base, next)| (base, next))
        .collect();
    for b in &large {
        assert!(
            in_wal.contains(&(b.base_offset(), b.next_offset())),
            "the large append's batch at {} is in the WAL",
            b.base_offset()
        );
    }
    acked.extend(large);

    let (more, failures) = append_until_full(&mut log, |_| 1000);
    assert!(
        more.len() > 20,
        "small appends wait in memory (and the WAL) until enough have come: {} taken",
        more.len()
    );
    acked.extend(more);
    assert_refused_by_a_segment(&failures);
    assert!(
        read_all(&log, 4096) == acked,
        "the buffered batches are readable and nothing of a refused append is"
    );
    free_the_disk_and_check(&mount, storage, log, acked);
}

#[test]
fn a_full_disk_under_the_write_ahead_log_poisons_the_storage_until_it_is_reopened() {
    let _exclusive = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = Tmpfs::mount(&dir.path().join("mnt"), "4m");
    let (storage, mut log, mut acked) = without_rolls_on_a_full_disk(&mount, "wal");
    let (more, failures) = append_until_full(&mut log, |_| 10);
    acked.extend(more);
    match &failures[..] {
        [Error::Poisoned { path, .. }] => {
            assert_eq!(path.extension().and_then(|e| e.to_str()), Some("wal"))
        }
        other => panic!("the write-ahead log runs out first and poisons the storage: {other:?}"),
    }
    std::fs::remove_file(mount.path.join("filler")).expect("free the disk");
    let later = log.append(vec![batch(log.next_offset(), 1, 10, 1)], durable().0);
    assert!(
        matches!(later, Err(Error::Poisoned { .. })),
        "a poisoned storage took an append: {later:?}"
    );
    assert!(matches!(log.truncate_from(0), Err(Error::Poisoned { .. })));
    assert!(matches!(log.purge_to(1), Err(Error::Poisoned { .. })));
    drop(log);
    drop(storage);
    reopen_and_check(&mount.path.join("data"), &acked);
}

/// Bytes left in the last page of a file (tmpfs allocates whole pages).
fn room_in_last_page(path: &Path) -> u64 {
    let len = std::fs::metadata(path).expect("stat").len();
    (4096 - len % 4096) % 4096
}

/// Regression: a `Log` kept past `Storage::close` still wrote to its segment files (and
/// rolled the write back by cutting them) and saved its stale checkpoint table, although
/// after `close` those files may belong to the next `Storage` opened on the directory.
#[test]
fn a_log_that_outlives_its_storage_cannot_touch_the_files_of_the_next_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = open(dir.path());
    let mut stale = first
        .create_partition(1, partition_config())
        .expect("create");
    let mut written = fill(&mut stale, 5);
    first.close().expect("close");

    let second = open(dir.path());
    let mut log = second.open_partition(1, partition_config()).expect("open");
    written.extend(fill(&mut log, 5));

    let b = batch(stale.next_offset(), 1, 10, 9);
    assert!(
        matches!(stale.append(vec![b], durable().0), Err(Error::Closed)),
        "append after close"
    );
    assert!(
        matches!(stale.purge_to(3), Err(Error::Closed)),
        "purge after close"
    );
    assert!(
        matches!(stale.truncate_from(1), Err(Error::Closed)),
        "truncate after close"
    );
    assert!(
        matches!(stale.delete(), Err(Error::Closed)),
        "delete after close"
    );
    assert!(
        read_all(&log, 1) == written,
        "the open storage's data is intact"
    );
    drop(log);
    second.close().expect("close");
    let third = open(dir.path());
    let log = third.open_partition(1, partition_config()).expect("open");
    assert_eq!(log.start_offset(), 0);
    assert!(
        read_all(&log, 1) == written,
        "and stays intact across a restart"
    );
}
