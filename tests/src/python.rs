//! Python client programs under test (pika now; paho-mqtt and stomp.py later): the cached
//! virtualenv that `tests/python/env` builds, and [`Script`], one running program whose
//! output the test reads as it is printed.
//!
//! A script reaches the broker under test through `PETREL_AMQP_PORT`, which
//! `tests/python/site/sitecustomize.py` (on `PYTHONPATH`) turns into pika's default port,
//! so the RabbitMQ tutorials in `tests/python/tutorials/` run unchanged.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::Exited;
use crate::process::capture;

/// How often a wait re-checks its condition.
const POLL: Duration = Duration::from_millis(20);

/// `tests/python/`: requirements, the venv script, `site/` and the programs.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// `tests/python/tutorials/`: the RabbitMQ tutorials' Python programs, as published.
pub fn tutorials_dir() -> PathBuf {
    python_dir().join("tutorials")
}

/// The virtualenv's python, with `tests/python/requirements.txt` installed.
///
/// The first call in a test process runs `tests/python/env` (which builds the venv or
/// finds it cached, safely when processes race) and keeps the answer, success or failure,
/// for every later call; a failure carries the script's output.
pub fn python() -> anyhow::Result<&'static Path> {
    // anyhow::Error is not Clone: keep the message, full context included.
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(|| find_python().map_err(|error| format!("{error:#}"))) {
        Ok(path) => Ok(path),
        Err(message) => Err(anyhow!("{message}")),
    }
}

/// Runs `tests/python/env` and takes the python path from its last stdout line.
fn find_python() -> anyhow::Result<PathBuf> {
    let script = python_dir().join("env");
    let output = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let describe = || format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    if !output.status.success() {
        bail!(
            "{} failed with {}\n{}",
            script.display(),
            output.status,
            describe()
        );
    }
    let path = stdout
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "{} printed no python path\n{}",
                script.display(),
                describe()
            )
        })?;
    if !path.is_file() {
        bail!(
            "{} printed {}, which is no file\n{}",
            script.display(),
            path.display(),
            describe()
        );
    }
    Ok(path)
}

/// A Python program running in the venv, stdout and stderr captured line by line;
/// killed (SIGKILL) if still running when dropped.
///
/// Its environment is the test's plus `PETREL_AMQP_PORT`, `PYTHONPATH=tests/python/site`,
/// `PYTHONUNBUFFERED=1` (each line reaches the test as printed) and
/// `PYTHONDONTWRITEBYTECODE=1` (no `__pycache__` in the source tree).
pub struct Script {
    name: String,
    // Behind a mutex so that every method takes `&self`, and a test can poll several
    // scripts from one condition closure.
    child: Mutex<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl Script {
    /// Starts `tests/python/tutorials/<name>` with `args`, pointed at the AMQP broker on
    /// 127.0.0.1:`amqp_port`.
    pub fn tutorial(name: &str, args: &[&str], amqp_port: u16) -> anyhow::Result<Script> {
        Script::start(&tutorials_dir().join(name), args, amqp_port)
    }

    /// Runs a tutorial program to its end; fails unless it exits with status 0 in time.
    pub fn run_tutorial(
        name: &str,
        args: &[&str],
        amqp_port: u16,
        timeout: Duration,
    ) -> anyhow::Result<Exited> {
        Script::tutorial(name, args, amqp_port)?.wait_success(timeout)
    }

    /// Starts the Python program at `path` with `args`, pointed at the AMQP broker on
    /// 127.0.0.1:`amqp_port`.
    pub fn start(path: &Path, args: &[&str], amqp_port: u16) -> anyhow::Result<Script> {
        let python = python()?;
        let mut name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        for arg in args {
            name.push(' ');
            name.push_str(arg);
        }
        let mut command = Command::new(python);
        command
            .arg(path)
            .args(args)
            .env("PETREL_AMQP_PORT", amqp_port.to_string())
            .env("PYTHONPATH", OsString::from(python_dir().join("site")))
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
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
        Ok(Script {
            name,
            child: Mutex::new(child),
            stdout,
            stderr,
            readers: Mutex::new(readers),
        })
    }

    /// The program's file name and arguments, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything the program wrote to stdout so far.
    pub fn stdout(&self) -> String {
        lock(&self.stdout).clone()
    }

    /// Everything the program wrote to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// The exit status, if the program has exited.
    pub fn try_exit(&self) -> anyhow::Result<Option<ExitStatus>> {
        // std caches the status once reaped, so polling again is fine.
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("cannot poll {}", self.name))
    }

    /// Waits until stdout or stderr contains `needle`; fails early if the program exits
    /// without printing it.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{needle:?} from {}", self.name);
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if self.try_exit()?.is_some() {
                // The last lines may still be in the pipes: read them all, then decide.
                self.join_readers();
                if self.stdout().contains(needle) || self.stderr().contains(needle) {
                    return Ok(());
                }
                bail!("{} exited before printing {what}", self.describe());
            }
            if Instant::now() >= deadline {
                bail!("no {what} after {timeout:?}\n{}", self.describe());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the program to exit and returns its status and full output.
    pub fn wait_exit(&self, timeout: Duration) -> anyhow::Result<Exited> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_exit()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!("still running after {timeout:?}: {}", self.describe());
            }
            std::thread::sleep(POLL);
        };
        // The pipes close when the program exits; the readers then finish.
        self.join_readers();
        Ok(Exited {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// Waits for the program to exit, and fails unless its status is 0.
    pub fn wait_success(&self, timeout: Duration) -> anyhow::Result<Exited> {
        let exited = self.wait_exit(timeout)?;
        if !exited.status.success() {
            bail!("{} failed: {}", self.name, self.describe());
        }
        Ok(exited)
    }

    /// Name, state and captured output, for error messages.
    pub fn describe(&self) -> String {
        let state = match self.try_exit() {
            Ok(Some(status)) => format!("exited with {status}"),
            Ok(None) => "running".to_owned(),
            Err(error) => format!("{error:#}"),
        };
        format!(
            "`{}` ({state})\n--- stdout ---\n{}--- stderr ---\n{}",
            self.name,
            self.stdout(),
            self.stderr()
        )
    }

    fn join_readers(&self) {
        let readers = std::mem::take(&mut *lock(&self.readers));
        for reader in readers {
            let _ = reader.join();
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `condition` holds, re-checking it until `timeout`; on timeout the error
/// names `what` and shows every script in `scripts` (those the condition reads).
pub fn wait_until(
    what: &str,
    timeout: Duration,
    scripts: &[&Script],
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let states: Vec<String> = scripts.iter().map(|script| script.describe()).collect();
            bail!(
                "timed out after {timeout:?} waiting until {what}\n{}",
                states.join("\n")
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Locks, ignoring poisoning: a panicked reader leaves nothing half-written that matters.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
