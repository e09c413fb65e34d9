//! A node of the cluster (DESIGN.md §3): its storage, the internal gRPC server, the
//! metadata group, and the partition groups the metadata places on it.
//!
//! * Start: the node opens its storage and serves the internal transport; the metadata
//!   group is initialised once, by the lowest node id of a fresh cluster (a restarted
//!   node never initialises again); then the node adds itself to the metadata.
//! * `partitions`: whenever the metadata changes, the node starts the groups of the
//!   partitions it holds (the preferred leader initialises a new one) and stops and
//!   deletes those it no longer holds.
//! * [`ClusterNode::write`] proposes through any node: to the local group if this node
//!   leads it, else forwarded to the leader over the internal transport.

mod commit;
mod data;
mod elections;
mod leadership;
mod members;
mod partitions;
mod retention;

pub use commit::{NewRecord, Offsets};
pub use leadership::{Progress, Replication};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, Fatal, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::{BasicNode, Raft};
use petrel_log::{PartitionConfig, Storage};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::meta::{self, Command, Kind, METADATA_GROUP, MetaError, Metadata, Outcome};
use crate::raft::{self, NodeId, PartitionRaft, Proposal};
use crate::transport::{Groups, Holds, Peers, ProposeError, RaftService};

/// Metadata voters at most; further nodes follow the metadata as learners.
pub const MAX_VOTERS: usize = 5;
/// Pause between attempts to join the metadata (each waits for a leader itself).
const JOIN_RETRY: Duration = Duration::from_millis(200);
/// Pause before asking again after a peer failed to answer.
const FORWARD_RETRY: Duration = Duration::from_millis(50);
/// How long a write may spend finding its group's leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// A proposal committed and applied by its group, or why not.
pub(super) type Written =
    Result<ClientWriteResponse<PartitionRaft>, ClientWriteError<NodeId, BasicNode>>;

/// What answers a proposal handed to a local leader (`ClusterNode::submit`).
pub(super) type Committing = oneshot::Receiver<Written>;

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster.
    pub id: NodeId,
    /// The data directory the storage was opened on (it holds the Raft state too).
    pub data_dir: PathBuf,
    /// Every node of a new cluster, this one included: id → internal address. Empty
    /// for a single node.
    pub peers: BTreeMap<NodeId, String>,
    /// Raft timings for every group.
    pub raft: openraft::Config,
    /// Settings of partition logs (segment size, …); each destination sets its own
    /// sync policy.
    pub partition_defaults: PartitionConfig,
}

/// Why a node could not start or serve a request.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The storage could not be opened or written.
    #[error(transparent)]
    Storage(#[from] petrel_log::Error),
    /// A group's Raft state could not be opened.
    #[error(transparent)]
    RaftStore(#[from] raft::RaftStoreError),
    /// The Raft settings are invalid.
    #[error("raft settings: {0}")]
    RaftConfig(String),
    /// A group's Raft stopped.
    #[error("raft group {group}: {message}")]
    Raft { group: u64, message: String },
    /// The internal listener failed.
    #[error("internal listener: {0}")]
    Listen(std::io::Error),
    /// No such group on this node or its peers.
    #[error("no raft group {0}")]
    NoGroup(u64),
    /// No leader answered in time.
    #[error("no leader for raft group {group} within {timeout:?}: {last}")]
    NoLeader {
        group: u64,
        timeout: Duration,
        last: String,
    },
    /// The metadata refused the command.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A read for a partition this node holds no replica of.
    #[error(
        "raft group {group} has no replica on this node; its replicas are on nodes {replicas:?}"
    )]
    NotReplica { group: u64, replicas: Vec<NodeId> },
    /// A queue at its length limit refused the records (`x-overflow` `reject-publish`).
    #[error("raft group {group} is a full queue partition: the message was refused")]
    Full { group: u64 },
    /// The failure of a proposal that carried the records of several producers.
    #[error(transparent)]
    Shared(Arc<ClusterError>),
}

