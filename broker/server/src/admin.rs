//! The admin API (`petrel.admin.v1`) on the internal listener: this node's status from
//! here; the cluster and its queues and topics from the metadata, through
//! `petrel_core::cluster` (changes go to the metadata leader, reads come from this
//! node's copy).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use petrel_api::admin::v1::{self as api, admin_server::Admin, admin_server::AdminServer};
use petrel_core::cluster::ClusterNode;
use petrel_core::messaging::{Messaging, MessagingError, QueueArguments};
use petrel_core::meta::{self, Command, Kind, MetaError, Outcome};
use tonic::{Request, Response, Status};

use crate::readiness::{Phase, Readiness};

/// The admin service; it answers `UNAVAILABLE` until the node has started.
#[derive(Clone)]
pub(crate) struct AdminService {
    node: Arc<OnceLock<Arc<ClusterNode>>>,
    messaging: Arc<OnceLock<Arc<Messaging>>>,
    node_id: u64,
    data_dir: String,
    readiness: Readiness,
}

impl AdminService {
    pub fn new(node_id: u64, data_dir: &Path, readiness: Readiness) -> Self {
        Self {
            node: Arc::default(),
            messaging: Arc::default(),
            node_id,
            data_dir: data_dir.display().to_string(),
            readiness,
        }
    }

    /// The service, ready to add to the internal listener's routes.
    pub fn server(&self) -> AdminServer<Self> {
        AdminServer::new(self.clone())
    }

    /// Hands the service its node once it has started.
    pub fn started(&self, node: Arc<ClusterNode>) {
        let _ = self.node.set(node);
    }

    /// Hands the service the node's messaging once it runs.
    pub fn messaging_started(&self, messaging: Arc<Messaging>) {
        let _ = self.messaging.set(messaging);
    }

    fn node(&self) -> Result<&Arc<ClusterNode>, Status> {
        self.node
            .get()
            .ok_or_else(|| Status::unavailable("the node is still starting"))
    }

    fn messaging(&self) -> Result<&Arc<Messaging>, Status> {
        self.messaging
            .get()
            .ok_or_else(|| Status::unavailable("the node is still starting"))
    }

    /// Binds or unbinds as `binding` says, answering it.
    async fn change_binding(
        &self,
        mut binding: api::Binding,
        bind: bool,
    ) -> Result<Response<api::Binding>, Status> {
        binding.vhost = vhost_or_default(&binding.vhost).to_owned();
        self.messaging()?
            .bind_queue(
                &binding.vhost,
                &binding.queue,
                &binding.exchange,
                &binding.routing_key,
                bind,
            )
            .await
            .map_err(messaging_status)?;
        Ok(Response::new(binding))
    }

    async fn command(&self, command: Command) -> Result<Response<api::Destination>, Status> {
        let node = self.node()?;
        match node.command(&command).await.map_err(Status::from)? {
            Outcome::Destination(d) | Outcome::Deleted(d) => {
                Ok(Response::new(destination(&d, node)))
            }
            Outcome::Nodes
            | Outcome::Placement(_)
            | Outcome::Exchanges
            | Outcome::Vhosts
            | Outcome::Users
            | Outcome::Nothing => Err(Status::internal("the command changed no destination")),
        }
    }
}

/// How far the decommission of node `id` is, from this node's copy of the metadata.
fn progress(node: &ClusterNode, id: u64) -> Result<Response<api::DecommissionProgress>, Status> {
    let metadata = node.metadata().borrow().clone();
    let member = metadata
        .nodes
        .get(&id)
        .ok_or_else(|| Status::not_found(MetaError::UnknownNode(id).to_string()))?;
    let remaining = metadata.remaining_on(id);
    let draining = member.state == meta::NodeState::Draining;
    Ok(Response::new(api::DecommissionProgress {
        node_id: id,
        state: if draining { "draining" } else { "active" }.to_owned(),
        partitions_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        done: draining && remaining == 0,
    }))
}

fn kind(value: i32) -> Result<Option<Kind>, Status> {
    match api::Kind::try_from(value) {
        Ok(api::Kind::Unspecified) => Ok(None),
        Ok(api::Kind::Queue) => Ok(Some(Kind::Queue)),
        Ok(api::Kind::Topic) => Ok(Some(Kind::Topic)),
        Err(_) => Err(Status::invalid_argument(format!("unknown kind {value}"))),
    }
}

fn required_kind(value: i32) -> Result<Kind, Status> {
    kind(value)?.ok_or_else(|| Status::invalid_argument("kind is required (queue or topic)"))
}

