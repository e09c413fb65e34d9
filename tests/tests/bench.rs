//! The benchmark tool runs end to end and keeps its documented JSON contract (a short
//! run: the figures themselves are for `petrel-bench`, not for tests).

use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// One benchmark at a time: each measures the machine, and the cluster one uses all of it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Holds the machine for one benchmark until dropped.
fn alone() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `command` (a `petrel-bench` run) alone; returns its last line as JSON once it
/// printed a table with `header` in it.
fn bench_json(command: &mut Command, header: &str) -> serde_json::Value {
    let _alone = alone();
    run_json(command, header)
}

/// [`bench_json`] for a caller that already holds [`alone`].
fn run_json(command: &mut Command, header: &str) -> serde_json::Value {
    let out = command.output().expect("run petrel-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "petrel-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(header), "the table is printed:\n{stdout}");
    let last = stdout.lines().last().expect("output");
    serde_json::from_str(last).expect("the last line is JSON")
}

/// Throughput and ordered latency percentiles of one result.
fn check_figures(r: &serde_json::Value) {
    assert!(r["msgs_per_s"].as_f64().expect("msgs_per_s") > 0.0, "{r}");
    assert!(r["mb_s"].as_f64().expect("mb_s") > 0.0, "{r}");
    let p50 = r["p50_us"].as_u64().expect("p50_us");
    let p99 = r["p99_us"].as_u64().expect("p99_us");
    let p999 = r["p999_us"].as_u64().expect("p999_us");
    assert!(0 < p50 && p50 <= p99 && p99 <= p999, "{r}");
}

#[test]
fn log_bench_ends_with_the_documented_json_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = bench_json(
        Command::new(env!("CARGO_BIN_EXE_petrel-bench"))
            .args([
                "log",
                "--json",
                "--seconds",
                "0.3",
                "--probe-seconds",
                "0.2",
                "--bandwidth-seconds",
                "0.2",
            ])
            .args(["--appenders", "1,4", "--partitions", "1,3"])
            .args(["--rss-bytes", "4000000", "--cache-mb", "1", "--wal-mb", "4"])
            .arg("--dir")
            .arg(dir.path()),
        "ratio",
    );
    assert!(json["disk_sync_per_s"].as_f64().expect("disk_sync_per_s") > 0.0);
    assert!(json["disk_seq_mb_s"].as_f64().expect("disk_seq_mb_s") > 0.0);
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "one result per appenders × partitions");
    for r in results {
        assert_eq!(r["policy"], "always");
        assert!(r["appenders"].as_u64().is_some() && r["partitions"].as_u64().is_some());
        check_figures(r);
        assert!(r["peak_rss_mb"].as_f64().expect("peak_rss_mb") > 0.0, "{r}");
        // Each case carries the disk probed around it, and its ratio to the ceiling that gives.
        let syncs = r["disk_sync_per_s"].as_f64().expect("disk_sync_per_s");
        let mb_s = r["disk_seq_mb_s"].as_f64().expect("disk_seq_mb_s");
        let appenders = r["appenders"].as_f64().expect("appenders");
        let ceiling = (appenders * syncs).min(mb_s * 1e6 / 1024.0);
        let expected = r["msgs_per_s"].as_f64().expect("msgs_per_s") / ceiling;
        let ratio = r["ratio_to_ceiling"].as_f64().expect("ratio_to_ceiling");
        assert!((ratio - expected).abs() <= 0.01 * expected.max(1.0), "{r}");
    }
    let memory = &json["memory"];
    assert!(memory["appended_mb"].as_f64().expect("appended_mb") >= 4.0);
    assert_eq!(
        memory["read_mb"], memory["appended_mb"],
        "all of it is read back"
    );
}