impl ClusterError {
    /// The gRPC status code a client is answered with.
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ClusterError::Shared(e) => e.code(),
            ClusterError::Meta(MetaError::AlreadyExists { .. }) => Code::AlreadyExists,
            ClusterError::Meta(
                MetaError::NotFound { .. }
                | MetaError::UnknownNode(_)
                | MetaError::ExchangeNotFound(_)
                | MetaError::VhostNotFound(_)
                | MetaError::UserNotFound(_),
            )
            | ClusterError::NoGroup(_) => Code::NotFound,
            ClusterError::Meta(MetaError::PreconditionFailed(_)) => Code::FailedPrecondition,
            ClusterError::Meta(MetaError::AccessRefused(_)) => Code::PermissionDenied,
            ClusterError::Meta(MetaError::InvalidArgument(_)) => Code::InvalidArgument,
            ClusterError::NotReplica { .. } => Code::FailedPrecondition,
            ClusterError::NoLeader { .. } => Code::Unavailable,
            ClusterError::Full { .. } => Code::ResourceExhausted,
            _ => Code::Internal,
        }
    }
}

/// A cluster error as a gRPC status with its message.
impl From<ClusterError> for tonic::Status {
    fn from(e: ClusterError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// This node's replica of a partition, for reads.
struct Replica {
    reader: raft::LogReader,
    high_watermark: watch::Receiver<u64>,
    app: watch::Receiver<raft::PartitionApp>,
}

/// A running node.
pub struct ClusterNode {
    id: NodeId,
    addr: String,
    storage: Arc<Storage>,
    root: PathBuf,
    groups: Groups,
    peers: Peers,
    metadata: Raft<PartitionRaft>,
    view: watch::Receiver<Metadata>,
    /// Raft settings of the partition groups: the metadata's, except that Raft never
    /// purges their logs by itself (the messages are the log: retention purges it).
    partition_raft: Arc<openraft::Config>,
    /// Settings of partition logs before their destination's own.
    partition_defaults: PartitionConfig,
    _server: ServerGuard,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Readers of the partition groups held here.
    replicas: Mutex<HashMap<u64, Replica>>,
    /// Groups whose membership this node is moving to a new placement.
    moving: Arc<Mutex<std::collections::HashSet<u64>>>,
    /// Records waiting to be proposed together, by group.
    commit: commit::GroupCommit,
    /// Groups whose proposals wait while their leadership is handed over.
    holds: Holds,
    /// Since when this node leads each group it leads, as last seen.
    led_since: Mutex<HashMap<u64, Instant>>,
    /// A handover back to a preferred leader is under way.
    handing_over: std::sync::atomic::AtomicBool,
    /// The other nodes of the peer list: where a node not yet following the metadata
    /// sends its join.
    seeds: Vec<String>,
    /// The seed asked next.
    next_seed: std::sync::atomic::AtomicUsize,
    /// Turns true once this node's join was committed and applied here.
    joined: watch::Sender<bool>,
}

impl ClusterNode {
    /// Starts a node on its opened `storage`, serving the internal transport on
    /// `listener` together with `services` (the admin API).
    pub async fn start(
        config: NodeConfig,
        storage: Storage,
        listener: TcpListener,
        services: tonic::service::Routes,
    ) -> Result<Arc<Self>, ClusterError> {
        let addr = listener.local_addr().map_err(ClusterError::Listen)?;
        let root = config.data_dir.clone();
        let storage = Arc::new(storage);
        let groups: Groups = Arc::new(RwLock::new(HashMap::new()));
        let peers = Peers::new(Some(addr.ip()));
        let raft_config = Arc::new(
            config
                .raft
                .clone()
                .validate()
                .map_err(|e| ClusterError::RaftConfig(e.to_string()))?,
        );
        let partition_raft = Arc::new(
            openraft::Config {
                max_in_snapshot_log_to_keep: u64::MAX,
                // Snapshots are small (state only) and bound how far a purge reaches.
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
                ..config.raft
            }
            .validate()
            .map_err(|e| ClusterError::RaftConfig(e.to_string()))?,
        );

        let fresh = !storage.partitions().contains(&METADATA_GROUP);
        let log = if fresh {
            storage.create_partition(METADATA_GROUP, PartitionConfig::default())?
        } else {
            storage.open_partition(METADATA_GROUP, PartitionConfig::default())?
        };
        let (publish, view) = watch::channel(Metadata::default());
        let (store, machine) =
            raft::open_group(log, &raft_dir(&root, METADATA_GROUP), Some(publish))?;
        let metadata = Raft::new(
            config.id,
            raft_config.clone(),
            peers.group(METADATA_GROUP),
            store,
            machine,
        )
        .await
        .map_err(|e| raft_error(METADATA_GROUP, e))?;
        groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(METADATA_GROUP, metadata.clone());
        let started = Started::default();
        let holds = Holds::default();
        let services = services
            .add_service(RaftService::new(groups.clone(), holds.clone()).into_server())
            .add_service(data::DataService::server(started.clone()))
            .add_service(leadership::LeadershipService::server(started.clone()));
        let stop_server = serve(listener, services);

        let node = Arc::new(Self {
            id: config.id,
            addr: advertised(addr, &config.peers, config.id),
            storage,
            root,
            groups,
            peers,
            metadata,
            view,
            partition_raft,
            partition_defaults: config.partition_defaults.clone(),
            _server: ServerGuard(Some(stop_server)),
            tasks: Mutex::new(Vec::new()),
            replicas: Mutex::new(HashMap::new()),
            moving: Arc::default(),
            commit: commit::GroupCommit::default(),
            holds,
            led_since: Mutex::default(),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            seeds: config
                .peers
                .iter()
                .filter(|(id, _)| **id != config.id)
                .map(|(_, addr)| addr.clone())
                .collect(),
            next_seed: std::sync::atomic::AtomicUsize::new(0),
            joined: watch::channel(false).0,
        });
        started.set(&node);
        let first = config.peers.keys().next().copied().unwrap_or(config.id);
        if fresh && first == config.id {
            node.initialize_metadata(&config.peers).await?;
        }
        let joining = node.clone();
        let reconciling = node.clone();
        let following = node.clone();
        let electing = node.clone();
        let retaining = node.clone();
        let mut tasks = vec![
            tokio::spawn(async move { joining.join().await }),
            tokio::spawn(async move { partitions::reconcile(reconciling).await }),
            tokio::spawn(async move { members::follow(following).await }),
            tokio::spawn(async move { elections::break_ties(electing).await }),
            tokio::spawn(async move { retention::enforce(retaining).await }),
        ];
        node.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .append(&mut tasks);
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address peers reach this node at.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Resolves once this node's join of the cluster was committed and applied here.
    pub async fn joined(&self) {
        let mut joined = self.joined.subscribe();
        let _ = joined.wait_for(|j| *j).await;
    }

    /// The metadata as this node last applied it.
    pub fn metadata(&self) -> watch::Receiver<Metadata> {
        self.view.clone()
    }

    /// The metadata group's Raft.
    pub fn metadata_raft(&self) -> &Raft<PartitionRaft> {
        &self.metadata
    }

    /// The leader of `group` as this node's replica knows it (`None` if it holds none).
    pub fn leader(&self, group: u64) -> Option<NodeId> {
        self.group(group)?.metrics().borrow().current_leader
    }

    /// The local Raft of `group`, if this node holds a replica.
    pub fn group(&self, group: u64) -> Option<Raft<PartitionRaft>> {
        self.groups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&group)
            .cloned()
    }

    /// Runs a metadata command through the metadata group's leader.
    pub async fn command(&self, command: &Command) -> Result<Outcome, ClusterError> {
        let proposal =
            meta::proposal(command).map_err(|e| MetaError::InvalidArgument(e.to_string()))?;
        let reply = self.write(METADATA_GROUP, proposal).await?;
        // Read-your-writes on this node: its own copy catches up before the answer.
        let _ = self
            .metadata
            .wait(Some(FORWARD_TIMEOUT))
            .applied_index_at_least(Some(reply.log_id.index), "the command applied here")
            .await;
        Ok(meta::outcome(&reply.data)?)
    }

    /// Hands `proposal` to this node's replica of `group` if it leads the group, and
    /// returns without waiting for the commit: proposals handed over one after another
    /// are appended in that order. `None` if this node does not lead the group (`write`
    /// finds the leader).
    pub(super) async fn submit(&self, group: u64, proposal: &Proposal) -> Option<Committing> {
        let raft = self.group(group)?;
        if raft.metrics().borrow().current_leader != Some(self.id) {
            return None;
        }
        self.holds.pass(group).await;
        // A `Proposal` is a handle on shared bytes: the clone copies no records.
        raft.client_write_ff(proposal.clone()).await.ok()
    }

    /// Proposes to `group` through its leader, wherever it is; returns once committed
    /// and applied. A group this node neither holds nor finds in its copy of the
    /// metadata is `NoGroup` (a node that just joined may not know it yet).
    pub async fn write(
        &self,
        group: u64,
        proposal: Proposal,
    ) -> Result<ClientWriteResponse<PartitionRaft>, ClusterError> {
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        // Where to propose: this node first if it holds the group, else its leader.
        let mut target: Option<String> = None;
        loop {
            let result = match (&target, self.group(group)) {
                (None, Some(raft)) => {
                    self.holds.pass(group).await;
                    raft.client_write(proposal.clone())
                        .await
                        .map_err(Box::new)
                        .map_err(ProposeError::Raft)
                }
                (None, None) => match self.leader_of(group) {
                    Some(addr) => {
                        target = Some(addr);
                        continue;
                    }
                    None => return Err(ClusterError::NoGroup(group)),
                },
                (Some(addr), _) => self.peers.propose(addr, group, &proposal).await,
            };
            let last = match result {
                Ok(reply) => return Ok(reply),
                Err(ProposeError::Raft(e)) => match *e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                        target = f.leader_node.map(|n| n.addr).filter(|a| *a != self.addr);
                        if target.is_none() {
                            target = self.seed(group);
                            match target {
                                Some(_) => tokio::time::sleep(FORWARD_RETRY).await,
                                None => self.await_leader(group, deadline).await,
                            }
                        }
                        "no leader known".to_owned()
                    }
                    // This node's replica stopped meanwhile (moved to another node, or
                    // the node is stopping): the group's leader is asked instead.
                    RaftError::Fatal(Fatal::Stopped) => {
                        tokio::time::sleep(FORWARD_RETRY).await;
                        "the replica here stopped".to_owned()
                    }
                    other => {
                        return Err(ClusterError::Raft {
                            group,
                            message: other.to_string(),
                        });
                    }
                },
                // The peer is down or lost leadership meanwhile: ask again from here.
                Err(e) => {
                    target = None;
                    tokio::time::sleep(FORWARD_RETRY).await;
                    e.to_string()
                }
            };
            if Instant::now() >= deadline {
                return Err(ClusterError::NoLeader {
                    group,
                    timeout: FORWARD_TIMEOUT,
                    last,
                });
            }
        }
    }

