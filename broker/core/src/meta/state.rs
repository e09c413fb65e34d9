//! The metadata itself and the commands that change it: a pure state machine, the same
//! on every node because every node applies the same commands in the same order.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::exchanges::{Arguments, Binding, Exchange, Exchanges, Target};
use super::users::{GUEST, User};
use super::vhosts::{DEFAULT_VHOST, Named, in_vhost, unscoped};
use crate::raft::NodeId;

/// Longest destination name, in bytes (RabbitMQ's limit for queue names).
pub const MAX_NAME_BYTES: usize = 255;
/// Most partitions one destination may have.
pub const MAX_PARTITIONS: u32 = 10_000;

/// A queue (kept until acknowledged) or a topic (kept by retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Point-to-point: one implicit shared subscription.
    Queue,
    /// Publish-subscribe: retention and named subscriptions.
    Topic,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Queue => "queue",
            Kind::Topic => "topic",
        })
    }
}

/// When an append is acknowledged (DESIGN.md §4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After an fsync on a majority.
    #[default]
    Always,
    /// At the next periodic sync.
    Interval,
    /// At once: relies on replication.
    Never,
}

/// How long a topic keeps its messages; `None` keeps them forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Longest time a message is kept, in milliseconds.
    pub ms: Option<u64>,
    /// Most bytes a partition keeps.
    pub bytes: Option<u64>,
}

/// What a user asks for when creating a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// Queue or topic.
    pub kind: Kind,
    /// Unique among destinations of its kind.
    pub name: String,
    /// Number of partitions (each its own Raft group).
    pub partitions: u32,
    /// Replicas of each partition.
    pub replication_factor: u32,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// How long messages are kept (topics).
    pub retention: Retention,
    /// How a queue was declared over AMQP (compared when it is declared again).
    #[serde(default)]
    pub declared: Declared,
}

/// A queue's declaration flags and arguments, as AMQP's queue.declare gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declared {
    /// Survives a restart (every queue does; kept to compare redeclarations).
    pub durable: bool,
    /// Used by its declaring connection only, and deleted with it.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// `x-…` arguments.
    pub arguments: Arguments,
}

impl Default for Declared {
    fn default() -> Self {
        Declared {
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: Arguments::new(),
        }
    }
}

impl Declared {
    /// Whether the queue is a stream (`x-queue-type: stream`): kept by retention and read
    /// from an offset by each consumer, as RabbitMQ's streams are.
    pub fn is_stream(&self) -> bool {
        self.arguments
            .get("x-queue-type")
            .and_then(super::argument_text)
            .is_some_and(|t| t == "stream")
    }
}

/// One partition of a destination: its Raft group and the nodes holding its replicas,
/// the first being its preferred leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// The partition's Raft group, unique in the cluster and never reused.
    pub group: u64,
    /// Nodes holding a replica; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// The replicas the group was created with: the first of them initialises it (only
    /// ever with these members, so a replica placed later never starts a group of its own).
    #[serde(default)]
    pub initial: Vec<NodeId>,
    /// The replicas changed and the group's membership is not yet theirs: replicas no
    /// longer placed keep serving until its leader reports it settled.
    #[serde(default)]
    pub moving: bool,
}

/// A destination as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// What was asked for (as last updated).
    pub spec: Spec,
    /// Where each partition lives, by partition number.
    pub partitions: Vec<Partition>,
}

/// A node's part in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes replicas.
    Active,
    /// Being drained: takes no new replicas and hands its own to others.
    Draining,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Address of its internal (Raft) listener, `host:port`.
    pub addr: String,
    /// Whether it takes replicas.
    pub state: NodeState,
}

