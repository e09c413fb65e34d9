//! What every reconcile shares: the Kubernetes client, the Event recorder, the settings,
//! the metrics, and each resource's failures in a row (for its backoff).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::metrics::Metrics;

/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "petrel-operator";

/// Annotation that stops the operator from changing a resource (and what it made) until
/// it is removed.
pub const PAUSED_ANNOTATION: &str = "petrel.io/paused";

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often a resource that is in step is looked at again, so that what changed
    /// behind the operator's back (a queue deleted through the broker) is put back.
    pub resync: Duration,
    /// The first retry after a failure; each further one waits twice as long.
    pub backoff: Duration,
    /// The longest wait between retries.
    pub max_backoff: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            resync: Duration::from_secs(30),
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Publishes Events on the resources.
    pub recorder: Recorder,
    /// How the operator runs.
    pub settings: Settings,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// Failures in a row, by resource (kind/namespace/name).
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, settings: Settings, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            failures: Mutex::default(),
        }
    }

    /// Publishes an Event on `object`; a failure to publish is only logged.
    pub async fn event<K>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an event");
        }
    }

    /// Forgets the failures of resource `key`: it was reconciled.
    pub fn succeeded(&self, key: &str) {
        self.failures().remove(key);
    }

    /// When to retry resource `key`, which just failed: after a backoff that doubles
    /// with each failure in a row.
    pub fn failed(&self, key: String) -> Action {
        let mut failures = self.failures();
        let n = failures.entry(key).or_insert(0);
        let wait = self
            .settings
            .backoff
            .saturating_mul(1 << (*n).min(16))
            .min(self.settings.max_backoff);
        *n += 1;
        Action::requeue(wait)
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether `object` carries the pause annotation set to `true`.
pub fn paused<K: Resource>(object: &K) -> bool {
    object
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(PAUSED_ANNOTATION))
        .is_some_and(|v| v == "true")
}
