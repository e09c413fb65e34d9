//! The Helm chart `charts/petrel`: its `crds/` are copies of the repository's `crds/`,
//! `helm lint` passes and the values schema refuses unknown and wrong values, and
//! `helm template` renders an operator Deployment that runs as its ServiceAccount, with
//! a ClusterRole that names what it may do — no wildcards.
//! Helm is the one `e2e/k8s/build helm` builds (cached after the first run).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde_json::Value;

fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn chart() -> PathBuf {
    repository().join("charts/petrel")
}

#[test]
fn the_charts_crds_are_copies_of_the_repositorys() -> anyhow::Result<()> {
    let refresh = "refresh them with `cargo run -p petrel-operator --bin crdgen`";
    let names = |dir: &Path| -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    };
    let generated = names(&repository().join("crds"))?;
    let copied = names(&chart().join("crds"))?;
    ensure!(
        generated == copied,
        "charts/petrel/crds/ holds {copied:?}, crds/ holds {generated:?}: {refresh}"
    );
    for name in &generated {
        let original = std::fs::read(repository().join("crds").join(name))?;
        let copy = std::fs::read(chart().join("crds").join(name))?;
        ensure!(
            original == copy,
            "charts/petrel/crds/{name} differs from crds/{name}: {refresh}"
        );
    }
    Ok(())
}

/// The helm binary, built (or found in the cache) once for every test.
fn helm() -> anyhow::Result<&'static Path> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = HELM.get_or_init(|| {
        let script = repository().join("e2e/k8s/build");
        let out = Command::new(&script)
            .arg("helm")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "e2e/k8s/build helm failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("HELM="))
            .map(PathBuf::from)
            .ok_or_else(|| "e2e/k8s/build helm printed no HELM= line".to_owned())
    });
    match found {
        Ok(path) => Ok(path),
        Err(e) => bail!("{e}"),
    }
}

/// `helm ARGS... charts/petrel EXTRA...`, run from the repository.
fn run_helm(args: &[&str], extra: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(helm()?)
        .args(args)
        .arg(chart())
        .args(extra)
        .current_dir(repository())
        .output()?)
}

/// What a failed helm command said.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn helm_lint_passes_and_the_schema_refuses_unknown_and_wrong_values() -> anyhow::Result<()> {
    let clean = run_helm(&["lint", "--strict"], &[])?;
    ensure!(
        clean.status.success(),
        "helm lint --strict charts/petrel failed:\n{}",
        said(&clean)
    );
    for (set, culprit) in [
        ("bogus=1", "bogus"),
        ("logFormat=xml", "logFormat"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("image.tagg=dev", "tagg"),
        ("replicaCount=2", "replicaCount"),
        ("resyncSeconds=0", "resyncSeconds"),
    ] {
        let out = run_helm(&["lint"], &["--set", set])?;
        ensure!(
            !out.status.success(),
            "helm lint --set {set} passed: values.schema.json should refuse it"
        );
        ensure!(
            said(&out).contains(culprit),
            "helm lint --set {set} failed without naming {culprit}:\n{}",
            said(&out)
        );
    }
    Ok(())
}

/// The documents `helm template` renders with `--set` each of `sets`.
fn render(sets: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut extra = vec!["--namespace", "petrel-system"];
    for set in sets {
        extra.extend(["--set", set]);
    }
    let out = run_helm(&["template", "petrel"], &extra)?;
    ensure!(
        out.status.success(),
        "helm template failed:\n{}",
        said(&out)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).context("helm template rendered bad YAML")?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// The one document of `kind` among `documents`, as its type.
fn the<K: serde::de::DeserializeOwned>(documents: &[Value], kind: &str) -> anyhow::Result<K> {
    let mut found = documents.iter().filter(|d| d["kind"] == kind);
    let (Some(document), None) = (found.next(), found.next()) else {
        bail!("helm template should render exactly one {kind}");
    };
    serde_json::from_value(document.clone()).with_context(|| format!("the {kind} is malformed"))
}

/// The Deployment's pod spec.
fn pod_spec(deployment: &Deployment) -> anyhow::Result<&PodSpec> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("the Deployment has no pod spec")
}

fn operator_container(deployment: &Deployment) -> anyhow::Result<&Container> {
    let pod = pod_spec(deployment)?;
    ensure!(
        pod.containers.len() == 1,
        "the operator's pod should have one container"
    );
    Ok(&pod.containers[0])
}

/// The value that follows `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

