//! `petrel-operator`: runs the operator's controllers against the cluster
//! of its kubeconfig (in a pod: its service account), with `/metrics`, `/healthz` and
//! `/readyz` on its HTTP port, until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::Client;
use petrel_operator::{Context, Settings, http, metrics::Metrics};
use tracing_subscriber::EnvFilter;

/// Petrel's Kubernetes operator.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the HTTP listener (/metrics, /healthz, /readyz)
    #[arg(long, env = "PETREL_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Log lines as `text` or `json`
    #[arg(long, env = "PETREL_OPERATOR_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter directives)
    #[arg(long, env = "PETREL_OPERATOR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Seconds between looks at a resource that is in step (drift correction)
    #[arg(long, env = "PETREL_OPERATOR_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log_level).context("invalid --log-level")?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    let listener = http::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on {}", args.http))?;
    let serving = tokio::spawn(http::serve(listener, metrics.clone(), ready.clone()));

    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    client
        .apiserver_version()
        .await
        .context("the API server does not answer")?;
    let settings = Settings {
        resync: Duration::from_secs(args.resync_seconds),
        ..Settings::default()
    };
    let ctx = Arc::new(Context::new(client, settings, metrics));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(http = %args.http, version = env!("CARGO_PKG_VERSION"), "petrel-operator is running");
    tokio::select! {
        () = petrel_operator::run(ctx) => tracing::warn!("the controllers stopped"),
        () = shutdown() => tracing::info!("shutting down"),
    }
    serving.abort();
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
