//! Heartbeats of idle groups to one peer, sent together: a task per peer gathers the
//! heartbeats that arrive within [`LINGER`] of the first and sends them as one
//! `AppendBatch` (without waiting for the previous batch to be answered), so a thousand
//! idle groups cost a few requests a heartbeat interval, not a thousand. Appends that
//! carry entries or commits go on their own: they wait for a follower's flush, and a
//! group has one append in flight to a peer, so a lingering one would hold up its next.

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
const LINGER: Duration = Duration::from_millis(10);
/// Heartbeats in one request at most.
const MAX_BATCH: usize = 1024;

/// A heartbeat waiting to be sent.
struct Queued {
    request: AppendRequest,
    timeout: Duration,
    reply: oneshot::Sender<Result<Bytes, Status>>,
}

/// The queue of heartbeats to one peer.
#[derive(Clone, Debug)]
pub(super) struct Heartbeats {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Heartbeats {
    /// Starts the task sending to the peer behind `channel`; it ends when the last
    /// handle is dropped.
    pub fn start(channel: Channel) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(run(RaftTransportClient::new(channel), queued));
        Self { queue }
    }

    /// Sends `request` (an append without entries) with the next batch; returns the Raft
    /// result (JSON) or why the request failed.
    pub async fn send(&self, request: AppendRequest, timeout: Duration) -> Result<Bytes, Status> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Status::unavailable("the heartbeat sender to this peer stopped");
        self.queue
            .send(Queued {
                request,
                timeout,
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(client: RaftTransportClient<Channel>, mut queued: mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        let until = Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            tokio::select! {
                next = queued.recv() => match next {
                    Some(q) => batch.push(q),
                    None => break,
                },
                () = tokio::time::sleep_until(until) => break,
            }
        }
        tokio::spawn(send(client.clone(), batch));
    }
}

async fn send(mut client: RaftTransportClient<Channel>, batch: Vec<Queued>) {
    let timeout = batch.iter().map(|q| q.timeout).min();
    let (requests, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|q| (q.request, q.reply)).unzip();
    let mut request = tonic::Request::new(AppendBatchRequest {
        requests: requests.clone(),
    });
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
        // A peer of an older version: one request each, as before batches.
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            for (request, reply) in requests.into_iter().zip(replies) {
                let mut single = tonic::Request::new(request);
                if let Some(timeout) = timeout {
                    single.set_timeout(timeout);
                }
                let result = client
                    .append_entries(single)
                    .await
                    .map(|r| r.into_inner().body);
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
