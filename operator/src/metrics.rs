//! The operator's own metrics, served on its `/metrics`: reconciles, their errors and
//! how long they take, per kind of resource.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The operator's registry and the metrics it fills.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
}

impl Metrics {
    /// A registry with `petrel_operator_reconciles_total{kind}`,
    /// `petrel_operator_reconcile_errors_total{kind,reason}` and
    /// `petrel_operator_reconcile_duration_seconds{kind}`.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "petrel_operator_reconciles_total",
                "Reconciles run, by kind of resource.",
            ),
            &["kind"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "petrel_operator_reconcile_errors_total",
                "Reconciles that failed, by kind of resource and reason.",
            ),
            &["kind", "reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "petrel_operator_reconcile_duration_seconds",
                "How long reconciles take, by kind of resource.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
            ]),
            &["kind"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            duration,
        })
    }

    /// Counts one reconcile of a `kind` that took `took` and failed for `error`, if so.
    pub fn reconciled(&self, kind: &str, took: Duration, error: Option<&str>) {
        self.reconciles.with_label_values(&[kind]).inc();
        self.duration
            .with_label_values(&[kind])
            .observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.errors.with_label_values(&[kind, reason]).inc();
        }
    }

    /// Everything in Prometheus' text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
