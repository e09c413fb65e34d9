//! The node's resource alarms (RabbitMQ's disk and memory alarms): while free disk space
//! under the data directory is below its limit, or the process's resident memory is above
//! its high watermark, publishers are held back (AMQP `connection.blocked`) instead of the
//! node running out.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use petrel_core::messaging::Messaging;

/// How often the resources are looked at.
const EVERY: Duration = Duration::from_secs(1);

/// The limits that raise an alarm.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The directory whose file system is watched.
    pub data_dir: PathBuf,
    /// Free bytes below which publishers are held back.
    pub disk_free_limit: u64,
    /// Resident bytes above which publishers are held back.
    pub memory_high_watermark: u64,
}

/// Watches the resources until the messaging goes.
pub async fn watch(limits: Limits, messaging: std::sync::Weak<Messaging>) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let Some(messaging) = messaging.upgrade() else {
            return;
        };
        messaging.set_alarm(alarm(&limits));
    }
}

/// Why publishers must wait now, if they must.
fn alarm(limits: &Limits) -> Option<String> {
    match rustix::fs::statvfs(&limits.data_dir) {
        Ok(fs) => {
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            if free < limits.disk_free_limit {
                return Some(format!(
                    "low on disk: {free} bytes free under {}, below the limit of {}",
                    limits.data_dir.display(),
                    limits.disk_free_limit
                ));
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the free disk space"),
    }
    match resident_bytes() {
        Some(rss) if rss > limits.memory_high_watermark => Some(format!(
            "memory: {rss} bytes resident, above the high watermark of {}",
            limits.memory_high_watermark
        )),
        _ => None,
    }
}

/// This process's resident memory, from /proc.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}

/// RabbitMQ's default memory high watermark: 40% of the machine's memory (or 4 GiB when
/// /proc/meminfo cannot be read).
pub fn default_memory_high_watermark() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    total_kib.map_or(4 << 30, |kib| kib * 1024 / 10 * 4)
}

/// Starts watching for `messaging`.
pub fn start(limits: Limits, messaging: &Arc<Messaging>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch(limits, Arc::downgrade(messaging)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_disk_limit_raises_the_alarm_and_a_zero_one_does_not() {
        let dir = std::env::temp_dir();
        let limits = |disk_free_limit| Limits {
            data_dir: dir.clone(),
            disk_free_limit,
            memory_high_watermark: u64::MAX,
        };
        assert!(alarm(&limits(u64::MAX)).is_some_and(|a| a.contains("low on disk")));
        assert_eq!(alarm(&limits(0)), None);
        let memory = Limits {
            memory_high_watermark: 1,
            ..limits(0)
        };
        assert!(alarm(&memory).is_some_and(|a| a.contains("memory")));
    }
}
