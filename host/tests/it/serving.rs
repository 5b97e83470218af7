//! Connections on a real socket: slow headers and bodies, idle keep-alive, unread replies,
//! the connection cap and shutdown with idle connections open.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use providers_database::testing::TestDatabase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{App, Edit};

/// A host with tight connection limits, served on a loopback port.
struct Served {
    app: App,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn served(extra: &str) -> Served {
    let app = App::configured(TestDatabase::sqlite(), |text| {
        text.edit(
            "shutdown_grace = \"5s\"",
            &format!("shutdown_grace = \"5s\"\n{extra}"),
        )
    })
    .await;
    let (addr, stop, server) = crate::support::serve(&app).await;
    Served {
        app,
        addr,
        stop: Some(stop),
        server,
    }
}

/// Reads until the peer closes (or fails the connection), within `limit`; what was read.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let end = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end.into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(all),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response head and its Content-Length body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "closed before a response");
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                let status = text[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + length].to_owned());
            }
        }
    }
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_sent_slowly_is_cut_off_at_the_header_read_timeout() {
    let s = served("header_read_timeout = \"300ms\"").await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"POST /providers/probe/echo HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    // One byte of a header every 50 ms: always some progress, never a whole header.
    let trickle = async {
        for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if stream.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), trickle)
        .await
        .unwrap();
    let rest = read_to_close(&mut stream, Duration::from_secs(10))
        .await
        .expect("the server closed the connection");
    let elapsed = started.elapsed();
    assert!(rest.is_empty(), "no response to half a request");
    assert!(
        elapsed >= Duration::from_millis(250),
        "not before the timeout: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_gets_408_at_the_body_read_timeout() {
    let s = served("body_read_timeout = \"300ms\"").await;
    let token = s.app.token("acme", &["user"]);
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /providers/probe/echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), read.read(&mut buf))
        .await
        .expect("answered before the body ended")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains(r#""error_code":"TIMEOUT""#), "{text}");
    assert!(
        text.contains("request body was not received within 300ms (server.body_read_timeout)"),
        "{text}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    trickle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
    // The header timeout is shorter, but an idle connection is not reading a header.
    let s = served("header_read_timeout = \"200ms\"\nkeepalive_timeout = \"700ms\"").await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(HEALTH).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    stream.write_all(HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut stream).await.0,
        200,
        "still open after the header timeout"
    );
    let idle_from = Instant::now();
    let rest = read_to_close(&mut stream, Duration::from_secs(10))
        .await
        .expect("closed when idle");
    assert!(rest.is_empty());
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(600),
        "not before the keep-alive timeout: {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_at_the_write_timeout() {
    let s = served("write_timeout = \"300ms\"\nkeepalive_timeout = \"10s\"").await;
    let token = s.app.token("acme", &["user"]);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(s.addr).await.unwrap();
    let body = r#"{"bytes": 16000000}"#;
    let request = format!(
        "POST /providers/probe/big HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Not reading for much longer than the write timeout, so that the reply has been built
    // and has stalled even on a loaded machine.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = read_to_close(&mut stream, Duration::from_secs(30))
        .await
        .expect("the connection ended");
    assert!(
        got.len() < 16_000_000,
        "the reply was abandoned, not delivered whole ({} bytes)",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_for_a_free_place() {
    let s = served("max_connections = 2\nkeepalive_timeout = \"10s\"").await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(s.addr).await.unwrap();
        stream.write_all(HEALTH).await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200);
        open.push(stream);
    }
    let mut third = TcpStream::connect(s.addr).await.unwrap();
    third.write_all(HEALTH).await.unwrap();
    let mut buf = [0u8; 256];
    assert!(
        tokio::time::timeout(Duration::from_millis(400), third.read(&mut buf))
            .await
            .is_err(),
        "not served while two connections are open"
    );
    drop(open.pop());
    assert_eq!(
        read_response(&mut third).await.0,
        200,
        "served once a place is free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_without_waiting_for_the_grace() {
    let mut s = served("keepalive_timeout = \"1m\"").await;
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    idle.write_all(HEALTH).await.unwrap();
    assert_eq!(read_response(&mut idle).await.0, 200);
    let started = Instant::now();
    s.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), &mut s.server)
        .await
        .expect("shutdown did not wait for the idle connection")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        read_to_close(&mut idle, Duration::from_secs(1)).await,
        Some(Vec::new())
    );
}
