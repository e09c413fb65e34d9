//! The Broker controller: applies the objects that run a Broker (`desired`), scales the
//! StatefulSet only as fast as the admin API drains nodes, rolls pods one at a time after
//! moving their leaderships away (`plan`), and shows the pods and the cluster's members
//! in the status.

pub mod credentials;
pub mod desired;
pub mod monitoring;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use petrel_api::admin::v1 as api;
use petrel_api::admin::v1::admin_client::AdminClient;
use serde::Serialize;
use serde_json::json;
use tonic::transport::Channel;

use crate::conditions::{self, Observed};
use crate::context::{self, Context, FIELD_MANAGER};
use crate::crd::{Broker, Member};
use crate::error::Error;
use crate::reporting::{self, Reported};
use plan::{NodeView, PodView};

/// How often a Broker that is changing is looked at.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Leadership transfers run at once, at most.
const TRANSFERS_AT_ONCE: usize = 16;

impl Reported for Broker {
    const KIND: &'static str = "Broker";

    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

/// Runs the Broker controller until its watches end: a Broker is reconciled on change,
/// on a change of anything it owns, and at each resync.
pub async fn run(ctx: Arc<Context>) {
    use futures_lite::StreamExt;
    let client = ctx.client.clone();
    // Only what the operator made is watched (and cached), not every such object.
    let made = || watcher::Config::default().labels(desired::MANAGED_BY);
    Controller::new(
        Api::<Broker>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<StatefulSet>::all(client.clone()), made())
    .owns(Api::<Service>::all(client.clone()), made())
    .owns(Api::<ConfigMap>::all(client.clone()), made())
    .owns(Api::<ServiceAccount>::all(client.clone()), made())
    .owns(Api::<PodDisruptionBudget>::all(client), made())
    .run(reconcile, reporting::retry, ctx)
    .for_each(|_| ())
    .await;
}

/// One reconcile of a Broker.
pub async fn reconcile(broker: Arc<Broker>, ctx: Arc<Context>) -> Result<Action, Error> {
    if context::paused(&*broker) || broker.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let result = apply(&broker, &ctx).await;
    reporting::reconciled(&*broker, &ctx, started, result).await
}

/// What the admin API shows of the cluster, if it answered.
struct ClusterView {
    nodes: Vec<NodeView>,
    members: Vec<Member>,
    version: String,
    healthy: bool,
}

async fn apply(broker: &Broker, ctx: &Context) -> Result<Action, Error> {
    let namespace = broker.namespace().unwrap_or_default();
    let name = broker.name_any();
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = sets.get_opt(&name).await?;
    let seed = existing
        .as_ref()
        .and_then(desired::seed_of)
        .unwrap_or(broker.spec.replicas);
    let current = existing
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(broker.spec.replicas);
    let mut objects = desired::objects(broker, seed)?;

    let pods = pods(ctx, broker).await?;
    let (mut admin, cluster) = match crate::admin::connect(broker).await {
        Ok(mut admin) => {
            let cluster = observe_cluster(&mut admin).await;
            (Some(admin), cluster)
        }
        Err(e) => (None, Err(e)),
    };
    let (cluster, unobserved) = match cluster {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e)),
    };
    let ordinals: BTreeSet<u64> = pods.iter().map(|p| p.ordinal).collect();
    let scale = plan::scale(
        broker.spec.replicas,
        current,
        cluster.as_ref().map_or(&[][..], |c| &c.nodes),
        &ordinals,
    );
    match (admin.as_mut(), unobserved) {
        // Shrinking unseen could drop acknowledged messages: wait for the admin API.
        (_, Some(e)) if broker.spec.replicas < current => return Err(e),
        (Some(admin), None) => carry_out(ctx, broker, admin, &scale).await?,
        _ => {}
    }
    if let Some(spec) = objects.stateful_set.spec.as_mut() {
        spec.replicas = Some(scale.replicas);
    }
    if scale.replicas != current && existing.is_some() {
        let note = format!(
            "scaling the StatefulSet from {current} to {}",
            scale.replicas
        );
        ctx.event(broker, false, "Scaling", "Scale", note).await;
    }

    apply_object(ctx, &namespace, &objects.service_account).await?;
    apply_object(ctx, &namespace, &objects.config).await?;
    apply_object(ctx, &namespace, &objects.headless).await?;
    apply_object(ctx, &namespace, &objects.client).await?;
    let applied = apply_object(ctx, &namespace, &objects.stateful_set).await?;
    match &objects.disruption_budget {
        Some(budget) => {
            apply_object(ctx, &namespace, budget).await?;
        }
        None => {
            let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &namespace);
            delete_if_there(&budgets, &name).await?;
        }
    }

    let (password, pending) = credentials::password(ctx, broker).await?;
    if let Some(admin) = admin.as_mut()
        && cluster.as_ref().is_some_and(|c| c.healthy)
        && credentials::ensure_user(admin, &password, pending).await?
    {
        if pending {
            credentials::password_set(ctx, broker).await?;
        }
        let note = format!(
            "set the default user {} on the brokers (credentials in Secret {})",
            credentials::USERNAME,
            credentials::secret_name(broker)
        );
        ctx.event(broker, false, "DefaultUser", "Update", note)
            .await;
    }
    let unmonitored = monitoring::apply(ctx, broker).await?;
    if !unmonitored.is_empty() {
        let note = unmonitored.join("; ");
        ctx.event(broker, true, "MonitoringUnavailable", "Monitor", note)
            .await;
    }

    let rolling = roll(
        ctx,
        broker,
        &applied,
        &pods,
        cluster.as_ref(),
        admin.as_mut(),
    )
    .await?;
    let (status, shown) = status(
        broker,
        &applied,
        cluster.as_ref(),
        scale.waiting,
        rolling,
        unmonitored,
    );
    let steady = conditions::holds(&shown, conditions::READY)
        && !conditions::holds(&shown, conditions::PROGRESSING);
    reporting::patch_status(ctx, broker, status).await?;
    Ok(Action::requeue(if steady {
        ctx.settings.resync
    } else {
        PROGRESS_EVERY
    }))
}

