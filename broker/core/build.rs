//! Generates the internal transport's gRPC code from `proto/` (protox: no `protoc`).

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "petrel/internal/v1/raft.proto",
    "petrel/internal/v1/queues.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;
    // `bytes::Bytes` fields: entries are sliced from the request, not copied.
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
