//! The `petrel` broker node: configuration, listeners, health, metrics and lifecycle.
//!
//! * `config`: [`Settings`] of `petrel serve` from flags, environment and YAML file,
//!   resolved into a [`Config`].
//! * [`Server`] / [`run`] (here): the node's life: bind the HTTP and internal listeners,
//!   open storage, join the cluster (`petrel_core::cluster`), report ready, wait for
//!   shutdown, drain, leave, close storage.
//! * `http`: `/healthz`, `/readyz` and `/metrics`.
//! * [`Metrics`]: the Prometheus registry: the server's gauges, the protocol front-ends'
//!   counters, and partition and queue gauges refreshed from the core.
//! * [`Readiness`]: the node's phase (starting, ready, stopping).
//! * [`ShutdownSignal`]: SIGTERM / SIGINT.
//! * [`init_logging`]: text or JSON logs through tracing.
//!
//! `main.rs` only parses the command line and calls [`run`]; tests call [`Server`]
//! directly. Protocol listeners and the admin gRPC service will be started from here.

mod admin;
pub mod cli;
mod config;
mod http;
mod logging;
mod metrics;
mod readiness;
mod resources;
mod signal;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use petrel_core::cluster::{ClusterError, ClusterNode, NodeConfig};
use petrel_log::Storage;
use tokio::net::TcpListener;

pub use config::{
    Config, ConfigError, DEFAULT_BIND, DEFAULT_DATA_DIR, DEFAULT_HTTP_PORT, DEFAULT_INTERNAL_PORT,
    DEFAULT_LOG_LEVEL, DEFAULT_NODE_ID, FsyncPolicy, LogFormat, Settings, StorageSettings,
};
pub use logging::{LoggingError, init as init_logging};
pub use metrics::Metrics;
pub use readiness::{Phase, Readiness};
pub use signal::ShutdownSignal;

/// How long in-flight HTTP requests may take to finish once shutdown began.
const HTTP_DRAIN: Duration = Duration::from_secs(5);
/// How long a stopping node waits for its queues to commit what consumers acked.
const SETTLE_DRAIN: Duration = Duration::from_secs(5);