fn durability(value: i32) -> Result<Option<meta::Durability>, Status> {
    match api::Durability::try_from(value) {
        Ok(api::Durability::Unspecified) => Ok(None),
        Ok(api::Durability::Always) => Ok(Some(meta::Durability::Always)),
        Ok(api::Durability::Interval) => Ok(Some(meta::Durability::Interval)),
        Ok(api::Durability::Never) => Ok(Some(meta::Durability::Never)),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown durability {value}"
        ))),
    }
}

/// The stored name of `name` in `vhost` (empty: the default one).
fn stored(vhost: &str, name: &str) -> Result<String, Status> {
    meta::scoped(vhost_or_default(vhost), name)
        .map(std::borrow::Cow::into_owned)
        .ok_or_else(|| Status::invalid_argument("a name may not contain control characters"))
}

/// The stored name a destination reference names.
fn stored_ref(target: &api::DestinationRef) -> Result<String, Status> {
    stored(&target.vhost, &target.name)
}

/// A user as the API shows it (never its password hash).
fn user(metadata: &meta::Metadata, name: &str) -> Result<api::User, Status> {
    let u = metadata
        .users
        .get(name)
        .ok_or_else(|| Status::not_found(MetaError::UserNotFound(name.to_owned()).to_string()))?;
    Ok(api::User {
        name: name.to_owned(),
        tags: u.tags.clone(),
        vhosts: u.vhosts.iter().cloned().collect(),
    })
}

/// A vhost as the API shows it.
fn vhost(metadata: &meta::Metadata, name: &str) -> api::Vhost {
    let queues = metadata
        .destinations
        .get(&Kind::Queue)
        .map_or(0, |q| q.keys().filter(|s| meta::in_vhost(s, name)).count());
    api::Vhost {
        name: name.to_owned(),
        queues: u32::try_from(queues).unwrap_or(u32::MAX),
    }
}

fn api_kind(kind: Kind) -> api::Kind {
    match kind {
        Kind::Queue => api::Kind::Queue,
        Kind::Topic => api::Kind::Topic,
    }
}

fn api_durability(d: meta::Durability) -> api::Durability {
    match d {
        meta::Durability::Always => api::Durability::Always,
        meta::Durability::Interval => api::Durability::Interval,
        meta::Durability::Never => api::Durability::Never,
    }
}

/// How long a node may take to answer the status's ping before it counts as unreachable.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A messaging error as a gRPC status: what the client asked wrongly, or what failed.
fn messaging_status(e: MessagingError) -> Status {
    match e {
        MessagingError::QueueNotFound(_) | MessagingError::ExchangeNotFound(_) => {
            Status::not_found(e.to_string())
        }
        MessagingError::PreconditionFailed(_) | MessagingError::AccessRefused(_) => {
            Status::invalid_argument(e.to_string())
        }
        MessagingError::Locked(_) => Status::failed_precondition(e.to_string()),
        MessagingError::Cluster(e) => Status::from(e),
        other => Status::unavailable(other.to_string()),
    }
}

/// The vhost a request names: empty is the default.
fn vhost_or_default(vhost: &str) -> &str {
    if vhost.is_empty() {
        meta::DEFAULT_VHOST
    } else {
        vhost
    }
}

/// A queue's arguments as the API types them, from what is stored.
fn api_arguments(arguments: &meta::Arguments) -> api::QueueArguments {
    let typed = QueueArguments::from_arguments(arguments);
    api::QueueArguments {
        message_ttl_ms: typed.message_ttl_ms,
        max_length: typed.max_length,
        max_length_bytes: typed.max_length_bytes,
        overflow: typed.overflow.unwrap_or_default(),
        dead_letter_exchange: typed.dead_letter_exchange.unwrap_or_default(),
        dead_letter_routing_key: typed.dead_letter_routing_key,
        delivery_limit: typed.delivery_limit,
    }
}

/// What the API's queue arguments are stored as.
fn stored_arguments(arguments: api::QueueArguments) -> meta::Arguments {
    let text = |s: String| (!s.is_empty()).then_some(s);
    QueueArguments {
        message_ttl_ms: arguments.message_ttl_ms,
        max_length: arguments.max_length,
        max_length_bytes: arguments.max_length_bytes,
        overflow: text(arguments.overflow),
        dead_letter_exchange: text(arguments.dead_letter_exchange),
        dead_letter_routing_key: arguments.dead_letter_routing_key,
        delivery_limit: arguments.delivery_limit,
    }
    .to_arguments()
}

