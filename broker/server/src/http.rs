//! The HTTP listener: `/healthz` (liveness), `/readyz` (readiness) and `/metrics`.
//!
//! It is bound first and answers while storage recovers, so a slow recovery reads as
//! "alive, not ready" rather than as a dead process.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::readiness::{Phase, Readiness};

/// Content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the handlers read.
#[derive(Clone)]
struct HttpState {
    readiness: Readiness,
    metrics: Metrics,
}

/// A running HTTP listener; [`HttpServer::stop`] drains it.
pub(crate) struct HttpServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl HttpServer {
    /// Serves the endpoints on `listener` until stopped (or until this value is dropped).
    pub(crate) fn start(
        listener: TcpListener,
        addr: SocketAddr,
        readiness: Readiness,
        metrics: Metrics,
    ) -> HttpServer {
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(HttpState { readiness, metrics });
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                })
                .await
        });
        HttpServer { addr, stop, task }
    }

    /// The address actually bound.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight requests finish for at most `drain`, then returns.
    pub(crate) async fn stop(self, drain: Duration) {
        let HttpServer { addr, stop, task } = self;
        let _ = stop.send(());
        let abort = task.abort_handle();
        match tokio::time::timeout(drain, task).await {
            Ok(Ok(Ok(()))) => tracing::info!(%addr, "http listener stopped"),
            Ok(Ok(Err(err))) => tracing::warn!(%addr, error = %err, "http listener failed"),
            Ok(Err(err)) => tracing::warn!(%addr, error = %err, "http task failed"),
            Err(_) => {
                abort.abort();
                tracing::warn!(%addr, ?drain, "http requests still open after drain; closed");
            }
        }
    }
}

fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// 200 while the process runs.
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 once the node is ready, 503 while starting and once stopping.
async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    match state.readiness.phase() {
        Phase::Ready => (StatusCode::OK, "ok\n".to_owned()),
        phase => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", phase.name()),
        ),
    }
}

/// Every metric of the node's registry, in Prometheus text format.
async fn metrics(State(state): State<HttpState>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot render metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n").into_response()
        }
    }
}
