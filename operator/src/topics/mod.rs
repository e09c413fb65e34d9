//! The Topic controller: keeps a topic on its Broker as the Topic resource says — made,
//! grown, its retention set — and shows its partitions, leaders and end offsets in the
//! status. A topic deleted behind the operator's back is made again at the next resync.

pub mod desired;

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;
use petrel_api::admin::v1 as api;

use crate::context::Context;
use crate::crd::{DeletionPolicy, Topic};
use crate::destinations::{self, OnBroker};
use crate::error::Error;
use crate::reporting::Reported;

impl Reported for Topic {
    const KIND: &'static str = "Topic";

    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

impl OnBroker for Topic {
    const FINALIZER: &'static str = "petrel.io/topic";

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

/// One reconcile of a Topic.
pub async fn reconcile(topic: Arc<Topic>, ctx: Arc<Context>) -> Result<Action, Error> {
    destinations::reconcile(topic, ctx, apply).await
}

async fn apply(topic: Arc<Topic>, ctx: Arc<Context>) -> Result<Action, Error> {
    let broker = destinations::required_broker(&ctx, &*topic).await?;
    let mut admin = crate::admin::connect(&broker).await?;
    let reference = desired::reference(&topic);
    let name = reference.name.clone();
    destinations::create_or_update(
        &ctx,
        &*topic,
        &mut admin,
        || desired::spec(&topic),
        |current| desired::update(&topic, current),
    )
    .await?;

    let shown = admin.get_destination(reference).await?.into_inner();
    let mismatches = desired::mismatches(&topic, &shown.spec.clone().unwrap_or_default());
    let status = desired::observed(&shown);
    let what = format!("topic {name:?}");
    destinations::finish(&ctx, &*topic, &what, &shown, &mismatches, status).await
}
