//! Harness for black-box tests of `petrel` processes (tests in `tests/`), and later the
//! home of the benchmark tool (`src/bin/`).
//!
//! * [`amqp`]: the AMQP broker a test talks to (a fresh node, or an external broker).
//! * `binary`: finds the built `petrel` binary next to the running test executable.
//! * [`Serve`]: a `petrel serve` command line being prepared in a fresh temp directory,
//!   with a free HTTP port reserved for it.
//! * [`PetrelProcess`]: a running node: HTTP probes, waiting for readiness or for a log
//!   line with a timeout, SIGTERM/SIGINT, exit status and captured output.
//! * [`cluster`]: a static cluster of nodes on loopback, restarted on their data.
//! * [`python`]: Python client programs (the RabbitMQ tutorials in pika, …) run in a
//!   cached virtualenv against a broker under test, their output captured.
//! * `http`: a dependency-free HTTP/1.0 GET for `/healthz`, `/readyz` and `/metrics`.
//! * `port`: free loopback ports.
//!
//! Every wait polls a condition until a deadline; nothing sleeps for a fixed time and hopes.
//! Errors are `anyhow` errors that carry the process's output, so a failing test says why.

pub mod amqp;
mod binary;
pub mod cluster;
mod http;
mod port;
mod process;
pub mod python;

pub use binary::{BINARY_ENV, petrel_binary, petrel_command};
pub use http::{HttpResponse, http_get};
pub use port::{free_port, free_port_other_than};
pub use process::{Exited, PetrelProcess, Serve, Signal, cpu_seconds_of};