/// Asks the admin API for the drains, cancellations and removals `scale` needs.
async fn carry_out(
    ctx: &Context,
    broker: &Broker,
    admin: &mut AdminClient<Channel>,
    scale: &plan::Scale,
) -> Result<(), Error> {
    for node in &scale.cancel {
        admin
            .cancel_decommission(api::NodeRef { node_id: *node })
            .await?;
        let note = format!("cancelled the drain of node {node}: the Broker grew again");
        ctx.event(broker, false, "DrainCancelled", "Scale", note)
            .await;
    }
    for node in &scale.decommission {
        admin
            .decommission_node(api::NodeRef { node_id: *node })
            .await?;
        let note = format!("draining node {node} before its pod goes");
        ctx.event(broker, false, "Draining", "Scale", note).await;
    }
    for node in &scale.remove {
        admin.remove_node(api::NodeRef { node_id: *node }).await?;
        let note = format!("node {node} left the cluster");
        ctx.event(broker, false, "NodeRemoved", "Scale", note).await;
    }
    Ok(())
}

/// Server-side applies `object` with the operator's field manager, taking over fields
/// someone else changed (drift is put back).
async fn apply_object<K>(ctx: &Context, namespace: &str, object: &K) -> Result<K, Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api
        .patch(&object.name_any(), &params, &Patch::Apply(object))
        .await?)
}

/// Deletes `name` unless it is already gone (something the Broker no longer asks for).
async fn delete_if_there<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The Broker's pods, by ordinal.
async fn pods(ctx: &Context, broker: &Broker) -> Result<Vec<PodView>, Error> {
    let api: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &broker.namespace().unwrap_or_default());
    let selector = format!(
        "app.kubernetes.io/name=petrel,app.kubernetes.io/instance={}",
        broker.name_any()
    );
    let prefix = format!("{}-", broker.name_any());
    let listed = api.list(&ListParams::default().labels(&selector)).await?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|p| {
            let ordinal = p.name_any().strip_prefix(&prefix)?.parse().ok()?;
            let revision = p
                .labels()
                .get("controller-revision-hash")
                .cloned()
                .unwrap_or_default();
            let stopping = p.metadata.deletion_timestamp.is_some();
            let ready = !stopping
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Some(PodView {
                ordinal,
                revision,
                ready,
            })
        })
        .collect())
}

