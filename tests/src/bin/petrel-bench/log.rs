//! `petrel-bench log`: durable append throughput and latency of `petrel-log` against the
//! disk's own sync rate and bandwidth, and memory while gigabytes pass through.
//!
//! Each partition is driven the way the broker drives it: one actor task owns the `Log`
//! and appends whatever its appenders queued since its last turn as one call. Every
//! appender waits for durability before its next 1 KiB record.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use petrel_log::{BatchBuilder, Log, PartitionConfig, Storage, StorageConfig, SyncPolicy};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::{disk, stats};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the benchmark's data (on the disk under test).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Seconds each case runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent appenders, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 256])]
    appenders: Vec<usize>,
    /// Partition counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 100])]
    partitions: Vec<u64>,
    /// Sync policies, comma-separated (always, interval, never).
    #[arg(long, value_delimiter = ',', default_values_t = vec![SyncPolicy::Always])]
    policy: Vec<SyncPolicy>,
    /// Bytes per record.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Batch cache size in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mb: usize,
    /// Write-ahead log file size in MiB.
    #[arg(long, default_value_t = 256)]
    wal_mb: u64,
    /// Seconds the disk's sync rate is probed for, before every case.
    #[arg(long, default_value_t = 1.0)]
    probe_seconds: f64,
    /// Seconds the disk's bandwidth is probed for, before every case (default: as long as
    /// a case runs). Many disks allow a burst at first; a probe as long as the case sees
    /// the same mix of burst and sustained rate the case can use.
    #[arg(long)]
    bandwidth_seconds: Option<f64>,
    /// Bytes appended and read back by the memory test (0 skips it).
    #[arg(long, default_value_t = 2_000_000_000)]
    rss_bytes: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

struct Case {
    appenders: usize,
    partitions: u64,
    policy: SyncPolicy,
    msgs_per_s: f64,
    mb_s: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    peak_rss_mb: f64,
    cpu_s: f64,
    /// The disk just before this case.
    disk: disk::Limits,
}

