//! The coordinator's Prometheus endpoint: `GET /metrics` and nothing else (other paths 404,
//! other methods 405), served with hyper on its own thread and runtime, so it answers even
//! while the trainer is busy between steps (and when training runs without workers).

use crate::ClusterError;
use bytes::Bytes;
use dtrain_fit::metrics::{Metrics, CONTENT_TYPE};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Connections answered at once; a client beyond that is told 503.
const IN_FLIGHT: usize = 16;

/// The most time one connection may take, however slowly its client sends.
const REQUEST_TIME: Duration = Duration::from_secs(2);

/// Starts serving; returns the bound address (port 0 picks a free one). Each connection is its
/// own task with a total deadline, so a slow or idle client cannot hold the endpoint for others.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, ClusterError> {
    let io = |what: String| move |cause| ClusterError::Io { what, cause };
    let listener = std::net::TcpListener::bind(addr).map_err(io(format!("--metrics-listen {addr}")))?;
    let local = listener.local_addr().map_err(io(format!("--metrics-listen {addr}")))?;
    listener.set_nonblocking(true).map_err(io(format!("--metrics-listen {addr}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("cannot start the metrics runtime".into()))?;
    std::thread::Builder::new()
        .name("dtrain-metrics".into())
        .spawn(move || rt.block_on(accept(listener, metrics)))
        .map_err(io("cannot start the metrics thread".into()))?;
    Ok(local)
}

async fn accept(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    let places = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let permit = Arc::clone(&places).try_acquire_owned().ok();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let busy = permit.is_none();
            let service = hyper::service::service_fn(move |req| {
                let response = if busy { unavailable() } else { answer(&req, &metrics) };
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(REQUEST_TIME, conn).await;
            drop(permit);
        });
    }
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn unavailable() -> Response<Full<Bytes>> {
    response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "busy: try again\n".into())
}

fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => response(StatusCode::OK, CONTENT_TYPE, metrics.render()),
        (&Method::GET, _) => {
            response(StatusCode::NOT_FOUND, "text/plain", "not found: only /metrics is served\n".into())
        }
        _ => response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET /metrics is served\n".into()),
    }
}
