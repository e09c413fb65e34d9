//! Free loopback ports for the processes under test.
//!
//! A port picked ahead is only a promise: nothing holds it until the process under test
//! binds it. Ports the OS hands out for port 0 (listeners that bind 0, every outgoing
//! connection) come from the ephemeral range, so a port picked *there* can be taken by
//! any of them meanwhile — even by another listener of the very node it was picked for.
//! So ports are picked below the ephemeral range, where only this allocator picks, each
//! at most once per test process, starting at an offset from the process id so that two
//! test processes running at once rarely try the same ones.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Ports picked from here: below Linux's ephemeral range (32768–60999 by default) and
/// above the well-known and common service ports.
const FIRST: u32 = 12_000;
const LAST: u32 = 32_000;

/// How many ports this process has tried so far.
static TRIED: AtomicU32 = AtomicU32::new(0);

/// A TCP port that was free on every local address a moment ago, never handed out
/// before by this process and outside the range the OS picks from.
pub fn free_port() -> std::io::Result<u16> {
    let span = LAST - FIRST;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = TRIED.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % span).map_err(std::io::Error::other)?;
        // The wildcard address conflicts with a listener on any 127.0.0.x.
        if TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no free port left between {FIRST} and {LAST}"),
    ))
}

/// A free port different from each of `taken`.
pub fn free_port_other_than(taken: &[u16]) -> std::io::Result<u16> {
    loop {
        let port = free_port()?;
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
}