/// A change to the metadata, proposed through the metadata group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// A node joins (or changes its address).
    AddNode { id: NodeId, addr: String },
    /// A node starts draining: its replicas are placed elsewhere.
    DecommissionNode { id: NodeId },
    /// A draining node is active again (its decommission is cancelled): replicas are
    /// rebalanced onto it.
    ActivateNode { id: NodeId },
    /// A drained node leaves.
    RemoveNode { id: NodeId },
    /// A new queue or topic.
    Create(Spec),
    /// New partitions (more only), durability or retention for a destination.
    Update {
        kind: Kind,
        name: String,
        partitions: Option<u32>,
        durability: Option<Durability>,
        retention: Option<Retention>,
    },
    /// A destination goes, with all its partitions (and a queue's bindings).
    Delete { kind: Kind, name: String },
    /// An exchange is declared (or checked to exist as declared).
    DeclareExchange { name: String, exchange: Exchange },
    /// An exchange goes, with its bindings.
    DeleteExchange { name: String, if_unused: bool },
    /// A virtual host is created (or checked to exist).
    CreateVhost { name: String },
    /// A virtual host goes, with its queues, exchanges and bindings.
    DeleteVhost { name: String },
    /// A user is created, or gets a new password and tags (keeping its vhosts).
    PutUser {
        name: String,
        password_hash: String,
        tags: Vec<String>,
    },
    /// A user goes.
    DeleteUser { name: String },
    /// A user may (or no longer may) open a vhost.
    Permit {
        user: String,
        vhost: String,
        allow: bool,
    },
    /// A queue is bound to an exchange.
    Bind(Binding),
    /// A binding goes.
    Unbind(Binding),
    /// A group's leader made its membership the placed replicas.
    Settled {
        group: u64,
        /// The replicas the membership was moved to: a move settles only if they are
        /// still the placement (it may have changed again meanwhile). Absent: any.
        #[serde(default)]
        replicas: Option<Vec<NodeId>>,
    },
    /// Changes nothing: a node that applied it has seen every command committed before.
    Barrier,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The node list changed.
    Nodes,
    /// The destination as it now is.
    Destination(Destination),
    /// The destination that was deleted.
    Deleted(Destination),
    /// A partition's placement.
    Placement(Partition),
    /// Exchanges or bindings changed (or were as asked already).
    Exchanges,
    /// The virtual hosts changed (or were as asked already).
    Vhosts,
    /// The users changed (or were as asked already).
    Users,
    /// Nothing changed (a barrier).
    Nothing,
}

/// Why a command was refused; refusals change nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetaError {
    /// A destination of that kind and name exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: Kind, name: String },
    /// No destination of that kind and name.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: Kind, name: String },
    /// No such node.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    /// A value out of range, with what is allowed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No exchange of that name.
    #[error("no exchange {}", Named(.0))]
    ExchangeNotFound(String),
    /// No virtual host of that name.
    #[error("vhost '{0}' not found")]
    VhostNotFound(String),
    /// No user of that name.
    #[error("user '{0}' not found")]
    UserNotFound(String),
    /// The request contradicts what exists.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Not permitted (a built-in exchange, a reserved name).
    #[error("{0}")]
    AccessRefused(String),
}

/// The cluster's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Members, by node id.
    pub nodes: BTreeMap<NodeId, Node>,
    /// Destinations, by kind and name.
    pub destinations: BTreeMap<Kind, BTreeMap<String, Destination>>,
    /// The next partition group id (group 0 is the metadata group itself).
    pub next_group: u64,
    /// Exchanges and bindings.
    #[serde(default)]
    pub exchanges: Exchanges,
    /// Virtual hosts besides the default one, `/`, which always exists.
    #[serde(default)]
    pub vhosts: BTreeSet<String>,
    /// Users besides the built-in `guest`, by name.
    #[serde(default)]
    pub users: BTreeMap<String, User>,
}

fn invalid(message: impl Into<String>) -> MetaError {
    MetaError::InvalidArgument(message.into())
}

impl Metadata {
    /// Partitions still placed on `node` or still moving: a decommission is done at 0.
    pub fn remaining_on(&self, node: NodeId) -> usize {
        self.partitions()
            .filter(|p| p.moving || p.replicas.contains(&node))
            .count()
    }

    /// Whether `user` may open `vhost` (the built-in `guest` may open any).
    pub fn may_open(&self, user: &str, vhost: &str) -> bool {
        match self.users.get(user) {
            Some(u) => u.vhosts.contains(vhost),
            None => user == GUEST,
        }
    }

    /// Whether virtual host `name` exists.
    pub fn has_vhost(&self, name: &str) -> bool {
        name == DEFAULT_VHOST || self.vhosts.contains(name)
    }

    /// The destination of `kind` named `name`.
    pub fn destination(&self, kind: Kind, name: &str) -> Option<&Destination> {
        self.destinations.get(&kind)?.get(name)
    }