#[test]
fn cluster_bench_ends_with_the_documented_json_line() {
    let json = bench_json(
        Command::new(env!("CARGO_BIN_EXE_petrel-bench"))
            .args(["cluster", "--json", "--seconds", "0.3"])
            .args(["--partitions", "1,2", "--producers", "1,2"])
            .args(["--idle-partitions", "4", "--idle-seconds", "0.3"]),
        "vs 1 node",
    );
    let results = json["results"].as_array().expect("results");
    // 1 node at RF 1, 3 nodes at RF 1 and at RF 3; 1 and 2 partitions, 1 and 2 producers.
    assert_eq!(results.len(), 12, "{json}");
    for r in results {
        let rf = r["replication_factor"]
            .as_u64()
            .expect("replication_factor");
        let nodes = r["nodes"].as_u64().expect("nodes");
        assert!(rf <= nodes, "{r}");
        assert!(r["partitions"].as_u64().is_some(), "{r}");
        check_figures(r);
        assert_eq!(r["errors"], 0, "{r}");
    }
    // Each partition count's peak is its best producer count, shape by shape.
    let best = |nodes: u64, rf: u64, partitions: u64| {
        results
            .iter()
            .filter(|r| {
                r["nodes"] == nodes
                    && r["replication_factor"] == rf
                    && r["partitions"] == partitions
            })
            .filter_map(|r| r["msgs_per_s"].as_f64())
            .fold(0.0, f64::max)
    };
    let peaks = json["peaks"].as_array().expect("peaks");
    assert_eq!(peaks.len(), 2, "{json}");
    for p in peaks {
        let partitions = p["partitions"].as_u64().expect("partitions");
        let rf3 = best(3, 3, partitions);
        assert_eq!(p["rf3_3_nodes_msgs_per_s"].as_f64(), Some(rf3), "{p}");
        assert_eq!(
            p["rf1_1_node_msgs_per_s"].as_f64(),
            Some(best(1, 1, partitions)),
            "{p}"
        );
        let ratio = rf3 / best(3, 1, partitions);
        let reported = p["rf3_vs_rf1_3_nodes"].as_f64().expect("ratio");
        assert!((reported - ratio).abs() < 1e-9, "{p}");
    }
    let failover = json["failover_ms"].as_f64().expect("failover_ms");
    assert!(failover > 0.0 && failover < 10_000.0, "{json}");
    assert_eq!(json["failover_lost"], 0, "nothing acknowledged is lost");
    assert!(json["idle_cpu_cores"].as_f64().expect("idle_cpu_cores") > 0.0);
}

#[test]
fn amqp_bench_against_petrel_ends_with_the_documented_json_line() {
    let _alone = alone();
    let mut petrel = petrel_tests::Serve::new()
        .expect("serve")
        .args(["--fsync-policy", "always", "--log-level", "warn"])
        .start()
        .expect("start petrel");
    petrel.wait_ready(Duration::from_secs(30)).expect("ready");
    let r = run_json(
        Command::new(env!("CARGO_BIN_EXE_petrel-bench"))
            .args(["amqp", "--json", "--url", &petrel.amqp_url()])
            .args(["--broker-pid", &petrel.pid().to_string()])
            .args(["--queue-type", "petrel", "--label", "test", "--persistent"])
            .args(["--producers", "2", "--consumers", "2", "--size", "1024"])
            .args(["--confirm-window", "64", "--prefetch", "64"])
            .args(["--seconds", "1", "--timeout-seconds", "20"]),
        "msgs/CPU-s",
    );
    assert_eq!(r["label"], "test", "{r}");
    assert_eq!(r["queue_type"], "petrel", "{r}");
    check_figures(&r);
    assert_eq!(r["lost"], 0, "every confirmed message is consumed: {r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    let confirmed = r["confirmed"].as_u64().expect("confirmed");
    assert!(confirmed > 0, "{r}");
    assert_eq!(r["consumed"].as_u64(), Some(confirmed), "{r}");
    let cpu = r["cpu_s"].as_f64().expect("cpu_s");
    let per_cpu = r["msgs_per_cpu_s"].as_f64().expect("msgs_per_cpu_s");
    assert!(cpu > 0.0, "{r}");
    assert!(
        (per_cpu - confirmed as f64 / cpu).abs() <= 1e-6 * per_cpu,
        "{r}"
    );
}
