//! `petrel serve` settings: read once from flags, environment and a YAML file.
//!
//! Every setting `name` is a flag `--name` (dashes), an environment variable
//! `PETREL_NAME` and a key `name` (underscores) in the optional config file given by
//! `--config` / `PETREL_CONFIG`. Precedence: flag > environment > file > default.
//! clap applies flag > environment into a [`Settings`]; [`Config::load`] lays the file's
//! [`Settings`] under it and [`Config::resolve`] fills defaults and validates.
//!
//! A key in the file that is not a setting is an error naming the key.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use petrel_log::{PartitionConfig, StorageConfig, SyncPolicy};
use serde::Deserialize;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default address every listener binds: all IPv4 interfaces.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Default port of the HTTP listener (health and metrics).
pub const DEFAULT_HTTP_PORT: u16 = 9464;
/// Default port of the internal listener (Raft between nodes).
pub const DEFAULT_INTERNAL_PORT: u16 = 9470;
/// Default port of the AMQP 0-9-1 listener (RabbitMQ's).
pub const DEFAULT_AMQP_PORT: u16 = 5672;
/// Default free disk space below which publishers are held back (RabbitMQ's 50 MB).
pub const DEFAULT_DISK_FREE_LIMIT_BYTES: u64 = 50_000_000;
/// Default node id of a single node.
pub const DEFAULT_NODE_ID: u64 = 1;
/// Log filter used when neither a log level setting nor `RUST_LOG` is given.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The settings of `petrel serve` as given by one source; `None` means "not given here".
///
/// The same struct is the clap argument group (flags and environment) and the YAML file's
/// schema, so a setting cannot exist in one and be missing from the other.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// YAML config file whose keys are the settings below, e.g. `http_port: 9464`
    #[arg(long, env = "PETREL_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Directory holding the node's data [default: ./data]
    #[arg(long, env = "PETREL_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// IP address every listener binds unless overridden [default: 0.0.0.0]
    #[arg(long, env = "PETREL_BIND", value_name = "IP")]
    pub bind: Option<IpAddr>,

    /// Port of the HTTP listener serving /healthz, /readyz and /metrics; 0 picks a free
    /// port [default: 9464]
    #[arg(long, env = "PETREL_HTTP_PORT", value_name = "PORT")]
    pub http_port: Option<u16>,

    /// IP address of the HTTP listener [default: the value of --bind]
    #[arg(long, env = "PETREL_HTTP_BIND", value_name = "IP")]
    pub http_bind: Option<IpAddr>,

    /// This node's id, unique in its cluster [default: 1]
    #[arg(long, env = "PETREL_NODE_ID", value_name = "ID")]
    pub node_id: Option<u64>,

    /// Every node of a new cluster, this one included: `id=host:port` of each internal
    /// listener, comma-separated, e.g. `1=10.0.0.1:9470,2=10.0.0.2:9470` [default: this
    /// node alone]
    #[arg(long, env = "PETREL_PEERS", value_name = "PEERS")]
    pub peers: Option<String>,

    /// Kubernetes mode: the peers' internal addresses as a pattern where `{}` stands for
    /// a StatefulSet ordinal, e.g. `petrel-{}.petrel-headless.default.svc:9470`, expanded
    /// for ordinals 0 to --replicas - 1; the node id is then this pod's ordinal, taken
    /// from the end of its hostname unless --node-id is given
    #[arg(long, env = "PETREL_PEER_PATTERN", value_name = "PATTERN")]
    pub peer_pattern: Option<String>,

    /// Kubernetes mode: the nodes that form a new cluster, ordinals 0 to N - 1 (the
    /// StatefulSet's first size); a pod with a higher ordinal joins them
    #[arg(long, env = "PETREL_REPLICAS", value_name = "N")]
    pub replicas: Option<u64>,

    /// Port of the internal listener (Raft between nodes); 0 picks a free port
    /// [default: 9470]
    #[arg(long, env = "PETREL_INTERNAL_PORT", value_name = "PORT")]
    pub internal_port: Option<u16>,

    /// IP address of the internal listener, and the address connections to peers leave
    /// from [default: the value of --bind]
    #[arg(long, env = "PETREL_INTERNAL_BIND", value_name = "IP")]
    pub internal_bind: Option<IpAddr>,

    /// Port of the AMQP 0-9-1 listener; 0 picks a free port [default: 5672]
    #[arg(long, env = "PETREL_AMQP_PORT", value_name = "PORT")]
    pub amqp_port: Option<u16>,

    /// IP address of the AMQP listener [default: the value of --bind]
    #[arg(long, env = "PETREL_AMQP_BIND", value_name = "IP")]
    pub amqp_bind: Option<IpAddr>,

    /// Free disk bytes under the data directory below which publishers are held back
    /// (AMQP connection.blocked) [default: 50000000]
    #[arg(long, env = "PETREL_DISK_FREE_LIMIT_BYTES", value_name = "BYTES")]
    pub disk_free_limit_bytes: Option<u64>,

    /// Resident memory above which publishers are held back [default: 40% of the
    /// machine's memory]
    #[arg(long, env = "PETREL_MEMORY_HIGH_WATERMARK_BYTES", value_name = "BYTES")]
    pub memory_high_watermark_bytes: Option<u64>,

    /// Log line format [default: text]
    #[arg(long, env = "PETREL_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter as tracing EnvFilter directives, e.g. `info,petrel_server=debug`
    /// [default: $RUST_LOG, else info]
    #[arg(long, env = "PETREL_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// When an append counts as durable, for destinations that do not choose
    /// [default: always]
    #[arg(long, env = "PETREL_FSYNC_POLICY", value_name = "POLICY")]
    pub fsync_policy: Option<FsyncPolicy>,

    /// Longest time between syncs under the `interval` policy, in milliseconds
    /// [default: the storage engine's]
    #[arg(long, env = "PETREL_SYNC_INTERVAL_MS", value_name = "MS")]
    pub sync_interval_ms: Option<u64>,

    /// Size at which a partition's segment file is rolled, in bytes
    /// [default: the storage engine's]
    #[arg(long, env = "PETREL_SEGMENT_BYTES", value_name = "BYTES")]
    pub segment_bytes: Option<u64>,

    /// Size at which the node's write-ahead log is rolled, in bytes
    /// [default: the storage engine's]
    #[arg(long, env = "PETREL_WAL_MAX_BYTES", value_name = "BYTES")]
    pub wal_max_bytes: Option<u64>,

    /// Memory for recently written entries kept for reads, in bytes
    /// [default: the storage engine's]
    #[arg(long, env = "PETREL_CACHE_BYTES", value_name = "BYTES")]
    pub cache_bytes: Option<u64>,

    /// Memory for small appends waiting to be written to their segments (they are in the
    /// write-ahead log meanwhile), in bytes; 0 writes every append through at once
    /// [default: the storage engine's]
    #[arg(long, env = "PETREL_WRITE_BUFFER_BYTES", value_name = "BYTES")]
    pub write_buffer_bytes: Option<u64>,
}

