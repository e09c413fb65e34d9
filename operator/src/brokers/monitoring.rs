//! A Broker's monitoring objects, each when its spec asks for it: a ServiceMonitor and a
//! PrometheusRule (the Prometheus operator's kinds, made only where their definitions
//! are installed; where not, the Broker says so as `Degraded`) and a Grafana dashboard
//! ConfigMap, which Grafana's dashboard sidecar finds by its label. The alert rules and
//! the dashboard live in the chart (`charts/petrel/monitoring/`); each Broker gets them
//! narrowed to its own pods.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::{delete_if_there, desired};
use crate::admin::headless_service;
use crate::context::{Context, FIELD_MANAGER};
use crate::crd::Broker;
use crate::error::Error;

/// The alert rules, with `PETREL_SELECTOR` and `PETREL_REPLICAS` to fill in.
const ALERTS: &str = include_str!("../../../charts/petrel/monitoring/alerts.yaml");
/// The dashboard, with `PETREL_SELECTOR`, `PETREL_UID` and `PETREL_TITLE` to fill in.
const DASHBOARD: &str = include_str!("../../../charts/petrel/monitoring/dashboard.json");
/// The Prometheus operator's API group and version.
const MONITORING_API: &str = "monitoring.coreos.com/v1";
/// The label Grafana's dashboard sidecar looks for (the Grafana chart's default).
pub const DASHBOARD_LABEL: &str = "grafana_dashboard";
/// The label on the Service a ServiceMonitor scrapes (the headless one: every pod,
/// ready or not).
pub const SCRAPED_LABEL: &str = "petrel.io/scraped";

/// The Prometheus operator's kinds a Broker may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Tells Prometheus to scrape the brokers.
    ServiceMonitor,
    /// The brokers' alert rules.
    PrometheusRule,
}

impl Kind {
    fn resource(self) -> ApiResource {
        let kind = match self {
            Kind::ServiceMonitor => "ServiceMonitor",
            Kind::PrometheusRule => "PrometheusRule",
        };
        ApiResource::from_gvk(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind))
    }

    fn wanted(self, broker: &Broker) -> bool {
        match self {
            Kind::ServiceMonitor => broker.spec.monitoring.service_monitor,
            Kind::PrometheusRule => broker.spec.monitoring.prometheus_rule,
        }
    }
}

/// The label matchers of the Broker's scrape targets: its namespace, and the job its
/// ServiceMonitor gives them (the scraped Service's name).
pub fn selector(broker: &Broker) -> String {
    format!(
        "namespace=\"{}\",job=\"{}\"",
        broker.namespace().unwrap_or_default(),
        headless_service(&broker.name_any())
    )
}

/// The objects' name.
fn name(broker: &Broker) -> String {
    format!("{}-petrel", broker.name_any())
}

