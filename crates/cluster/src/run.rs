//! `coordinator train` with workers: serve the Coordinator service, optionally start local
//! workers, wait for enough of them, and train with a `ClusterEngine`.

use crate::engine::ClusterEngine;
use crate::hub::{Hub, Offer};
use crate::service::CoordinatorService;
use crate::spawn::LocalWorkers;
use crate::termination::Termination;
use crate::{ClusterError, MESSAGE_LIMIT};
use dtrain_data::Dataset;
use dtrain_fit::session::{train_with, EngineFactory, TrainOptions};
use dtrain_fit::{Engine, EngineError, FitError, IoError, Job, Observer, Report};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

#[derive(Clone, Debug)]
/// How the coordinator serves its workers (the `train` flags).
pub struct ClusterOptions {
    /// Where workers dial in (port 0: any free port, printed at start).
    pub listen: SocketAddr,
    /// Local worker processes to start.
    pub spawn_workers: usize,
    /// Workers to wait for before the first step.
    pub min_workers: usize,
    /// The job token workers must present (none: only with mutual TLS or `insecure`).
    pub token: Option<String>,
    /// Allow listening without a token or mutual TLS.
    pub insecure: bool,
    /// A worker that has not answered this long after getting work is dropped.
    pub step_timeout: Duration,
    /// How long to wait for workers, at start or when none is left.
    pub worker_wait: Duration,
    /// Serve TLS with this certificate and key (PEM); with `client_ca`, also require client
    /// certificates signed by it (mutual TLS).
    pub tls: Option<ServerTls>,
    /// Offer workers on this host shared memory for parameters and gradients.
    pub shared_memory: bool,
    /// The fraction of shards a second party computes too (`None`: the job's `fit.verify`,
    /// else `DEFAULT_VERIFY`).
    pub verify: Option<crate::verify::Fraction>,
    /// Where workers, bytes and recomputed shards are counted, if metrics are served.
    pub metrics: Option<Arc<dtrain_fit::metrics::Metrics>>,
    /// How gradients and parameters travel: star, chain, or the chain when it can.
    pub topology: crate::topology::Topology,
}

#[derive(Clone, Debug)]
/// The coordinator's TLS: its certificate and key, and the CA of client certificates for mutual TLS.
pub struct ServerTls {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
    /// PEM CA that signs workers' certificates (mutual TLS).
    pub client_ca: Option<std::path::PathBuf>,
    /// The name every worker's certificate carries (`--peer-tls-name`): with mutual TLS the
    /// coordinator's lanes to chain members check it.
    pub peer_name: String,
}

fn pem(p: &std::path::Path) -> Result<Vec<u8>, IoError> {
    std::fs::read(p).map_err(IoError::on(p, "read"))
}

impl ServerTls {
    fn config(&self) -> Result<tonic::transport::ServerTlsConfig, IoError> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut c = ServerTlsConfig::new().identity(Identity::from_pem(pem(&self.cert)?, pem(&self.key)?));
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(pem(ca)?));
        }
        Ok(c)
    }
}

/// How the coordinator opens lanes to chain members: without TLS with the job token; under
/// mutual TLS also with its own certificate, the members' checked against the client CA; under
/// TLS without a client CA not at all (it could not check a member's certificate), nor when its
/// certificate does not make a lane's TLS (said once): the chain's ends then take the members'
/// streams.
pub(crate) fn lane_access(opts: &ClusterOptions) -> Option<crate::lane::LaneAccess> {
    let token = opts.token.clone();
    let Some(tls) = &opts.tls else { return Some(crate::lane::LaneAccess { token, tls: None }) };
    let ca = tls.client_ca.as_ref()?;
    let made = (|| -> Result<crate::lane::LaneTls, String> {
        let read = |p: &std::path::Path| pem(p).map_err(|e| e.to_string());
        crate::lane::LaneTls::new(&read(&tls.cert)?, &read(&tls.key)?, &read(ca)?, &tls.peer_name)
    })();
    match made {
        Ok(lane_tls) => Some(crate::lane::LaneAccess { token, tls: Some(lane_tls) }),
        Err(why) => {
            tracing::warn!("no lanes to chain members under TLS ({why}): the chain's ends take their streams");
            None
        }
    }
}

impl ClusterOptions {
    /// A token (or mutual TLS) is required, on loopback too, unless `insecure` says otherwise;
    /// a token must be long enough and not the manifests' placeholder.
    pub fn check(&self) -> Result<(), ClusterError> {
        if let Some(t) = &self.token {
            crate::auth::validate(t)
                .map_err(|e| ClusterError::Config(format!("{e} (--token-file or DTRAIN_TOKEN)")))?;
        }
        let mutual_tls = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if self.token.is_none() && !mutual_tls && !self.insecure {
            return Err(ClusterError::Config(format!(
                "refusing to listen on {} without a job token: any local user could join and read the job and its \
                 data; set --token-file or DTRAIN_TOKEN, use mutual TLS, or pass --insecure",
                self.listen
            )));
        }
        if self.tls.is_some() && self.spawn_workers > 0 {
            return Err(ClusterError::Config(
                "--spawn-workers starts local plain-text workers; it cannot be combined with TLS".into(),
            ));
        }
        if self.min_workers == 0 {
            return Err(ClusterError::Config("--min-workers must be at least 1".into()));
        }
        Ok(())
    }
}

/// How often both ends ping an HTTP/2 connection (each side's network thread answers, whatever
/// the computing thread is doing).
pub const KEEPALIVE: Duration = Duration::from_secs(1);

