//! The coordinator's Prometheus endpoint: `GET /metrics` and nothing else (other paths 404,
//! other methods 405). A plain HTTP/1.1 responder on its own thread, so it answers even while
//! the trainer is busy between steps.

use crate::ClusterError;
use dtrain_fit::metrics::Metrics;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Starts serving; returns the bound address (port 0 picks a free one).
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, ClusterError> {
    let io = |what: String| move |cause| ClusterError::Io { what, cause };
    let listener = TcpListener::bind(addr).map_err(io(format!("--metrics-listen {addr}")))?;
    let local = listener.local_addr().map_err(io(format!("--metrics-listen {addr}")))?;
    std::thread::Builder::new()
        .name("dtrain-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &metrics);
            }
        })
        .map_err(io("cannot start the metrics thread".into()))?;
    Ok(local)
}

fn answer(mut s: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found: only /metrics is served\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET /metrics is served\n".into()),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
