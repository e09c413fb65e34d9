//! The process's shutdown trigger: SIGTERM (Kubernetes) or SIGINT (Ctrl-C).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Handlers for SIGTERM and SIGINT, installed before the node starts so that no signal
/// arriving during startup is lost.
#[derive(Debug)]
pub struct ShutdownSignal {
    terminate: Signal,
    interrupt: Signal,
}

impl ShutdownSignal {
    /// Installs the handlers; must be called inside a tokio runtime.
    pub fn install() -> std::io::Result<ShutdownSignal> {
        Ok(ShutdownSignal {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Completes when the first of the two signals arrives, and logs which.
    pub async fn recv(mut self) {
        let name = tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "received shutdown signal");
    }
}
