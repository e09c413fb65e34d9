//! The `petrel` binary: parses the command line and hands over to `petrel_server::run`.
//!
//! Exit codes: 0 after a clean shutdown, 1 on any error (printed as one line on stderr),
//! 2 on a command-line usage error (clap's).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use petrel_server::cli::{
    self, ClusterCommand, Connection, DestinationCommand, NodeCommand, UserCommand, VhostCommand,
};
use petrel_server::{Config, Settings, ShutdownSignal};

/// Petrel: a message broker for Kubernetes.
#[derive(Parser)]
#[command(name = "petrel", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the serve settings does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a broker node.
    ///
    /// Every setting is a flag, an environment variable `PETREL_<NAME>` and a key of the
    /// YAML file given by --config; precedence: flag > environment > file > default.
    Serve(Settings),
    /// The cluster, through a node's admin API.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Nodes of the cluster.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Topics (kept by retention, any number of subscriptions).
    Topic {
        #[command(subcommand)]
        command: DestinationCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Queues (kept until acknowledged).
    Queue {
        #[command(subcommand)]
        command: DestinationCommand,
        /// The queues' virtual host.
        #[arg(long, default_value = "/", global = true)]
        vhost: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Virtual hosts (AMQP's vhosts: separate sets of queues and exchanges).
    Vhost {
        #[command(subcommand)]
        command: VhostCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Users who may connect, and the vhosts each may open.
    User {
        #[command(subcommand)]
        command: UserCommand,
        #[command(flatten)]
        connection: Connection,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(settings) => serve(settings),
        Command::Cluster {
            command,
            connection,
        } => admin(async move { cli::cluster(&command, &connection).await }),
        Command::Node {
            command,
            connection,
        } => admin(async move { cli::node(&command, &connection).await }),
        Command::Topic {
            command,
            connection,
        } => admin(async move {
            let kind = petrel_api::admin::v1::Kind::Topic;
            cli::destination(kind, "", &command, &connection).await
        }),
        Command::Queue {
            command,
            vhost,
            connection,
        } => admin(async move {
            let kind = petrel_api::admin::v1::Kind::Queue;
            cli::destination(kind, &vhost, &command, &connection).await
        }),
        Command::Vhost {
            command,
            connection,
        } => admin(async move { cli::vhost(&command, &connection).await }),
        Command::User {
            command,
            connection,
        } => admin(async move { cli::user(&command, &connection).await }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("petrel: error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let config = Config::load(settings)?;
    petrel_server::init_logging(config.log_format, config.log_level.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let signal = ShutdownSignal::install().context("cannot install signal handlers")?;
        petrel_server::run(config, signal.recv()).await?;
        Ok(())
    })
}

/// Runs an admin command and prints its answer.
fn admin(command: impl std::future::Future<Output = anyhow::Result<String>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    print!("{}", runtime.block_on(command)?);
    Ok(())
}

/// The error and its causes joined by ": " on one line, skipping a cause whose text the
/// line already ends with (errors that print their source themselves).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