impl Case {
    fn ceiling(&self, record_bytes: usize) -> f64 {
        self.disk.ceiling(self.appenders, record_bytes)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let base = args
        .dir
        .join(format!("petrel-bench-log-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let result = run_in(&args, &base);
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn run_in(args: &Args, base: &Path) -> anyhow::Result<()> {
    let probe = (
        Duration::from_secs_f64(args.probe_seconds),
        Duration::from_secs_f64(args.bandwidth_seconds.unwrap_or(args.seconds)),
    );
    let first = disk::Limits::probe(base, probe.0, probe.1)?;
    println!(
        "disk: {:.0} fdatasync/s (4 KiB writes), {:.0} MB/s (1 MiB writes + fdatasync); probed again before each case",
        first.sync_per_s, first.seq_mb_s
    );

    // First, while the process is fresh, so its RSS is not the allocator's leftovers.
    let memory = if args.rss_bytes > 0 {
        let m = memory_case(args, &base.join("memory"))?;
        let _ = std::fs::remove_dir_all(base.join("memory"));
        println!(
            "memory: appended {:.0} MB and read back {:.0} MB; RSS {:.1} MiB before, peak {:.1} MiB (cache {} MiB); {:.0} MB/s in, {:.0} MB/s out",
            m.appended as f64 / 1e6,
            m.read as f64 / 1e6,
            m.rss_before_mb,
            m.peak_rss_mb,
            args.cache_mb,
            m.append_mb_s,
            m.read_mb_s
        );
        Some(m)
    } else {
        None
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut cases = Vec::new();
    for &policy in &args.policy {
        for &partitions in &args.partitions {
            for &appenders in &args.appenders {
                let dir = base.join(format!("{policy}-{partitions}-{appenders}"));
                let disk = disk::Limits::probe(base, probe.0, probe.1)?;
                let mut case =
                    runtime.block_on(append_case(args, &dir, appenders, partitions, policy))?;
                let _ = std::fs::remove_dir_all(&dir);
                case.disk = disk;
                cases.push(case);
            }
        }
    }
    drop(runtime);

    println!();
    println!(
        "{:>9} {:>10} {:>8} {:>11} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>9} {:>10} {:>6}",
        "appenders",
        "partitions",
        "policy",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "RSS MiB",
        "CPU s",
        "syncs/s",
        "disk MB/s",
        "ceiling",
        "ratio"
    );
    for c in &cases {
        println!(
            "{:>9} {:>10} {:>8} {:>11.0} {:>8.1} {:>8} {:>8} {:>9} {:>8.1} {:>7.2} {:>8.0} {:>9.0} {:>10.0} {:>6.2}",
            c.appenders,
            c.partitions,
            c.policy.to_string(),
            c.msgs_per_s,
            c.mb_s,
            c.p50,
            c.p99,
            c.p999,
            c.peak_rss_mb,
            c.cpu_s,
            c.disk.sync_per_s,
            c.disk.seq_mb_s,
            c.ceiling(args.record_bytes),
            c.msgs_per_s / c.ceiling(args.record_bytes)
        );
    }
    println!("syncs/s and disk MB/s: the disk probed just before the case;");
    println!(
        "ceiling = min(appenders × syncs/s, disk MB/s ÷ record size); ratio = msgs/s ÷ ceiling"
    );
    for &appenders in &args.appenders {
        let one = cases
            .iter()
            .find(|c| c.partitions == 1 && c.appenders == appenders);
        let many = cases
            .iter()
            .find(|c| c.partitions > 1 && c.appenders == appenders);
        if let (Some(one), Some(many)) = (one, many) {
            println!(
                "{} partitions vs 1 at {appenders} appenders: {:.2}×",
                many.partitions,
                many.msgs_per_s / one.msgs_per_s
            );
        }
    }

    if args.json {
        let results: Vec<_> = cases
            .iter()
            .map(|c| {
                json!({
                    "appenders": c.appenders,
                    "partitions": c.partitions,
                    "policy": c.policy.to_string(),
                    "record_bytes": args.record_bytes,
                    "msgs_per_s": c.msgs_per_s.round(),
                    "mb_s": (c.mb_s * 10.0).round() / 10.0,
                    "p50_us": c.p50,
                    "p99_us": c.p99,
                    "p999_us": c.p999,
                    "peak_rss_mb": (c.peak_rss_mb * 10.0).round() / 10.0,
                    "cpu_s": (c.cpu_s * 100.0).round() / 100.0,
                    "disk_sync_per_s": c.disk.sync_per_s.round(),
                    "disk_seq_mb_s": (c.disk.seq_mb_s * 10.0).round() / 10.0,
                    "ceiling_msgs_per_s": c.ceiling(args.record_bytes).round(),
                    "ratio_to_ceiling": (c.msgs_per_s / c.ceiling(args.record_bytes) * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        let memory = memory.map(|m| {
            json!({
                "appended_mb": (m.appended as f64 / 1e6).round(),
                "read_mb": (m.read as f64 / 1e6).round(),
                "rss_before_mb": (m.rss_before_mb * 10.0).round() / 10.0,
                "peak_rss_mb": (m.peak_rss_mb * 10.0).round() / 10.0,
                "cache_mb": args.cache_mb,
            })
        });
        // The disk over the whole run: the median of every probe's figures.
        let probes: Vec<disk::Limits> = std::iter::once(first)
            .chain(cases.iter().map(|c| c.disk))
            .collect();
        let sync_per_s = stats::median(probes.iter().map(|l| l.sync_per_s));
        let seq_mb_s = stats::median(probes.iter().map(|l| l.seq_mb_s));
        let out = json!({
            "disk_sync_per_s": sync_per_s.round(),
            "disk_seq_mb_s": (seq_mb_s * 10.0).round() / 10.0,
            "results": results,
            "memory": memory,
        });
        println!("{out}");
    }
    Ok(())
}

struct Request {
    value: Bytes,
    done: oneshot::Sender<Result<(), String>>,
}

fn storage_config(args: &Args, dir: &Path) -> StorageConfig {
    let mut c = StorageConfig::new(dir);
    c.cache_bytes = args.cache_mb << 20;
    c.wal_max_bytes = args.wal_mb << 20;
    c
}

async fn append_case(
    args: &Args,
    dir: &Path,
    appenders: usize,
    partitions: u64,
    policy: SyncPolicy,
) -> anyhow::Result<Case> {
    let storage = Storage::open(storage_config(args, dir))?;
    let config = PartitionConfig {
        sync_policy: policy,
        ..PartitionConfig::default()
    };
    let mut senders = Vec::new();
    let mut actors = Vec::new();
    for id in 0..partitions {
        let log = storage.create_partition(id, config.clone())?;
        let (tx, rx) = mpsc::channel(1024);
        senders.push(tx);
        actors.push(tokio::spawn(partition_actor(log, rx)));
    }
    let senders = Arc::new(senders);
    let value = Bytes::from(vec![0x42u8; args.record_bytes]);
    stats::reset_peak_rss();
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..appenders {
        let (senders, value) = (senders.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = stats::histogram()?;
            let mut k = i;
            while Instant::now() < deadline {
                let (done, wait) = oneshot::channel();
                let t0 = Instant::now();
                let to = &senders[k % senders.len()];
                to.send(Request {
                    value: value.clone(),
                    done,
                })
                .await
                .map_err(|_| anyhow::anyhow!("actor stopped"))?;
                wait.await?.map_err(|e| anyhow::anyhow!(e))?;
                h.record(t0.elapsed().as_micros().max(1) as u64)?;
                k += 1;
            }
            anyhow::Ok(h)
        }));
    }
    let mut all: Histogram<u64> = stats::histogram()?;
    for t in tasks {
        all.add(t.await??)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds() - cpu_before;
    let peak_rss_mb = stats::peak_rss_mb();
    drop(senders);
    for a in actors {
        a.await??;
    }
    storage.close()?;
    let n = all.len() as f64;
    let (p50, p99, p999) = stats::percentiles(&all);
    Ok(Case {
        appenders,
        partitions,
        policy,
        msgs_per_s: n / elapsed,
        mb_s: n * args.record_bytes as f64 / 1e6 / elapsed,
        p50,
        p99,
        p999,
        peak_rss_mb,
        cpu_s,
        disk: disk::Limits {
            sync_per_s: 0.0,
            seq_mb_s: 0.0,
        },
    })
}

/// Owns one partition's log; each turn appends everything queued as one call.
async fn partition_actor(mut log: Log, mut rx: mpsc::Receiver<Request>) -> anyhow::Result<()> {
    let mut queued = Vec::with_capacity(1024);
    while rx.recv_many(&mut queued, 1024).await > 0 {
        let now = now_ms();
        let mut next = log.next_offset();
        let mut batches = Vec::with_capacity(queued.len());
        let mut waiters = Vec::with_capacity(queued.len());
        for r in queued.drain(..) {
            let mut b = BatchBuilder::new();
            b.push(now, None, &r.value, &[]);
            let batch = b.build(next, 1, next)?;
            next = batch.next_offset();
            batches.push(batch);
            waiters.push(r.done);
        }
        log.append(
            batches,
            Box::new(move |result| {
                let result = result.map_err(|e| e.to_string());
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }),
        )?;
    }
    Ok(())
}

struct Memory {
    appended: u64,
    read: u64,
    rss_before_mb: f64,
    peak_rss_mb: f64,
    append_mb_s: f64,
    read_mb_s: f64,
}

/// Appends `rss_bytes` to one partition (64-record batches, 16 in flight), then reads it
/// all back, and reports the peak RSS against the configured cache.
fn memory_case(args: &Args, dir: &Path) -> anyhow::Result<Memory> {
    let storage = Storage::open(storage_config(args, dir))?;
    let mut log = storage.create_partition(0, PartitionConfig::default())?;
    stats::reset_peak_rss();
    let rss_before_mb = stats::rss_mb();
    let value = vec![0x17u8; args.record_bytes];
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut in_flight = 0;
    let mut appended = 0u64;
    let start = Instant::now();
    while appended < args.rss_bytes {
        let mut b = BatchBuilder::new();
        for _ in 0..64 {
            b.push(now_ms(), None, &value, &[]);
        }
        let batch = b.build(log.next_offset(), 1, log.next_offset())?;
        appended += batch.len() as u64;
        let tx = tx.clone();
        log.append(
            vec![batch],
            Box::new(move |r| drop(tx.send(r.map_err(|e| e.to_string())))),
        )?;
        in_flight += 1;
        while in_flight >= 16 {
            rx.recv()?.map_err(|e| anyhow::anyhow!(e))?;
            in_flight -= 1;
        }
    }
    for _ in 0..in_flight {
        rx.recv()?.map_err(|e| anyhow::anyhow!(e))?;
    }
    let append_mb_s = appended as f64 / 1e6 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let (mut offset, end, mut read) = (0u64, log.next_offset(), 0u64);
    while offset < end {
        let batches = log.read(offset, 1 << 20, end)?;
        let last = batches
            .last()
            .context("read returned nothing before the end")?;
        offset = last.next_offset();
        read += batches.iter().map(|b| b.len() as u64).sum::<u64>();
    }
    let read_mb_s = read as f64 / 1e6 / start.elapsed().as_secs_f64();
    let peak_rss_mb = stats::peak_rss_mb();
    drop(log);
    storage.close()?;
    Ok(Memory {
        appended,
        read,
        rss_before_mb,
        peak_rss_mb,
        append_mb_s,
        read_mb_s,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer we pass, which points at
    // enough properly aligned space; we read it only when the call reports success.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: initialised by the successful call above (and zeroed before it).
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}
