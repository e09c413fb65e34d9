//! What the operator's tests against a real API server share: a control plane of their
//! own (etcd + kube-apiserver from `e2e/k8s/apiserver`), the definitions installed, and
//! waits on conditions.

#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config};
use petrel_operator::crd;

/// How long the definitions may take to be served.
const ESTABLISHED: Duration = Duration::from_secs(30);

/// A control plane of its own, stopped when dropped.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/k8s/apiserver")
}

impl ControlPlane {
    /// Starts one (building the binaries on first use on a machine).
    pub fn start() -> anyhow::Result<ControlPlane> {
        let dir = tempfile::Builder::new().prefix("petrel-k8s-").tempdir()?;
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "the control plane did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let printed = String::from_utf8(out.stdout)?;
        let kubeconfig = PathBuf::from(printed.lines().last().context("no kubeconfig printed")?);
        Ok(ControlPlane { dir, kubeconfig })
    }

    /// Starts one with the operator's definitions installed, and a client of it.
    pub async fn installed() -> anyhow::Result<(ControlPlane, Client)> {
        let plane = ControlPlane::start()?;
        let client = plane.client().await?;
        install(&client).await?;
        Ok((plane, client))
    }

    /// Its admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Installs every definition (server-side apply) and waits until each is served.
pub async fn install(client: &Client) -> anyhow::Result<()> {
    for definition in crd::all() {
        apply_definition(client, &definition).await?;
    }
    Ok(())
}

/// Applies `definition` (server-side) and waits until it is served.
pub async fn apply_definition(
    client: &Client,
    definition: &CustomResourceDefinition,
) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply("petrel-operator").force();
    let name = definition
        .metadata
        .name
        .clone()
        .context("a named definition")?;
    crds.patch(&name, &apply, &Patch::Apply(definition)).await?;
    tokio::time::timeout(
        ESTABLISHED,
        await_condition(crds.clone(), &name, conditions::is_crd_established()),
    )
    .await
    .with_context(|| format!("{name} not established within {ESTABLISHED:?}"))??;
    Ok(())
}

/// Waits until `test` holds for object `name` (or its absence), at most `timeout`.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    test: impl Fn(Option<&K>) -> bool,
) -> anyhow::Result<Option<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let found = tokio::time::timeout(timeout, await_condition(api.clone(), name, test))
        .await
        .with_context(|| format!("{name}: not {what} within {timeout:?}"))??;
    Ok(found)
}

/// Waits (within `timeout`) for an Event with `reason` on the object named `name`, and
/// returns it.
pub async fn until_event(
    events: &Api<k8s_openapi::api::events::v1::Event>,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> anyhow::Result<k8s_openapi::api::events::v1::Event> {
    let on_it = kube::api::ListParams::default().fields(&format!("regarding.name={name}"));
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let listed = events.list(&on_it).await?;
        if let Some(event) = listed
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
        {
            return Ok(event);
        }
        if std::time::Instant::now() >= deadline {
            bail!("no {reason} Event on {name} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the operator's controllers in this process, quick to resync and retry, until
/// the handle is aborted.
pub fn run_operator(client: &Client) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use petrel_operator::{Context as OperatorContext, Settings, metrics::Metrics};
    let settings = Settings {
        resync: Duration::from_millis(500),
        backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
    };
    let ctx = std::sync::Arc::new(OperatorContext::new(
        client.clone(),
        settings,
        Metrics::new()?,
    ));
    Ok(tokio::spawn(petrel_operator::run(ctx)))
}
