//! Free loopback ports for the processes under test.

use std::net::{Ipv4Addr, TcpListener};

/// A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it).
///
/// Nothing holds it afterwards: a process started right away almost always gets it.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
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
