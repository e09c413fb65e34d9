//! A cluster of `petrel serve` processes on loopback: they form from a static peer list,
//! and a node killed with SIGKILL comes back on its data and is a member again.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use petrel_tests::{PetrelProcess, Serve, Signal, free_port_other_than};

const READY: Duration = Duration::from_secs(30);
const FORM: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);

/// The value of an unlabelled metric on a node's `/metrics`, if it reports it.
fn metric(node: &PetrelProcess, name: &str) -> anyhow::Result<Option<f64>> {
    let body = node.get("/metrics")?.body;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()))
}

/// Waits until every node reports `petrel_cluster_nodes` = `n`.
fn members(nodes: &[&PetrelProcess], n: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + FORM;
    for node in nodes {
        loop {
            if metric(node, "petrel_cluster_nodes")? == Some(n) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no cluster of {n} nodes after {FORM:?}:\n{}",
                node.stdout()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// `petrel serve` as node `id` of the cluster `peers`, on `data_dir` if given.
fn node(
    id: u64,
    peers: &str,
    port: u16,
    data_dir: Option<&std::path::Path>,
) -> anyhow::Result<(Serve, std::path::PathBuf)> {
    let serve = Serve::bare()?;
    let dir = data_dir.map_or_else(|| serve.data_dir(), std::path::Path::to_path_buf);
    let http = serve.http_port().to_string();
    let serve = serve
        .args(["--bind", "127.0.0.1", "--http-port", &http])
        .args(["--node-id", &id.to_string(), "--peers", peers])
        .args(["--internal-port", &port.to_string()])
        .arg("--data-dir")
        .arg(&dir);
    Ok((serve, dir))
}

#[test]
fn three_processes_form_a_cluster_and_a_killed_node_comes_back_a_member() -> anyhow::Result<()> {
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push(free_port_other_than(&ports)?);
    }
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (serve, dir) = node(i as u64 + 1, &peers, *port, None)?;
        nodes.push(serve.start()?);
        dirs.push(dir);
    }
    for node in &mut nodes {
        node.wait_ready(READY)?;
    }
    members(&nodes.iter().collect::<Vec<_>>(), 3.0)?;

    // Node 3 crashes; the other two keep the cluster; it restarts on its data.
    let crashed = nodes.pop().context("node 3")?;
    crashed.signal(Signal::Kill)?;
    let mut crashed = crashed;
    crashed.wait_exit(EXIT)?;
    let (serve, _) = node(3, &peers, ports[2], Some(&dirs[2]))?;
    let mut back = serve.start()?;
    back.wait_ready(READY)?;
    members(&[&nodes[0], &nodes[1], &back], 3.0)?;
    for node in nodes.iter().chain([&back]) {
        node.signal(Signal::Term)?;
    }
    for node in nodes.iter_mut().chain([&mut back]) {
        let exited = node.wait_exit(EXIT)?;
        ensure!(exited.status.success(), "unclean stop: {}", exited.stderr);
    }
    drop(crashed);
    Ok(())
}

#[test]
fn a_peer_list_without_this_node_is_refused() -> anyhow::Result<()> {
    let port = free_port_other_than(&[])?;
    let (serve, _) = node(1, &format!("2=127.0.0.1:{port}"), port, None)?;
    let exited = serve.run_to_exit(EXIT)?;
    ensure!(exited.status.code() == Some(1), "{exited:?}");
    ensure!(
        exited
            .stderr
            .contains("does not list this node (node_id 1)"),
        "{}",
        exited.stderr
    );
    Ok(())
}

#[test]
fn an_internal_port_in_use_fails_naming_the_address() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let (serve, _) = node(1, &format!("1=127.0.0.1:{port}"), port, None)?;
    let exited = serve.run_to_exit(EXIT)?;
    ensure!(exited.status.code() == Some(1), "{exited:?}");
    let expected = format!("cannot listen for peers on 127.0.0.1:{port}");
    ensure!(exited.stderr.contains(&expected), "{}", exited.stderr);
    Ok(())
}