    /// Carries out `command`; a refusal leaves the metadata as it was.
    pub fn execute(&mut self, command: Command) -> Result<Outcome, MetaError> {
        match command {
            Command::AddNode { id, addr } => {
                if addr.is_empty() {
                    return Err(invalid("a node needs an address"));
                }
                let joined = !self.nodes.contains_key(&id);
                let node = self.nodes.entry(id).or_insert(Node {
                    addr: String::new(),
                    state: NodeState::Active,
                });
                node.addr = addr;
                if joined {
                    self.rebalance();
                }
                Ok(Outcome::Nodes)
            }
            Command::DecommissionNode { id } => {
                let node = self.nodes.get_mut(&id).ok_or(MetaError::UnknownNode(id))?;
                node.state = NodeState::Draining;
                self.move_replicas_off(id);
                Ok(Outcome::Nodes)
            }
            Command::ActivateNode { id } => {
                let node = self.nodes.get_mut(&id).ok_or(MetaError::UnknownNode(id))?;
                if node.state == NodeState::Draining {
                    node.state = NodeState::Active;
                    self.rebalance();
                }
                Ok(Outcome::Nodes)
            }
            Command::RemoveNode { id } => {
                if !self.nodes.contains_key(&id) {
                    return Err(MetaError::UnknownNode(id));
                }
                if self.replicas_on(id) > 0 {
                    return Err(invalid(format!(
                        "node {id} still holds replicas: decommission it first"
                    )));
                }
                self.nodes.remove(&id);
                Ok(Outcome::Nodes)
            }
            Command::Create(spec) => self.create(spec),
            Command::Update {
                kind,
                name,
                partitions,
                durability,
                retention,
            } => self.update(kind, &name, partitions, durability, retention),
            Command::Barrier => Ok(Outcome::Nothing),
            Command::Settled { group, replicas } => {
                let partition = self
                    .destinations
                    .values_mut()
                    .flat_map(|d| d.values_mut())
                    .flat_map(|d| d.partitions.iter_mut())
                    .find(|p| p.group == group)
                    .ok_or_else(|| invalid(format!("no partition group {group}")))?;
                let placed: BTreeSet<NodeId> = partition.replicas.iter().copied().collect();
                let applied = replicas.map(|r| r.into_iter().collect::<BTreeSet<NodeId>>());
                let settled = applied.is_none_or(|a| a == placed);
                if settled {
                    partition.moving = false;
                }
                let placement = partition.clone();
                // A move done frees the group for the next one the balance needs (a
                // join or a cancelled drain asks for more than one move per group).
                if settled {
                    self.rebalance();
                }
                Ok(Outcome::Placement(placement))
            }
            Command::Delete { kind, name } => {
                let removed = self
                    .destinations
                    .get_mut(&kind)
                    .and_then(|d| d.remove(&name))
                    .ok_or(MetaError::NotFound { kind, name })?;
                if kind == Kind::Queue {
                    self.exchanges.forget_queue(&removed.spec.name);
                }
                Ok(Outcome::Deleted(removed))
            }
            Command::CreateVhost { name } => {
                validate_name(&name)?;
                if name != DEFAULT_VHOST {
                    self.vhosts.insert(name);
                }
                Ok(Outcome::Vhosts)
            }
            Command::DeleteVhost { name } => {
                if name == DEFAULT_VHOST {
                    return Err(invalid("the default vhost '/' cannot be deleted"));
                }
                if !self.vhosts.remove(&name) {
                    return Err(MetaError::VhostNotFound(name));
                }
                if let Some(queues) = self.destinations.get_mut(&Kind::Queue) {
                    queues.retain(|stored, _| !in_vhost(stored, &name));
                }
                self.exchanges.forget_vhost(&name);
                for user in self.users.values_mut() {
                    user.vhosts.remove(&name);
                }
                Ok(Outcome::Vhosts)
            }
            Command::PutUser {
                name,
                password_hash,
                tags,
            } => {
                validate_name(&name)?;
                let user = self.users.entry(name).or_default();
                user.password_hash = password_hash;
                user.tags = tags;
                Ok(Outcome::Users)
            }
            Command::DeleteUser { name } => {
                self.users
                    .remove(&name)
                    .ok_or(MetaError::UserNotFound(name))?;
                Ok(Outcome::Users)
            }
            Command::Permit { user, vhost, allow } => {
                if allow && !self.has_vhost(&vhost) {
                    return Err(MetaError::VhostNotFound(vhost));
                }
                let u = self
                    .users
                    .get_mut(&user)
                    .ok_or(MetaError::UserNotFound(user))?;
                if allow {
                    u.vhosts.insert(vhost);
                } else {
                    u.vhosts.remove(&vhost);
                }
                Ok(Outcome::Users)
            }
            Command::DeclareExchange { name, exchange } => {
                self.validate_scoped(&name)?;
                self.exchanges.declare(&name, exchange)?;
                Ok(Outcome::Exchanges)
            }
            Command::DeleteExchange { name, if_unused } => {
                self.exchanges.delete(&name, if_unused)?;
                Ok(Outcome::Exchanges)
            }
            Command::Bind(binding) => {
                match binding.target {
                    Target::Queue
                        if self
                            .destination(Kind::Queue, &binding.destination)
                            .is_none() =>
                    {
                        return Err(MetaError::NotFound {
                            kind: Kind::Queue,
                            name: binding.destination,
                        });
                    }
                    Target::Exchange if unscoped(&binding.destination).1.is_empty() => {
                        return Err(MetaError::AccessRefused(
                            "operation not permitted on the default exchange".into(),
                        ));
                    }
                    Target::Exchange if self.exchanges.get(&binding.destination).is_none() => {
                        return Err(MetaError::ExchangeNotFound(binding.destination));
                    }
                    _ => {}
                }
                self.exchanges.bind(binding)?;
                Ok(Outcome::Exchanges)
            }
            Command::Unbind(binding) => {
                self.exchanges.unbind(&binding)?;
                Ok(Outcome::Exchanges)
            }
        }
    }

