//! A static cluster of `petrel serve` processes on loopback, for the black-box tests and
//! the cluster benchmark.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::ensure;

use crate::port::free_port_other_than;
use crate::process::{PetrelProcess, Serve};

/// How long a node may take to become ready.
pub const READY: Duration = Duration::from_secs(30);
/// How long the nodes may take to see each other as members.
pub const FORM: Duration = Duration::from_secs(30);
/// How long a stopped or killed node may take to exit.
pub const EXIT: Duration = Duration::from_secs(15);

/// The value of an unlabelled metric on a node's `/metrics`, if it reports it.
pub fn metric(node: &PetrelProcess, name: &str) -> anyhow::Result<Option<f64>> {
    let body = node.get("/metrics")?.body;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()))
}

/// Waits until every node reports `petrel_cluster_nodes` = `n`.
pub fn members(nodes: &[&PetrelProcess], n: f64) -> anyhow::Result<()> {
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

/// `petrel serve` as node `id` of the cluster `peers`, listening for peers on `port`, on
/// `data_dir` if given (else in its own temp directory); returns it and its data dir.
pub fn node(
    id: u64,
    peers: &str,
    port: u16,
    data_dir: Option<&Path>,
) -> anyhow::Result<(Serve, PathBuf)> {
    let serve = Serve::bare()?;
    let dir = data_dir.map_or_else(|| serve.data_dir(), Path::to_path_buf);
    let http = serve.http_port().to_string();
    // The AMQP listener takes any free port (PETREL_AMQP_PORT=0): fewer ports picked ahead
    // means fewer races with other tests; `PetrelProcess::amqp_addr` reads it from the log.
    let serve = serve
        .args(["--bind", "127.0.0.1", "--http-port", &http])
        .args(["--node-id", &id.to_string(), "--peers", peers])
        .args(["--internal-port", &port.to_string()])
        .arg("--data-dir")
        .arg(&dir);
    Ok((serve, dir))
}

/// Running nodes of one cluster, with ids 1 to n.
pub struct Cluster {
    /// The processes, by node id - 1.
    pub nodes: Vec<PetrelProcess>,
    /// Their internal ports (admin API, internal data API), by node id - 1.
    pub ports: Vec<u16>,
    /// The `--peers` they were given.
    pub peers: String,
    /// Their data directories.
    pub dirs: Vec<PathBuf>,
    /// Arguments every node gets besides its identity.
    extra: Vec<OsString>,
}

impl Cluster {
    /// Starts `n` nodes, ready and joined.
    pub fn start(n: usize) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, Vec::<OsString>::new())
    }

    /// Starts `n` nodes with `extra` arguments each, ready and joined.
    pub fn start_with<I, S>(n: usize, extra: I) -> anyhow::Result<Cluster>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let extra: Vec<OsString> = extra.into_iter().map(Into::into).collect();
        let mut ports = Vec::new();
        for _ in 0..n {
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
            nodes.push(serve.args(extra.iter().cloned()).start()?);
            dirs.push(dir);
        }
        for node in &mut nodes {
            node.wait_ready(READY)?;
        }
        members(&nodes.iter().collect::<Vec<_>>(), n as f64)?;
        Ok(Cluster {
            nodes,
            ports,
            peers,
            dirs,
            extra,
        })
    }

    /// Waits until every node sees all of them as members.
    pub fn joined(&self) -> anyhow::Result<()> {
        members(
            &self.nodes.iter().collect::<Vec<_>>(),
            self.nodes.len() as f64,
        )
    }

    /// Starts one more node, id n + 1, whose peer list is the cluster's and itself (the
    /// others keep theirs: it joins through them), and waits until every node lists it.
    pub fn add_node(&mut self) -> anyhow::Result<()> {
        let port = free_port_other_than(&self.ports)?;
        let id = self.nodes.len() + 1;
        let peers = format!("{},{id}=127.0.0.1:{port}", self.peers);
        let (serve, dir) = node(u64::try_from(id)?, &peers, port, None)?;
        let mut process = serve.args(self.extra.iter().cloned()).start()?;
        process.wait_ready(READY)?;
        self.nodes.push(process);
        self.ports.push(port);
        self.dirs.push(dir);
        self.peers = peers;
        self.joined()
    }

    /// Starts node `index` (0-based) again on its data directory, emptied first if
    /// `wipe`, once its process has exited (the caller stopped or killed it), and waits
    /// until it is ready. Returns the old process handle: it owns the directory, so the
    /// caller keeps it to the end.
    pub fn restart(&mut self, index: usize, wipe: bool) -> anyhow::Result<PetrelProcess> {
        self.nodes[index].wait_exit(EXIT)?;
        if wipe {
            std::fs::remove_dir_all(&self.dirs[index])?;
        }
        let id = u64::try_from(index)? + 1;
        let (serve, _) = node(id, &self.peers, self.ports[index], Some(&self.dirs[index]))?;
        let serve = serve.args(self.extra.iter().cloned());
        let old = std::mem::replace(&mut self.nodes[index], serve.start()?);
        self.nodes[index].wait_ready(READY)?;
        Ok(old)
    }
}
