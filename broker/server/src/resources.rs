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

/// The resource gauges of `/metrics`, set at every look.
#[derive(Debug, Clone)]
pub struct Gauges {
    /// `petrel_resource_alarm{resource="disk"}`.
    pub disk_alarm: prometheus::IntGauge,
    /// `petrel_resource_alarm{resource="memory"}`.
    pub memory_alarm: prometheus::IntGauge,
    /// `petrel_disk_free_bytes`.
    pub disk_free: prometheus::IntGauge,
}

/// What one look at the resources found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reading {
    /// Free bytes under the data directory, if they could be read.
    disk_free: Option<u64>,
    /// Why the disk alarm is on, if it is.
    disk: Option<String>,
    /// Why the memory alarm is on, if it is.
    memory: Option<String>,
}

/// Watches the resources until the messaging goes.
pub async fn watch(limits: Limits, messaging: std::sync::Weak<Messaging>, gauges: Gauges) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let Some(messaging) = messaging.upgrade() else {
            return;
        };
        let reading = read(&limits);
        gauges.disk_alarm.set(i64::from(reading.disk.is_some()));
        gauges.memory_alarm.set(i64::from(reading.memory.is_some()));
        if let Some(free) = reading.disk_free {
            gauges.disk_free.set(crate::metrics::gauge_value(free));
        }
        messaging.set_alarm(reading.disk.or(reading.memory));
    }
}

/// Looks at the disk and the memory: either alarm holds publishers back.
fn read(limits: &Limits) -> Reading {
    let mut reading = Reading::default();
    match rustix::fs::statvfs(&limits.data_dir) {
        Ok(fs) => {
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            reading.disk_free = Some(free);
            if free < limits.disk_free_limit {
                reading.disk = Some(format!(
                    "low on disk: {free} bytes free under {}, below the limit of {}",
                    limits.data_dir.display(),
                    limits.disk_free_limit
                ));
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the free disk space"),
    }
    reading.memory = match resident_bytes() {
        Some(rss) if rss > limits.memory_high_watermark => Some(format!(
            "memory: {rss} bytes resident, above the high watermark of {}",
            limits.memory_high_watermark
        )),
        _ => None,
    };
    reading
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

/// Starts watching for `messaging`, reporting in `gauges`.
pub fn start(
    limits: Limits,
    messaging: &Arc<Messaging>,
    gauges: Gauges,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch(limits, Arc::downgrade(messaging), gauges))
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
        let low = read(&limits(u64::MAX));
        assert!(low.disk.is_some_and(|a| a.contains("low on disk")));
        assert_eq!(low.memory, None);
        let fine = read(&limits(0));
        assert_eq!((fine.disk, fine.memory), (None, None));
        assert!(fine.disk_free.is_some_and(|free| free > 0));
        let memory = Limits {
            memory_high_watermark: 1,
            ..limits(0)
        };
        let high = read(&memory);
        assert!(high.memory.is_some_and(|a| a.contains("memory")));
        assert_eq!(high.disk, None);
    }
}
