//! The Queue controller: keeps a queue on its Broker as the Queue resource says — made
//! with its arguments, grown, bound to exchanges — and shows its partitions, leaders and
//! counts in the status. A queue deleted behind the operator's back is made again at
//! the next resync.

pub mod desired;

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;
use petrel_api::admin::v1 as api;
use serde_json::json;

use crate::context::Context;
use crate::crd::{DeletionPolicy, Queue};
use crate::destinations::{self, OnBroker};
use crate::error::Error;
use crate::reporting::Reported;

impl Reported for Queue {
    const KIND: &'static str = "Queue";

    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

impl OnBroker for Queue {
    const FINALIZER: &'static str = "petrel.io/queue";

    fn broker_name(&self) -> &str {
        &self.spec.broker_ref.name
    }

    fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy
    }

    fn reference(&self) -> api::DestinationRef {
        desired::reference(self)
    }
}

/// One reconcile of a Queue.
pub async fn reconcile(queue: Arc<Queue>, ctx: Arc<Context>) -> Result<Action, Error> {
    destinations::reconcile(queue, ctx, apply).await
}

async fn apply(queue: Arc<Queue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let broker = destinations::required_broker(&ctx, &*queue).await?;
    let mut admin = crate::admin::connect(&broker).await?;
    let reference = desired::reference(&queue);
    let name = reference.name.clone();
    destinations::create_or_update(
        &ctx,
        &*queue,
        &mut admin,
        || desired::spec(&queue),
        |current| Ok(desired::update(&queue, current)),
    )
    .await?;

    let applied = queue
        .status
        .as_ref()
        .map(|s| s.bindings.clone())
        .unwrap_or_default();
    let listed = api::ListBindingsRequest {
        vhost: queue.spec.vhost.clone(),
        queue: name.clone(),
    };
    let present = admin.list_bindings(listed).await?.into_inner().bindings;
    let (add, remove) = desired::binding_changes(&queue, &applied, &present);
    for binding in add {
        let note = format!(
            "bound to exchange {:?} with key {:?}",
            binding.exchange, binding.routing_key
        );
        admin.bind(binding).await?;
        ctx.event(&*queue, false, "Bound", "Bind", note).await;
    }
    for binding in remove {
        let note = format!(
            "unbound from exchange {:?} with key {:?}",
            binding.exchange, binding.routing_key
        );
        admin.unbind(binding).await?;
        ctx.event(&*queue, false, "Unbound", "Unbind", note).await;
    }

    let shown = admin.get_destination(reference).await?.into_inner();
    let mismatches = desired::mismatches(&queue, &shown.spec.clone().unwrap_or_default())?;
    let mut status = desired::observed(&shown);
    status["bindings"] = json!(queue.spec.bindings);
    let what = format!("queue {name:?}");
    destinations::finish(&ctx, &*queue, &what, &shown, &mismatches, status).await
}
