//! `petrel-bench`: Petrel's benchmark programs. Each subcommand drives one layer and
//! reports throughput, latency percentiles and resource use, with ratios to a reference
//! measured in the same run (DESIGN.md §8).

mod amqp;
mod cluster;
mod disk;
mod log;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "petrel-bench", version, about = "Petrel benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The storage engine against the disk's own limits.
    Log(log::Args),
    /// Clusters of `petrel` processes: replication factor 1 against 3, idle cost, failover.
    Cluster(cluster::Args),
    /// An AMQP 0-9-1 broker (Petrel or RabbitMQ) under confirmed load: throughput,
    /// end-to-end latency, lost and duplicated messages, broker CPU per message.
    Amqp(amqp::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Log(args) => log::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Amqp(args) => amqp::run(args),
    }
}
