//! Petrel's Kubernetes operator (DESIGN.md §6).
//!
//! * [`crd`]: the custom resources `Broker`, `Queue` and `Topic` in [`API_GROUP`] /
//!   [`API_VERSION`], whose definitions the `crdgen` binary writes to `crds/`.
//! * [`queues`] and [`topics`]: their controllers, over what [`destinations`] shares;
//!   each kind's `desired` module holds the pure functions from resource to admin API
//!   requests and from the broker's answer to status.
//! * [`admin`]: how a Broker's admin API is reached — the only way the operator talks
//!   to brokers.
//! * [`context`], [`conditions`], [`reporting`], [`error`], [`metrics`]: what every
//!   reconcile shares;
//!   [`http`]: the operator's `/metrics`, `/healthz` and `/readyz`.
//! * [`brokers`]: the Broker controller — the objects that run a Broker (`desired`),
//!   and its scale and roll decisions (`plan`), carried out through the admin API.

pub mod admin;
pub mod brokers;
pub mod conditions;
pub mod context;
pub mod crd;
pub mod destinations;
pub mod error;
pub mod http;
pub mod metrics;
pub mod queues;
pub mod reporting;
pub mod topics;

use std::sync::Arc;

pub use context::{Context, Settings};
pub use error::Error;

/// Runs every controller with `ctx` until their watches end.
pub async fn run(ctx: Arc<Context>) {
    tokio::join!(
        brokers::run(ctx.clone()),
        destinations::run::<crd::Queue, _, _>(ctx.clone(), queues::reconcile),
        destinations::run::<crd::Topic, _, _>(ctx, topics::reconcile),
    );
}

/// The API group of every Petrel custom resource.
pub const API_GROUP: &str = "petrel.io";

/// The version of the custom resources inside [`API_GROUP`].
pub const API_VERSION: &str = "v1alpha1";

/// `apiVersion` as written in a manifest: `petrel.io/v1alpha1`.
pub const API_GROUP_VERSION: &str = "petrel.io/v1alpha1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_version_is_group_slash_version() {
        assert_eq!(API_GROUP_VERSION, format!("{API_GROUP}/{API_VERSION}"));
    }
}