/// A destination as the API shows it, with the leaders this node knows.
fn destination(d: &meta::Destination, node: &ClusterNode) -> api::Destination {
    let spec = &d.spec;
    let (vhost, name) = meta::unscoped(&spec.name);
    api::Destination {
        spec: Some(api::DestinationSpec {
            kind: api_kind(spec.kind).into(),
            name: name.to_owned(),
            vhost: vhost.to_owned(),
            partitions: spec.partitions,
            replication_factor: spec.replication_factor,
            durability: api_durability(spec.durability).into(),
            retention_ms: spec.retention.ms,
            retention_bytes: spec.retention.bytes,
            queue_arguments: (spec.kind == Kind::Queue)
                .then(|| api_arguments(&spec.declared.arguments)),
        }),
        partitions: d
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| api::PartitionStatus {
                number: u32::try_from(i).unwrap_or(u32::MAX),
                group: p.group,
                replicas: p.replicas.clone(),
                leader: node.leader(p.group),
                lag: Default::default(),
                end_offset: None,
            })
            .collect(),
        queue_stats: None,
    }
}

/// The destination with each partition's replica lag and end offset, as its leader
/// reports them.
async fn with_progress(d: &meta::Destination, node: &ClusterNode) -> api::Destination {
    let mut shown = destination(d, node);
    for p in &mut shown.partitions {
        if let Ok(Some(progress)) = node.progress(d.spec.kind, &d.spec.name, p.number).await {
            p.lag = progress.lag;
            p.end_offset = Some(progress.end_offset);
        }
    }
    shown
}

