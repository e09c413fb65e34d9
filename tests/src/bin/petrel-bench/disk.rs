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

/// Both limits, as measured at one time.
#[derive(Clone, Copy)]
pub struct Limits {
    /// `fdatasync` of 4 KiB writes per second.
    pub sync_per_s: f64,
    /// MB/s of 1 MiB writes each followed by `fdatasync`.
    pub seq_mb_s: f64,
}

impl Limits {
    /// Probes the sync rate for `sync`, then the bandwidth for `seq`.
    pub fn probe(dir: &Path, sync: Duration, seq: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            sync_per_s: sync_rate(dir, sync)?,
            seq_mb_s: sequential_mb_s(dir, seq)?,
        })
    }

    /// Records per second the disk allows `appenders` appenders that each wait for
    /// durability: min(appenders × syncs/s, bandwidth ÷ record size).
    pub fn ceiling(&self, appenders: usize, record_bytes: usize) -> f64 {
        (appenders as f64 * self.sync_per_s).min(self.seq_mb_s * 1e6 / record_bytes as f64)
    }
}
