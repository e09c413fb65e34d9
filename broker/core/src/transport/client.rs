//! The sending side: a `RaftNetworkFactory` per group over connections shared by all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::ClientWriteResponse;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, LogId};
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::AppendHeader;
use super::heartbeats::Heartbeats;
use super::proto::leadership_client::LeadershipClient;
use super::proto::raft_transport_client::RaftTransportClient;
use super::proto::{
    AppendRequest, HandoverRequest, HandoverStep, LagRequest, PingRequest, RaftReply, RaftRequest,
    ReadLogRequest,
};
use crate::raft::{NodeId, PartitionRaft, Proposal, entry};

/// A group that has replicated nothing for this long is idle: its heartbeats may wait to
/// be batched with others.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Bytes of batches one `read_log` asks for.
const READ_LOG_BYTES: u32 = 16 << 20;
/// How long one `read_log` may take.
const READ_LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a leader may take to tell how far its replicas are behind.
const LAG_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a connection to a peer is pinged (HTTP/2), and how long an answer may take
/// before the connection counts as dead.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(1);
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

type RpcError<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

/// Connections to this node's peers, one per address, shared by every group.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Peer>>>,
    /// The address outgoing connections originate from (this node's internal bind).
    local: Option<IpAddr>,
}

impl Peers {
    /// Connections originating from `local` (any address if `None`).
    pub fn new(local: Option<IpAddr>) -> Self {
        Self {
            channels: Arc::default(),
            local,
        }
    }

    /// The network a group's `Raft` sends through.
    pub fn group(&self, group: u64) -> Network {
        Network {
            group,
            peers: self.clone(),
        }
    }

    /// The connection to `addr` (`host:port`) and its append queue, made on first use.
    fn peer(&self, addr: &str) -> Result<Peer, tonic::transport::Error> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = channels.get(addr) {
            return Ok(p.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            // A peer that vanished without closing (a pod gone with its address) is
            // seen dead in seconds, so streams to it (a relay's) end and are made anew.
            .http2_keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .local_address(self.local)
            .connect_lazy();
        let peer = Peer {
            heartbeats: Heartbeats::start(channel.clone()),
            channel,
        };
        channels.insert(addr.to_owned(), peer.clone());
        Ok(peer)
    }

    /// The connection to `addr` (`host:port`), made on first use.
    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(self.peer(addr)?.channel)
    }

    /// A client of the `Queues` service of the node at `addr`.
    pub fn queues(
        &self,
        addr: &str,
    ) -> Result<super::proto::queues_client::QueuesClient<Channel>, tonic::transport::Error> {
        Ok(
            super::proto::queues_client::QueuesClient::new(self.channel(addr)?)
                .max_decoding_message_size(256 << 20),
        )
    }
}

/// One peer: its connection, and the queue gathering idle groups' heartbeats to it.
#[derive(Clone, Debug)]
struct Peer {
    channel: Channel,
    heartbeats: Heartbeats,
}

/// Why a proposal forwarded to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The peer could not be reached, or refused the request.
    #[error("forwarding to {addr}: {status}")]
    Transport { addr: String, status: tonic::Status },
    /// The peer's Raft refused it (not the leader, or shutting down).
    #[error("{0}")]
    Raft(Box<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>),
    /// The peer's answer did not decode.
    #[error("unreadable answer from {addr}: {error}")]
    Decode {
        addr: String,
        error: serde_json::Error,
    },
}

impl Peers {
    /// Proposes `proposal` to `group` through the node at `addr` (its leader, as far as
    /// this node knows).
    pub async fn propose(
        &self,
        addr: &str,
        group: u64,
        proposal: &Proposal,
    ) -> Result<ClientWriteResponse<PartitionRaft>, ProposeError> {
        let transport = |status| ProposeError::Transport {
            addr: addr.to_owned(),
            status,
        };
        let channel = self
            .channel(addr)
            .map_err(|e| transport(tonic::Status::unavailable(e.to_string())))?;
        let request = RaftRequest {
            group,
            body: proposal.0.as_bytes().clone(),
        };
        let reply = RaftTransportClient::new(channel)
            .propose(request)
            .await
            .map_err(transport)?;
        let result: Result<
            ClientWriteResponse<PartitionRaft>,
            RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
        > = serde_json::from_slice(&reply.into_inner().body).map_err(|error| {
            ProposeError::Decode {
                addr: addr.to_owned(),
                error,
            }
        })?;
        result.map_err(|e| ProposeError::Raft(Box::new(e)))
    }
}