/// Why the node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The HTTP listener's address could not be bound (in use, not local, no permission).
    #[error("cannot listen for HTTP on {addr}")]
    Bind {
        /// The address from the configuration.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The AMQP listener's address could not be bound.
    #[error("cannot listen for AMQP on {addr}")]
    BindAmqp {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The internal listener's address could not be bound.
    #[error("cannot listen for peers on {addr}")]
    BindInternal {
        /// The address from the configuration.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The node could not start or leave its cluster.
    #[error("cluster node {node_id}")]
    Cluster {
        /// This node's id.
        node_id: u64,
        /// What failed.
        #[source]
        source: Box<ClusterError>,
    },
    /// The storage under the data directory could not be opened or recovered.
    #[error("cannot open storage in {}", dir.display())]
    OpenStorage {
        /// The data directory.
        dir: PathBuf,
        /// The storage engine's error.
        #[source]
        source: petrel_log::Error,
    },
    /// The storage could not be closed cleanly; the next start will recover it.
    #[error("cannot close storage in {}", dir.display())]
    CloseStorage {
        /// The data directory.
        dir: PathBuf,
        /// The storage engine's error.
        #[source]
        source: petrel_log::Error,
    },
    /// Opening or closing storage panicked.
    #[error("storage task for {} failed", dir.display())]
    StorageTask {
        /// The data directory.
        dir: PathBuf,
        /// The task's failure.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The metrics registry rejected a metric (a duplicate or invalid name).
    #[error("cannot register metrics")]
    Metrics(#[source] prometheus::Error),
}

/// Runs a node with `config` until `shutdown` completes, then stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Server::bind(config).await?.run(shutdown).await
}

/// A node whose HTTP listener is bound and answering and whose internal listener is
/// bound, with storage not yet open.
pub struct Server {
    config: Config,
    http: http::HttpServer,
    internal: TcpListener,
    amqp: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
}

impl Server {
    /// Binds the HTTP listener and starts serving it; `/readyz` answers 503 until
    /// [`Server::run`] has opened storage.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let metrics = Metrics::new().map_err(Error::Metrics)?;
        let readiness = Readiness::default();
        let addr = config.http_addr();
        let bind_error = |source| Error::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        tracing::info!(addr = %local, "http listener bound");
        let addr = config.internal_addr();
        let bind_error = |source| Error::BindInternal { addr, source };
        let internal = TcpListener::bind(addr).await.map_err(bind_error)?;
        tracing::info!(addr = %internal.local_addr().map_err(bind_error)?, "internal listener bound");
        let addr = config.amqp_addr();
        let bind_error = |source| Error::BindAmqp { addr, source };
        let amqp = TcpListener::bind(addr).await.map_err(bind_error)?;
        tracing::info!(addr = %amqp.local_addr().map_err(bind_error)?, "amqp listener bound");
        let http = http::HttpServer::start(listener, local, readiness.clone(), metrics.clone());
        Ok(Server {
            config,
            http,
            internal,
            amqp,
            readiness,
            metrics,
        })
    }

    /// The address the internal listener actually bound (useful with port 0).
    pub fn internal_addr(&self) -> std::io::Result<SocketAddr> {
        self.internal.local_addr()
    }

    /// The address the AMQP listener actually bound (useful with port 0).
    pub fn amqp_addr(&self) -> std::io::Result<SocketAddr> {
        self.amqp.local_addr()
    }

    /// The address the HTTP listener actually bound (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// The node's phase, as `/readyz` reports it.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The node's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Opens storage, reports ready, waits for `shutdown`, then drains HTTP and closes
    /// storage. A shutdown during startup waits for storage to finish opening, then
    /// closes it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            config,
            http,
            internal,
            amqp,
            readiness,
            metrics,
        } = self;
        let dir = config.data_dir.clone();
        tracing::info!(
            data_dir = %dir.display(),
            fsync_policy = %petrel_log::SyncPolicy::from(config.storage.fsync_policy),
            "opening storage"
        );
        let storage_config = config.storage_config();
        let mut opening = tokio::task::spawn_blocking(move || Storage::open(storage_config));
        tokio::pin!(shutdown);

        // `None`: shutdown was requested before storage finished opening.
        let opened = tokio::select! {
            opened = &mut opening => Some(opened_storage(opened, &dir)),
            () = &mut shutdown => None,
        };
        let storage = match opened {
            Some(Err(err)) => {
                readiness.advance(Phase::Stopping);
                http.stop(HTTP_DRAIN).await;
                return Err(err);
            }
            Some(Ok(storage)) => {
                let admin =
                    admin::AdminService::new(config.node_id, &config.data_dir, readiness.clone());
                let queues = petrel_core::messaging::MessagingSlot::default();
                let node = match join_cluster(&config, storage, internal, &admin, &queues).await {
                    Ok(node) => node,
                    Err(err) => {
                        readiness.advance(Phase::Stopping);
                        http.stop(HTTP_DRAIN).await;
                        return Err(err);
                    }
                };
                admin.started(node.clone());
                let (stop_amqp, amqp_stopped) = tokio::sync::watch::channel(false);
                let amqp_addr = amqp.local_addr().ok();
                let messaging = petrel_core::messaging::Messaging::new(node.clone());
                queues.set(&messaging);
                admin.messaging_started(messaging.clone());
                let alarms = resources::start(
                    resources::Limits {
                        data_dir: config.data_dir.clone(),
                        disk_free_limit: config.disk_free_limit_bytes,
                        memory_high_watermark: config
                            .memory_high_watermark_bytes
                            .unwrap_or_else(resources::default_memory_high_watermark),
                    },
                    &messaging,
                    metrics.resources(),
                );
                let amqp = tokio::spawn(petrel_protocols::amqp::serve(
                    amqp,
                    messaging.clone(),
                    petrel_protocols::amqp::Settings::default(),
                    metrics.protocols(),
                    amqp_stopped,
                ));
                let watching = metrics.watch_cluster(node.metadata());
                let refreshing = metrics.watch_node(node.clone(), messaging.clone());
                // Ready (clients sent here) only once a member: before, this node's
                // metadata may be missing or behind, so its answers would be wrong.
                let joined = tokio::select! {
                    () = node.joined() => true,
                    () = &mut shutdown => false,
                };
                if joined {
                    readiness.advance(Phase::Ready);
                    metrics.set_up(true);
                    tracing::info!(
                        http = %http.local_addr(),
                        internal = %node.addr(),
                        amqp = ?amqp_addr,
                        node_id = node.id(),
                        version = env!("CARGO_PKG_VERSION"),
                        "petrel is ready"
                    );
                    shutdown.await;
                }
                let _ = stop_amqp.send(true);
                let _ = amqp.await;
                alarms.abort();
                messaging.drain(SETTLE_DRAIN).await;
                watching.abort();
                refreshing.abort();
                // Awaited, so that its hold on the node is gone before the node closes.
                let _ = refreshing.await;
                Some(node)
            }
            None => None,
        };

        tracing::info!("shutting down");
        readiness.advance(Phase::Stopping);
        metrics.set_up(false);
        http.stop(HTTP_DRAIN).await;
        match storage {
            Some(node) => {
                tracing::info!(data_dir = %dir.display(), "leaving the cluster and closing storage");
                let node_id = node.id();
                node.close().await.map_err(|source| match source {
                    ClusterError::Storage(source) => Error::CloseStorage { dir, source },
                    source => Error::Cluster {
                        node_id,
                        source: Box::new(source),
                    },
                })?;
            }
            None => {
                tracing::info!("waiting for storage to finish opening before closing it");
                close_storage(opened_storage(opening.await, &dir)?, dir).await?;
            }
        }
        tracing::info!("petrel stopped");
        Ok(())
    }
}