    /// A peer to ask about the metadata while this node is no member of its group (it
    /// joins the cluster, or was registered and not yet added); `None` otherwise.
    fn seed(&self, group: u64) -> Option<String> {
        let member = self
            .metadata
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.id)
            .is_some();
        if group != METADATA_GROUP || member || self.seeds.is_empty() {
            return None;
        }
        let next = self
            .next_seed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.seeds.get(next % self.seeds.len()).cloned()
    }

    /// Waits (until `deadline`) for the local replica of `group` to know a leader, or a
    /// moment if this node holds none.
    async fn await_leader(&self, group: u64, deadline: Instant) {
        match self.group(group) {
            Some(raft) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = raft
                    .wait(Some(left))
                    .metrics(|m| m.current_leader.is_some(), "a leader")
                    .await;
            }
            None => tokio::time::sleep(FORWARD_RETRY).await,
        }
    }

    /// Connections to this node's peers.
    pub(crate) fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The internal address of node `id`, as the metadata has it.
    pub fn addr_of(&self, id: NodeId) -> Option<String> {
        self.view.borrow().nodes.get(&id).map(|n| n.addr.clone())
    }

    /// The high watermark of this node's replica of `group`, as it moves.
    pub fn high_watermark(&self, group: u64) -> Option<watch::Receiver<u64>> {
        self.replica(group, |r| r.high_watermark.clone())
    }

    /// Messages appended to this node's replica of `group` in all, and their body bytes
    /// (counted while the queue has a byte limit).
    pub fn appended(&self, group: u64) -> Option<(u64, u64)> {
        self.replica(group, |r| {
            let app = r.app.borrow();
            (app.settled.appended, app.settled.appended_bytes)
        })
    }

    /// Whether this node's replica of `group` has the message at `offset` settled.
    pub fn is_settled(&self, group: u64, offset: u64) -> bool {
        self.replica(group, |r| r.app.borrow().settled.contains(offset))
            .unwrap_or(false)
    }

    /// The length limits this node's replica of `group` counts, if it holds one.
    pub fn limits(&self, group: u64) -> Option<Option<crate::messaging::cursor::Limits>> {
        self.replica(group, |r| r.app.borrow().limits)
    }

    /// What this node's replica of `group` has applied of its consumers' settles.
    pub fn settled(&self, group: u64) -> Option<crate::messaging::cursor::Settled> {
        self.replica(group, |r| r.app.borrow().settled.clone())
    }

    fn replica<T>(&self, group: u64, f: impl FnOnce(&Replica) -> T) -> Option<T> {
        self.replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&group)
            .map(f)
    }

    /// The group of partition `number` of a queue or topic, with its replicas.
    pub fn partition(
        &self,
        kind: Kind,
        name: &str,
        number: u32,
    ) -> Result<meta::Partition, ClusterError> {
        let view = self.view.borrow();
        let destination = view
            .destination(kind, name)
            .ok_or_else(|| MetaError::NotFound {
                kind,
                name: name.to_owned(),
            })?;
        usize::try_from(number)
            .ok()
            .and_then(|n| destination.partitions.get(n))
            .cloned()
            .ok_or_else(|| {
                ClusterError::Meta(MetaError::InvalidArgument(format!(
                    "{kind} {name:?} has partitions 0 to {}, not {number}",
                    destination.partitions.len().saturating_sub(1)
                )))
            })
    }

    /// Appends records to a partition through its leader; returns once committed and
    /// applied there, with the offsets the records took. Records produced to a partition
    /// meanwhile are committed together with them, as one batch.
    pub async fn produce(
        self: &Arc<Self>,
        kind: Kind,
        name: &str,
        partition: u32,
        records: &[NewRecord<'_>],
    ) -> Result<Offsets, ClusterError> {
        self.enqueue(kind, name, partition, records)?.await
    }

    /// Like [`ClusterNode::produce`], but the records are queued before this returns, so
    /// that one producer's appends keep their call order while their commits overlap.
    pub fn enqueue(
        self: &Arc<Self>,
        kind: Kind,
        name: &str,
        partition: u32,
        records: &[NewRecord<'_>],
    ) -> Result<impl Future<Output = Result<Offsets, ClusterError>> + Send + 'static, ClusterError>
    {
        let group = self.partition(kind, name, partition)?.group;
        let committed = commit::GroupCommit::produce(self, group, records);
        Ok(async move { committed.await.map_err(ClusterError::Shared) })
    }

    /// Committed message batches of a partition from this node's replica, from `offset`
    /// on (about `max_bytes`), and the replica's high watermark.
    pub fn fetch(
        &self,
        kind: Kind,
        name: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
    ) -> Result<(Vec<petrel_log::RecordBatch>, u64), ClusterError> {
        let placed = self.partition(kind, name, partition)?;
        self.read(placed.group, offset, max_bytes)
            .ok_or(ClusterError::NotReplica {
                group: placed.group,
                replicas: placed.replicas,
            })?
    }

    /// Committed message batches of `group` from this node's replica (`None` if it holds
    /// none), from `offset` on (about `max_bytes`), and the replica's high watermark.
    pub fn read(
        &self,
        group: u64,
        offset: u64,
        max_bytes: usize,
    ) -> Option<Result<(Vec<petrel_log::RecordBatch>, u64), ClusterError>> {
        self.replica(group, |replica| {
            let high_watermark = *replica.high_watermark.borrow();
            let batches = replica
                .reader
                .read_messages(offset, max_bytes, high_watermark)?;
            Ok((batches, high_watermark))
        })
    }

    /// Where the metadata says a group not held here is led: its preferred leader.
    fn leader_of(&self, group: u64) -> Option<String> {
        let view = self.view.borrow();
        let partition = view
            .destinations
            .values()
            .flat_map(|d| d.values())
            .flat_map(|d| &d.partitions)
            .find(|p| p.group == group)?;
        let node = partition.replicas.first()?;
        view.nodes.get(node).map(|n| n.addr.clone())
    }

    async fn initialize_metadata(
        &self,
        peers: &BTreeMap<NodeId, String>,
    ) -> Result<(), ClusterError> {
        let mut voters: BTreeMap<NodeId, BasicNode> = peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        if voters.is_empty() {
            voters.insert(self.id, BasicNode::new(&self.addr));
        }
        let voters: BTreeMap<_, _> = voters.into_iter().take(MAX_VOTERS).collect();
        match self.metadata.initialize(voters).await {
            Ok(()) => Ok(()),
            // Already initialised (a restart found a vote or a log): nothing to do.
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ClusterError::Raft {
                group: METADATA_GROUP,
                message: e.to_string(),
            }),
        }
    }

    /// Adds this node to the metadata, retrying until the metadata group answers.
    async fn join(&self) {
        let command = Command::AddNode {
            id: self.id,
            addr: self.addr.clone(),
        };
        loop {
            match self.command(&command).await {
                Ok(_) => {
                    self.joined.send_replace(true);
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "joining the metadata; trying again"),
            }
            tokio::time::sleep(JOIN_RETRY).await;
        }
    }

    /// Stops every group and the internal server, then closes the storage (which makes
    /// everything durable and checkpointed).
    pub async fn close(self: Arc<Self>) -> Result<(), ClusterError> {
        self.shutdown().await;
        let Ok(node) = Arc::try_unwrap(self) else {
            // Still referenced: the storage closes when the last holder drops it.
            return Ok(());
        };
        let ClusterNode {
            storage,
            _server: server,
            ..
        } = node;
        drop(server);
        let Ok(storage) = Arc::try_unwrap(storage) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || storage.close())
            .await
            .map_err(|e| raft_error(METADATA_GROUP, e))??;
        Ok(())
    }

    /// Stops every group and the node's tasks; the storage stays open.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        for task in tasks {
            task.abort();
            // Awaited, so that the task's hold on the node is gone when this returns.
            let _ = task.await;
        }
        let groups: Vec<Raft<PartitionRaft>> = self
            .groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .map(|(_, raft)| raft)
            .collect();
        for raft in groups {
            let _ = raft.shutdown().await;
        }
    }
}