impl Settings {
    /// Parses a YAML config file's text; an empty file sets nothing.
    pub fn from_yaml(text: &str) -> Result<Settings, serde_yaml::Error> {
        // An empty (or comment-only) document is YAML null, which is no mapping.
        Ok(serde_yaml::from_str::<Option<Settings>>(text)?.unwrap_or_default())
    }

    /// Each setting from `self` if given there, else from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            config: self.config.or(lower.config),
            data_dir: self.data_dir.or(lower.data_dir),
            bind: self.bind.or(lower.bind),
            http_port: self.http_port.or(lower.http_port),
            http_bind: self.http_bind.or(lower.http_bind),
            node_id: self.node_id.or(lower.node_id),
            peers: self.peers.or(lower.peers),
            peer_pattern: self.peer_pattern.or(lower.peer_pattern),
            replicas: self.replicas.or(lower.replicas),
            internal_port: self.internal_port.or(lower.internal_port),
            internal_bind: self.internal_bind.or(lower.internal_bind),
            amqp_port: self.amqp_port.or(lower.amqp_port),
            amqp_bind: self.amqp_bind.or(lower.amqp_bind),
            disk_free_limit_bytes: self.disk_free_limit_bytes.or(lower.disk_free_limit_bytes),
            memory_high_watermark_bytes: self
                .memory_high_watermark_bytes
                .or(lower.memory_high_watermark_bytes),
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
            fsync_policy: self.fsync_policy.or(lower.fsync_policy),
            sync_interval_ms: self.sync_interval_ms.or(lower.sync_interval_ms),
            segment_bytes: self.segment_bytes.or(lower.segment_bytes),
            wal_max_bytes: self.wal_max_bytes.or(lower.wal_max_bytes),
            cache_bytes: self.cache_bytes.or(lower.cache_bytes),
            write_buffer_bytes: self.write_buffer_bytes.or(lower.write_buffer_bytes),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The node's default durability policy (DESIGN.md §4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Acknowledge an append only after fsync covered it.
    #[default]
    Always,
    /// Acknowledge at once; sync at least every `sync_interval_ms`.
    Interval,
    /// Acknowledge at once; never sync, rely on replication.
    Never,
}

