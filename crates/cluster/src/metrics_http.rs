//! The coordinator's Prometheus endpoint: `GET /metrics` and nothing else (other paths 404,
//! other methods 405). A plain HTTP/1.1 responder on its own thread, so it answers even while
//! the trainer is busy between steps.

use crate::ClusterError;
use dtrain_fit::metrics::Metrics;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests answered at once; a client beyond that is told 503 and closed.
const IN_FLIGHT: usize = 16;

/// The most time one request may take, however slowly its client sends.
const REQUEST_TIME: Duration = Duration::from_secs(2);

/// Starts serving; returns the bound address (port 0 picks a free one). Each request is
/// answered on its own thread, so a slow or idle client cannot hold the endpoint for others.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, ClusterError> {
    let io = |what: String| move |cause| ClusterError::Io { what, cause };
    let listener = TcpListener::bind(addr).map_err(io(format!("--metrics-listen {addr}")))?;
    let local = listener.local_addr().map_err(io(format!("--metrics-listen {addr}")))?;
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("dtrain-metrics".into())
        .spawn(move || {
            for mut conn in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::SeqCst) >= IN_FLIGHT {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = conn.set_write_timeout(Some(REQUEST_TIME));
                    let _ = conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n");
                    continue;
                }
                let (metrics, done) = (Arc::clone(&metrics), Arc::clone(&busy));
                let spawned = std::thread::Builder::new().name("dtrain-metrics-conn".into()).spawn(move || {
                    let _ = answer(conn, &metrics);
                    done.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst); // no thread: the connection is dropped
                }
            }
        })
        .map_err(io("cannot start the metrics thread".into()))?;
    Ok(local)
}

fn answer(mut s: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let until = Instant::now() + REQUEST_TIME;
    s.set_write_timeout(Some(REQUEST_TIME))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        // A client sending a byte at a time still gets only REQUEST_TIME in all.
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
        }
        s.set_read_timeout(Some(left))?;
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