/// The node the services of the internal server answer for, once it has started: the
/// server starts first, as peers must reach it while the node starts.
#[derive(Clone, Default)]
struct Started(Arc<OnceLock<Weak<ClusterNode>>>);

impl Started {
    fn set(&self, node: &Arc<ClusterNode>) {
        let _ = self.0.set(Arc::downgrade(node));
    }

    /// The node, or `UNAVAILABLE` while it starts or stops.
    fn get(&self) -> Result<Arc<ClusterNode>, tonic::Status> {
        self.0
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| tonic::Status::unavailable("the node is starting or stopping"))
    }
}

/// Milliseconds since the Unix epoch (0 before it, as records and retention count time).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Stops the internal server when dropped.
struct ServerGuard(Option<oneshot::Sender<()>>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

/// Where a group's vote, purge point and snapshot live.
fn raft_dir(root: &std::path::Path, group: u64) -> PathBuf {
    root.join("raft").join(group.to_string())
}

fn raft_error(group: u64, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Raft {
        group,
        message: e.to_string(),
    }
}

/// The address peers know this node by: its entry in the peer list, else where it listens.
fn advertised(listening: SocketAddr, peers: &BTreeMap<NodeId, String>, id: NodeId) -> String {
    peers
        .get(&id)
        .cloned()
        .unwrap_or_else(|| listening.to_string())
}

/// Serves `services` until the returned sender fires or is dropped.
fn serve(listener: TcpListener, services: tonic::service::Routes) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            // A relay whose node vanished is seen dead in seconds: its consumers go, and
            // what they held is delivered again.
            .http2_keepalive_interval(Some(crate::transport::KEEP_ALIVE))
            .http2_keepalive_timeout(Some(crate::transport::KEEP_ALIVE_TIMEOUT))
            .add_routes(services)
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY a reply split over writes waits for a delayed ACK.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "internal transport stopped");
        }
    });
    stop
}