/// Raft timings of every group: heartbeats every 150 ms, an election 0.5–1 s after the
/// leader went silent (a new leader typically within 2 s: failover must stay under 5).
/// An append carries at most 64 entries, each a batch of at most 1 MiB unless a single
/// produce was larger.
fn raft_config() -> openraft::Config {
    openraft::Config {
        heartbeat_interval: 150,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        max_payload_entries: 64,
        ..openraft::Config::default()
    }
}

/// Starts this node's part of the cluster on its opened storage.
async fn join_cluster(
    config: &Config,
    storage: Storage,
    internal: TcpListener,
    admin: &admin::AdminService,
    queues: &petrel_core::messaging::MessagingSlot,
) -> Result<Arc<ClusterNode>, Error> {
    let node = NodeConfig {
        id: config.node_id,
        data_dir: config.data_dir.clone(),
        peers: config.peers.clone(),
        raft: raft_config(),
        partition_defaults: config.partition_defaults(),
    };
    let services = tonic::service::Routes::new(admin.server()).add_service(queues.server());
    ClusterNode::start(node, storage, internal, services)
        .await
        .map_err(|source| Error::Cluster {
            node_id: config.node_id,
            source: Box::new(source),
        })
}

/// Unpacks the result of the blocking open task.
fn opened_storage(
    opened: Result<Result<Storage, petrel_log::Error>, tokio::task::JoinError>,
    dir: &Path,
) -> Result<Storage, Error> {
    match opened {
        Ok(Ok(storage)) => Ok(storage),
        Ok(Err(source)) => Err(Error::OpenStorage {
            dir: dir.to_owned(),
            source,
        }),
        Err(source) => Err(Error::StorageTask {
            dir: dir.to_owned(),
            source,
        }),
    }
}

/// Closes storage on a blocking thread.
async fn close_storage(storage: Storage, dir: PathBuf) -> Result<(), Error> {
    tracing::info!(data_dir = %dir.display(), "closing storage");
    match tokio::task::spawn_blocking(move || storage.close()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::CloseStorage { dir, source }),
        Err(source) => Err(Error::StorageTask { dir, source }),
    }
}
