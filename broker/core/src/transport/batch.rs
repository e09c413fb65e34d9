//! Appends from every group to one peer, sent together: a task per peer takes whatever
//! appends are queued when it runs and sends them as one `AppendBatch` (without waiting
//! for the previous batch to be answered). Heartbeats of idle groups wait up to
//! [`HEARTBEAT_LINGER`] for company, so a thousand idle groups cost a few requests a
//! heartbeat interval, not a thousand. Anything else goes at once: a group has one
//! append in flight to a peer, so a lingering one would hold up its next.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;

use super::proto::raft_transport_client::RaftTransportClient;
use super::proto::{AppendBatchRequest, AppendRequest};

/// The longest a heartbeat waits for others to go with it; well under the heartbeat
/// interval and the leader lease.
const HEARTBEAT_LINGER: Duration = Duration::from_millis(10);
/// Appends in one request at most.
const MAX_BATCH: usize = 512;

/// An append waiting to be sent.
struct Queued {
    request: AppendRequest,
    heartbeat: bool,
    timeout: Duration,
    reply: oneshot::Sender<Result<Bytes, Status>>,
}

/// The queue of appends to one peer.
#[derive(Clone, Debug)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Batcher {
    /// Starts the task sending to the peer behind `channel`; it ends when the last
    /// handle is dropped.
    pub fn start(channel: Channel) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(run(RaftTransportClient::new(channel), queued));
        Self { queue }
    }

    /// Sends `request` with the next batch; returns the Raft result (JSON) or why the
    /// request failed.
    pub async fn append(
        &self,
        request: AppendRequest,
        heartbeat: bool,
        timeout: Duration,
    ) -> Result<Bytes, Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued {
                request,
                heartbeat,
                timeout,
                reply,
            })
            .map_err(|_| Status::unavailable("the sender to this peer stopped"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the sender to this peer stopped"))?
    }
}

async fn run(client: RaftTransportClient<Channel>, mut queued: mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        if batch[0].heartbeat {
            let until = Instant::now() + HEARTBEAT_LINGER;
            while batch.len() < MAX_BATCH {
                tokio::select! {
                    next = queued.recv() => match next {
                        Some(q) => {
                            let urgent = !q.heartbeat;
                            batch.push(q);
                            if urgent {
                                break;
                            }
                        }
                        None => break,
                    },
                    () = tokio::time::sleep_until(until) => break,
                }
            }
        }
        while batch.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        tokio::spawn(send(client.clone(), batch));
    }
}

async fn send(mut client: RaftTransportClient<Channel>, batch: Vec<Queued>) {
    let timeout = batch.iter().map(|q| q.timeout).min();
    let (requests, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|q| (q.request, q.reply)).unzip();
    let mut request = tonic::Request::new(AppendBatchRequest { requests });
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    match client.append_batch(request).await {
        Ok(answer) => {
            let mut results = answer.into_inner().results.into_iter();
            for reply in replies {
                let result = match results.next() {
                    Some(r) if r.code == 0 => Ok(r.body),
                    Some(r) => Err(Status::new(r.code.into(), r.message)),
                    None => Err(Status::internal(
                        "the peer answered fewer appends than sent",
                    )),
                };
                let _ = reply.send(result);
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