/// One destination as this node's metadata has it.
fn find(node: &ClusterNode, kind: Kind, name: &str) -> Result<meta::Destination, Status> {
    node.metadata()
        .borrow()
        .destination(kind, name)
        .cloned()
        .ok_or_else(|| {
            Status::not_found(
                MetaError::NotFound {
                    kind,
                    name: name.to_owned(),
                }
                .to_string(),
            )
        })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_node_status(
        &self,
        _request: Request<api::GetNodeStatusRequest>,
    ) -> Result<Response<api::GetNodeStatusResponse>, Status> {
        Ok(Response::new(api::GetNodeStatusResponse {
            node_id: self.node_id,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            data_dir: self.data_dir.clone(),
            ready: self.readiness.phase() == Phase::Ready,
        }))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<api::GetClusterStatusRequest>,
    ) -> Result<Response<api::ClusterStatus>, Status> {
        let node = self.node()?;
        let metadata = node.metadata().borrow().clone();
        let (lag, up) = tokio::join!(node.metadata_lag(), node.reachable(PING_TIMEOUT));
        let nodes = metadata
            .nodes
            .iter()
            .map(|(id, n)| {
                let behind = lag.as_ref().and_then(|l| l.get(id).copied());
                api::ClusterNode {
                    id: *id,
                    addr: n.addr.clone(),
                    state: match n.state {
                        meta::NodeState::Active => "active",
                        meta::NodeState::Draining => "draining",
                    }
                    .to_owned(),
                    health: match (up.contains(id), behind) {
                        (false, _) => "unreachable",
                        (true, Some(0)) => "ok",
                        (true, _) => "lagging",
                    }
                    .to_owned(),
                    metadata_lag: behind,
                }
            })
            .collect();
        Ok(Response::new(api::ClusterStatus {
            nodes,
            metadata_leader: node.metadata_raft().metrics().borrow().current_leader,
            answered_by: node.id(),
        }))
    }

    async fn create_destination(
        &self,
        request: Request<api::CreateDestinationRequest>,
    ) -> Result<Response<api::Destination>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let kind = required_kind(spec.kind)?;
        let declared = match (kind, spec.queue_arguments) {
            (Kind::Topic, Some(_)) => {
                return Err(Status::invalid_argument("a topic takes no queue arguments"));
            }
            (Kind::Topic, None) => meta::Declared::default(),
            // Made by an administrator: kept until deleted, as a durable queue.
            (Kind::Queue, arguments) => meta::Declared {
                durable: true,
                arguments: arguments.map(stored_arguments).unwrap_or_default(),
                ..meta::Declared::default()
            },
        };
        let spec = meta::Spec {
            kind,
            name: stored(&spec.vhost, &spec.name)?,
            partitions: spec.partitions,
            replication_factor: spec.replication_factor,
            durability: durability(spec.durability)?.unwrap_or_default(),
            retention: meta::Retention {
                ms: spec.retention_ms,
                bytes: spec.retention_bytes,
            },
            declared,
        };
        if kind == Kind::Topic {
            return self.command(Command::Create(spec)).await;
        }
        let created = self
            .messaging()?
            .create_queue(spec)
            .await
            .map_err(messaging_status)?;
        Ok(Response::new(destination(&created, self.node()?)))
    }

    async fn update_destination(
        &self,
        request: Request<api::UpdateDestinationRequest>,
    ) -> Result<Response<api::Destination>, Status> {
        let request = request.into_inner();
        let target = request
            .destination
            .ok_or_else(|| Status::invalid_argument("destination is required"))?;
        let retention = (request.retention_ms.is_some() || request.retention_bytes.is_some())
            .then_some(meta::Retention {
                ms: request.retention_ms,
                bytes: request.retention_bytes,
            });
        self.command(Command::Update {
            kind: required_kind(target.kind)?,
            name: stored_ref(&target)?,
            partitions: request.partitions,
            durability: durability(request.durability)?,
            retention,
        })
        .await
    }

    async fn get_destination(
        &self,
        request: Request<api::DestinationRef>,
    ) -> Result<Response<api::Destination>, Status> {
        let target = request.into_inner();
        let kind = required_kind(target.kind)?;
        let node = self.node()?;
        let name = stored_ref(&target)?;
        let found = find(node, kind, &name)?;
        let mut shown = with_progress(&found, node).await;
        if kind == Kind::Queue {
            let stats = self
                .messaging()?
                .queue_stats(&name)
                .await
                .map_err(messaging_status)?;
            shown.queue_stats = Some(api::QueueStats {
                ready: stats.ready,
                unacked: stats.unacked,
                consumers: stats.consumers,
            });
        }
        Ok(Response::new(shown))
    }

    async fn list_destinations(
        &self,
        request: Request<api::ListDestinationsRequest>,
    ) -> Result<Response<api::ListDestinationsResponse>, Status> {
        let wanted = kind(request.into_inner().kind)?;
        let node = self.node()?;
        let metadata = node.metadata().borrow().clone();
        let destinations = metadata
            .destinations
            .iter()
            .filter(|(k, _)| wanted.is_none_or(|w| w == **k))
            .flat_map(|(_, by_name)| by_name.values())
            .map(|d| destination(d, node))
            .collect();
        Ok(Response::new(api::ListDestinationsResponse {
            destinations,
        }))
    }

    async fn decommission_node(
        &self,
        request: Request<api::NodeRef>,
    ) -> Result<Response<api::DecommissionProgress>, Status> {
        let id = request.into_inner().node_id;
        let node = self.node()?;
        node.command(&Command::DecommissionNode { id })
            .await
            .map_err(Status::from)?;
        progress(node, id)
    }

    async fn cancel_decommission(
        &self,
        request: Request<api::NodeRef>,
    ) -> Result<Response<api::DecommissionProgress>, Status> {
        let id = request.into_inner().node_id;
        let node = self.node()?;
        node.command(&Command::ActivateNode { id })
            .await
            .map_err(Status::from)?;
        progress(node, id)
    }

    async fn remove_node(
        &self,
        request: Request<api::NodeRef>,
    ) -> Result<Response<api::ClusterStatus>, Status> {
        let id = request.into_inner().node_id;
        self.node()?
            .command(&Command::RemoveNode { id })
            .await
            .map_err(Status::from)?;
        self.get_cluster_status(Request::new(api::GetClusterStatusRequest {}))
            .await
    }

    async fn add_node(
        &self,
        request: Request<api::AddNodeRequest>,
    ) -> Result<Response<api::ClusterStatus>, Status> {
        let request = request.into_inner();
        let node = self.node()?;
        node.command(&Command::AddNode {
            id: request.node_id,
            addr: request.addr,
        })
        .await
        .map_err(Status::from)?;
        self.get_cluster_status(Request::new(api::GetClusterStatusRequest {}))
            .await
    }

    async fn transfer_leadership(
        &self,
        request: Request<api::TransferLeadershipRequest>,
    ) -> Result<Response<api::PartitionStatus>, Status> {
        let request = request.into_inner();
        let target = request
            .destination
            .ok_or_else(|| Status::invalid_argument("destination is required"))?;
        let kind = required_kind(target.kind)?;
        let node = self.node()?;
        let name = stored_ref(&target)?;
        node.transfer_leadership(kind, &name, request.partition, request.to_node)
            .await
            .map_err(Status::from)?;
        let found = find(node, kind, &name)?;
        let shown = with_progress(&found, node).await;
        shown
            .partitions
            .into_iter()
            .find(|p| p.number == request.partition)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("the partition went away"))
    }

    async fn get_decommission_progress(
        &self,
        request: Request<api::NodeRef>,
    ) -> Result<Response<api::DecommissionProgress>, Status> {
        progress(self.node()?, request.into_inner().node_id)
    }

    async fn delete_destination(
        &self,
        request: Request<api::DestinationRef>,
    ) -> Result<Response<api::Destination>, Status> {
        let target = request.into_inner();
        self.command(Command::Delete {
            kind: required_kind(target.kind)?,
            name: stored_ref(&target)?,
        })
        .await
    }

    async fn create_vhost(
        &self,
        request: Request<api::VhostRef>,
    ) -> Result<Response<api::Vhost>, Status> {
        let name = request.into_inner().name;
        let node = self.node()?;
        node.command(&Command::CreateVhost { name: name.clone() })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(vhost(&node.metadata().borrow(), &name)))
    }

    async fn delete_vhost(
        &self,
        request: Request<api::VhostRef>,
    ) -> Result<Response<api::Vhost>, Status> {
        let name = request.into_inner().name;
        let node = self.node()?;
        let shown = vhost(&node.metadata().borrow(), &name);
        node.command(&Command::DeleteVhost { name })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(shown))
    }

    async fn put_user(
        &self,
        request: Request<api::PutUserRequest>,
    ) -> Result<Response<api::User>, Status> {
        let request = request.into_inner();
        if request.password.is_empty() {
            return Err(Status::invalid_argument("a user needs a password"));
        }
        let node = self.node()?;
        let password = request.password;
        let password_hash = tokio::task::spawn_blocking(move || meta::hash_password(&password))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let command = Command::PutUser {
            name: request.name.clone(),
            password_hash,
            tags: request.tags,
        };
        node.command(&command).await.map_err(Status::from)?;
        user(&node.metadata().borrow(), &request.name).map(Response::new)
    }

    async fn delete_user(
        &self,
        request: Request<api::UserRef>,
    ) -> Result<Response<api::User>, Status> {
        let name = request.into_inner().name;
        let node = self.node()?;
        let shown = user(&node.metadata().borrow(), &name)?;
        node.command(&Command::DeleteUser { name })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(shown))
    }

    async fn list_users(
        &self,
        _request: Request<api::ListUsersRequest>,
    ) -> Result<Response<api::ListUsersResponse>, Status> {
        let metadata = self.node()?.metadata().borrow().clone();
        let users = metadata
            .users
            .keys()
            .map(|name| user(&metadata, name))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(api::ListUsersResponse { users }))
    }

    async fn set_permission(
        &self,
        request: Request<api::SetPermissionRequest>,
    ) -> Result<Response<api::User>, Status> {
        let request = request.into_inner();
        let node = self.node()?;
        let command = Command::Permit {
            user: request.user.clone(),
            vhost: request.vhost,
            allow: request.allow,
        };
        node.command(&command).await.map_err(Status::from)?;
        user(&node.metadata().borrow(), &request.user).map(Response::new)
    }

    async fn bind(&self, request: Request<api::Binding>) -> Result<Response<api::Binding>, Status> {
        self.change_binding(request.into_inner(), true).await
    }

    async fn unbind(
        &self,
        request: Request<api::Binding>,
    ) -> Result<Response<api::Binding>, Status> {
        self.change_binding(request.into_inner(), false).await
    }

    async fn list_bindings(
        &self,
        request: Request<api::ListBindingsRequest>,
    ) -> Result<Response<api::ListBindingsResponse>, Status> {
        let request = request.into_inner();
        let vhost = vhost_or_default(&request.vhost);
        let queue = (!request.queue.is_empty()).then_some(request.queue.as_str());
        let bindings = self
            .messaging()?
            .queue_bindings(vhost, queue)
            .into_iter()
            .map(|b| api::Binding {
                vhost: b.vhost,
                exchange: b.exchange,
                queue: b.queue,
                routing_key: b.routing_key,
            })
            .collect();
        Ok(Response::new(api::ListBindingsResponse { bindings }))
    }

    async fn list_vhosts(
        &self,
        _request: Request<api::ListVhostsRequest>,
    ) -> Result<Response<api::ListVhostsResponse>, Status> {
        let metadata = self.node()?.metadata().borrow().clone();
        let vhosts = std::iter::once(meta::DEFAULT_VHOST)
            .chain(metadata.vhosts.iter().map(String::as_str))
            .map(|name| vhost(&metadata, name))
            .collect();
        Ok(Response::new(api::ListVhostsResponse { vhosts }))
    }
}