impl Peers {
    /// Sends `message` to the node at `addr` through `call`, within `timeout` from the
    /// start: the request's own deadline does not bound connecting.
    async fn call<T, R, F, Fut>(
        &self,
        addr: &str,
        timeout: Duration,
        message: T,
        call: F,
    ) -> Result<R, tonic::Status>
    where
        F: FnOnce(Channel, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let channel = self
            .channel(addr)
            .map_err(|e| tonic::Status::unavailable(format!("{addr}: {e}")))?;
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, call(channel, request)).await {
            Ok(answer) => Ok(answer?.into_inner()),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "{addr} did not answer within {timeout:?}"
            ))),
        }
    }

    /// Asks the node at `addr` to take `step` of handing `group`'s leadership to `to`.
    pub async fn handover(
        &self,
        addr: &str,
        group: u64,
        to: NodeId,
        step: HandoverStep,
        forwarded: bool,
        timeout: Duration,
    ) -> Result<(), tonic::Status> {
        let request = HandoverRequest {
            group,
            to,
            step: step.into(),
            forwarded,
        };
        self.call(addr, timeout, request, |channel, request| async move {
            LeadershipClient::new(channel).handover(request).await
        })
        .await
        .map(|_| ())
    }

    /// Batches of `group` from `offset` up to `upto` as the node at `addr` stores them.
    pub async fn read_log(
        &self,
        addr: &str,
        group: u64,
        offset: u64,
        upto: u64,
    ) -> Result<Vec<bytes::Bytes>, tonic::Status> {
        let request = ReadLogRequest {
            group,
            offset,
            upto,
            max_bytes: READ_LOG_BYTES,
        };
        let reply = self
            .call(
                addr,
                READ_LOG_TIMEOUT,
                request,
                |channel, request| async move {
                    let mut client =
                        LeadershipClient::new(channel).max_decoding_message_size(64 << 20);
                    client.read_log(request).await
                },
            )
            .await?;
        Ok(reply.batches)
    }

    /// Whether the node at `addr` answers within `timeout`.
    pub async fn ping(&self, addr: &str, timeout: Duration) -> bool {
        self.call(
            addr,
            timeout,
            PingRequest {},
            |channel, request| async move { RaftTransportClient::new(channel).ping(request).await },
        )
        .await
        .is_ok()
    }

    /// How far each replica of `group` is behind, and the end offset, from its leader
    /// at `addr`.
    pub async fn lag(
        &self,
        addr: &str,
        group: u64,
    ) -> Result<crate::cluster::Progress, tonic::Status> {
        let reply = self
            .call(
                addr,
                LAG_TIMEOUT,
                LagRequest { group },
                |channel, request| async move { LeadershipClient::new(channel).lag(request).await },
            )
            .await?;
        Ok(crate::cluster::Progress {
            lag: reply.entries_behind,
            end_offset: reply.end_offset,
        })
    }
}

/// A group's `RaftNetworkFactory`.
#[derive(Clone, Debug)]
pub struct Network {
    group: u64,
    peers: Peers,
}

impl RaftNetworkFactory<PartitionRaft> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        let peer = self
            .peers
            .peer(&node.addr)
            .map_err(|e| NetworkError::new(&e));
        Connection {
            group: self.group,
            target,
            peer,
            sent_commit: None,
            busy_at: None,
        }
    }
}

/// One group's link to one peer.
pub struct Connection {
    group: u64,
    target: NodeId,
    peer: Result<Peer, NetworkError>,
    /// The commit index last sent: an append without entries that sends it again is a
    /// heartbeat, one that advances it tells the follower what it may apply.
    sent_commit: Option<LogId<NodeId>>,
    /// When an append last carried entries or commits: the group is idle a while after.
    busy_at: Option<std::time::Instant>,
}