    /// Checks a name that may lie in a vhost: the name itself, and that the vhost exists.
    fn validate_scoped(&self, stored: &str) -> Result<(), MetaError> {
        let (vhost, name) = unscoped(stored);
        validate_name(name)?;
        if !self.has_vhost(vhost) {
            return Err(MetaError::VhostNotFound(vhost.to_owned()));
        }
        Ok(())
    }

    fn create(&mut self, spec: Spec) -> Result<Outcome, MetaError> {
        self.validate_scoped(&spec.name)?;
        validate_partitions(spec.partitions)?;
        let active = self.active_nodes().len();
        if spec.replication_factor == 0 || spec.replication_factor as usize > active {
            return Err(invalid(format!(
                "replication factor {} must be between 1 and the {active} active nodes",
                spec.replication_factor
            )));
        }
        if self.destination(spec.kind, &spec.name).is_some() {
            return Err(MetaError::AlreadyExists {
                kind: spec.kind,
                name: spec.name,
            });
        }
        let mut partitions = Vec::new();
        for _ in 0..spec.partitions {
            let p = self.place(spec.replication_factor as usize, &partitions);
            partitions.push(p);
        }
        let destination = Destination {
            spec: spec.clone(),
            partitions,
        };
        self.destinations
            .entry(spec.kind)
            .or_default()
            .insert(spec.name, destination.clone());
        Ok(Outcome::Destination(destination))
    }

    fn update(
        &mut self,
        kind: Kind,
        name: &str,
        partitions: Option<u32>,
        durability: Option<Durability>,
        retention: Option<Retention>,
    ) -> Result<Outcome, MetaError> {
        let not_found = || MetaError::NotFound {
            kind,
            name: name.to_owned(),
        };
        let current = self.destination(kind, name).ok_or_else(not_found)?.clone();
        let mut updated = current.clone();
        if let Some(n) = partitions {
            validate_partitions(n)?;
            if n < current.spec.partitions {
                return Err(invalid(format!(
                    "partitions can only grow: {kind} {name:?} has {}",
                    current.spec.partitions
                )));
            }
            let rf = current.spec.replication_factor as usize;
            if (n > current.spec.partitions) && rf > self.active_nodes().len() {
                return Err(invalid(format!(
                    "replication factor {rf} is above the active nodes"
                )));
            }
            let mut added = Vec::new();
            for _ in current.spec.partitions..n {
                let p = self.place(rf, &added);
                added.push(p);
            }
            updated.partitions.extend(added);
            updated.spec.partitions = n;
        }
        if let Some(d) = durability {
            updated.spec.durability = d;
        }
        if let Some(r) = retention {
            updated.spec.retention = r;
        }
        self.destinations
            .entry(kind)
            .or_default()
            .insert(name.to_owned(), updated.clone());
        Ok(Outcome::Destination(updated))
    }