/// `value` with every `(token, replacement)` put in each string it holds.
fn fill(value: &mut Value, tokens: &[(&str, &str)]) {
    match value {
        Value::String(s) => {
            for (token, replacement) in tokens {
                if s.contains(token) {
                    *s = s.replace(token, replacement);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| fill(v, tokens)),
        Value::Object(map) => map.values_mut().for_each(|v| fill(v, tokens)),
        _ => {}
    }
}

/// The alert rule groups for `broker` (a PrometheusRule's spec, or a rules file).
pub fn alert_rules(broker: &Broker) -> Result<Value, Error> {
    let mut rules: Value = serde_yaml::from_str(ALERTS)
        .map_err(|e| Error::InvalidSpec(format!("the built-in alert rules: {e}")))?;
    let replicas = broker.spec.replicas.to_string();
    fill(
        &mut rules,
        &[
            ("PETREL_SELECTOR", &selector(broker)),
            ("PETREL_REPLICAS", &replicas),
        ],
    );
    Ok(rules)
}

/// The Grafana dashboard for `broker`, as JSON text.
pub fn dashboard(broker: &Broker) -> Result<String, Error> {
    let mut dashboard: Value = serde_json::from_str(DASHBOARD)
        .map_err(|e| Error::InvalidSpec(format!("the built-in dashboard: {e}")))?;
    let namespace = broker.namespace().unwrap_or_default();
    let title = format!("Petrel / {namespace} / {}", broker.name_any());
    // Grafana uids are at most 40 characters.
    let uid: String = format!("petrel-{namespace}-{}", broker.name_any())
        .chars()
        .take(40)
        .collect();
    fill(
        &mut dashboard,
        &[
            ("PETREL_SELECTOR", &selector(broker)),
            ("PETREL_UID", &uid),
            ("PETREL_TITLE", &title),
        ],
    );
    serde_json::to_string_pretty(&dashboard).map_err(|e| Error::InvalidSpec(e.to_string()))
}

/// The ServiceMonitor: every pod's `/metrics`, through the headless Service.
pub fn service_monitor(broker: &Broker) -> Result<DynamicObject, Error> {
    desired::object(
        broker,
        &name(broker),
        json!({"apiVersion": MONITORING_API, "kind": "ServiceMonitor", "spec": {
            "selector": {"matchLabels": {
                "app.kubernetes.io/name": "petrel",
                "app.kubernetes.io/instance": broker.name_any(),
                SCRAPED_LABEL: "true",
            }},
            "namespaceSelector": {"matchNames": [broker.namespace()]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        }}),
    )
}

/// The PrometheusRule with the Broker's alerts.
pub fn prometheus_rule(broker: &Broker) -> Result<DynamicObject, Error> {
    desired::object(
        broker,
        &name(broker),
        json!({"apiVersion": MONITORING_API, "kind": "PrometheusRule", "spec": alert_rules(broker)?}),
    )
}

/// The name of a Broker's dashboard ConfigMap.
fn dashboard_name(broker: &Broker) -> String {
    format!("{}-dashboard", name(broker))
}

/// The ConfigMap holding the dashboard.
pub fn dashboard_config_map(broker: &Broker) -> Result<ConfigMap, Error> {
    let mut map: ConfigMap = desired::object(
        broker,
        &dashboard_name(broker),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {
            format!("petrel-{}.json", broker.name_any()): dashboard(broker)?,
        }}),
    )?;
    map.labels_mut()
        .insert(DASHBOARD_LABEL.to_owned(), "1".to_owned());
    Ok(map)
}

/// Applies the monitoring objects `broker` asks for and deletes those it no longer asks
/// for; answers what it asks for that cannot be made here.
pub async fn apply(ctx: &Context, broker: &Broker) -> Result<Vec<String>, Error> {
    let namespace = broker.namespace().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut unserved = Vec::new();
    let served = served_kinds(ctx).await?;
    for kind in [Kind::ServiceMonitor, Kind::PrometheusRule] {
        let wanted = kind.wanted(broker);
        if !served.contains(&kind) {
            if wanted {
                unserved.push(format!(
                    "a {kind:?} is asked for, but the Prometheus operator's {kind:?} definition ({MONITORING_API}) is not installed"
                ));
            }
            continue;
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &kind.resource());
        if wanted {
            let object = match kind {
                Kind::ServiceMonitor => service_monitor(broker)?,
                Kind::PrometheusRule => prometheus_rule(broker)?,
            };
            api.patch(&name(broker), &params, &Patch::Apply(&object))
                .await?;
        } else {
            delete_if_there(&api, &name(broker)).await?;
        }
    }
    // The dashboard is built (a large JSON document) only when asked for.
    if broker.spec.monitoring.grafana_dashboard {
        super::apply_object(ctx, &namespace, &dashboard_config_map(broker)?).await?;
    } else {
        let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
        delete_if_there(&maps, &dashboard_name(broker)).await?;
    }
    Ok(unserved)
}

/// Which of the Prometheus operator's kinds the API server serves.
async fn served_kinds(ctx: &Context) -> Result<Vec<Kind>, Error> {
    match ctx.client.list_api_group_resources(MONITORING_API).await {
        Ok(list) => Ok([
            (Kind::ServiceMonitor, "servicemonitors"),
            (Kind::PrometheusRule, "prometheusrules"),
        ]
        .into_iter()
        .filter(|(_, plural)| list.resources.iter().any(|r| r.name == *plural))
        .map(|(kind, _)| kind)
        .collect()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker() -> Broker {
        serde_json::from_value(json!({
            "apiVersion": "petrel.io/v1alpha1", "kind": "Broker",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1"},
            "spec": {"replicas": 5, "monitoring": {"serviceMonitor": true}},
        }))
        .expect("a broker")
    }

    #[test]
    fn alert_rules_are_narrowed_to_the_brokers_own_pods_and_size() {
        let rules = alert_rules(&broker()).expect("rules");
        let text = rules.to_string();
        assert!(!text.contains("PETREL_"), "{text}");
        let exprs: Vec<&str> = rules["groups"][0]["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter_map(|r| r["expr"].as_str())
            .collect();
        assert!(!exprs.is_empty());
        for expr in &exprs {
            assert!(
                expr.contains(r#"{namespace="shop",job="orders-headless"}"#),
                "{expr}"
            );
        }
        assert!(exprs.iter().any(|e| e.ends_with("< 5")), "{exprs:?}");
    }

    #[test]
    fn the_dashboard_is_the_brokers_own_and_found_by_grafana() {
        let map = dashboard_config_map(&broker()).expect("map");
        assert_eq!(
            map.labels().get(DASHBOARD_LABEL).map(String::as_str),
            Some("1")
        );
        let text = &map.data.as_ref().expect("data")["petrel-orders.json"];
        let dashboard: Value = serde_json::from_str(text).expect("json");
        assert_eq!(dashboard["uid"], "petrel-shop-orders");
        assert_eq!(dashboard["title"], "Petrel / shop / orders");
        assert!(!text.contains("PETREL_"));
        let owner = &map.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(owner.uid, "u-1");
    }

    #[test]
    fn the_service_monitor_scrapes_the_http_port_of_the_scraped_service() {
        let monitor = service_monitor(&broker()).expect("monitor");
        assert_eq!(monitor.data["spec"]["endpoints"][0]["port"], "http");
        assert_eq!(
            monitor.data["spec"]["selector"]["matchLabels"][SCRAPED_LABEL],
            "true"
        );
    }
}