impl From<FsyncPolicy> for SyncPolicy {
    fn from(policy: FsyncPolicy) -> SyncPolicy {
        match policy {
            FsyncPolicy::Always => SyncPolicy::Always,
            FsyncPolicy::Interval => SyncPolicy::Interval,
            FsyncPolicy::Never => SyncPolicy::Never,
        }
    }
}

/// Storage settings passed through to `petrel-log`; `None` keeps the engine's default.
///
/// `fsync_policy` and `segment_bytes` are per-partition defaults
/// ([`Config::partition_defaults`]); the rest are node-wide ([`Config::storage_config`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageSettings {
    /// The node's default durability policy.
    pub fsync_policy: FsyncPolicy,
    /// Longest time between syncs under [`FsyncPolicy::Interval`], in milliseconds.
    pub sync_interval_ms: Option<u64>,
    /// Segment roll size in bytes.
    pub segment_bytes: Option<u64>,
    /// Write-ahead log roll size in bytes.
    pub wal_max_bytes: Option<u64>,
    /// Read cache size in bytes.
    pub cache_bytes: Option<u64>,
    /// Write buffer budget in bytes (0: write through).
    pub write_buffer_bytes: Option<u64>,
}

/// The resolved configuration of one node: every default filled, every value checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory holding the node's data.
    pub data_dir: PathBuf,
    /// Address every listener binds unless overridden.
    pub bind: IpAddr,
    /// Port of the HTTP listener; 0 picks a free one.
    pub http_port: u16,
    /// Address of the HTTP listener, overriding [`Config::bind`].
    pub http_bind: Option<IpAddr>,
    /// This node's id.
    pub node_id: u64,
    /// The nodes of a new cluster (this one included) by id, at their internal
    /// addresses; empty for a single node.
    pub peers: BTreeMap<u64, String>,
    /// Port of the internal listener; 0 picks a free one.
    pub internal_port: u16,
    /// Address of the internal listener, overriding [`Config::bind`].
    pub internal_bind: Option<IpAddr>,
    /// Port of the AMQP listener; 0 picks a free one.
    pub amqp_port: u16,
    /// Address of the AMQP listener, overriding [`Config::bind`].
    pub amqp_bind: Option<IpAddr>,
    /// Free disk bytes below which publishers are held back.
    pub disk_free_limit_bytes: u64,
    /// Resident bytes above which publishers are held back; `None`: 40% of the memory.
    pub memory_high_watermark_bytes: Option<u64>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter directives; `None` means `RUST_LOG`, else [`DEFAULT_LOG_LEVEL`].
    pub log_level: Option<String>,
    /// Settings handed to the storage engine.
    pub storage: StorageSettings,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            bind: DEFAULT_BIND,
            http_port: DEFAULT_HTTP_PORT,
            http_bind: None,
            node_id: DEFAULT_NODE_ID,
            peers: BTreeMap::new(),
            internal_port: DEFAULT_INTERNAL_PORT,
            internal_bind: None,
            amqp_port: DEFAULT_AMQP_PORT,
            amqp_bind: None,
            disk_free_limit_bytes: DEFAULT_DISK_FREE_LIMIT_BYTES,
            memory_high_watermark_bytes: None,
            log_format: LogFormat::default(),
            log_level: None,
            storage: StorageSettings::default(),
        }
    }
}

impl Config {
    /// Reads the config file named by `settings.config` (if any), lays it under
    /// `settings`, and resolves the result.
    pub fn load(settings: Settings) -> Result<Config, ConfigError> {
        let from_file = match &settings.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        Config::resolve(settings.or(from_file))
    }

