//! A Broker's monitoring: its ServiceMonitor and PrometheusRule made against the
//! Prometheus operator's own definitions on a real API server (and reported missing,
//! as `Degraded` and an Event, where they are not installed), its Grafana dashboard
//! ConfigMap, all removed when turned off; the alert rules checked and unit-tested by
//! Prometheus's `promtool`, the dashboard's queries parsed by it, and every metric they
//! use exported by a running broker.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use petrel_api::admin::v1::{self as api, admin_client::AdminClient};
use petrel_operator::brokers::monitoring::{self, DASHBOARD_LABEL, SCRAPED_LABEL};
use petrel_operator::conditions::DEGRADED;
use petrel_operator::crd::Broker;
use petrel_tests::Serve;
use serde_json::{Value, json};
use support::{ControlPlane, apply_definition, run_operator, until_event, wait_for};

const TIMEOUT: Duration = Duration::from_secs(30);
const NS: &str = "default";

/// What `e2e/monitoring/fetch` provides: promtool, and the Prometheus operator's CRDs.
fn tools() -> anyhow::Result<BTreeMap<String, String>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/monitoring/fetch");
    let out = Command::new(script).output()?;
    if !out.status.success() {
        bail!(
            "e2e/monitoring/fetch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn broker(name: &str, namespace: &str, spec: Value) -> anyhow::Result<Broker> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "petrel.io/v1alpha1", "kind": "Broker",
        "metadata": {"name": name, "namespace": namespace, "uid": "test-uid"},
        "spec": spec,
    }))?)
}

/// Runs promtool with `args` in `dir`; fails with its output unless it succeeds.
fn promtool(tools: &BTreeMap<String, String>, dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tools.get("PROMTOOL").context("PROMTOOL")?)
        .args(args)
        .current_dir(dir)
        .output()?;
    ensure!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every query of the dashboard, with Grafana's own variables given values.
fn dashboard_queries(broker: &Broker) -> anyhow::Result<Vec<String>> {
    let dashboard: Value = serde_json::from_str(&monitoring::dashboard(broker)?)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("a query")?;
            queries.push(expr.replace("$__rate_interval", "5m"));
        }
    }
    Ok(queries)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests_and_the_dashboard_parses()
-> anyhow::Result<()> {
    let tools = tools()?;
    let dir = tempfile::tempdir()?;
    let orders = broker("orders", "shop", json!({"replicas": 3}))?;
    let rules = monitoring::alert_rules(&orders)?;
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rules)?,
    )?;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/alerts-test.yaml"),
        dir.path().join("alerts-test.yaml"),
    )?;
    promtool(&tools, dir.path(), &["check", "rules", "rules.yaml"])?;
    promtool(&tools, dir.path(), &["test", "rules", "alerts-test.yaml"])?;

    // The dashboard's queries, as recording rules: promtool parses each.
    let queries = dashboard_queries(&orders)?;
    ensure!(queries.len() >= 10, "{queries:?}");
    let recorded: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| json!({"record": format!("dashboard:query{i}"), "expr": q}))
        .collect();
    let file = json!({"groups": [{"name": "dashboard", "rules": recorded}]});
    std::fs::write(
        dir.path().join("dashboard.yaml"),
        serde_yaml::to_string(&file)?,
    )?;
    promtool(&tools, dir.path(), &["check", "rules", "dashboard.yaml"])?;
    Ok(())
}

/// The `petrel_*` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("petrel_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_use_is_one_a_broker_exports() -> anyhow::Result<()>
{
    let orders = broker("orders", "shop", json!({"replicas": 3}))?;
    let mut used = metric_names(&monitoring::alert_rules(&orders)?.to_string());
    used.extend(metric_names(&monitoring::dashboard(&orders)?));
    ensure!(used.len() >= 10, "{used:?}");

    // A queue, so that the per-queue series are there too.
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    let addr = petrel.internal_addr().context("no internal listener")?;
    let mut admin = AdminClient::connect(format!("http://{addr}")).await?;
    admin
        .create_destination(api::CreateDestinationRequest {
            spec: Some(api::DestinationSpec {
                kind: api::Kind::Queue.into(),
                name: "jobs".into(),
                partitions: 1,
                replication_factor: 1,
                ..api::DestinationSpec::default()
            }),
        })
        .await?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let body = petrel.get("/metrics")?.body;
        let exported: BTreeSet<String> = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the rules or the dashboard use metrics no broker exports: {missing:?}\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Installs the Prometheus operator's CRDs from `dir` and waits until they are served.
async fn install_prometheus_operator_crds(client: &Client, dir: &Path) -> anyhow::Result<()> {
    for plural in ["servicemonitors", "prometheusrules"] {
        let path: PathBuf = dir.join(format!("monitoring.coreos.com_{plural}.yaml"));
        let definition: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
        apply_definition(client, &definition).await?;
    }
    Ok(())
}

fn monitoring_api(client: &Client, kind: &str) -> Api<DynamicObject> {
    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind));
    Api::namespaced_with(client.clone(), NS, &resource)
}

fn degraded(b: &Broker) -> Option<(String, String, String)> {
    b.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == DEGRADED)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until `name` exists in `api` and is owned by the Broker `uid`.