/// The cluster as the admin API shows it: members, their drains, who leads what.
async fn observe_cluster(admin: &mut AdminClient<Channel>) -> Result<ClusterView, Error> {
    let status = admin
        .get_cluster_status(api::GetClusterStatusRequest {})
        .await?
        .into_inner();
    let destinations = admin
        .list_destinations(api::ListDestinationsRequest::default())
        .await?
        .into_inner()
        .destinations;
    let version = admin
        .get_node_status(api::GetNodeStatusRequest {})
        .await?
        .into_inner()
        .version;
    let mut led: BTreeMap<u64, u32> = BTreeMap::new();
    for p in destinations.iter().flat_map(|d| &d.partitions) {
        if let Some(leader) = p.leader {
            *led.entry(leader).or_default() += 1;
        }
    }
    let mut nodes = Vec::new();
    for n in &status.nodes {
        let draining = n.state == "draining";
        let remaining = if draining {
            admin
                .get_decommission_progress(api::NodeRef { node_id: n.id })
                .await?
                .into_inner()
                .partitions_remaining
        } else {
            0
        };
        nodes.push(NodeView {
            id: n.id,
            draining,
            remaining,
        });
    }
    let members = status
        .nodes
        .iter()
        .map(|n| Member {
            node_id: n.id,
            ready: n.health == "ok",
            partitions_led: led.get(&n.id).copied().unwrap_or(0),
        })
        .collect::<Vec<_>>();
    let healthy = status.metadata_leader.is_some() && members.iter().all(|m| m.ready);
    Ok(ClusterView {
        nodes,
        members,
        version,
        healthy,
    })
}

/// Rolls the next pod whose template is outdated, once its leaderships have moved to
/// other replicas; answers what is rolling, if anything.
async fn roll(
    ctx: &Context,
    broker: &Broker,
    set: &StatefulSet,
    pods: &[PodView],
    cluster: Option<&ClusterView>,
    admin: Option<&mut AdminClient<Channel>>,
) -> Result<Option<String>, Error> {
    let Some(revision) = set.status.as_ref().and_then(|s| s.update_revision.clone()) else {
        return Ok(None);
    };
    let outdated = pods.iter().filter(|p| p.revision != revision).count();
    if outdated == 0 {
        return Ok(None);
    }
    let healthy = cluster.is_some_and(|c| c.healthy);
    let (Some(ordinal), Some(admin)) = (
        plan::next_to_roll(&revision, pods, broker.spec.replicas, healthy),
        admin,
    ) else {
        return Ok(Some(format!(
            "{outdated} pods to roll; waiting for every pod and node to be ready"
        )));
    };
    move_leadership_off(admin, ordinal).await?;
    let pod = format!("{}-{ordinal}", broker.name_any());
    let api: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &broker.namespace().unwrap_or_default());
    api.delete(&pod, &DeleteParams::default()).await?;
    let note = format!("restarting pod {pod} on the new template (its leaderships moved first)");
    ctx.event(broker, false, "Rolling", "Roll", note).await;
    Ok(Some(format!("rolling pod {pod}; {outdated} pods to roll")))
}

