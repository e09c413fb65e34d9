//! What the end-to-end tests run on: any Kubernetes cluster given by
//! `PETREL_E2E_KUBECONFIG` (its nodes must already have the images named by
//! `PETREL_E2E_BROKER_IMAGE` and `PETREL_E2E_OPERATOR_IMAGE`; see `e2e/kind/up`), or else
//! a local cluster with real pods that `e2e/k8s/cluster` brings up for the test (root on
//! Linux; images built from this build's binaries and imported with no registry) and
//! tears down when it ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The repository's root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A cluster to test on, and how to reach it.
pub struct TestCluster {
    kubeconfig: PathBuf,
    /// The local cluster's directory, torn down on drop; `None` for a given cluster.
    local: Option<tempfile::TempDir>,
    kubectl: PathBuf,
    helm: PathBuf,
    /// The broker image the Broker resources name.
    pub broker_image: String,
    /// The operator image the chart installs.
    pub operator_image: String,
    /// `Never` for images imported by hand, else `IfNotPresent`.
    pub pull_policy: String,
}

/// Runs `command`, failing with its stderr unless it succeeds; answers its stdout.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    let out: Output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The `NAME=path` lines `e2e/k8s/build` prints, for `what`.
fn built(what: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let printed = run(Command::new(repository().join("e2e/k8s/build")).arg(what))?;
    Ok(printed
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
        .collect())
}

fn tool(tools: &[(String, PathBuf)], name: &str) -> anyhow::Result<PathBuf> {
    tools
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .with_context(|| format!("e2e/k8s/build printed no {name}"))
}

impl TestCluster {
    /// The cluster of `PETREL_E2E_KUBECONFIG`, or a local one brought up now with this
    /// build's `petrel` and `petrel-operator` imported as images.
    pub fn provision() -> anyhow::Result<TestCluster> {
        let mut tools = built("helm")?;
        if let Ok(kubeconfig) = std::env::var("PETREL_E2E_KUBECONFIG") {
            let kubectl = which("kubectl").context("kubectl is needed on PATH")?;
            let image = |var: &str, default: &str| {
                std::env::var(var).unwrap_or_else(|_| default.to_owned())
            };
            return Ok(TestCluster {
                kubeconfig: kubeconfig.into(),
                local: None,
                kubectl,
                helm: tool(&tools, "HELM")?,
                broker_image: image("PETREL_E2E_BROKER_IMAGE", "localhost/petrel:dev"),
                operator_image: image("PETREL_E2E_OPERATOR_IMAGE", "localhost/petrel-operator:dev"),
                pull_policy: image("PETREL_E2E_PULL_POLICY", "IfNotPresent"),
            });
        }
        tools.extend(built("cluster")?);
        let dir = tempfile::Builder::new().prefix("petrel-e2e-").tempdir()?;
        let up = run(Command::new(repository().join("e2e/k8s/cluster"))
            .arg("up")
            .arg(dir.path()))?;
        let kubeconfig = PathBuf::from(up.lines().last().context("no kubeconfig printed")?);
        let cluster = TestCluster {
            kubeconfig,
            local: Some(dir),
            kubectl: tool(&tools, "KUBECTL")?,
            helm: tool(&tools, "HELM")?,
            broker_image: "localhost/petrel:dev".to_owned(),
            operator_image: "localhost/petrel-operator:dev".to_owned(),
            pull_policy: "Never".to_owned(),
        };
        let binaries = petrel_tests::petrel_binary()?;
        let bin_dir = binaries.parent().context("binary directory")?;
        for (image, binary) in [
            (&cluster.broker_image, bin_dir.join("petrel")),
            (&cluster.operator_image, bin_dir.join("petrel-operator")),
        ] {
            if !binary.exists() {
                bail!(
                    "{} is missing: cargo build --workspace first",
                    binary.display()
                );
            }
            run(Command::new(repository().join("e2e/images/build"))
                .arg(image)
                .arg(&binary)
                .env(
                    "PETREL_CLUSTER_DIR",
                    cluster.local.as_ref().map(|d| d.path()).context("dir")?,
                ))?;
        }
        Ok(cluster)
    }

    /// A client of the cluster.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// `kubectl ARGS` against the cluster.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(&self.kubectl);
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// `helm ARGS` against the cluster.
    pub fn helm(&self) -> Command {
        let mut command = Command::new(&self.helm);
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// The warnings and errors the pods of `namespace` logged (JSON lines at WARN or
    /// ERROR, and anything that is not JSON), to show why a test failed.
    pub fn pod_warnings(&self, namespace: &str) -> String {
        let pods = run(self
            .kubectl()
            .args(["get", "pods", "-n", namespace, "-o", "name"]))
        .unwrap_or_default();
        let mut found = String::new();
        for pod in pods.lines() {
            let logs = run(self
                .kubectl()
                .args(["logs", "-n", namespace, pod, "--all-containers"]))
            .unwrap_or_else(|e| format!("(no logs: {e})"));
            for line in logs.lines() {
                let level = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("level").and_then(|l| l.as_str()).map(str::to_owned));
                if level.as_deref().is_none_or(|l| l == "WARN" || l == "ERROR") {
                    found.push_str(&format!("{pod}: {line}\n"));
                }
            }
        }
        found
    }

    /// Panic messages in any container log of the local cluster, rotated ones too.
    pub fn panics(&self) -> String {
        let Some(dir) = &self.local else {
            return String::new();
        };
        let found = Command::new("grep")
            .args(["-r", "-a", "-h", "-A3", "panicked at"])
            .arg(dir.path().join("pod-logs"))
            .output();
        found
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Whether this is the local cluster (whose Service IPs the host reaches).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.local {
            let _ = Command::new(repository().join("e2e/k8s/cluster"))
                .arg("down")
                .arg(dir.path())
                .status();
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
