//! A `petrel serve` process under test: how it is started, probed, stopped and read.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::binary::petrel_command;
use crate::http::{HttpResponse, http_get};
use crate::port::{free_port, free_port_other_than};

/// How often a wait re-checks its condition.
const POLL: Duration = Duration::from_millis(20);
/// Timeout of one HTTP probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A `petrel serve` command line being prepared; its working directory is a fresh temp
/// directory, and [`Serve::http_port`] a port that was free when it was made.
pub struct Serve {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    workdir: TempDir,
    http_port: u16,
    amqp_port: u16,
}

impl Serve {
    /// `petrel serve --bind 127.0.0.1 --http-port <free port> --amqp-port <free port>
    /// --data-dir <workdir>/data`.
    pub fn new() -> anyhow::Result<Serve> {
        let serve = Serve::bare()?;
        let http = serve.http_port.to_string();
        let amqp = serve.amqp_port.to_string();
        let data_dir = serve.data_dir();
        Ok(serve
            .args(["--bind", "127.0.0.1", "--http-port", &http])
            .args(["--amqp-port", &amqp])
            .arg("--data-dir")
            .arg(data_dir))
    }

    /// Like [`Serve::new`], with the data in `dir` (which outlives the process, so that a
    /// test can start a node again on it).
    pub fn on_data_dir(dir: &Path) -> anyhow::Result<Serve> {
        let serve = Serve::bare()?;
        let http = serve.http_port.to_string();
        let amqp = serve.amqp_port.to_string();
        Ok(serve
            .args(["--bind", "127.0.0.1", "--http-port", &http])
            .args(["--amqp-port", &amqp])
            .arg("--data-dir")
            .arg(dir))
    }

    /// `petrel serve` with no setting but `PETREL_INTERNAL_PORT=0` and
    /// `PETREL_AMQP_PORT=0`: the test must get [`Serve::http_port`] (and
    /// [`Serve::amqp_port`]) to the process itself (flag, environment or config file) to
    /// reach it.
    pub fn bare() -> anyhow::Result<Serve> {
        let workdir = tempfile::Builder::new()
            .prefix("petrel-test-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let http_port = free_port().context("cannot find a free port")?;
        let amqp_port = free_port_other_than(&[http_port]).context("cannot find a free port")?;
        Ok(Serve {
            args: vec!["serve".into()],
            // Any free port unless a test picks one, so that nodes run in parallel.
            envs: vec![
                ("PETREL_INTERNAL_PORT".into(), "0".into()),
                ("PETREL_AMQP_PORT".into(), "0".into()),
            ],
            workdir,
            http_port,
            amqp_port,
        })
    }

    /// Adds one command-line argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Serve {
        self.args.push(arg.into());
        self
    }

    /// Adds command-line arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Serve {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Serve {
        self.envs.push((name.into(), value.into()));
        self
    }

    /// The port the test means the HTTP listener to use.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The port the test means the AMQP listener to use.
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The process's working directory (deleted when the process handle is dropped).
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// `<workdir>/data`: the data dir [`Serve::new`] passes, and where the default
    /// `./data` lands.
    pub fn data_dir(&self) -> PathBuf {
        self.workdir.path().join("data")
    }

    /// Writes `contents` to `<workdir>/<name>` and returns its path (e.g. a config file).
    pub fn write_file(&self, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.workdir.path().join(name);
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Starts the process with stdout and stderr captured.
    pub fn start(self) -> anyhow::Result<PetrelProcess> {
        let mut command = petrel_command()?;
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(name, value)| (name, value)))
            .current_dir(self.workdir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            readers.push(capture(pipe, Arc::clone(&stdout)));
        }
        if let Some(pipe) = child.stderr.take() {
            readers.push(capture(pipe, Arc::clone(&stderr)));
        }
        Ok(PetrelProcess {
            child,
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port)),
            amqp_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, self.amqp_port)),
            stdout,
            stderr,
            readers,
            exited: None,
            _workdir: self.workdir,
        })
    }

    /// Starts the process and waits for it to exit by itself, e.g. on a startup error.
    /// The working directory is removed on return: keep files to inspect elsewhere.
    pub fn run_to_exit(self, timeout: Duration) -> anyhow::Result<Exited> {
        let mut process = self.start()?;
        process.wait_exit(timeout)
    }
}

