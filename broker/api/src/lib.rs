//! Petrel's admin gRPC contract, shared by the broker and the operator.
//!
//! * `proto/petrel/admin/v1/admin.proto` is the source of truth; `build.rs` generates the
//!   Rust code from it at build time (protox, so no `protoc` is needed).
//! * [`admin::v1`] holds the messages, the [`admin::v1::admin_client::AdminClient`] the
//!   operator calls and the [`admin::v1::admin_server::Admin`] trait the broker implements.
//!
//! This crate holds no logic: no broker state, no I/O beyond what tonic generates.

/// The `petrel.admin` protobuf packages, one module per API version.
pub mod admin {
    /// `petrel.admin.v1`: node status (more services follow as the broker gains them).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("petrel.admin.v1");
    }
}
