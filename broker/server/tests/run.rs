//! `petrel_server::Server` driven in-process, as the binary drives it: bind, run until a
//! shutdown future completes, and report storage failures as typed errors.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use petrel_server::{Config, Error, Phase, Readiness, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);

fn loopback_config(data_dir: std::path::PathBuf) -> Config {
    Config {
        data_dir,
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        http_port: 0,
        internal_port: 0,
        amqp_port: 0,
        ..Config::default()
    }
}

async fn wait_for(readiness: &Readiness, phase: Phase) {
    tokio::time::timeout(TIMEOUT, async {
        while readiness.phase() != phase {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("node not {phase:?} within {TIMEOUT:?}"));
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .expect("read answer");
    answer
}

#[tokio::test]
async fn a_node_becomes_ready_and_stops_when_shutdown_completes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::bind(loopback_config(dir.path().join("data")))
        .await
        .expect("bind");
    let addr = server.http_addr();
    assert_ne!(addr.port(), 0, "port 0 resolves to the bound port");
    let readiness = server.readiness();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    wait_for(&readiness, Phase::Ready).await;
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.0 200"));
    assert!(get(addr, "/metrics").await.contains("petrel_up 1"));

    stop.send(()).expect("node still running");
    tokio::time::timeout(TIMEOUT, running)
        .await
        .expect("node stops in time")
        .expect("run task joins")
        .expect("clean stop");
    assert_eq!(readiness.phase(), Phase::Stopping);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "http listener closed"
    );
}

#[tokio::test]
async fn a_storage_failure_is_an_open_storage_error_naming_the_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write file");
    let server = Server::bind(loopback_config(file.clone()))
        .await
        .expect("bind");
    let readiness = server.readiness();
    let err = server
        .run(std::future::pending())
        .await
        .expect_err("a file is no data dir");
    assert!(
        matches!(&err, Error::OpenStorage { dir, .. } if *dir == file),
        "{err:?}"
    );
    assert_eq!(readiness.phase(), Phase::Stopping);
}

#[tokio::test]
async fn a_taken_http_port_is_a_bind_error() {
    let holder = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind holder");
    let port = holder.local_addr().expect("holder address").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        http_port: port,
        ..loopback_config(dir.path().join("data"))
    };
    match Server::bind(config).await {
        Err(Error::Bind { addr, .. }) => assert_eq!(addr.port(), port),
        Err(other) => panic!("expected a bind error, got {other:?}"),
        Ok(_) => panic!("bound a port already in use"),
    }
}