    /// Fills defaults for every setting not given and checks the values.
    pub fn resolve(settings: Settings) -> Result<Config, ConfigError> {
        let defaults = Config::default();
        let config = Config {
            data_dir: settings.data_dir.unwrap_or(defaults.data_dir),
            bind: settings.bind.unwrap_or(defaults.bind),
            http_port: settings.http_port.unwrap_or(defaults.http_port),
            http_bind: settings.http_bind,
            node_id: match (settings.node_id, &settings.peer_pattern) {
                (Some(id), _) => id,
                (None, Some(_)) => ordinal(&hostname())?,
                (None, None) => defaults.node_id,
            },
            peers: match (&settings.peers, &settings.peer_pattern) {
                (Some(_), Some(_)) => return Err(ConfigError::PeersTwice),
                (Some(text), None) => parse_peers(text)?,
                (None, Some(pattern)) => expand_peers(pattern, settings.replicas)?,
                (None, None) => defaults.peers,
            },
            internal_port: settings.internal_port.unwrap_or(defaults.internal_port),
            internal_bind: settings.internal_bind,
            amqp_port: settings.amqp_port.unwrap_or(defaults.amqp_port),
            amqp_bind: settings.amqp_bind,
            disk_free_limit_bytes: settings
                .disk_free_limit_bytes
                .unwrap_or(defaults.disk_free_limit_bytes),
            memory_high_watermark_bytes: settings.memory_high_watermark_bytes,
            log_format: settings.log_format.unwrap_or(defaults.log_format),
            log_level: settings.log_level,
            storage: StorageSettings {
                fsync_policy: settings.fsync_policy.unwrap_or_default(),
                sync_interval_ms: positive("sync_interval_ms", settings.sync_interval_ms)?,
                segment_bytes: positive("segment_bytes", settings.segment_bytes)?,
                wal_max_bytes: positive("wal_max_bytes", settings.wal_max_bytes)?,
                cache_bytes: positive("cache_bytes", settings.cache_bytes)?,
                write_buffer_bytes: settings.write_buffer_bytes,
            },
        };
        if config.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::EmptyDataDir);
        }
        let mut config = config;
        // Kubernetes mode: a pod beyond the seed (the StatefulSet grew) joins the cluster
        // the seed formed, through its members.
        if let (Some(pattern), false) = (
            &settings.peer_pattern,
            config.peers.contains_key(&config.node_id),
        ) {
            let addr = pattern.replace("{}", &config.node_id.to_string());
            config.peers.insert(config.node_id, addr);
        }
        if !config.peers.is_empty() && !config.peers.contains_key(&config.node_id) {
            return Err(ConfigError::NodeNotInPeers {
                node_id: config.node_id,
            });
        }
        Ok(config)
    }

    /// The address the internal listener binds.
    pub fn internal_addr(&self) -> SocketAddr {
        SocketAddr::new(self.internal_bind.unwrap_or(self.bind), self.internal_port)
    }

    /// The address the AMQP listener binds.
    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.amqp_bind.unwrap_or(self.bind), self.amqp_port)
    }

    /// The address the HTTP listener binds.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.http_bind.unwrap_or(self.bind), self.http_port)
    }

    /// The storage engine's node-wide configuration: petrel-log's defaults, overridden
    /// by the settings given.
    pub fn storage_config(&self) -> StorageConfig {
        let mut config = StorageConfig::new(self.data_dir.clone());
        let storage = &self.storage;
        if let Some(bytes) = storage.wal_max_bytes {
            config.wal_max_bytes = bytes;
        }
        if let Some(ms) = storage.sync_interval_ms {
            config.sync_interval = Duration::from_millis(ms);
        }
        if let Some(bytes) = storage.cache_bytes {
            // Only a 32-bit target can overflow; the whole address space is the cap then.
            config.cache_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        }
        if let Some(bytes) = storage.write_buffer_bytes {
            config.write_buffer_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        }
        config
    }

    /// The settings a partition gets unless its destination chooses its own:
    /// petrel-log's defaults, overridden by the node's fsync policy and segment size.
    pub fn partition_defaults(&self) -> PartitionConfig {
        let mut config = PartitionConfig {
            sync_policy: self.storage.fsync_policy.into(),
            ..PartitionConfig::default()
        };
        if let Some(bytes) = self.storage.segment_bytes {
            config.segment_bytes = bytes;
        }
        config
    }
}