/// Copies a pipe into `sink` line by line until EOF.
pub(crate) fn capture(
    pipe: impl Read + Send + 'static,
    sink: Arc<Mutex<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut text = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            text.push_str(&line);
            text.push('\n');
        }
    })
}

/// A signal a test sends to the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// What Kubernetes sends on pod deletion.
    Term,
    /// What Ctrl-C sends.
    Int,
    /// A crash: no chance to clean up.
    Kill,
    /// A pause (the process keeps its sockets but does nothing).
    Stop,
    /// The end of a pause.
    Cont,
}

/// How a process ended, and everything it printed.
#[derive(Debug, Clone)]
pub struct Exited {
    /// The exit status.
    pub status: ExitStatus,
    /// Everything written to stdout (the logs).
    pub stdout: String,
    /// Everything written to stderr (fatal errors).
    pub stderr: String,
}

/// A running `petrel serve`; killed (SIGKILL) if still running when dropped.
pub struct PetrelProcess {
    child: Child,
    http_addr: SocketAddr,
    amqp_addr: SocketAddr,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    exited: Option<ExitStatus>,
    _workdir: TempDir,
}

impl PetrelProcess {
    /// Where the test expects the HTTP listener: 127.0.0.1 and the [`Serve::http_port`].
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the AMQP listener is: the address the process logged binding (with port 0
    /// it picks one), else 127.0.0.1 and the [`Serve::amqp_port`].
    pub fn amqp_addr(&self) -> SocketAddr {
        self.bound("amqp").unwrap_or(self.amqp_addr)
    }

    /// Where the internal listener (admin API, peers) is, as the process logged binding
    /// it; `None` before it has.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.bound("internal")
    }

    /// The address the process logged binding its `listener` listener to.
    fn bound(&self, listener: &str) -> Option<SocketAddr> {
        let needle = format!("{listener} listener bound addr=");
        lock(&self.stdout).lines().find_map(|l| {
            let (_, rest) = l.split_once(&needle)?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// Runs `petrel <args>` against this node's admin API, which must succeed, and
    /// answers what it printed.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        anyhow::ensure!(
            out.status.success(),
            "petrel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs `petrel <args>` against this node's admin API, and answers its output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let server = self
            .internal_addr()
            .context("the node has not logged its internal listener")?;
        Ok(crate::petrel_command()?
            .args(args)
            .args(["--server", &server.to_string()])
            .output()?)
    }

    /// `amqp://guest:guest@127.0.0.1:<amqp port>/%2f`: the default vhost as `guest`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp_addr())
    }

    /// `GET path` on the HTTP listener.
    pub fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        http_get(self.http_addr, path, PROBE_TIMEOUT)
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        lock(&self.stdout).clone()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Waits until `GET /readyz` answers 200; fails early if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                bail!(
                    "petrel exited with {status} before it was ready\n{}",
                    self.describe()
                );
            }
            if self
                .get("/readyz")
                .is_ok_and(|response| response.status == 200)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("petrel not ready after {timeout:?}\n{}", self.describe());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until stdout or stderr contains `needle`.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {needle:?} in the output after {timeout:?}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// CPU time the process has used so far, user and system, over all its threads.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(self.child.id())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let number = match signal {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        };
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is our
        // own child, not yet reaped (we hold its `Child`), so it cannot name another process.
        let result = unsafe { libc::kill(pid, number) };
        if result != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot send {signal:?} to pid {pid}"));
        }
        Ok(())
    }

    /// Waits for the process to exit and returns its status and full output.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Exited> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_exit()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!(
                    "petrel still running after {timeout:?}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(POLL);
        };
        // The pipes close when the process exits; the readers then finish.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Ok(Exited {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// The exit status, if the process has exited.
    fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("cannot poll petrel")?;
        }
        Ok(self.exited)
    }

    /// The captured output, for error messages.
    fn describe(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for PetrelProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time process `pid` has used so far, user and system, over all its threads (from
/// `/proc/<pid>/stat`; waited-for children are not counted).
pub fn cpu_seconds_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) closed by its last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("short /proc/{pid}/stat: {stat}"))?
            .parse::<u64>()? as f64)
    };
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    anyhow::ensure!(per_second > 0, "no clock tick rate");
    Ok((ticks(11)? + ticks(12)?) / per_second as f64)
}

fn lock(text: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    text.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
