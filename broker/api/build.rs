//! Generates the gRPC code for `proto/` into `OUT_DIR`.
//!
//! protox parses the .proto files in pure Rust, so no `protoc` is needed on the machine;
//! tonic-prost-build then writes the messages (prost) and the client and server (tonic).

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &["petrel/admin/v1/admin.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
