//! `petrel cluster|node|topic|queue|vhost|user …`: the admin API from the command line, as tables for
//! people or JSON (`-o json`) for scripts.

use std::fmt::Write as _;

use anyhow::Context;
use petrel_api::admin::v1 as api;
use petrel_api::admin::v1::admin_client::AdminClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Where the admin API is and how to print answers.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// A node's internal address, host:port
    #[arg(
        long,
        env = "PETREL_SERVER",
        default_value = "127.0.0.1:9470",
        global = true
    )]
    pub server: String,
    /// Output format
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// How answers are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

/// `petrel cluster …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ClusterCommand {
    /// The cluster's nodes and metadata leader.
    Status,
}

/// `petrel node …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodeCommand {
    /// Drains a node: its replicas move to other nodes; it may stop once done.
    Decommission {
        /// The node's id.
        id: u64,
        /// Wait until the node is drained.
        #[arg(long)]
        wait: bool,
        /// The longest to wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// How far a node's decommission is.
    Progress {
        /// The node's id.
        id: u64,
    },
    /// Cancels a node's decommission: it is active again and takes replicas back.
    CancelDecommission {
        /// The node's id.
        id: u64,
    },
    /// Forgets a drained node that has stopped. Prints the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
    /// Registers a node ahead of its start (a node started with a peer list joins by
    /// itself); it is given an even share of the replicas. Prints the cluster.
    Add {
        /// The node's id.
        id: u64,
        /// Its internal address, host:port.
        #[arg(long)]
        addr: String,
    },
}

/// `petrel topic …` and `petrel queue …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DestinationCommand {
    /// Creates one.
    Create {
        /// Its name (1 to 255 bytes).
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Replicas of each partition.
        #[arg(long, default_value_t = 1)]
        replication_factor: u32,
        /// When appends are acknowledged.
        #[arg(long, value_enum, default_value_t = DurabilityArg::Always)]
        durability: DurabilityArg,
        /// How long messages are kept, in milliseconds (topics).
        #[arg(long)]
        retention_ms: Option<u64>,
        /// How many bytes a partition keeps (topics).
        #[arg(long)]
        retention_bytes: Option<u64>,
    },
    /// Lists them all.
    List,
    /// Shows one, with its partitions.
    Describe {
        /// Its name.
        name: String,
    },
    /// Deletes one with all its messages.
    Delete {
        /// Its name.
        name: String,
    },
    /// Hands a partition's leadership to another of its replicas, then shows it.
    TransferLeader {
        /// Its name.
        name: String,
        /// The partition.
        #[arg(long)]
        partition: u32,
        /// The replica's node id.
        #[arg(long)]
        to: u64,
    },
}

/// `petrel vhost …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum VhostCommand {
    /// Creates one (nothing happens if it exists).
    Create {
        /// Its name (1 to 255 bytes).
        name: String,
    },
    /// Lists them all, "/" included.
    List,
    /// Deletes one with its queues, their messages, and its exchanges.
    Delete {
        /// Its name.
        name: String,
    },
}

/// `petrel user …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum UserCommand {
    /// Creates a user, or gives one a new password and tags (its vhosts stay).
    Add {
        /// Its name.
        name: String,
        /// Its password (only a salted hash is kept).
        #[arg(long, env = "PETREL_USER_PASSWORD", hide_env_values = true)]
        password: String,
        /// A tag (repeatable), such as administrator or monitoring.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Deletes a user.
    Delete {
        /// Its name.
        name: String,
    },
    /// Lists the users and the vhosts each may open.
    List,
    /// Lets a user open a vhost.
    Permit {
        /// The user.
        name: String,
        /// The vhost.
        #[arg(long)]
        vhost: String,
    },
    /// No longer lets a user open a vhost.
    Forbid {
        /// The user.
        name: String,
        /// The vhost.
        #[arg(long)]
        vhost: String,
    },
}

/// `--durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    /// After an fsync on a majority.
    Always,
    /// At the next periodic sync.
    Interval,
    /// At once, relying on replication.
    Never,
}

async fn connect(connection: &Connection) -> anyhow::Result<AdminClient<Channel>> {
    AdminClient::connect(format!("http://{}", connection.server))
        .await
        .with_context(|| format!("cannot reach the admin API at {}", connection.server))
}

/// A gRPC failure as one line: the server's message says what was wrong.
fn failed(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => {
            anyhow::anyhow!("{} ({:?})", status.message(), status.code())
        }
        _ => anyhow::anyhow!("{}", status.message()),
    }
}

