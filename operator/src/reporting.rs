//! How every controller reports: the status merged through the status subresource,
//! an error shown as `Ready=False` with its reason and a Warning Event, metrics for each
//! reconcile, and a backoff that grows with failures in a row.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::conditions::{self, Observed};
use crate::context::Context;
use crate::error::Error;

/// A resource the operator reconciles and reports on.
pub trait Reported:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Its kind, for metrics and logs.
    const KIND: &'static str;
    /// Its conditions as last stored.
    fn conditions(&self) -> &[Condition];
}

/// Merges `status` (a JSON object) into `object`'s status.
pub async fn patch_status<K: Reported>(
    ctx: &Context,
    object: &K,
    status: serde_json::Value,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Counts a reconcile of `object` begun at `started`, and reports its failure; passes
/// `result` on.
pub async fn reconciled<K: Reported>(
    object: &K,
    ctx: &Context,
    started: Instant,
    result: Result<Action, Error>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled(
        K::KIND,
        started.elapsed(),
        result.as_ref().err().map(Error::reason),
    );
    match &result {
        Ok(_) => ctx.succeeded(&key(object)),
        Err(e) => report(object, ctx, e).await,
    }
    result
}

/// When to look at `object` again after `error`.
pub fn retry<K: Reported>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(kind = K::KIND, name = %object.name_any(), error = %error, "reconcile failed");
    ctx.failed(key(&*object))
}

fn key<K: Reported>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::KIND,
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Shows `error` on `object`: `Ready=False` with its reason, and a Warning Event.
async fn report<K: Reported>(object: &K, ctx: &Context, error: &Error) {
    let message = error.to_string();
    if object.meta().deletion_timestamp.is_none() {
        let ready = Observed::no(conditions::READY, error.reason(), &message);
        let status = json!({
            "conditions": conditions::merge(object.conditions(), &[ready], object.meta().generation),
        });
        if let Err(e) = patch_status(ctx, object, status).await {
            tracing::warn!(error = %e, "could not store the failure in the status");
        }
    }
    ctx.event(object, true, error.reason(), "Reconcile", message)
        .await;
}
