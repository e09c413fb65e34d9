//! What Queue and Topic controllers share: a resource that stands for a destination on
//! a Broker, kept there through the admin API. The flow of one reconcile: paused → do
//! nothing; else under the finalizer either apply (the kind's own step) or clean up
//! (delete on the broker as `deletionPolicy` says); an error becomes a `Ready=False`
//! condition and a Warning Event, and is retried after a backoff.

use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as Finalized};
use kube::{Api, Resource, ResourceExt};
use petrel_api::admin::v1 as api;
use petrel_api::admin::v1::admin_client::AdminClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::conditions::{self, Observed};
use crate::context::{self, Context};
use crate::crd::{Broker, DeletionPolicy};
use crate::error::Error;
use crate::reporting::{self, Reported};

/// Annotation that lets a Queue or Topic go without touching the broker (for a broker
/// that will never answer again): its finalizer is removed at once.
pub const SKIP_CLEANUP_ANNOTATION: &str = "petrel.io/skip-cleanup";

/// A resource standing for a queue or topic on a Broker.
pub trait OnBroker: Reported {
    /// Its finalizer.
    const FINALIZER: &'static str;
    /// The Broker it lives on, in its namespace.
    fn broker_name(&self) -> &str;
    /// What deleting it does on the broker.
    fn deletion_policy(&self) -> DeletionPolicy;
    /// How the admin API names it.
    fn reference(&self) -> api::DestinationRef;
}

/// Makes `object`'s destination on the broker from `spec` if it is not there, else
/// applies what `update` asks of the one there; an Event tells which.
pub async fn create_or_update<K: OnBroker>(
    ctx: &Context,
    object: &K,
    admin: &mut AdminClient<Channel>,
    spec: impl FnOnce() -> Result<api::DestinationSpec, Error>,
    update: impl FnOnce(&api::DestinationSpec) -> Result<Option<api::UpdateDestinationRequest>, Error>,
) -> Result<(), Error> {
    let reference = object.reference();
    let what = format!("{} {:?}", K::KIND.to_lowercase(), reference.name);
    match admin.get_destination(reference).await {
        Ok(found) => {
            if let Some(request) = update(&found.into_inner().spec.unwrap_or_default())? {
                admin.update_destination(request).await?;
                ctx.event(
                    object,
                    false,
                    "Updated",
                    "Update",
                    format!("updated {what}"),
                )
                .await;
            }
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            let request = api::CreateDestinationRequest {
                spec: Some(spec()?),
            };
            admin.create_destination(request).await?;
            let note = format!("created {what} on Broker {:?}", object.broker_name());
            ctx.event(object, false, "Created", "Create", note).await;
        }
        Err(status) => return Err(status.into()),
    }
    Ok(())
}

/// The conditions of a destination the broker shows as `shown`, with `mismatches`
/// (what it does not do as asked), and whether it is ready: every partition has a
/// leader.
pub fn observe(
    what: &str,
    shown: &api::Destination,
    mismatches: &[String],
) -> (Vec<Observed>, bool) {
    let leaderless = shown
        .partitions
        .iter()
        .filter(|p| p.leader.is_none())
        .count();
    let ready = leaderless == 0;
    let (ready_now, progressing) = if ready {
        (
            Observed::yes(
                conditions::READY,
                "InStep",
                format!("{what} is on the broker"),
            ),
            Observed::no(conditions::PROGRESSING, "InStep", "nothing to do"),
        )
    } else {
        let electing = format!("{leaderless} of its partitions have no leader yet");
        (
            Observed::no(
                conditions::READY,
                "ElectingLeaders",
                format!("{what}: {electing}"),
            ),
            Observed::yes(conditions::PROGRESSING, "ElectingLeaders", electing),
        )
    };
    let degraded = if mismatches.is_empty() {
        Observed::no(
            conditions::DEGRADED,
            "AsAsked",
            format!("{what} is as the spec asks"),
        )
    } else {
        Observed::yes(conditions::DEGRADED, "Mismatch", mismatches.join("; "))
    };
    (vec![ready_now, progressing, degraded], ready)
}

