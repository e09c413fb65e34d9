//! `petrel serve` as an operator sees it: the real binary, started on loopback with a
//! temp data dir, probed over HTTP, configured by flag, environment and file, and stopped
//! by signal. Startup failures must be one clear line on stderr and a non-zero exit.

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use anyhow::ensure;
use petrel_tests::{Exited, Serve, Signal, free_port_other_than, petrel_command};

/// Generous: a debug build on two busy cores.
const READY: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The failure is exactly one `petrel: error: …` line on stderr, with no panic.
fn assert_one_error_line(exited: &Exited, needles: &[&str]) -> anyhow::Result<()> {
    ensure!(
        !exited.status.success(),
        "expected failure, got {}\n{exited:?}",
        exited.status
    );
    ensure!(
        exited.status.code() == Some(1),
        "exit code {:?}",
        exited.status.code()
    );
    let lines: Vec<&str> = exited.stderr.lines().collect();
    ensure!(lines.len() == 1, "expected one stderr line, got {lines:#?}");
    ensure!(lines[0].starts_with("petrel: error: "), "{}", lines[0]);
    for needle in needles {
        ensure!(lines[0].contains(needle), "no {needle:?} in {:?}", lines[0]);
    }
    ensure!(!exited.stderr.contains("panicked"), "{}", exited.stderr);
    Ok(())
}

#[test]
fn serves_health_readiness_and_metrics_with_default_settings() -> anyhow::Result<()> {
    // Only the port is given (tests must not collide); data goes to the default ./data.
    let serve = Serve::bare()?;
    let port = serve.http_port().to_string();
    let data_dir = serve.data_dir();
    let mut node = serve.args(["--http-port", &port]).start()?;
    node.wait_ready(READY)?;

    let health = node.get("/healthz")?;
    ensure!(health.status == 200 && health.body == "ok\n", "{health:?}");
    let ready = node.get("/readyz")?;
    ensure!(ready.status == 200, "{ready:?}");
    let metrics = node.get("/metrics")?;
    ensure!(metrics.status == 200, "{metrics:?}");
    ensure!(
        metrics.headers.contains("text/plain; version=0.0.4"),
        "{metrics:?}"
    );
    let build_info = format!("petrel_build_info{{version=\"{VERSION}\"}} 1");
    ensure!(metrics.body.contains(&build_info), "{}", metrics.body);
    ensure!(metrics.body.contains("petrel_up 1"), "{}", metrics.body);
    ensure!(node.get("/nope")?.status == 404);
    ensure!(
        data_dir.is_dir(),
        "no default data dir {}",
        data_dir.display()
    );
    Ok(())
}

#[test]
fn sigterm_stops_the_node_with_exit_code_0_and_logs_the_shutdown() -> anyhow::Result<()> {
    let mut node = Serve::new()?.start()?;
    node.wait_ready(READY)?;
    node.signal(Signal::Term)?;
    let exited = node.wait_exit(EXIT)?;
    ensure!(exited.status.success(), "{exited:?}");
    for line in [
        "received shutdown signal",
        "SIGTERM",
        "shutting down",
        "closing storage",
        "petrel stopped",
    ] {
        ensure!(
            exited.stdout.contains(line),
            "no {line:?} in\n{}",
            exited.stdout
        );
    }
    ensure!(exited.stderr.is_empty(), "{}", exited.stderr);
    Ok(())
}

#[test]
fn sigint_stops_the_node_with_exit_code_0() -> anyhow::Result<()> {
    let mut node = Serve::new()?.start()?;
    node.wait_ready(READY)?;
    node.signal(Signal::Int)?;
    let exited = node.wait_exit(EXIT)?;
    ensure!(exited.status.success(), "{exited:?}");
    ensure!(exited.stdout.contains("SIGINT"), "{}", exited.stdout);
    Ok(())
}

#[test]
fn settings_come_from_environment_variables() -> anyhow::Result<()> {
    let serve = Serve::bare()?;
    let port = serve.http_port().to_string();
    let data_dir = serve.workdir().join("env-data");
    let mut node = serve
        .env("PETREL_HTTP_PORT", &port)
        .env("PETREL_BIND", "127.0.0.1")
        .env("PETREL_DATA_DIR", &data_dir)
        .env("PETREL_LOG_FORMAT", "json")
        .start()?;
    node.wait_ready(READY)?;
    ensure!(data_dir.is_dir(), "no data dir {}", data_dir.display());
    let stdout = node.stdout();
    let first = stdout.lines().next().unwrap_or_default();
    ensure!(first.starts_with('{'), "not a JSON log line: {first:?}");
    Ok(())
}

#[test]
fn settings_come_from_the_config_file_named_by_flag() -> anyhow::Result<()> {
    let serve = Serve::bare()?;
    let data_dir = serve.workdir().join("file-data");
    let file = serve.write_file(
        "petrel.yaml",
        &format!(
            "# a node configured by file only\nbind: 127.0.0.1\nhttp_port: {}\ndata_dir: {}\nfsync_policy: interval\nsync_interval_ms: 100\n",
            serve.http_port(),
            data_dir.display()
        ),
    )?;
    let mut node = serve.arg("--config").arg(file).start()?;
    node.wait_ready(READY)?;
    ensure!(data_dir.is_dir(), "no data dir {}", data_dir.display());
    Ok(())
}

