//! The partition's Raft storage against openraft's own conformance suite, and what the
//! suite does not cover: messages as entries, offsets, and reopening.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, Vote};
use petrel_core::raft::{LogStore, PartitionMachine, PartitionRaft, Proposal, StorageError};
use petrel_log::{BatchBuilder, PartitionConfig, RecordBatch, Storage, StorageConfig};

/// Keeps a test's directory and storage alive as long as its stores.
struct Guard {
    _storage: Storage,
    _dir: tempfile::TempDir,
}

struct Builder;

fn open(dir: &std::path::Path, create: bool) -> (Storage, LogStore, PartitionMachine) {
    let storage = Storage::open(StorageConfig::new(dir.join("data"))).expect("open storage");
    let log = if create {
        storage.create_partition(1, PartitionConfig::default())
    } else {
        storage.open_partition(1, PartitionConfig::default())
    }
    .expect("partition");
    let (store, machine) = petrel_core::raft::open(log, &dir.join("raft")).expect("raft storage");
    (storage, store, machine)
}

impl StoreBuilder<PartitionRaft, LogStore, PartitionMachine, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, LogStore, PartitionMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, store, machine) = open(dir.path(), true);
        let guard = Guard {
            _storage: storage,
            _dir: dir,
        };
        Ok((guard, store, machine))
    }
}

#[test]
fn the_log_store_and_state_machine_pass_openrafts_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft's storage suite failed: {e}");
    }
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

/// An entry carrying `records` messages.
fn message(term: u64, index: u64, records: u32) -> Entry<PartitionRaft> {
    let mut b = BatchBuilder::new();
    for i in 0..records {
        b.push(
            1_000 + i64::from(i),
            None,
            format!("m{index}.{i}").as_bytes(),
            &[],
        );
    }
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Proposal(b.build(0, 0, 0).expect("build"))),
    }
}

/// Appends and waits until the storage reports the entries flushed.
async fn append(store: &mut LogStore, entries: Vec<Entry<PartitionRaft>>) {
    store.blocking_append(entries).await.expect("append");
}

fn batches(entries: &[Entry<PartitionRaft>]) -> Vec<&RecordBatch> {
    entries
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::Normal(Proposal(b)) => Some(b),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn messages_take_consecutive_offsets_and_keep_them_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, mut store, mut machine) = open(dir.path(), true);
    append(&mut store, vec![message(1, 1, 3), message(1, 2, 1)]).await;
    append(
        &mut store,
        vec![
            Entry {
                log_id: log_id(2, 3),
                payload: EntryPayload::Blank,
            },
            message(2, 4, 2),
        ],
    )
    .await;
    let entries = store.try_get_log_entries(1..5).await.expect("read");
    assert_eq!(entries.len(), 4);
    let spans: Vec<(u64, u64)> = batches(&entries)
        .iter()
        .map(|b| (b.base_offset(), b.next_offset()))
        .collect();
    // The blank entry takes an offset too (a control batch consumers skip).
    assert_eq!(spans, vec![(0, 3), (3, 4), (5, 7)]);
    let applied = machine.apply(entries).await.expect("apply");
    assert_eq!(
        applied.last().map(|a| (a.base_offset, a.next_offset)),
        Some((5, 7))
    );
    assert_eq!(machine.state().next_offset, 7);
    store.save_vote(&Vote::new(2, 1)).await.expect("vote");
    drop((store, machine));
    drop(storage);

    let (_storage, mut store, _machine) = open(dir.path(), false);
    assert_eq!(
        store.read_vote().await.expect("vote"),
        Some(Vote::new(2, 1))
    );
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, Some(log_id(2, 4)));
    let again = store.try_get_log_entries(2..=4).await.expect("read");
    let spans: Vec<(u64, u64)> = batches(&again)
        .iter()
        .map(|b| (b.base_offset(), b.next_offset()))
        .collect();
    assert_eq!(spans, vec![(3, 4), (5, 7)]);
    let record = batches(&again)[1].records().expect("records");
    assert_eq!(&record[1].value[..], b"m4.1");
}

#[tokio::test]
async fn a_conflicting_tail_is_cut_and_its_offsets_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_storage, mut store, _machine) = open(dir.path(), true);
    append(&mut store, (1..=5).map(|i| message(1, i, 2)).collect()).await;
    store.truncate(log_id(1, 3)).await.expect("truncate");
    assert_eq!(
        store.get_log_state().await.expect("state").last_log_id,
        Some(log_id(1, 2))
    );
    append(&mut store, vec![message(2, 3, 1)]).await;
    let entries = store.try_get_log_entries(..).await.expect("read");
    let last = batches(&entries)[2];
    assert_eq!((last.term(), last.raft_index()), (2, 3));
    assert_eq!((last.base_offset(), last.next_offset()), (4, 5));
}

#[tokio::test]
async fn a_reader_follows_the_log_as_it_grows_and_is_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_storage, mut store, _machine) = open(dir.path(), true);
    let mut reader = store.get_log_reader().await;
    append(
        &mut store,
        (1..=100)
            .map(|i| message(1, i, 1 + (i % 3) as u32))
            .collect(),
    )
    .await;
    for from in (1..=100).step_by(10) {
        let got = reader
            .try_get_log_entries(from..from + 10)
            .await
            .expect("read");
        let indexes: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (from..from + 10).collect::<Vec<_>>());
    }
    store.purge(log_id(1, 50)).await.expect("purge");
    let got = reader.try_get_log_entries(40..60).await.expect("read");
    assert_eq!(got.first().map(|e| e.log_id.index), Some(51));
    assert_eq!(got.len(), 9);
}
