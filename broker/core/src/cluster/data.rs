//! The internal produce/fetch service (`petrel.internal.v1.Data`): records in and out of
//! partitions by queue or topic name, for tests and benchmarks until the client
//! protocols exist.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{ClusterNode, NewRecord, Started};
use crate::meta::Kind;
use crate::transport::proto::data_server::{Data, DataServer};
use crate::transport::proto::{
    FetchRequest, FetchResponse, FetchedRecord, ProduceRequest, ProduceResponse, Target,
};

/// The service; it answers `UNAVAILABLE` until its node has started.
#[derive(Clone)]
pub(super) struct DataService {
    node: Started,
}

impl DataService {
    pub fn server(node: Started) -> DataServer<Self> {
        DataServer::new(Self { node })
    }

    fn node(&self) -> Result<Arc<ClusterNode>, Status> {
        self.node.get()
    }
}

fn target(t: Option<Target>) -> Result<(Kind, String, u32), Status> {
    let t = t.ok_or_else(|| Status::invalid_argument("target is required"))?;
    let kind = match t.kind.as_str() {
        "queue" => Kind::Queue,
        "topic" => Kind::Topic,
        other => {
            return Err(Status::invalid_argument(format!(
                "kind must be queue or topic, not {other:?}"
            )));
        }
    };
    Ok((kind, t.name, t.partition))
}

#[tonic::async_trait]
impl Data for DataService {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let request = request.into_inner();
        let (kind, name, partition) = target(request.target)?;
        if request.records.is_empty() {
            return Err(Status::invalid_argument("no records to produce"));
        }
        let now = super::now_ms();
        let records: Vec<NewRecord<'_>> = request
            .records
            .iter()
            .map(|r| NewRecord {
                timestamp: now,
                key: r.key.as_deref(),
                value: &r.value,
                headers: &[],
            })
            .collect();
        let node = self.node()?;
        let (base_offset, next_offset) = node
            .produce(kind, &name, partition, &records)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(ProduceResponse {
            base_offset,
            next_offset,
        }))
    }

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let request = request.into_inner();
        let (kind, name, partition) = target(request.target)?;
        let node = self.node()?;
        let max_bytes = usize::try_from(request.max_bytes.max(1)).unwrap_or(usize::MAX);
        let (batches, high_watermark) = node
            .fetch(kind, &name, partition, request.offset, max_bytes)
            .map_err(Status::from)?;
        let mut records = Vec::new();
        for b in batches {
            let decoded = b
                .records()
                .map_err(|e| Status::data_loss(format!("a stored batch does not decode: {e}")))?;
            records.extend(
                decoded
                    .into_iter()
                    .filter(|r| r.offset >= request.offset)
                    .map(|r| FetchedRecord {
                        offset: r.offset,
                        key: r.key,
                        value: r.value,
                        timestamp: r.timestamp,
                    }),
            );
        }
        Ok(Response::new(FetchResponse {
            records,
            high_watermark,
        }))
    }
}