#[test]
fn the_config_file_can_be_named_by_petrel_config() -> anyhow::Result<()> {
    let serve = Serve::bare()?;
    let file = serve.write_file(
        "petrel.yaml",
        &format!("bind: 127.0.0.1\nhttp_port: {}\n", serve.http_port()),
    )?;
    let mut node = serve.env("PETREL_CONFIG", file).start()?;
    node.wait_ready(READY)
}

#[test]
fn a_flag_beats_the_environment() -> anyhow::Result<()> {
    let serve = Serve::bare()?;
    let flag_port = serve.http_port();
    let env_port = free_port_other_than(&[flag_port])?;
    let mut node = serve
        .args(["--bind", "127.0.0.1", "--http-port", &flag_port.to_string()])
        .env("PETREL_HTTP_PORT", env_port.to_string())
        .start()?;
    node.wait_ready(READY)
}

#[test]
fn the_environment_beats_the_config_file() -> anyhow::Result<()> {
    let serve = Serve::bare()?;
    let env_port = serve.http_port();
    let file_port = free_port_other_than(&[env_port])?;
    let file = serve.write_file(
        "petrel.yaml",
        &format!("bind: 127.0.0.1\nhttp_port: {file_port}\n"),
    )?;
    let mut node = serve
        .arg("--config")
        .arg(file)
        .env("PETREL_HTTP_PORT", env_port.to_string())
        .start()?;
    node.wait_ready(READY)
}

#[test]
fn an_unknown_config_key_fails_naming_the_key() -> anyhow::Result<()> {
    let serve = Serve::new()?;
    let file = serve.write_file("petrel.yaml", "http_port: 1234\nfsync_polcy: always\n")?;
    let exited = serve.arg("--config").arg(&file).run_to_exit(EXIT)?;
    let file = file.display().to_string();
    assert_one_error_line(&exited, &["invalid config file", &file, "fsync_polcy"])
}

#[test]
fn a_data_dir_that_is_a_file_fails_naming_the_directory() -> anyhow::Result<()> {
    let serve = Serve::bare()?;
    let port = serve.http_port().to_string();
    let file = serve.write_file("not-a-dir", "")?;
    let exited = serve
        .args(["--bind", "127.0.0.1", "--http-port", &port, "--data-dir"])
        .arg(&file)
        .run_to_exit(EXIT)?;
    let file = file.display().to_string();
    assert_one_error_line(&exited, &["cannot open storage in", &file])
}

#[test]
fn a_data_dir_below_a_file_fails_naming_the_directory() -> anyhow::Result<()> {
    let serve = Serve::bare()?;
    let port = serve.http_port().to_string();
    let data_dir = serve.write_file("file", "")?.join("data");
    let exited = serve
        .args(["--bind", "127.0.0.1", "--http-port", &port, "--data-dir"])
        .arg(&data_dir)
        .run_to_exit(EXIT)?;
    let data_dir = data_dir.display().to_string();
    assert_one_error_line(
        &exited,
        &["cannot open storage in", &data_dir, "Not a directory"],
    )
}

#[test]
fn an_unwritable_data_dir_fails_naming_the_directory() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("skipped: permissions do not bind root, so no directory is unwritable");
        return Ok(());
    }
    // Owned here, not by the process, so that it outlives the process and its permissions
    // are restored (whatever happened) before it is removed.
    let parent = tempfile::tempdir()?;
    let locked = parent.path().join("locked");
    std::fs::create_dir(&locked)?;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500))?;
    let data_dir = locked.join("data");
    let serve = Serve::bare()?;
    let port = serve.http_port().to_string();
    let exited = serve
        .args(["--bind", "127.0.0.1", "--http-port", &port, "--data-dir"])
        .arg(&data_dir)
        .run_to_exit(EXIT);
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700))?;
    let data_dir = data_dir.display().to_string();
    assert_one_error_line(
        &exited?,
        &["cannot open storage in", &data_dir, "ermission denied"],
    )
}

#[test]
fn an_http_port_in_use_fails_naming_the_address() -> anyhow::Result<()> {
    let serve = Serve::new()?;
    let port = serve.http_port();
    let _holder = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    let exited = serve.run_to_exit(EXIT)?;
    let addr = format!("127.0.0.1:{port}");
    assert_one_error_line(&exited, &["cannot listen for HTTP on", &addr, "in use"])
}

#[test]
fn a_data_dir_held_by_a_running_node_fails_naming_the_directory() -> anyhow::Result<()> {
    let first = Serve::new()?;
    let data_dir = first.data_dir();
    let mut running = first.start()?;
    running.wait_ready(READY)?;

    let second = Serve::bare()?;
    let port = second.http_port().to_string();
    let exited = second
        .args(["--bind", "127.0.0.1", "--http-port", &port, "--data-dir"])
        .arg(&data_dir)
        .run_to_exit(EXIT)?;
    let data_dir = data_dir.display().to_string();
    assert_one_error_line(&exited, &["cannot open storage in", &data_dir, "locked"])?;
    // The first node is unharmed.
    ensure!(running.get("/readyz")?.status == 200);
    Ok(())
}

#[test]
fn version_flag_prints_the_version() -> anyhow::Result<()> {
    let output = petrel_command()?.arg("--version").output()?;
    ensure!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(stdout.trim() == format!("petrel {VERSION}"), "{stdout:?}");
    Ok(())
}