/// Stores what the broker shows of `object` (`status`, the kind's own fields, with the
/// conditions from [`observe`]), and says when to look again: at the resync once
/// ready, soon while its partitions elect leaders.
pub async fn finish<K: OnBroker>(
    ctx: &Context,
    object: &K,
    what: &str,
    shown: &api::Destination,
    mismatches: &[String],
    mut status: serde_json::Value,
) -> Result<Action, Error> {
    let (observed, ready) = observe(what, shown, mismatches);
    let generation = object.meta().generation;
    status["observedGeneration"] = json!(generation);
    status["conditions"] = json!(conditions::merge(
        object.conditions(),
        &observed,
        generation
    ));
    reporting::patch_status(ctx, object, status).await?;
    Ok(Action::requeue(if ready {
        ctx.settings.resync
    } else {
        ctx.settings.backoff
    }))
}

/// The Broker `object` names, if it exists.
pub async fn broker<K: OnBroker>(ctx: &Context, object: &K) -> Result<Option<Broker>, Error> {
    let namespace = object.namespace().unwrap_or_default();
    let brokers: Api<Broker> = Api::namespaced(ctx.client.clone(), &namespace);
    Ok(brokers.get_opt(object.broker_name()).await?)
}

/// The Broker `object` names, or why it cannot be used.
pub async fn required_broker<K: OnBroker>(ctx: &Context, object: &K) -> Result<Broker, Error> {
    broker(ctx, object)
        .await?
        .ok_or_else(|| Error::BrokerNotFound(object.broker_name().to_owned()))
}

/// One reconcile of `object`: `apply` brings the broker in step with it.
pub async fn reconcile<K, F, Fut>(
    object: Arc<K>,
    ctx: Arc<Context>,
    apply: F,
) -> Result<Action, Error>
where
    K: OnBroker,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>>,
{
    if context::paused(&*object) {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let result = finalizer::finalizer(&api, K::FINALIZER, object.clone(), |event| async {
        match event {
            Finalized::Apply(object) => apply(object, ctx.clone()).await,
            Finalized::Cleanup(object) => cleanup(&*object, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::InvalidSpec(other.to_string()),
    });
    reporting::reconciled(&*object, &ctx, started, result).await
}

/// Deletion: the destination goes from the broker if `deletionPolicy` says so; nothing
/// is asked of a broker that is gone or going, or when the skip annotation is set.
async fn cleanup<K: OnBroker>(object: &K, ctx: &Context) -> Result<Action, Error> {
    let skip = object
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    let broker = broker(ctx, object)
        .await?
        .filter(|b| b.meta().deletion_timestamp.is_none());
    let (Some(broker), DeletionPolicy::Delete, false) = (broker, object.deletion_policy(), skip)
    else {
        return Ok(Action::await_change());
    };
    let mut admin = crate::admin::connect(&broker).await?;
    match admin.delete_destination(object.reference()).await {
        Ok(_) => {
            ctx.event(
                object,
                false,
                "Deleted",
                "Delete",
                format!(
                    "deleted {} from Broker {}",
                    K::KIND.to_lowercase(),
                    broker.name_any()
                ),
            )
            .await;
        }
        Err(status) if status.code() == tonic::Code::NotFound => {}
        Err(status) => return Err(status.into()),
    }
    Ok(Action::await_change())
}

/// Runs the controller of kind `K` until the stream of its resources ends: every `K`
/// is reconciled on change, on a change of its Broker, and at each resync.
pub async fn run<K, R, Fut>(ctx: Arc<Context>, reconcile: R)
where
    K: OnBroker,
    R: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    use futures_lite::StreamExt;
    use kube::runtime::{Controller, reflector::ObjectRef, watcher};

    let resources: Api<K> = Api::all(ctx.client.clone());
    let brokers: Api<Broker> = Api::all(ctx.client.clone());
    let controller = Controller::new(resources, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(brokers, watcher::Config::default(), move |broker| {
            let (namespace, name) = (broker.namespace(), broker.name_any());
            store
                .state()
                .into_iter()
                .filter(|r| r.namespace() == namespace && r.broker_name() == name)
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        })
        .run(reconcile, reporting::retry, ctx)
        .for_each(|_| ())
        .await;
}
