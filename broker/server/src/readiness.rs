//! Where the node is in its life: starting, ready, or stopping. `/readyz` reads it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// A phase of the node's life; phases only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Binding listeners and opening storage.
    Starting = 0,
    /// Storage open, every listener bound, a member of the cluster: clients may be sent
    /// here.
    Ready = 1,
    /// Shutdown began: no new clients should be sent here.
    Stopping = 2,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }

    /// Lower-case name, as `/readyz` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
        }
    }
}

/// The node's current [`Phase`], shared by the startup path and the HTTP handlers.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicU8>);

impl Default for Readiness {
    fn default() -> Readiness {
        Readiness(Arc::new(AtomicU8::new(Phase::Starting as u8)))
    }
}

impl Readiness {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.load(Ordering::Acquire))
    }

    /// Moves to `phase` unless the node is already past it (a node that began stopping
    /// never becomes ready again).
    pub(crate) fn advance(&self, phase: Phase) {
        self.0.fetch_max(phase as u8, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_node_is_starting() {
        assert_eq!(Readiness::default().phase(), Phase::Starting);
    }

    #[test]
    fn a_stopping_node_never_becomes_ready_again() {
        let readiness = Readiness::default();
        readiness.advance(Phase::Ready);
        assert_eq!(readiness.phase(), Phase::Ready);
        readiness.advance(Phase::Stopping);
        readiness.advance(Phase::Ready);
        assert_eq!(readiness.phase(), Phase::Stopping);
    }
}