    fn active_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every partition of every destination.
    pub fn partitions(&self) -> impl Iterator<Item = &Partition> {
        self.destinations
            .values()
            .flat_map(|d| d.values())
            .flat_map(|d| d.partitions.iter())
    }

    /// Replicas on `node`, and how many of them it is the preferred leader of, counting
    /// `pending` partitions not yet recorded too.
    fn load_with(&self, node: NodeId, pending: &[Partition]) -> (usize, usize) {
        self.partitions()
            .chain(pending)
            .fold((0, 0), |(all, led), p| {
                (
                    all + usize::from(p.replicas.contains(&node)),
                    led + usize::from(p.replicas.first() == Some(&node)),
                )
            })
    }

    fn load(&self, node: NodeId) -> (usize, usize) {
        self.load_with(node, &[])
    }

    fn replicas_on(&self, node: NodeId) -> usize {
        self.load(node).0
    }

    /// A new partition led by the active node leading fewest, its other replicas on the
    /// nodes holding fewest (of equals, those leading most, keeping the others free to
    /// lead later): replicas and leadership spread evenly.
    fn place(&mut self, rf: usize, pending: &[Partition]) -> Partition {
        let mut nodes: Vec<(NodeId, (usize, usize))> = self
            .active_nodes()
            .into_iter()
            .map(|n| (n, self.load_with(n, pending)))
            .collect();
        nodes.sort_by_key(|(n, (all, led))| (*led, *all, *n));
        let mut others = nodes.split_off(nodes.len().min(1));
        others.sort_by_key(|(n, (all, led))| (*all, std::cmp::Reverse(*led), *n));
        let replicas: Vec<NodeId> = nodes
            .into_iter()
            .chain(others.into_iter().take(rf.saturating_sub(1)))
            .map(|(n, _)| n)
            .collect();
        self.next_group += 1;
        Partition {
            group: self.next_group,
            initial: replicas.clone(),
            replicas,
            moving: false,
        }
    }

    /// After a node joined: replicas of draining nodes go where they now can, then
    /// replicas move from the active nodes holding most to those holding fewest until
    /// they differ by one at most, preferred leaderships with them where those are
    /// uneven. A partition already moving keeps its move (one at a time per group).
    fn rebalance(&mut self) {
        let draining: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Draining)
            .map(|(id, _)| *id)
            .collect();
        for node in draining {
            self.move_replicas_off(node);
        }
        loop {
            let loads: Vec<(NodeId, (usize, usize))> = self
                .active_nodes()
                .into_iter()
                .map(|n| (n, self.load(n)))
                .collect();
            let (Some(&(light, (few, light_led))), Some(&(heavy, (most, heavy_led)))) = (
                loads.iter().min_by_key(|(n, (all, _))| (*all, *n)),
                loads
                    .iter()
                    .max_by_key(|(n, (all, _))| (*all, std::cmp::Reverse(*n))),
            ) else {
                return;
            };
            if most <= few + 1 {
                return;
            }
            // Hand over a preferred leadership too while the heavy node leads more.
            let lead = heavy_led > light_led + 1;
            let candidate = self
                .destinations
                .values_mut()
                .flat_map(|d| d.values_mut())
                .flat_map(|d| d.partitions.iter_mut())
                .filter(|p| !p.moving && !p.replicas.contains(&light))
                .filter_map(|p| {
                    let at = p.replicas.iter().position(|r| *r == heavy)?;
                    Some((p, at))
                })
                .min_by_key(|(_, at)| if lead { *at != 0 } else { *at == 0 });
            let Some((partition, at)) = candidate else {
                return;
            };
            partition.replicas[at] = light;
            partition.moving = true;
        }
    }

    /// Gives each replica on `node` to the least loaded active node not yet holding
    /// one of that partition; a replica with nowhere to go stays until a node joins.
    fn move_replicas_off(&mut self, node: NodeId) {
        let active = self.active_nodes();
        let kinds: Vec<Kind> = self.destinations.keys().copied().collect();
        for kind in kinds {
            let names: Vec<String> = self.destinations[&kind].keys().cloned().collect();
            for name in names {
                let count = self.destinations[&kind][&name].partitions.len();
                for i in 0..count {
                    let replicas = self.destinations[&kind][&name].partitions[i]
                        .replicas
                        .clone();
                    let Some(at) = replicas.iter().position(|r| *r == node) else {
                        continue;
                    };
                    let target = active
                        .iter()
                        .filter(|n| !replicas.contains(n))
                        .min_by_key(|n| (self.load(**n), **n))
                        .copied();
                    if let Some(target) = target
                        && let Some(d) = self
                            .destinations
                            .get_mut(&kind)
                            .and_then(|d| d.get_mut(&name))
                    {
                        d.partitions[i].replicas[at] = target;
                        d.partitions[i].moving = true;
                    }
                }
            }
        }
    }
}