/// Runs `petrel cluster <command>` and returns what to print.
pub async fn cluster(command: &ClusterCommand, connection: &Connection) -> anyhow::Result<String> {
    let mut client = connect(connection).await?;
    match command {
        ClusterCommand::Status => {
            let status = client
                .get_cluster_status(api::GetClusterStatusRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            if connection.output == Output::Json {
                let nodes: Vec<Value> = status
                    .nodes
                    .iter()
                    .map(|n| {
                        json!({
                            "id": n.id,
                            "addr": n.addr,
                            "state": n.state,
                            "health": n.health,
                            "metadata_lag": n.metadata_lag,
                        })
                    })
                    .collect();
                let doc = json!({
                    "nodes": nodes,
                    "metadata_leader": status.metadata_leader,
                    "answered_by": status.answered_by,
                });
                return Ok(format!("{doc}\n"));
            }
            let rows = status
                .nodes
                .iter()
                .map(|n| {
                    let leader = status.metadata_leader == Some(n.id);
                    vec![
                        n.id.to_string(),
                        n.addr.clone(),
                        n.state.clone(),
                        n.health.clone(),
                        n.metadata_lag
                            .map_or_else(|| "-".to_owned(), |l| l.to_string()),
                        if leader { "leader" } else { "" }.to_owned(),
                    ]
                })
                .collect();
            Ok(table(
                &["NODE", "ADDRESS", "STATE", "HEALTH", "LAG", "METADATA"],
                rows,
            ))
        }
    }
}

/// Runs `petrel node <command>` and returns what to print.
pub async fn node(command: &NodeCommand, connection: &Connection) -> anyhow::Result<String> {
    let mut client = connect(connection).await?;
    let progress = match command {
        NodeCommand::Decommission { id, wait, timeout } => {
            let node = api::NodeRef { node_id: *id };
            let mut progress = client
                .decommission_node(node)
                .await
                .map_err(failed)?
                .into_inner();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(*timeout);
            while *wait && !progress.done {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "node {id} still has {} partitions to move after {timeout} s",
                    progress.partitions_remaining
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                progress = client
                    .get_decommission_progress(node)
                    .await
                    .map_err(failed)?
                    .into_inner();
            }
            progress
        }
        NodeCommand::Progress { id } => client
            .get_decommission_progress(api::NodeRef { node_id: *id })
            .await
            .map_err(failed)?
            .into_inner(),
        NodeCommand::CancelDecommission { id } => client
            .cancel_decommission(api::NodeRef { node_id: *id })
            .await
            .map_err(failed)?
            .into_inner(),
        NodeCommand::Remove { id } => {
            client
                .remove_node(api::NodeRef { node_id: *id })
                .await
                .map_err(failed)?;
            return cluster(&ClusterCommand::Status, connection).await;
        }
        NodeCommand::Add { id, addr } => {
            let request = api::AddNodeRequest {
                node_id: *id,
                addr: addr.clone(),
            };
            client.add_node(request).await.map_err(failed)?;
            return cluster(&ClusterCommand::Status, connection).await;
        }
    };
    Ok(match connection.output {
        Output::Json => format!(
            "{}\n",
            json!({
                "node_id": progress.node_id,
                "state": progress.state,
                "partitions_remaining": progress.partitions_remaining,
                "done": progress.done,
            })
        ),
        Output::Table => table(
            &["NODE", "STATE", "REMAINING", "DONE"],
            vec![vec![
                progress.node_id.to_string(),
                progress.state,
                progress.partitions_remaining.to_string(),
                progress.done.to_string(),
            ]],
        ),
    })
}

/// Runs `petrel topic|queue <command>` and returns what to print.
pub async fn destination(
    kind: api::Kind,
    vhost: &str,
    command: &DestinationCommand,
    connection: &Connection,
) -> anyhow::Result<String> {
    let mut client = connect(connection).await?;
    let named = |name: &str| api::DestinationRef {
        kind: kind.into(),
        name: name.to_owned(),
        vhost: vhost.to_owned(),
    };
    let one = match command {
        DestinationCommand::Create {
            name,
            partitions,
            replication_factor,
            durability,
            retention_ms,
            retention_bytes,
        } => {
            let spec = api::DestinationSpec {
                kind: kind.into(),
                name: name.clone(),
                partitions: *partitions,
                replication_factor: *replication_factor,
                durability: match durability {
                    DurabilityArg::Always => api::Durability::Always,
                    DurabilityArg::Interval => api::Durability::Interval,
                    DurabilityArg::Never => api::Durability::Never,
                }
                .into(),
                retention_ms: *retention_ms,
                retention_bytes: *retention_bytes,
                vhost: vhost.to_owned(),
                queue_arguments: None,
            };
            let request = api::CreateDestinationRequest { spec: Some(spec) };
            client.create_destination(request).await
        }
        DestinationCommand::Describe { name } => client.get_destination(named(name)).await,
        DestinationCommand::Delete { name } => client.delete_destination(named(name)).await,
        DestinationCommand::TransferLeader {
            name,
            partition,
            to,
        } => {
            let request = api::TransferLeadershipRequest {
                destination: Some(named(name)),
                partition: *partition,
                to_node: *to,
            };
            client.transfer_leadership(request).await.map_err(failed)?;
            client.get_destination(named(name)).await
        }
        DestinationCommand::List => {
            let listed = client
                .list_destinations(api::ListDestinationsRequest { kind: kind.into() })
                .await
                .map_err(failed)?
                .into_inner()
                .destinations
                .into_iter()
                // Queues of the vhost asked for only, as `rabbitmqctl list_queues -p`.
                .filter(|d| {
                    kind != api::Kind::Queue || d.spec.as_ref().is_some_and(|s| s.vhost == vhost)
                })
                .collect::<Vec<_>>();
            return Ok(match connection.output {
                Output::Json => {
                    let all: Vec<Value> = listed.iter().map(destination_json).collect();
                    format!("{}\n", Value::Array(all))
                }
                Output::Table => table(
                    &["NAME", "PARTITIONS", "REPLICATION", "DURABILITY"],
                    listed.iter().map(summary).collect(),
                ),
            });
        }
    };
    let d = one.map_err(failed)?.into_inner();
    Ok(match connection.output {
        Output::Json => format!("{}\n", destination_json(&d)),
        Output::Table => {
            let mut out = table(
                &["NAME", "PARTITIONS", "REPLICATION", "DURABILITY"],
                vec![summary(&d)],
            );
            out.push('\n');
            out.push_str(&table(
                &[
                    "PARTITION",
                    "GROUP",
                    "LEADER",
                    "REPLICAS",
                    "LAG",
                    "END OFFSET",
                ],
                d.partitions
                    .iter()
                    .map(|p| {
                        vec![
                            p.number.to_string(),
                            p.group.to_string(),
                            p.leader.map_or_else(|| "-".to_owned(), |l| l.to_string()),
                            p.replicas
                                .iter()
                                .map(u64::to_string)
                                .collect::<Vec<_>>()
                                .join(","),
                            lag(p),
                            p.end_offset
                                .map_or_else(|| "-".to_owned(), |o| o.to_string()),
                        ]
                    })
                    .collect(),
            ));
            if let Some(s) = d.queue_stats {
                out.push('\n');
                out.push_str(&table(
                    &["READY", "UNACKED", "CONSUMERS"],
                    vec![vec![
                        s.ready.to_string(),
                        s.unacked.to_string(),
                        s.consumers.to_string(),
                    ]],
                ));
            }
            out
        }
    })
}

/// Runs `petrel vhost <command>` and returns what to print.
pub async fn vhost(command: &VhostCommand, connection: &Connection) -> anyhow::Result<String> {
    let mut client = connect(connection).await?;
    let named = |name: &str| api::VhostRef {
        name: name.to_owned(),
    };
    let vhosts = match command {
        VhostCommand::Create { name } => {
            vec![
                client
                    .create_vhost(named(name))
                    .await
                    .map_err(failed)?
                    .into_inner(),
            ]
        }
        VhostCommand::Delete { name } => {
            vec![
                client
                    .delete_vhost(named(name))
                    .await
                    .map_err(failed)?
                    .into_inner(),
            ]
        }
        VhostCommand::List => {
            let request = api::ListVhostsRequest {};
            client
                .list_vhosts(request)
                .await
                .map_err(failed)?
                .into_inner()
                .vhosts
        }
    };
    Ok(match connection.output {
        Output::Json => json_lines(
            matches!(command, VhostCommand::List),
            vhosts
                .iter()
                .map(|v| json!({"name": v.name, "queues": v.queues}))
                .collect(),
        ),
        Output::Table => table(
            &["NAME", "QUEUES"],
            vhosts
                .iter()
                .map(|v| vec![v.name.clone(), v.queues.to_string()])
                .collect(),
        ),
    })
}

/// Runs `petrel user <command>` and returns what to print.
pub async fn user(command: &UserCommand, connection: &Connection) -> anyhow::Result<String> {
    let mut client = connect(connection).await?;
    let permit = |name: &str, vhost: &str, allow: bool| api::SetPermissionRequest {
        user: name.to_owned(),
        vhost: vhost.to_owned(),
        allow,
    };
    let users = match command {
        UserCommand::Add {
            name,
            password,
            tags,
        } => {
            let request = api::PutUserRequest {
                name: name.clone(),
                password: password.clone(),
                tags: tags.clone(),
            };
            vec![client.put_user(request).await.map_err(failed)?.into_inner()]
        }
        UserCommand::Delete { name } => {
            let request = api::UserRef { name: name.clone() };
            vec![
                client
                    .delete_user(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            ]
        }
        UserCommand::List => {
            let request = api::ListUsersRequest {};
            client
                .list_users(request)
                .await
                .map_err(failed)?
                .into_inner()
                .users
        }
        UserCommand::Permit { name, vhost } => {
            let request = permit(name, vhost, true);
            vec![
                client
                    .set_permission(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            ]
        }
        UserCommand::Forbid { name, vhost } => {
            let request = permit(name, vhost, false);
            vec![
                client
                    .set_permission(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            ]
        }
    };
    Ok(match connection.output {
        Output::Json => json_lines(
            matches!(command, UserCommand::List),
            users
                .iter()
                .map(|u| json!({"name": u.name, "tags": u.tags, "vhosts": u.vhosts}))
                .collect(),
        ),
        Output::Table => table(
            &["NAME", "TAGS", "VHOSTS"],
            users
                .iter()
                .map(|u| vec![u.name.clone(), u.tags.join(","), u.vhosts.join(",")])
                .collect(),
        ),
    })
}

/// JSON for what a command answered: the list for a listing, else its one item.
fn json_lines(listing: bool, all: Vec<Value>) -> String {
    match (listing, all.as_slice()) {
        (false, [one]) => format!("{one}\n"),
        _ => format!("{}\n", Value::Array(all)),
    }
}

/// Entries each replica is behind, in replica order (`-` where not known).
fn lag(p: &api::PartitionStatus) -> String {
    if p.lag.is_empty() {
        return "-".to_owned();
    }
    p.replicas
        .iter()
        .map(|r| p.lag.get(r).map_or_else(|| "?".to_owned(), u64::to_string))
        .collect::<Vec<_>>()
        .join(",")
}

fn durability_name(d: &api::DestinationSpec) -> &'static str {
    match api::Durability::try_from(d.durability) {
        Ok(api::Durability::Interval) => "interval",
        Ok(api::Durability::Never) => "never",
        _ => "always",
    }
}

fn summary(d: &api::Destination) -> Vec<String> {
    let spec = d.spec.clone().unwrap_or_default();
    vec![
        spec.name.clone(),
        spec.partitions.to_string(),
        spec.replication_factor.to_string(),
        durability_name(&spec).to_owned(),
    ]
}

fn destination_json(d: &api::Destination) -> Value {
    let spec = d.spec.clone().unwrap_or_default();
    let partitions: Vec<Value> = d
        .partitions
        .iter()
        .map(|p| {
            let lag: serde_json::Map<String, Value> =
                p.lag.iter().map(|(id, n)| (id.to_string(), json!(n))).collect();
            json!({"partition": p.number, "group": p.group, "leader": p.leader, "replicas": p.replicas, "lag": lag, "end_offset": p.end_offset})
        })
        .collect();
    json!({
        "name": spec.name,
        "vhost": spec.vhost,
        "kind": if spec.kind == i32::from(api::Kind::Queue) { "queue" } else { "topic" },
        "partitions": spec.partitions,
        "replication_factor": spec.replication_factor,
        "durability": durability_name(&spec),
        "retention_ms": spec.retention_ms,
        "retention_bytes": spec.retention_bytes,
        "placement": partitions,
        "messages": d.queue_stats.map(|s| json!({"ready": s.ready, "unacked": s.unacked, "consumers": s.consumers})),
    })
}

/// Rows under a header, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let t = table(
            &["NAME", "N"],
            vec![
                vec!["orders".into(), "3".into()],
                vec!["ä".into(), "12".into()],
            ],
        );
        assert_eq!(t, "NAME    N\norders  3\nä       12\n");
    }
}
