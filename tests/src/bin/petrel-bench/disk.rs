//! The disk's own limits, measured the way the log uses the disk.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Small writes each followed by `fdatasync`, per second.
pub fn sync_rate(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let path = dir.join("disk-probe-sync");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0x5au8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// Sequential 1 MiB writes each followed by `fdatasync`, MB/s (10^6 bytes).
pub fn sequential_mb_s(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let path = dir.join("disk-probe-seq");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        f.write_all(&block)?;
        f.sync_data()?;
        bytes += block.len() as u64;
    }
    let rate = bytes as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}
