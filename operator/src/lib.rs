//! Petrel's Kubernetes operator (DESIGN.md §6).
//!
//! * [`crd`]: the custom resources `Broker`, `Queue` and `Topic` in [`API_GROUP`] /
//!   [`API_VERSION`], whose definitions the `crdgen` binary writes to `crds/`.
//!
//! Still to come: pure desired-state builders (Broker → StatefulSet, Services, ConfigMap,
//! PodDisruptionBudget, monitoring objects) and the kube-rs controllers that server-side
//! apply them and report status, reaching brokers only through `petrel-api`'s admin client.

pub mod crd;

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
