//! Where the `petrel` binary under test is, and a clean command line for it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Environment variable naming the binary to test instead of the one in the target dir.
pub const BINARY_ENV: &str = "PETREL_TEST_BINARY";

/// The `petrel` binary: `$PETREL_TEST_BINARY` if set, else `petrel` in the cargo target
/// profile directory this test executable was built into (`target/<profile>/`).
///
/// Cargo builds it there for `cargo test --workspace` and `cargo build --workspace`
/// (`tests/run` does both); `cargo test -p petrel-tests` alone may find a stale one.
pub fn petrel_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    // Integration tests run from target/<profile>/deps/, binaries live in target/<profile>/.
    let mut dir = exe.parent();
    while let Some(candidate_dir) = dir {
        let candidate = candidate_dir.join(format!("petrel{}", std::env::consts::EXE_SUFFIX));
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !candidate_dir.ends_with("deps") {
            break;
        }
        dir = candidate_dir.parent();
    }
    bail!(
        "no petrel binary next to {}: build it first with `cargo build --workspace` \
         (tests/run does), or set {BINARY_ENV}",
        exe.display()
    )
}

/// A command running the `petrel` binary with no `PETREL_*` or `RUST_LOG` variable
/// inherited from the test's environment, so only what a test sets reaches it.
pub fn petrel_command() -> anyhow::Result<Command> {
    let mut command = Command::new(petrel_binary()?);
    for (name, _) in std::env::vars_os() {
        let inherited = name.to_string_lossy();
        if inherited.starts_with("PETREL_") || inherited == "RUST_LOG" {
            command.env_remove(&name);
        }
    }
    Ok(command)
}