async fn owned(api: &Api<DynamicObject>, name: &str, uid: &str) -> anyhow::Result<DynamicObject> {
    let found = wait_for(api, name, TIMEOUT, "made", |o| o.is_some())
        .await?
        .context("gone")?;
    ensure!(
        found.owner_references().iter().any(|o| o.uid == uid),
        "{name} is not owned by the Broker: {found:?}"
    );
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_objects_are_made_where_the_prometheus_operator_is_and_said_missing_where_not()
-> anyhow::Result<()> {
    let tools = tools()?;
    let (_plane, client) = ControlPlane::installed().await?;
    let operator = run_operator(&client)?;
    let brokers: Api<Broker> = Api::namespaced(client.clone(), NS);
    let nowhere = format!("http://127.0.0.1:{}", petrel_tests::free_port()?);
    let asked: Broker = serde_json::from_value(json!({
        "apiVersion": "petrel.io/v1alpha1", "kind": "Broker",
        "metadata": {"name": "petrel", "annotations": {"petrel.io/admin-url": nowhere}},
        "spec": {"replicas": 3, "monitoring": {
            "serviceMonitor": true, "prometheusRule": true, "grafanaDashboard": true}},
    }))?;
    let made = brokers.create(&PostParams::default(), &asked).await?;
    let uid = made.uid().context("uid")?;

    // No Prometheus operator here: the Broker says what it cannot have, and why.
    let shown = wait_for(&brokers, "petrel", TIMEOUT, "degraded", |b| {
        b.and_then(degraded).is_some_and(|(status, _, message)| {
            status == "True" && message.contains("ServiceMonitor")
        })
    })
    .await?
    .context("gone")?;
    let (_, reason, message) = degraded(&shown).context("degraded")?;
    ensure!(reason == "NotServed", "{reason}: {message}");
    ensure!(
        message.contains("PrometheusRule") && message.contains("not installed"),
        "{message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let event = until_event(&events, "petrel", "MonitoringUnavailable", TIMEOUT).await?;
    ensure!(event.type_.as_deref() == Some("Warning"), "{event:?}");
    // The dashboard needs no definition: it is there already, for Grafana's sidecar.
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let dashboard = wait_for(&maps, "petrel-petrel-dashboard", TIMEOUT, "made", |m| {
        m.is_some()
    })
    .await?
    .context("gone")?;
    ensure!(dashboard.labels().get(DASHBOARD_LABEL).map(String::as_str) == Some("1"));
    let json = dashboard
        .data
        .as_ref()
        .and_then(|d| d.get("petrel-petrel.json"))
        .context("the dashboard JSON")?;
    let parsed: Value = serde_json::from_str(json)?;
    ensure!(
        parsed["title"] == "Petrel / default / petrel",
        "{}",
        parsed["title"]
    );
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let headless = services.get("petrel-headless").await?;
    ensure!(headless.labels().get(SCRAPED_LABEL).map(String::as_str) == Some("true"));

    // With the Prometheus operator's definitions installed, the objects are made (and
    // accepted by their real schemas), owned by the Broker, and it is no longer degraded.
    let dir = PathBuf::from(tools.get("MONITORING_CRDS").context("MONITORING_CRDS")?);
    install_prometheus_operator_crds(&client, &dir).await?;
    let monitors = monitoring_api(&client, "ServiceMonitor");
    let rules = monitoring_api(&client, "PrometheusRule");
    let monitor = owned(&monitors, "petrel-petrel", &uid).await?;
    ensure!(
        monitor.data["spec"]["endpoints"][0]["port"] == "http",
        "{monitor:?}"
    );
    let rule = owned(&rules, "petrel-petrel", &uid).await?;
    let groups = &rule.data["spec"]["groups"];
    ensure!(
        groups[0]["rules"].as_array().is_some_and(|r| r.len() >= 5),
        "{groups}"
    );
    ensure!(
        groups
            .to_string()
            .contains(r#"namespace=\"default\",job=\"petrel-headless\""#),
        "{groups}"
    );
    wait_for(&brokers, "petrel", TIMEOUT, "no longer degraded", |b| {
        b.and_then(degraded)
            .is_some_and(|(status, _, _)| status == "False")
    })
    .await?;

    // A changed replica count changes the rules that count pods.
    brokers
        .patch(
            "petrel",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await?;
    wait_for(&rules, "petrel-petrel", TIMEOUT, "counting 5 pods", |r| {
        r.is_some_and(|r| r.data.to_string().contains("< 5"))
    })
    .await?;

    // Turned off, each goes.
    brokers
        .patch(
            "petrel",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"monitoring": {
                "serviceMonitor": false, "prometheusRule": false, "grafanaDashboard": false}}})),
        )
        .await?;
    for api in [&monitors, &rules] {
        wait_for(api, "petrel-petrel", TIMEOUT, "deleted", |o| o.is_none()).await?;
    }
    wait_for(&maps, "petrel-petrel-dashboard", TIMEOUT, "deleted", |o| {
        o.is_none()
    })
    .await?;
    operator.abort();
    Ok(())
}