/// How long a ping may go unanswered before the connection is closed: a frozen, crashed or
/// cut-off peer is noticed within about `KEEPALIVE + KEEPALIVE_TIMEOUT`, long before
/// `--step-timeout`.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 frame size both ends accept: 1 MiB frames carry a step's 200 KB of parameters
/// in one frame instead of thirteen.
pub const FRAME: u32 = 1 << 20;

/// A server with dtrain's connection settings (the coordinator's, and a worker's peer port):
/// keepalive pings and TCP keepalive, so a peer that vanished without a FIN (a crashed host, a
/// cut link) is noticed and its stream ends instead of holding its place for ever; windows
/// and frames sized for whole tensors.
pub(crate) fn tuned_server<L>(b: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
    b.http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE))
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(FRAME)
}

/// A client endpoint with the same settings (a worker to its coordinator, a chain member to
/// its successor), without Nagle's delay, connecting within 5 s.
pub(crate) fn tuned_endpoint(e: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    e.tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(FRAME)
}

struct Cluster<'o> {
    opts: &'o ClusterOptions,
    rt: Arc<tokio::runtime::Runtime>,
    workers: Option<LocalWorkers>,
}

impl EngineFactory for Cluster<'_> {
    fn engine<'a>(&mut self, job: &'a Job, train: &'a Arc<Dataset>) -> Result<Box<dyn Engine + 'a>, FitError> {
        let err = |e: String| FitError::Engine(EngineError::Setup(e));
        // Watched from before anything is logged, so a signal sent on seeing "waiting for" counts.
        let mut stop = self.rt.block_on(async { Termination::watch() });
        let offer = self.opts.shared_memory.then(|| Offer { params: job.model.num_params(), slots: job.fit.shards });
        let (hub, events) = Hub::new(job.config.to_toml(), offer);
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(self.opts.listen))
            .map_err(|e| err(format!("cannot listen on {}: {e}", self.opts.listen)))?;
        let addr = listener.local_addr().map_err(|e| err(e.to_string()))?;
        tracing::info!("listening on {addr}");
        let service = CoordinatorService { hub: Arc::clone(&hub), token: self.opts.token.clone() };
        let server = dtrain_proto::coordinator_service(service, MESSAGE_LIMIT);
        // tonic's serve_with_incoming ignores the builder's nodelay: set it on every socket. A
        // connection that would exceed the cap on unheard ones is closed at once.
        let admission = crate::admission::Admission::default();
        let incoming = TcpListenerStream::new(listener).filter_map(move |s| {
            let s = s.ok()?;
            let _ = s.set_nodelay(true);
            admission.admit(s).map(Ok::<_, std::io::Error>)
        });
        let (health_reporter, health) = tonic_health::server::health_reporter();
        let serving = tonic_health::ServingStatus::Serving;
        self.rt.block_on(health_reporter.set_service_status(dtrain_proto::COORDINATOR_SERVICE, serving));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.opts.tls {
            builder = builder.tls_config(tls.config()?).map_err(|e| err(format!("TLS: {e}")))?;
        }
        self.rt.spawn(tuned_server(builder).add_service(health).add_service(server).serve_with_incoming(incoming));
        if self.opts.spawn_workers > 0 {
            let url = format!("http://{addr}");
            // Off shared memory, they can form a chain over loopback.
            let peers = !self.opts.shared_memory && self.opts.topology != crate::topology::Topology::Star;
            let token = self.opts.token.as_deref();
            self.workers = Some(LocalWorkers::spawn(self.opts.spawn_workers, &url, token, peers)?);
        }
        let (workers, shards) = (self.opts.spawn_workers.max(self.opts.min_workers), job.fit.shards);
        if workers > shards {
            tracing::info!(
                "fit.shards is {shards}: at most {shards} of the {workers} workers compute each step (the others \
                 stand by in case one fails); set fit.shards in the job to use more (the result depends on it)"
            );
        }
        let need = self.opts.min_workers;
        tracing::info!("waiting for {need} worker(s)");
        let wait = self.opts.worker_wait;
        self.rt.block_on(async {
            tokio::select! {
                joined = hub.wait_for_workers(need, wait) => {
                    joined.map_err(|joined| EngineError::TooFewWorkers { joined, needed: need, waited: wait })
                }
                () = stop.arrived() => Err(EngineError::Interrupted),
            }
        })?;
        Ok(Box::new(ClusterEngine::new(job, train, Arc::clone(&self.rt), hub, events, self.opts, stop)))
    }
}

/// Trains with workers; like `session::train` otherwise (same run directory, same results
/// for the same `fit.shards`).
pub fn train(opts: &TrainOptions, cluster: &ClusterOptions, obs: &mut dyn Observer) -> Result<Report, ClusterError> {
    crate::timeline::start("coordinator", "coordinator");
    // Workers this coordinator starts get a token made for this run, so that no other local
    // user's process can join (and read the job and its training rows) uninvited.
    let mut cluster = cluster.clone();
    if cluster.spawn_workers > 0 && cluster.token.is_none() && !cluster.insecure {
        let token = crate::auth::random_token()
            .map_err(|cause| ClusterError::Io { what: "cannot make a job token (/dev/urandom)".into(), cause })?;
        cluster.token = Some(token);
    }
    cluster.check()?;
    let cluster = &cluster;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|cause| ClusterError::Io { what: "cannot start the network runtime".into(), cause })?;
    let mut factory = Cluster { opts: cluster, rt: Arc::new(rt), workers: None };
    let report = train_with(opts, &mut factory, obs)?;
    Ok(report)
}