/// This machine's hostname (a pod's name in Kubernetes).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The StatefulSet ordinal at the end of a pod's hostname (`petrel-2` → 2).
fn ordinal(hostname: &str) -> Result<u64, ConfigError> {
    hostname
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| ConfigError::NoOrdinal {
            hostname: hostname.to_owned(),
        })
}

/// The peers of a StatefulSet: `pattern` with `{}` replaced by each ordinal.
fn expand_peers(
    pattern: &str,
    replicas: Option<u64>,
) -> Result<BTreeMap<u64, String>, ConfigError> {
    let replicas = match replicas {
        Some(0) => return Err(ConfigError::Zero { key: "replicas" }),
        Some(n) => n,
        None => return Err(ConfigError::PatternWithoutReplicas),
    };
    if pattern.matches("{}").count() != 1 {
        return Err(ConfigError::Peers {
            value: pattern.to_owned(),
            reason: "a peer pattern holds `{}` exactly once".to_owned(),
        });
    }
    let list = (0..replicas)
        .map(|i| format!("{i}={}", pattern.replace("{}", &i.to_string())))
        .collect::<Vec<_>>()
        .join(",");
    parse_peers(&list)
}

/// Parses `id=host:port,…`.
fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let invalid = |reason: String| ConfigError::Peers {
        value: text.to_owned(),
        reason,
    };
    let mut peers = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, addr) = entry
            .split_once('=')
            .ok_or_else(|| invalid(format!("`{entry}` is not id=host:port")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| invalid(format!("`{id}` is not a node id")))?;
        let addr = addr.trim();
        let port = addr
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
            return Err(invalid(format!("`{addr}` is not host:port")));
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(invalid(format!("node {id} is listed twice")));
        }
    }
    Ok(peers)
}

/// Rejects a zero for a setting that must be positive.
fn positive(key: &'static str, value: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::Zero { key }),
        other => Ok(other),
    }
}