fn validate_name(name: &str) -> Result<(), MetaError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "a name has 1 to {MAX_NAME_BYTES} bytes, not {}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("a name may not contain control characters"));
    }
    Ok(())
}

fn validate_partitions(n: u32) -> Result<(), MetaError> {
    if n == 0 || n > MAX_PARTITIONS {
        return Err(invalid(format!(
            "partitions must be between 1 and {MAX_PARTITIONS}, not {n}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(nodes: u64) -> Metadata {
        let mut m = Metadata::default();
        for id in 1..=nodes {
            m.execute(Command::AddNode {
                id,
                addr: format!("127.0.0.{id}:7000"),
            })
            .expect("add node");
        }
        m
    }

    fn spec(kind: Kind, name: &str, partitions: u32, rf: u32) -> Spec {
        Spec {
            kind,
            name: name.to_owned(),
            partitions,
            replication_factor: rf,
            durability: Durability::Always,
            retention: Retention::default(),
            declared: Declared::default(),
        }
    }

    fn create(m: &mut Metadata, kind: Kind, name: &str, partitions: u32, rf: u32) -> Destination {
        match m.execute(Command::Create(spec(kind, name, partitions, rf))) {
            Ok(Outcome::Destination(d)) => d,
            other => panic!("create {name}: {other:?}"),
        }
    }

    /// Most minus fewest replicas, and preferred leaderships, across the nodes.
    fn spread(m: &Metadata) -> (usize, usize) {
        let loads: Vec<(usize, usize)> = m.nodes.keys().map(|n| m.load(*n)).collect();
        let range = |f: fn(&(usize, usize)) -> usize| {
            loads.iter().map(f).max().unwrap_or(0) - loads.iter().map(f).min().unwrap_or(0)
        };
        (range(|l| l.0), range(|l| l.1))
    }

    #[test]
    fn replicas_and_preferred_leaders_spread_evenly_over_the_nodes() {
        let mut m = cluster(3);
        create(&mut m, Kind::Topic, "orders", 6, 3);
        create(&mut m, Kind::Queue, "jobs", 3, 2);
        for node in 1..=3 {
            assert_eq!(
                m.load(node),
                (8, 3),
                "node {node}: replicas, preferred leaderships"
            );
        }
        let jobs = m.destination(Kind::Queue, "jobs").expect("jobs");
        for p in &jobs.partitions {
            assert_eq!(p.replicas.len(), 2);
            assert_ne!(p.replicas[0], p.replicas[1], "one replica per node");
        }
        let mut m = cluster(4);
        for (i, (partitions, rf)) in [(7, 2), (5, 3), (1, 1), (9, 4), (3, 2)]
            .into_iter()
            .enumerate()
        {
            create(&mut m, Kind::Topic, &format!("t{i}"), partitions, rf);
            let (replicas, leaders) = spread(&m);
            assert!(
                replicas <= 1 && leaders <= 1,
                "after t{i}: spread {replicas}, {leaders}"
            );
        }
    }

    #[test]
    fn groups_are_unique_and_never_reused() {
        let mut m = cluster(1);
        let first = create(&mut m, Kind::Topic, "t", 2, 1);
        m.execute(Command::Delete {
            kind: Kind::Topic,
            name: "t".into(),
        })
        .expect("delete");
        let again = create(&mut m, Kind::Topic, "t", 2, 1);
        let groups: Vec<u64> = first
            .partitions
            .iter()
            .chain(&again.partitions)
            .map(|p| p.group)
            .collect();
        assert_eq!(groups, [1, 2, 3, 4], "group 0 is the metadata group's");
    }

    #[test]
    fn refused_commands_name_the_problem_and_change_nothing() {
        let mut m = cluster(3);
        create(&mut m, Kind::Topic, "t", 1, 3);
        let before = m.clone();
        let refusals = [
            (
                Command::Create(spec(Kind::Topic, "t", 1, 1)),
                MetaError::AlreadyExists {
                    kind: Kind::Topic,
                    name: "t".into(),
                },
            ),
            (
                Command::Delete {
                    kind: Kind::Queue,
                    name: "t".into(),
                },
                MetaError::NotFound {
                    kind: Kind::Queue,
                    name: "t".into(),
                },
            ),
            (
                Command::DecommissionNode { id: 9 },
                MetaError::UnknownNode(9),
            ),
        ];
        for (command, expected) in refusals {
            assert_eq!(m.execute(command), Err(expected));
        }
        let invalid = [
            Command::Create(spec(Kind::Topic, "u", 1, 4)),
            Command::Create(spec(Kind::Topic, "u", 1, 0)),
            Command::Create(spec(Kind::Topic, "u", 0, 1)),
            Command::Create(spec(Kind::Topic, "u", MAX_PARTITIONS + 1, 1)),
            Command::Create(spec(Kind::Topic, "", 1, 1)),
            Command::Create(spec(Kind::Topic, &"x".repeat(MAX_NAME_BYTES + 1), 1, 1)),
            Command::Create(spec(Kind::Topic, "bad\nname", 1, 1)),
            Command::Update {
                kind: Kind::Topic,
                name: "t".into(),
                partitions: Some(0),
                durability: None,
                retention: None,
            },
            Command::AddNode {
                id: 4,
                addr: String::new(),
            },
            Command::RemoveNode { id: 1 },
        ];
        for command in invalid {
            let refused = m.execute(command.clone());
            assert!(
                matches!(refused, Err(MetaError::InvalidArgument(_))),
                "{command:?}: {refused:?}"
            );
        }
        let rf = m.execute(Command::Create(spec(Kind::Topic, "u", 1, 4)));
        assert!(
            rf.as_ref()
                .is_err_and(|e| e.to_string().contains("replication factor 4")),
            "{rf:?}"
        );
        assert_eq!(m, before);
    }

    #[test]
    fn names_are_any_text_up_to_255_bytes_per_kind() {
        let mut m = cluster(1);
        create(&mut m, Kind::Queue, "same", 1, 1);
        create(&mut m, Kind::Topic, "same", 1, 1);
        create(&mut m, Kind::Queue, "amq.gen-Ää/€ 1", 1, 1);
        create(&mut m, Kind::Queue, &"y".repeat(MAX_NAME_BYTES), 1, 1);
    }

    #[test]
    fn an_update_only_adds_partitions_and_changes_what_it_names() {
        let mut m = cluster(2);
        create(&mut m, Kind::Topic, "t", 2, 2);
        let retention = Retention {
            ms: Some(60_000),
            bytes: None,
        };
        let updated = m
            .execute(Command::Update {
                kind: Kind::Topic,
                name: "t".into(),
                partitions: Some(4),
                durability: None,
                retention: Some(retention),
            })
            .expect("update");
        let Outcome::Destination(d) = updated else {
            panic!("{updated:?}")
        };
        assert_eq!(d.partitions.len(), 4);
        assert_eq!(d.spec.retention, retention);
        assert_eq!(d.spec.durability, Durability::Always);
        assert_eq!(
            d.partitions.iter().map(|p| p.group).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        let shrink = m.execute(Command::Update {
            kind: Kind::Topic,
            name: "t".into(),
            partitions: Some(3),
            durability: None,
            retention: None,
        });
        assert!(shrink.is_err_and(|e| e.to_string().contains("only grow")));
    }

    #[test]
    fn a_decommissioned_node_hands_its_replicas_over_and_may_then_leave() {
        let mut m = cluster(4);
        create(&mut m, Kind::Topic, "t", 8, 3);
        assert!(m.replicas_on(2) > 0);
        m.execute(Command::DecommissionNode { id: 2 })
            .expect("decommission");
        assert_eq!(m.replicas_on(2), 0);
        for p in m.partitions() {
            let mut r = p.replicas.clone();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), 3, "still three distinct replicas: {p:?}");
        }
        let later = create(&mut m, Kind::Queue, "q", 3, 3);
        assert!(later.partitions.iter().all(|p| !p.replicas.contains(&2)));
        m.execute(Command::RemoveNode { id: 2 }).expect("remove");
        assert!(!m.nodes.contains_key(&2));
    }

    #[test]
    fn a_cancelled_decommission_makes_the_node_active_and_gives_it_replicas_again() {
        let mut m = cluster(4);
        create(&mut m, Kind::Topic, "t", 8, 3);
        m.execute(Command::DecommissionNode { id: 4 })
            .expect("decommission");
        assert_eq!(m.replicas_on(4), 0);
        m.execute(Command::ActivateNode { id: 4 })
            .expect("activate");
        assert_eq!(m.nodes[&4].state, NodeState::Active);
        // Moves settle one per group at a time; each settled one lets the next go.
        for _ in 0..8 {
            for group in m
                .partitions()
                .filter(|p| p.moving)
                .map(|p| p.group)
                .collect::<Vec<_>>()
            {
                m.execute(Command::Settled {
                    group,
                    replicas: None,
                })
                .expect("settled");
            }
        }
        assert_eq!(m.replicas_on(4), 6, "balanced again");
        assert!(m.execute(Command::RemoveNode { id: 4 }).is_err());
        assert!(m.execute(Command::ActivateNode { id: 9 }).is_err());
    }

    #[test]
    fn a_replica_with_nowhere_to_go_stays_until_a_node_joins() {
        let mut m = cluster(3);
        create(&mut m, Kind::Topic, "t", 1, 3);
        m.execute(Command::DecommissionNode { id: 3 })
            .expect("decommission");
        assert_eq!(m.replicas_on(3), 1, "no fourth node to take it");
        assert!(m.execute(Command::RemoveNode { id: 3 }).is_err());
        m.execute(Command::AddNode {
            id: 4,
            addr: "127.0.0.4:7000".into(),
        })
        .expect("join");
        assert_eq!(m.replicas_on(3), 0, "the new node took it");
        m.execute(Command::RemoveNode { id: 3 }).expect("remove");
    }

    #[test]
    fn a_joining_node_takes_an_even_share_of_replicas_and_preferred_leaders() {
        let mut m = cluster(3);
        create(&mut m, Kind::Topic, "t", 6, 3);
        create(&mut m, Kind::Queue, "q", 3, 1);
        m.execute(Command::AddNode {
            id: 4,
            addr: "127.0.0.4:7000".into(),
        })
        .expect("join");
        // 21 replicas over 4 nodes: 5 or 6 each; 9 preferred leaderships: 2 or 3 each.
        assert_eq!(spread(&m), (1, 1), "{:?}", m.destinations);
        assert!(m.load(4).0 >= 5 && m.load(4).1 >= 2, "{:?}", m.load(4));
        for p in m.partitions() {
            let mut r = p.replicas.clone();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), p.initial.len(), "distinct replicas: {p:?}");
            assert_eq!(p.moving, p.replicas.contains(&4), "{p:?}");
        }
        // A node that comes back (a restart) moves nothing.
        let before = m.clone();
        m.execute(Command::AddNode {
            id: 2,
            addr: "127.0.0.2:7000".into(),
        })
        .expect("rejoin");
        assert_eq!(m, before);
    }

    #[test]
    fn a_move_settles_only_for_the_placement_it_applied() {
        let mut m = cluster(4);
        create(&mut m, Kind::Topic, "t", 1, 3);
        let group = m.partitions().next().expect("partition").group;
        let replicas = |m: &Metadata| m.partitions().next().expect("partition").replicas.clone();
        let first = replicas(&m);
        let leaving = first[1];
        m.execute(Command::DecommissionNode { id: leaving })
            .expect("decommission");
        let moved = replicas(&m);
        // The membership applied before the placement changed does not settle it.
        m.execute(Command::Settled {
            group,
            replicas: Some(first),
        })
        .expect("settled");
        assert!(m.partitions().all(|p| p.moving), "still moving");
        m.execute(Command::Settled {
            group,
            replicas: Some(moved),
        })
        .expect("settled");
        assert!(m.partitions().all(|p| !p.moving), "settled");
    }

    #[test]
    fn commands_and_outcomes_keep_their_json_shape() {
        let command = Command::Create(spec(Kind::Queue, "q", 1, 1));
        let json = serde_json::to_value(&command).expect("json");
        assert_eq!(json["op"], "create");
        assert_eq!(json["kind"], "queue");
        let back: Command = serde_json::from_value(json).expect("back");
        assert_eq!(back, command);
        let refusal: Result<Outcome, MetaError> = Err(MetaError::UnknownNode(3));
        let json = serde_json::to_string(&refusal).expect("json");
        let back: Result<Outcome, MetaError> = serde_json::from_str(&json).expect("back");
        assert_eq!(back, refusal);
    }
}
