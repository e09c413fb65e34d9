//! The benchmark tool runs end to end and keeps its documented JSON contract (a short
//! run: the figures themselves are for `petrel-bench`, not for tests).

use std::process::Command;

#[test]
fn log_bench_ends_with_the_documented_json_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_petrel-bench"))
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
        .arg(dir.path())
        .output()
        .expect("run petrel-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "petrel-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ratio"), "the table is printed:\n{stdout}");
    let last = stdout.lines().last().expect("output");
    let json: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    assert!(json["disk_sync_per_s"].as_f64().expect("disk_sync_per_s") > 0.0);
    assert!(json["disk_seq_mb_s"].as_f64().expect("disk_seq_mb_s") > 0.0);
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "one result per appenders × partitions");
    for r in results {
        assert_eq!(r["policy"], "always");
        assert!(r["appenders"].as_u64().is_some() && r["partitions"].as_u64().is_some());
        assert!(r["msgs_per_s"].as_f64().expect("msgs_per_s") > 0.0, "{r}");
        assert!(r["mb_s"].as_f64().expect("mb_s") > 0.0, "{r}");
        let p50 = r["p50_us"].as_u64().expect("p50_us");
        let p99 = r["p99_us"].as_u64().expect("p99_us");
        let p999 = r["p999_us"].as_u64().expect("p999_us");
        assert!(0 < p50 && p50 <= p99 && p99 <= p999, "{r}");
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