impl Connection {
    fn client(&self) -> Result<RaftTransportClient<Channel>, NetworkError> {
        self.peer
            .as_ref()
            .map(|p| RaftTransportClient::new(p.channel.clone()))
            .map_err(Clone::clone)
    }

    fn request(
        &self,
        body: &impl serde::Serialize,
        option: &RPCOption,
    ) -> Result<tonic::Request<RaftRequest>, NetworkError> {
        let body = serde_json::to_vec(body).map_err(|e| NetworkError::new(&e))?;
        let request = RaftRequest {
            group: self.group,
            body: body.into(),
        };
        Ok(timed(request, option))
    }

    /// openraft's error for a failed call to this connection's peer.
    fn failed<E: std::error::Error>(&self, failure: Failure<E>) -> RpcError<E> {
        match failure {
            Failure::Unreachable(status) => RPCError::Unreachable(Unreachable::new(&status)),
            Failure::Network(e) => RPCError::Network(e),
            Failure::Remote(e) => RPCError::RemoteError(RemoteError::new(self.target, e)),
        }
    }
}

/// How a call failed, before it becomes openraft's (large) error.
enum Failure<E> {
    /// The peer is down or not listening: openraft backs off instead of retrying at once.
    Unreachable(tonic::Status),
    Network(NetworkError),
    /// The peer answered with a Raft error.
    Remote(RaftError<NodeId, E>),
}

/// The peer's result: its response, or the Raft error it answered with.
fn decode<T, E>(
    reply: Result<tonic::Response<RaftReply>, tonic::Status>,
) -> Result<T, Box<Failure<E>>>
where
    T: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let reply = reply.map_err(|status| match status.code() {
        tonic::Code::Unavailable => Box::new(Failure::Unreachable(status)),
        _ => Box::new(Failure::Network(NetworkError::new(&status))),
    })?;
    let result: Result<T, RaftError<NodeId, E>> = serde_json::from_slice(&reply.into_inner().body)
        .map_err(|e| Box::new(Failure::Network(NetworkError::new(&e))))?;
    result.map_err(|e| Box::new(Failure::Remote(e)))
}

fn timed<T>(message: T, option: &RPCOption) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(option.hard_ttl());
    request
}

impl RaftNetwork<PartitionRaft> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        // Only an idle group's heartbeats wait to be batched: a busy group's next append
        // would wait behind its heartbeat.
        let news = !rpc.entries.is_empty() || rpc.leader_commit != self.sent_commit;
        if news {
            self.busy_at = Some(std::time::Instant::now());
        }
        self.sent_commit = rpc.leader_commit;
        let idle = self.busy_at.is_none_or(|t| t.elapsed() > IDLE_AFTER);
        let header = AppendHeader {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            leader_commit: rpc.leader_commit,
        };
        let header =
            serde_json::to_vec(&header).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let entries = rpc
            .entries
            .into_iter()
            .map(|e| entry::encode(e).map(|b| b.as_bytes().clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = AppendRequest {
            group: self.group,
            header: header.into(),
            entries,
        };
        let reply = if !news && idle {
            let heartbeats = match &self.peer {
                Ok(peer) => peer.heartbeats.clone(),
                Err(e) => return Err(RPCError::Network(e.clone())),
            };
            heartbeats
                .send(request, option.hard_ttl())
                .await
                .map(|body| tonic::Response::new(RaftReply { body }))
        } else {
            // On its own: an append with entries waits for the follower's flush, which
            // must not hold up other groups.
            let mut client = self.client().map_err(RPCError::Network)?;
            client.append_entries(timed(request, &option)).await
        };
        decode(reply).map_err(|f| self.failed(*f))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        let request = self.request(&rpc, &option).map_err(RPCError::Network)?;
        let mut client = self.client().map_err(RPCError::Network)?;
        let reply = client.install_snapshot(request).await;
        decode(reply).map_err(|f| self.failed(*f))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        let request = self.request(&rpc, &option).map_err(RPCError::Network)?;
        let mut client = self.client().map_err(RPCError::Network)?;
        let reply = client.vote(request).await;
        decode(reply).map_err(|f| self.failed(*f))
    }
}