/// Reads and parses one config file.
fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Settings::from_yaml(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file named by `--config` / `PETREL_CONFIG`.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML, has an unknown key or a value of the wrong type.
    #[error("invalid config file {}", path.display())]
    Parse {
        /// The file named by `--config` / `PETREL_CONFIG`.
        path: PathBuf,
        /// The parser's error; it names the offending key and its line.
        #[source]
        source: serde_yaml::Error,
    },
    /// A setting that must be positive is 0.
    #[error("setting `{key}` must be greater than 0")]
    Zero {
        /// The setting's config-file key.
        key: &'static str,
    },
    /// `data_dir` is the empty string.
    #[error("setting `data_dir` must not be empty")]
    EmptyDataDir,
    /// `peers` does not parse.
    #[error("setting `peers` is invalid ({reason}): {value:?}")]
    Peers {
        /// The setting as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Both `peers` and `peer_pattern` are given.
    #[error("settings `peers` and `peer_pattern` exclude each other")]
    PeersTwice,
    /// `peer_pattern` is given without `replicas`.
    #[error("setting `peer_pattern` needs `replicas`")]
    PatternWithoutReplicas,
    /// Kubernetes mode without `node_id`, and the hostname ends in no ordinal.
    #[error(
        "cannot take a node id from hostname {hostname:?} (no `-<ordinal>` at its end); set `node_id`"
    )]
    NoOrdinal {
        /// The hostname found.
        hostname: String,
    },
    /// `peers` lists other nodes but not this one.
    #[error("setting `peers` does not list this node (node_id {node_id})")]
    NodeNotInPeers {
        /// This node's id.
        node_id: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn flags(args: &[&str]) -> Settings {
        let argv = std::iter::once("petrel").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.settings,
            Err(err) => panic!("flags {args:?} rejected: {err}"),
        }
    }

    #[test]
    fn nothing_given_resolves_to_the_documented_defaults() {
        let config = Config::resolve(Settings::default()).expect("defaults are valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.http_addr(), "0.0.0.0:9464".parse().expect("literal"));
        assert_eq!(config.storage.fsync_policy, FsyncPolicy::Always);
        assert_eq!(
            SyncPolicy::from(config.storage.fsync_policy),
            SyncPolicy::default()
        );
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let file = Settings::from_yaml("http_port: 7000\ndata_dir: /from/file\n").expect("valid");
        let config = Config::resolve(flags(&["--http-port", "8000"]).or(file)).expect("valid");
        assert_eq!(config.http_port, 8000);
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.bind, DEFAULT_BIND);
    }

    #[test]
    fn http_bind_overrides_bind_for_the_http_listener_only() {
        let config = Config::resolve(flags(&["--bind", "10.1.2.3", "--http-bind", "127.0.0.1"]))
            .expect("valid");
        assert_eq!(config.bind, "10.1.2.3".parse::<IpAddr>().expect("literal"));
        assert_eq!(
            config.http_addr(),
            "127.0.0.1:9464".parse().expect("literal")
        );
    }

    #[test]
    fn every_setting_is_a_config_file_key() {
        let yaml = "\
data_dir: /var/lib/petrel
bind: '::'
http_port: 9000
http_bind: 127.0.0.1
node_id: 2
peers: 1=10.0.0.1:9470, 2=10.0.0.2:9470
internal_port: 9471
internal_bind: 10.0.0.2
log_format: json
log_level: debug
fsync_policy: interval
sync_interval_ms: 50
segment_bytes: 1048576
wal_max_bytes: 2097152
cache_bytes: 4096
write_buffer_bytes: 0
";
        let config = Config::resolve(Settings::from_yaml(yaml).expect("valid")).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/petrel"));
        assert_eq!(config.bind, "::".parse::<IpAddr>().expect("literal"));
        assert_eq!(
            config.http_addr(),
            "127.0.0.1:9000".parse().expect("literal")
        );
        assert_eq!(config.node_id, 2);
        assert_eq!(
            config.peers,
            BTreeMap::from([
                (1, "10.0.0.1:9470".to_owned()),
                (2, "10.0.0.2:9470".to_owned())
            ])
        );
        assert_eq!(
            config.internal_addr(),
            "10.0.0.2:9471".parse().expect("literal")
        );
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level.as_deref(), Some("debug"));
        assert_eq!(
            config.storage,
            StorageSettings {
                fsync_policy: FsyncPolicy::Interval,
                sync_interval_ms: Some(50),
                segment_bytes: Some(1_048_576),
                wal_max_bytes: Some(2_097_152),
                cache_bytes: Some(4096),
                write_buffer_bytes: Some(0),
            }
        );
    }

    #[test]
    fn the_readme_config_file_example_is_valid_and_complete() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```yaml\n# petrel.yaml")
            .expect("the README has the example")
            + "```yaml\n".len();
        let len = readme[start..].find("```").expect("the example ends");
        let settings = Settings::from_yaml(&readme[start..start + len]).expect("valid YAML");
        Config::resolve(settings.clone()).expect("valid settings");
        // Destructured whole, so a new setting cannot be left out of the example unnoticed.
        let Settings {
            config,
            data_dir,
            bind,
            http_port,
            http_bind,
            node_id,
            peers,
            peer_pattern,
            replicas,
            internal_port,
            internal_bind,
            amqp_port,
            amqp_bind,
            disk_free_limit_bytes,
            memory_high_watermark_bytes,
            log_format,
            log_level,
            fsync_policy,
            sync_interval_ms,
            segment_bytes,
            wal_max_bytes,
            cache_bytes,
            write_buffer_bytes,
        } = settings;
        // A file does not name itself; `http_bind`, `peers` and `internal_bind` are shown
        // commented out.
        assert!(config.is_none() && http_bind.is_none());
        assert!(peers.is_none() && internal_bind.is_none() && amqp_bind.is_none());
        assert!(amqp_port.is_some());
        assert!(disk_free_limit_bytes.is_some() && memory_high_watermark_bytes.is_some());
        assert!(peer_pattern.is_none() && replicas.is_none());
        assert!(node_id.is_some() && internal_port.is_some());
        assert!(data_dir.is_some() && bind.is_some() && http_port.is_some());
        assert!(log_format.is_some() && log_level.is_some() && fsync_policy.is_some());
        assert!(sync_interval_ms.is_some() && segment_bytes.is_some());
        assert!(wal_max_bytes.is_some() && cache_bytes.is_some() && write_buffer_bytes.is_some());
    }

    #[test]
    fn peers_are_checked_and_must_include_this_node() {
        let resolve =
            |peers: &str, id: &str| Config::resolve(flags(&["--peers", peers, "--node-id", id]));
        let config = resolve(" 1=a:1 , 3=[::1]:9,2=b.example:65535,", "3").expect("valid");
        assert_eq!(config.peers.len(), 3);
        assert_eq!(config.peers[&3], "[::1]:9");
        for bad in ["1", "x=a:1", "1=a", "1=:5", "1=a:99999", "1=a:1,1=b:2"] {
            let err = resolve(bad, "1").expect_err(bad);
            assert!(matches!(err, ConfigError::Peers { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        let err = resolve("1=a:1,2=b:2", "3").expect_err("not listed");
        assert_eq!(
            err.to_string(),
            "setting `peers` does not list this node (node_id 3)"
        );
        let single = Config::resolve(flags(&[])).expect("valid");
        assert!(single.peers.is_empty());
        assert_eq!((single.node_id, single.internal_port), (1, 9470));
    }

    #[test]
    fn kubernetes_mode_derives_peers_from_a_pattern_and_the_id_from_the_hostname() {
        let config = Config::resolve(flags(&[
            "--peer-pattern",
            "petrel-{}.petrel.default.svc:9470",
            "--replicas",
            "3",
            "--node-id",
            "2",
        ]))
        .expect("valid");
        assert_eq!(config.peers.len(), 3);
        assert_eq!(config.peers[&0], "petrel-0.petrel.default.svc:9470");
        assert_eq!(config.peers[&2], "petrel-2.petrel.default.svc:9470");
        // A pod beyond the seed of 3 (the StatefulSet grew) joins through it.
        let grown = Config::resolve(flags(&[
            "--peer-pattern",
            "petrel-{}.petrel.default.svc:9470",
            "--replicas",
            "3",
            "--node-id",
            "5",
        ]))
        .expect("valid");
        assert_eq!(
            grown.peers.keys().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 5]
        );
        assert_eq!(grown.peers[&5], "petrel-5.petrel.default.svc:9470");
        assert_eq!(ordinal("petrel-12").expect("ordinal"), 12);
        assert_eq!(ordinal("my-broker-0").expect("ordinal"), 0);
        let none = ordinal("petrel").expect_err("no ordinal");
        assert!(none.to_string().contains("set `node_id`"), "{none}");
        let refusals = [
            (vec!["--peer-pattern", "p-{}:1"], "needs `replicas`"),
            (
                vec!["--peer-pattern", "p-{}:1", "--replicas", "0"],
                "`replicas` must be greater than 0",
            ),
            (
                vec!["--peer-pattern", "p:1", "--replicas", "2", "--node-id", "0"],
                "exactly once",
            ),
            (
                vec![
                    "--peer-pattern",
                    "p-{}:1",
                    "--peers",
                    "0=p:1",
                    "--replicas",
                    "1",
                ],
                "exclude each other",
            ),
        ];
        for (mut args, expected) in refusals {
            // An id given, so these do not depend on this machine's hostname.
            if !args.contains(&"--node-id") {
                args.extend(["--node-id", "0"]);
            }
            let err = Config::resolve(flags(&args)).expect_err(expected);
            assert!(err.to_string().contains(expected), "{args:?}: {err}");
        }
    }

    #[test]
    fn every_setting_is_a_flag() {
        let settings = flags(&[
            "--config=c.yaml",
            "--data-dir=d",
            "--bind=127.0.0.1",
            "--http-port=1",
            "--http-bind=::1",
            "--node-id=6",
            "--peers=6=a:1",
            "--peer-pattern=p-{}:1",
            "--replicas=8",
            "--internal-port=7",
            "--internal-bind=::2",
            "--amqp-port=9",
            "--amqp-bind=::3",
            "--disk-free-limit-bytes=10",
            "--memory-high-watermark-bytes=11",
            "--log-format=json",
            "--log-level=warn",
            "--fsync-policy=never",
            "--sync-interval-ms=1",
            "--segment-bytes=2",
            "--wal-max-bytes=3",
            "--cache-bytes=4",
            "--write-buffer-bytes=5",
        ]);
        let every_field_given = Settings {
            config: Some("c.yaml".into()),
            data_dir: Some("d".into()),
            bind: Some("127.0.0.1".parse().expect("literal")),
            http_port: Some(1),
            http_bind: Some("::1".parse().expect("literal")),
            node_id: Some(6),
            peers: Some("6=a:1".to_owned()),
            peer_pattern: Some("p-{}:1".to_owned()),
            replicas: Some(8),
            internal_port: Some(7),
            internal_bind: Some("::2".parse().expect("literal")),
            amqp_port: Some(9),
            amqp_bind: Some("::3".parse().expect("literal")),
            disk_free_limit_bytes: Some(10),
            memory_high_watermark_bytes: Some(11),
            log_format: Some(LogFormat::Json),
            log_level: Some("warn".to_owned()),
            fsync_policy: Some(FsyncPolicy::Never),
            sync_interval_ms: Some(1),
            segment_bytes: Some(2),
            wal_max_bytes: Some(3),
            cache_bytes: Some(4),
            write_buffer_bytes: Some(5),
        };
        assert_eq!(settings, every_field_given);
    }

    #[test]
    fn storage_settings_reach_the_storage_and_partition_configs() {
        let config = Config::resolve(flags(&[
            "--data-dir=/d",
            "--fsync-policy=never",
            "--sync-interval-ms=7",
            "--segment-bytes=8192",
            "--wal-max-bytes=65536",
            "--cache-bytes=1024",
            "--write-buffer-bytes=2048",
        ]))
        .expect("valid");
        let storage = config.storage_config();
        assert_eq!(storage.dir, PathBuf::from("/d"));
        assert_eq!(storage.wal_max_bytes, 65536);
        assert_eq!(storage.sync_interval, Duration::from_millis(7));
        assert_eq!(storage.cache_bytes, 1024);
        assert_eq!(storage.write_buffer_bytes, 2048);
        let partition = config.partition_defaults();
        assert_eq!(partition.sync_policy, SyncPolicy::Never);
        assert_eq!(partition.segment_bytes, 8192);
    }

    #[test]
    fn unset_storage_settings_keep_the_engine_defaults() {
        let config = Config::default();
        let engine = StorageConfig::new(DEFAULT_DATA_DIR);
        let storage = config.storage_config();
        assert_eq!(storage.wal_max_bytes, engine.wal_max_bytes);
        assert_eq!(storage.sync_interval, engine.sync_interval);
        assert_eq!(storage.cache_bytes, engine.cache_bytes);
        assert_eq!(storage.write_buffer_bytes, engine.write_buffer_bytes);
        let partition = config.partition_defaults();
        assert_eq!(
            partition.segment_bytes,
            PartitionConfig::default().segment_bytes
        );
        assert_eq!(partition.sync_policy, SyncPolicy::Always);
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = Settings::from_yaml("http_port: 1\nhttp_prot: 2\n").expect_err("unknown key");
        assert!(err.to_string().contains("http_prot"), "{err}");
    }

    #[test]
    fn the_config_key_itself_is_not_accepted_inside_a_file() {
        let err = Settings::from_yaml("config: other.yaml\n").expect_err("unknown key");
        assert!(err.to_string().contains("config"), "{err}");
    }

    #[test]
    fn an_empty_or_comment_only_file_sets_nothing() {
        assert_eq!(Settings::from_yaml("").expect("valid"), Settings::default());
        assert_eq!(
            Settings::from_yaml("# nothing\n").expect("valid"),
            Settings::default()
        );
    }

    #[test]
    fn a_zero_size_is_rejected_naming_the_setting() {
        let err = Config::resolve(flags(&["--segment-bytes", "0"])).expect_err("zero");
        assert!(err.to_string().contains("segment_bytes"), "{err}");
    }

    #[test]
    fn an_empty_data_dir_is_rejected() {
        let settings = Settings::from_yaml("data_dir: ''\n").expect("valid");
        assert!(matches!(
            Config::resolve(settings),
            Err(ConfigError::EmptyDataDir)
        ));
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_it() {
        let settings = flags(&["--config", "/nonexistent/petrel.yaml"]);
        let err = Config::load(settings).expect_err("missing file");
        assert!(
            err.to_string().contains("/nonexistent/petrel.yaml"),
            "{err}"
        );
    }
}