#[test]
fn the_operator_runs_as_its_service_account_with_its_flags() -> anyhow::Result<()> {
    let documents = render(&[])?;
    let deployment: Deployment = the(&documents, "Deployment")?;
    let account: ServiceAccount = the(&documents, "ServiceAccount")?;
    let pod = pod_spec(&deployment)?;
    ensure!(
        pod.service_account_name == account.metadata.name,
        "the pod runs as {:?}, the chart makes the ServiceAccount {:?}",
        pod.service_account_name,
        account.metadata.name
    );
    ensure!(pod.automount_service_account_token == Some(true));

    let container = operator_container(&deployment)?;
    ensure!(
        container.image.as_deref() == Some("ghcr.io/petrel-io/petrel-operator:0.1.0"),
        "the image tag should default to the appVersion: {:?}",
        container.image
    );
    let args = container.args.clone().unwrap_or_default();
    for (name, value) in [
        ("--log-format", "json"),
        ("--log-level", "info"),
        ("--resync-seconds", "30"),
        ("--http", "0.0.0.0:8080"),
    ] {
        ensure!(
            flag(&args, name) == Some(value),
            "the operator should run with {name} {value}: {args:?}"
        );
    }
    let pod_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    ensure!(
        pod_name == Some("metadata.name"),
        "POD_NAME (the Events' reporting instance) should come from the downward API"
    );
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    ensure!(probe(&container.liveness_probe).as_deref() == Some("/healthz"));
    ensure!(probe(&container.readiness_probe).as_deref() == Some("/readyz"));
    let security = container
        .security_context
        .as_ref()
        .context("the container has no security context")?;
    ensure!(security.run_as_non_root == Some(true));
    ensure!(security.read_only_root_filesystem == Some(true));
    ensure!(security.allow_privilege_escalation == Some(false));

    // A Broker's Services and pod listing select app.kubernetes.io/name=petrel: the
    // operator's pod must never match them.
    let labels = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    ensure!(
        labels.get("app.kubernetes.io/name").map(String::as_str) != Some("petrel"),
        "the operator's pod carries app.kubernetes.io/name=petrel, the label of broker pods"
    );
    Ok(())
}

#[test]
fn the_cluster_role_names_what_the_operator_does_and_no_wildcard() -> anyhow::Result<()> {
    let documents = render(&[])?;
    let role: ClusterRole = the(&documents, "ClusterRole")?;
    let rules = role.rules.unwrap_or_default();
    for rule in &rules {
        let named = rule
            .verbs
            .iter()
            .chain(rule.resources.iter().flatten())
            .chain(rule.api_groups.iter().flatten());
        for name in named {
            ensure!(
                !name.contains('*'),
                "the ClusterRole has a wildcard: {rule:?}"
            );
        }
        ensure!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "the ClusterRole should only name resources: {rule:?}"
        );
    }
    let grants = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for (group, resource, verb) in [
        ("petrel.io", "brokers/status", "patch"),
        ("petrel.io", "queues", "patch"),
        ("petrel.io", "brokers", "watch"),
        // Server-side apply of an object that does not exist yet is authorized as create.
        ("", "serviceaccounts", "create"),
        ("apps", "statefulsets", "patch"),
        ("", "pods", "delete"),
        ("events.k8s.io", "events", "create"),
        // Monitoring objects, when a Broker asks for them (and turned off again).
        ("monitoring.coreos.com", "servicemonitors", "patch"),
        ("monitoring.coreos.com", "prometheusrules", "create"),
        ("monitoring.coreos.com", "prometheusrules", "delete"),
        ("", "configmaps", "delete"),
        // A Broker's default-user Secret: made once, read back by name, unmarked.
        ("", "secrets", "create"),
        ("", "secrets", "get"),
        ("", "secrets", "patch"),
    ] {
        ensure!(
            grants(group, resource, verb),
            "the ClusterRole should grant {verb} on {resource} in group {group:?}"
        );
    }
    for verb in ["list", "watch", "delete"] {
        ensure!(
            !grants("", "secrets", verb),
            "the operator reads only its Brokers' Secrets, by name: no {verb}"
        );
    }

    let binding: ClusterRoleBinding = the(&documents, "ClusterRoleBinding")?;
    let account: ServiceAccount = the(&documents, "ServiceAccount")?;
    ensure!(binding.role_ref.name == role.metadata.name.unwrap_or_default());
    let bound = binding.subjects.iter().flatten().any(|s| {
        s.kind == "ServiceAccount"
            && Some(&s.name) == account.metadata.name.as_ref()
            && s.namespace.as_deref() == Some("petrel-system")
    });
    ensure!(
        bound,
        "the ClusterRoleBinding should bind the operator's ServiceAccount"
    );
    Ok(())
}

#[test]
fn local_images_and_root_can_be_set_and_rbac_left_out() -> anyhow::Result<()> {
    let documents = render(&[
        "image.repository=localhost/petrel-operator",
        "image.tag=dev",
        "image.pullPolicy=Never",
        "securityContext.runAsNonRoot=false",
        "securityContext.runAsUser=0",
        "rbac.create=false",
    ])?;
    let deployment: Deployment = the(&documents, "Deployment")?;
    let container = operator_container(&deployment)?;
    ensure!(container.image.as_deref() == Some("localhost/petrel-operator:dev"));
    ensure!(container.image_pull_policy.as_deref() == Some("Never"));
    let security = container.security_context.clone().unwrap_or_default();
    ensure!(security.run_as_non_root == Some(false) && security.run_as_user == Some(0));
    ensure!(
        !documents
            .iter()
            .any(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding"),
        "rbac.create=false should leave out the ClusterRole and its binding"
    );
    Ok(())
}