/// Hands every partition node `id` leads to another of its replicas: each other
/// replica in turn until one takes it (one still catching up is refused by the broker).
async fn move_leadership_off(admin: &mut AdminClient<Channel>, id: u64) -> Result<(), Error> {
    let destinations = admin
        .list_destinations(api::ListDestinationsRequest::default())
        .await?
        .into_inner()
        .destinations;
    let mut moves = Vec::new();
    for d in &destinations {
        let Some(spec) = &d.spec else { continue };
        for p in d.partitions.iter().filter(|p| p.leader == Some(id)) {
            let reference = api::DestinationRef {
                kind: spec.kind,
                name: spec.name.clone(),
                vhost: spec.vhost.clone(),
            };
            let others: Vec<u64> = p.replicas.iter().copied().filter(|r| *r != id).collect();
            moves.push((reference, p.number, others));
        }
    }
    for batch in moves.chunks(TRANSFERS_AT_ONCE) {
        let mut running = tokio::task::JoinSet::new();
        for (reference, partition, others) in batch.iter().cloned() {
            let mut admin = admin.clone();
            running.spawn(async move {
                let mut last = None;
                for to_node in others {
                    let request = api::TransferLeadershipRequest {
                        destination: Some(reference.clone()),
                        partition,
                        to_node,
                    };
                    match admin.transfer_leadership(request).await {
                        Ok(_) => return Ok(()),
                        Err(status) => last = Some(status),
                    }
                }
                last.map_or(Ok(()), Err)
            });
        }
        while let Some(done) = running.join_next().await {
            if let Ok(Err(status)) = done {
                return Err(status.into());
            }
        }
    }
    Ok(())
}

/// The status and its conditions.
fn status(
    broker: &Broker,
    set: &StatefulSet,
    cluster: Option<&ClusterView>,
    draining: Option<String>,
    rolling: Option<String>,
    unmonitored: Vec<String>,
) -> (serde_json::Value, Vec<Condition>) {
    let wanted = broker.spec.replicas;
    let shown = set.status.clone().unwrap_or_default();
    let ready_replicas = shown.ready_replicas.unwrap_or(0);
    let pods_ready = ready_replicas == wanted && shown.replicas == wanted;
    let healthy = cluster.is_some_and(|c| c.healthy);
    let ready = if pods_ready && healthy {
        Observed::yes(
            conditions::READY,
            "AllReplicasReady",
            format!("{wanted} brokers ready and in the cluster"),
        )
    } else if !pods_ready {
        Observed::no(
            conditions::READY,
            "PodsNotReady",
            format!("{ready_replicas} of {wanted} broker pods ready"),
        )
    } else {
        Observed::no(
            conditions::READY,
            "ClusterNotHealthy",
            "every pod is ready, but not every node is in the cluster yet",
        )
    };
    let progress = draining.or(rolling).or_else(|| {
        (shown.replicas != wanted || ready_replicas != wanted)
            .then(|| format!("{ready_replicas} of {wanted} broker pods ready"))
    });
    let progressing = match progress {
        Some(message) => Observed::yes(conditions::PROGRESSING, "Changing", message),
        None => Observed::no(conditions::PROGRESSING, "Steady", "nothing to do"),
    };
    let mut unserved = unserved(broker);
    unserved.extend(unmonitored);
    let degraded = if unserved.is_empty() {
        Observed::no(
            conditions::DEGRADED,
            "AsAsked",
            "the Broker is as the spec asks",
        )
    } else {
        Observed::yes(conditions::DEGRADED, "NotServed", unserved.join("; "))
    };
    let generation = broker.metadata.generation;
    let merged = conditions::merge(
        broker.conditions(),
        &[ready, progressing, degraded],
        generation,
    );
    let value = json!({
        "replicas": shown.replicas,
        "readyReplicas": ready_replicas,
        "members": cluster.map(|c| c.members.clone()).unwrap_or_default(),
        "version": cluster.map(|c| c.version.clone()),
        "defaultUserSecret": credentials::secret_name(broker),
        "observedGeneration": generation,
        "conditions": merged,
    });
    (value, merged)
}

/// What the Broker asks for that this operator and broker version do not serve yet.
fn unserved(broker: &Broker) -> Vec<String> {
    let spec = &broker.spec;
    let mut found = Vec::new();
    for (name, listener) in [
        ("mqtt", &spec.listeners.mqtt),
        ("stomp", &spec.listeners.stomp),
        ("kafka", &spec.listeners.kafka),
    ] {
        if listener.enabled {
            found.push(format!(
                "the {name} listener is not served by this broker version"
            ));
        }
    }
    if spec.tls.is_some() {
        found.push("TLS is not served by this broker version".to_owned());
    }
    found
}
