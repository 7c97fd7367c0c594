//! The worker: dials the coordinator, receives the job, then computes the shards it is sent
//! until told to stop. It reads no data files. A lost connection is retried (the coordinator
//! may be restarting from its checkpoint) for `retry_for`.

use crate::peer::{member_step, Next, PeerPort, PeerTls};
use crate::shm::SharedFile;
use crate::timeline;
use crate::ClusterError;
use dtrain_fit::config::JobConfig;
use dtrain_fit::engine::ShardBuffers;
use dtrain_fit::Job;
use dtrain_nn::simd::{sum_into, Part};
use dtrain_nn::Mode;
use dtrain_proto::{
    read_f32s, shard_from_wire, Connection, FromWorker, Hello, ShardResult, SharedMemoryOffer, Tensor, ToWorker,
    WireError, WireShard, WireTensor, Work, PROTOCOL_VERSION,
};
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::transport::Endpoint;
use tonic::{Code, Status};

#[derive(Clone, Debug)]
/// How a worker reaches its coordinator (the `worker` flags).
pub struct WorkerOptions {
    /// e.g. http://coordinator:50051
    pub coordinator: String,
    /// The job token.
    pub token: Option<String>,
    /// The name it joins under (in the coordinator's log lines).
    pub name: String,
    /// Keep trying to (re)connect this long before giving up.
    pub retry_for: Duration,
    /// Serve the gRPC health service here (for Kubernetes probes).
    pub health_listen: Option<std::net::SocketAddr>,
    /// TLS to the coordinator, for an https:// URL.
    pub tls: Option<ClientTls>,
    /// Take part in chains: serve the peer port here (`--peer-listen`).
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The address peers dial (`--peer-advertise`); default: the bound address.
    pub peer_advertise: Option<String>,
    /// With mutual TLS to the coordinator, the name every worker's certificate carries
    /// (`--peer-tls-name`): lanes between chain members are mutual TLS too.
    pub peer_tls_name: String,
}

/// TLS to the coordinator (an https:// URL): the CA that signed its certificate, optionally a
/// client certificate and key for mutual TLS, and the name to verify if not the URL's host.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// PEM CA that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// PEM certificate and key of this worker, for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name to verify in the coordinator's certificate, if not the URL's host.
    pub domain: Option<String>,
}

impl ClientTls {
    fn config(&self) -> Result<tonic::transport::ClientTlsConfig, Status> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| Status::invalid_argument(format!("{}: {e}", p.display())));
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        Ok(c)
    }
}

/// Serves `grpc.health.v1.Health` on `addr`, reporting SERVING.
async fn serve_health(addr: std::net::SocketAddr) -> Result<(), ClusterError> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| ClusterError::Io { what: format!("--health-listen {addr}"), cause })?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(())
}

/// How long joining (dial, Hello, Welcome) may take before the attempt counts as failed.
const HANDSHAKE: Duration = Duration::from_secs(10);

enum End {
    Stopped(String),
}

/// Runs until the coordinator says stop (Ok) or cannot be reached for `retry_for` (Err).
/// Meant for `block_on` of a runtime with a thread of its own: shards are computed on the
/// calling thread, and the runtime's thread keeps the connection (and its pings) going.
pub async fn run(opts: WorkerOptions) -> Result<(), ClusterError> {
    crate::timeline::start("worker", &opts.name);
    dtrain_nn::set_blas_threads(1);
    if let Some(addr) = opts.health_listen {
        serve_health(addr).await?;
    }
    let mut port = match opts.peer_listen {
        Some(listen) => {
            let tls = match &opts.tls {
                Some(ClientTls { ca, identity: Some((cert, key)), .. }) => {
                    Some(PeerTls::read(cert, key, ca, opts.peer_tls_name.clone())?)
                }
                _ => None,
            };
            Some(PeerPort::bind(listen, opts.peer_advertise.clone(), opts.token.clone(), tls).await?)
        }
        None => None,
    };
    let mut last_ok = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&opts, port.as_mut(), &mut last_ok).await {
            Ok(End::Stopped(reason)) => {
                tracing::info!("stopping: {reason}");
                return Ok(());
            }
            Err(e) if matches!(e.code(), Code::Unauthenticated | Code::FailedPrecondition | Code::InvalidArgument) => {
                return Err(ClusterError::Rejected(e.message().to_string()));
            }
            Err(e) => {
                if last_ok.elapsed() > opts.retry_for {
                    return Err(ClusterError::Unreachable {
                        coordinator: opts.coordinator.clone(),
                        waited: opts.retry_for,
                        why: e.message().to_string(),
                    });
                }
                tracing::warn!("connection to {} lost or refused ({}); retrying", opts.coordinator, e.message());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn session(opts: &WorkerOptions, mut port: Option<&mut PeerPort>, last_ok: &mut Instant) -> Result<End, Status> {
    let mut endpoint = Endpoint::from_shared(opts.coordinator.clone())
        .map_err(|e| Status::invalid_argument(format!("--coordinator {}: {e}", opts.coordinator)))?;
    if let Some(tls) = &opts.tls {
        endpoint = endpoint.tls_config(tls.config()?).map_err(|e| Status::invalid_argument(format!("TLS: {e}")))?;
    }
    let endpoint = crate::run::tuned_endpoint(endpoint);
    let channel = tokio::time::timeout(HANDSHAKE, endpoint.connect())
        .await
        .map_err(|_| Status::unavailable(format!("no connection within {HANDSHAKE:?}")))?
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let headers: Vec<_> = opts.token.iter().map(|t| (crate::auth::HEADER, crate::auth::bearer(t))).collect();
    let peer_address = port.as_ref().map(|p| p.address.clone());
    let hello = Hello { protocol_version: PROTOCOL_VERSION, name: opts.name.clone(), peer_address };
    // A peer that accepts the connection but never answers must not hold the worker forever:
    // joining (up to the Welcome) has its own deadline, and a miss counts as a failed attempt.
    let late = |_| Status::unavailable(format!("no answer within {HANDSHAKE:?}"));
    let mut conn = tokio::time::timeout(HANDSHAKE, Connection::open(channel, crate::MESSAGE_LIMIT, &headers, hello))
        .await
        .map_err(late)??;
    let (job, offer) = match tokio::time::timeout(HANDSHAKE, conn.next()).await.map_err(late)?? {
        Some(ToWorker::Welcome(w)) => {
            let config: JobConfig =
                toml::from_str(&w.job_toml).map_err(|e| Status::invalid_argument(format!("job: {e}")))?;
            let job = Job::build(config, PathBuf::new()).map_err(|e| Status::invalid_argument(format!("job: {e}")))?;
            use_the_runs_kernel(job.fit.kernel)?;
            tracing::info!(
                "joined as worker {}: {} parameters, BLAS kernel {}",
                w.worker_id,
                job.model.num_params(),
                dtrain_nn::kernel::running()
            );
            (job, w.shared_memory)
        }
        _ => return Err(Status::internal("expected Welcome")),
    };
    *last_ok = Instant::now();
    let mut shared = None;
    if let Some(o) = offer {
        match attach(&o, job.model.num_params()) {
            Ok(files) => {
                conn.send(FromWorker::Attached).await?;
                tracing::info!("on the coordinator's host: parameters and gradients go through shared memory");
                shared = Some(files);
            }
            Err(e) => tracing::warn!("shared memory offered but not usable here ({e}); tensors go over the stream"),
        }
    }
    let mut compute = Compute::new(job);
    compute.shared = shared;
    // A chain step ends early when the coordinator sends something else; that comes next.
    let mut pending = None;
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match conn.next().await? {
                Some(m) => m,
                None => return Err(Status::unavailable("the coordinator closed the stream")),
            },
        };
        *last_ok = Instant::now();
        match msg {
            // Computed right here, on the thread that runs this session (the binary's main
            // thread): the connection is driven by the runtime's own thread meanwhile, so
            // keepalive pings are answered while a shard is computed.
            ToWorker::Work(mut w) => match (w.chain.take(), port.as_deref_mut()) {
                (Some(role), Some(port)) => {
                    if let Next::Then(m) = member_step(&mut conn, port, &mut compute, w, role).await? {
                        pending = Some(m);
                    }
                }
                (Some(_), None) => return Err(Status::invalid_argument("chain work for a worker without a peer port")),
                (None, _) => {
                    let step = w.step;
                    crate::timeline::mark("work in", step);
                    let results = compute.run(w)?;
                    crate::timeline::mark("shards computed", step);
                    for r in results {
                        conn.send(FromWorker::Result(r)).await?;
                    }
                }
            },
            ToWorker::Chunk(_) => {} // of a chain step this worker left
            ToWorker::Stop { reason } => {
                crate::timeline::flush();
                return Ok(End::Stopped(reason));
            }
            ToWorker::Welcome(_) => return Err(Status::internal("unexpected message")),
        }
    }
}

/// Computes with the run's BLAS kernel (its bits depend on it): if this process runs another,
/// it executes itself again with the run's and joins anew; a CPU that cannot run it is refused
/// with the missing feature named.
fn use_the_runs_kernel(kernel: Option<dtrain_nn::kernel::Kernel>) -> Result<(), Status> {
    let Some(k) = kernel.filter(|&k| dtrain_nn::kernel::pinned() != Some(k)) else { return Ok(()) };
    dtrain_nn::kernel::resolve(Some(k), &dtrain_nn::kernel::cpu_has).map_err(Status::failed_precondition)?;
    tracing::info!("the run computes with BLAS kernel {k}; restarting with it");
    dtrain_nn::kernel::pin(Some(k)); // returns only if the restart failed
    Err(Status::failed_precondition(format!("could not restart with the run's BLAS kernel {k}")))
}

/// Opens the offered shared memory: the parameters read-only, the gradient slots to write.
fn attach(o: &SharedMemoryOffer, n: usize) -> std::io::Result<Shared> {
    let params = SharedFile::open(std::path::Path::new(&o.params_path), o.params_nonce, n, 1, false)?;
    let slots = SharedFile::open(std::path::Path::new(&o.path), o.nonce, n, o.slots as usize, true)?;
    Ok(Shared { params, slots })
}

/// The coordinator's shared memory, for a worker on its host.
struct Shared {
    params: SharedFile,
    slots: SharedFile,
}

/// One worker's compute state, reused across steps: what a worker does with `Work`.
pub struct Compute {
    job: Job,
    buffers: ShardBuffers,
    pub(crate) params: Vec<f32>,
    /// The step whose parameters `params` holds, whole.
    pub(crate) params_step: Option<u64>,
    /// Computed into, then sent as is.
    grad: WireTensor,
    shared: Option<Shared>,
    /// A chain member's: its shards' gradients, the predecessor's chunk, and the chunk it sends.
    pub(crate) chain_grads: Vec<Vec<f32>>,
    /// A chain member's buffers, one per shard (its shards are computed side by side).
    chain_buffers: Vec<ShardBuffers>,
    pub(crate) prefix: Vec<f32>,
    pub(crate) sum: Vec<f32>,
}

impl Compute {
    /// For `job`, with tensors on the stream (shared memory is set once attached).
    pub fn new(job: Job) -> Compute {
        Compute {
            job,
            buffers: ShardBuffers::default(),
            params: vec![],
            params_step: None,
            grad: WireTensor::default(),
            shared: None,
            chain_grads: vec![],
            chain_buffers: vec![],
            prefix: vec![],
            sum: vec![],
        }
    }

    /// The model's number of parameters.
    pub fn num_params(&self) -> usize {
        self.job.model.num_params()
    }

    /// A chain member's shards at the parameters in `params`, each gradient into
    /// `chain_grads`, while `running_sum` sends the running sum: the shards are computed on a
    /// thread of their own, layer by layer (`ShardBuffers::gradients_streamed`: every
    /// forward pass, then each layer's backward for every shard), which hands `running_sum`
    /// each layer's final part of every shard's gradient as soon as it is done (the last
    /// layers' first), so the sum of those travels while the first layers' are computed.
    /// Returns each shard's (index, sums, compute time: the whole computation's share) and
    /// what `running_sum` returned.
    pub(crate) fn chained<R>(
        &mut self,
        step: u64,
        global_batch: u32,
        shards: Vec<WireShard>,
        running_sum: impl FnOnce(OwnGradients<'_>) -> R,
    ) -> Result<(Vec<Computed>, R), Status> {
        let n = self.num_params();
        let decoded = shards.into_iter().map(|s| decode(&self.job, s)).collect::<Result<Vec<_>, _>>()?;
        self.chain_grads.resize_with(decoded.len(), Vec::new);
        self.chain_buffers.resize_with(decoded.len(), ShardBuffers::default);
        let Compute { job, chain_buffers, params, chain_grads, prefix, sum, .. } = self;
        chain_grads.iter_mut().for_each(|g| g.resize(n, 0.0));
        let seed = job.seed;
        let modes: Vec<(&dtrain_data::Dataset, Mode)> = decoded
            .iter()
            .map(|(_, first, data)| (data, Mode::Train { seed, step, first_position: *first, global_batch }))
            .collect();
        // At most one part per layer, and one for what lies below them: never full.
        let (tx, rx) = tokio::sync::mpsc::channel(job.model.layers().len() + 1);
        let (job, params): (&Job, &[f32]) = (job, params);
        std::thread::scope(|scope| {
            let computing = scope.spawn(move || {
                let t0 = Instant::now();
                let grads: Vec<&mut [f32]> = chain_grads.iter_mut().map(|g| &mut g[..]).collect();
                // The receiver is gone only if the step ended meanwhile: then nobody waits.
                let mut ready = |from, parts| drop(tx.blocking_send((from, parts)));
                let stats = ShardBuffers::gradients_streamed(
                    &job.model,
                    &mut chain_buffers[..],
                    &modes,
                    params,
                    grads,
                    &mut ready,
                );
                timeline::mark("shards computed", step);
                (stats, t0.elapsed().as_micros() as u64)
            });
            let own = OwnGradients { parts: vec![], arrivals: rx, final_from: n, prefix, sum };
            let summed = running_sum(own);
            let (stats, micros) = computing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let each = micros / stats.len().max(1) as u64;
            let out = decoded.iter().zip(stats).map(|((index, ..), stats)| (*index, stats, each)).collect();
            Ok((out, summed))
        })
    }

    /// Each shard's gradient and sums at the parameters `w` carries (as the stream's `Work`);
    /// `Err` if the work is malformed.
    pub fn run(&mut self, w: Work) -> Result<Vec<ShardResult>, Status> {
        let model = &self.job.model;
        let n = model.num_params();
        let bad = |e: WireError| Status::invalid_argument(e.to_string());
        let (params, mut slots) = match (&mut self.shared, &w.params) {
            // Written only by the coordinator, which checked them (`Hub::share_params`). Copied
            // out first: once this worker is dropped (late), the next step's may be written there
            // while it still computes.
            (Some(Shared { params, slots }), Tensor::Shared) => {
                let shared = params.shared(0).ok_or_else(|| Status::internal("no parameter region"))?;
                self.params.resize(n, 0.0);
                shared.read_into(&mut self.params);
                self.params_step = Some(w.step);
                (&self.params[..], Some(slots))
            }
            (None, Tensor::Shared) => {
                return Err(Status::invalid_argument("parameters in shared memory this worker does not have"))
            }
            // A copy of a late shard for a member: the parameters it received on this step's chain.
            (shared, Tensor::Chained) if self.params_step == Some(w.step) => {
                (&self.params[..], shared.as_mut().map(|s| &mut s.slots))
            }
            (_, Tensor::Chained) => {
                return Err(Status::invalid_argument(format!(
                    "the parameters of step {} from a chain it had no part in",
                    w.step
                )))
            }
            (shared, Tensor::Inline(bytes)) => {
                self.params.resize(n, 0.0);
                self.params_step = None;
                read_f32s("params", bytes, &mut self.params).map_err(bad)?;
                self.params_step = Some(w.step);
                (&self.params[..], shared.as_mut().map(|s| &mut s.slots))
            }
        };
        let mut out = Vec::with_capacity(w.shards.len());
        for s in w.shards {
            let t0 = Instant::now();
            let (index, first, data) = decode(&self.job, s)?;
            let at = (w.step, w.global_batch, first);
            // In place in the shard's shared-memory slot if there is one, else into a message.
            let (claimed, gradient) = match slots.as_mut().and_then(|s| s.region_mut(index as usize)) {
                Some(g) => {
                    let stats = shard_gradient(&self.job, &mut self.buffers, params, at, &data, g, &mut |_, _| {});
                    (stats, Tensor::Shared)
                }
                None => {
                    let g = self.grad.fill(n);
                    let stats = shard_gradient(&self.job, &mut self.buffers, params, at, &data, g, &mut |_, _| {});
                    (stats, Tensor::Inline(self.grad.share()))
                }
            };
            let compute_micros = t0.elapsed().as_micros() as u64;
            out.push(ShardResult { step: w.step, index, gradient, claimed, compute_micros });
        }
        Ok(out)
    }
}

/// A shard as it arrived, checked against the model: (index, first position, its rows).
fn decode(job: &Job, s: WireShard) -> Result<(u32, u32, dtrain_data::Dataset), Status> {
    let model = &job.model;
    shard_from_wire(s, model.input_shape(), model.output_width()).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A shard a member computed: its index, its sums, and how long it took (µs).
pub(crate) type Computed = (u32, dtrain_nn::ShardStats, u64);

/// A shard's gradient into `grad` and its sums, at `params`, for (step, global batch, the
/// shard's first position): the dropout masks are keyed by them. `ready` gets each part of
/// `grad` as soon as it is final (`Sequential::gradient_streamed`).
fn shard_gradient<'g>(
    job: &Job,
    buffers: &mut ShardBuffers,
    params: &[f32],
    (step, global_batch, first_position): (u64, u32, u32),
    data: &dtrain_data::Dataset,
    grad: &'g mut [f32],
    ready: &mut dyn FnMut(usize, &'g [f32]),
) -> dtrain_nn::ShardStats {
    let idx: Vec<u32> = (0..data.len() as u32).collect();
    let mode = Mode::Train { seed: job.seed, step, first_position, global_batch };
    buffers.gradient_streamed(&job.model, data, params, &idx, None, mode, grad, ready)
}

/// A chain member's own shards' gradients as its running sum reads them: in parts, final from
/// the end down, each with every shard's values there in shard order, as the backward pass
/// finishes them on another thread. With the buffers of the sum's chunk.
pub(crate) struct OwnGradients<'g> {
    /// The parts so far: (index of the first value, each shard's values), from the tensor's
    /// end down, each joining the one before.
    parts: Vec<(usize, Vec<&'g [f32]>)>,
    arrivals: tokio::sync::mpsc::Receiver<(usize, Vec<&'g [f32]>)>,
    /// Everything from here on is final.
    final_from: usize,
    /// The predecessor's chunk of the running sum, as received.
    pub(crate) prefix: &'g mut Vec<f32>,
    /// The chunk sent on.
    pub(crate) sum: &'g mut Vec<f32>,
}

impl OwnGradients<'_> {
    /// `sum` := the running sum's `range`: the predecessor's chunk (in `prefix`) if
    /// `with_prefix`, plus the member's shards' gradients in shard order; once they are final
    /// there (waiting for them). `Err` if the computing ended first.
    pub(crate) async fn add(&mut self, range: Range<usize>, with_prefix: bool) -> Result<(), &'static str> {
        while self.final_from > range.start {
            let Some((from, parts)) = self.arrivals.recv().await else {
                return Err("the shards' computing ended early");
            };
            self.parts.push((from, parts));
            self.final_from = from;
        }
        self.sum.resize(range.len(), 0.0);
        // Piece by piece of the parts; an element-wise sum, so the pieces give the bits of the
        // whole.
        let mut at = range.start;
        while at < range.end {
            let len = |parts: &[&[f32]]| parts.first().map_or(0, |p| p.len());
            let Some((from, parts)) = self.parts.iter().find(|(from, p)| (*from..from + len(p)).contains(&at)) else {
                return Err("a part of the gradient is missing");
            };
            let end = (from + len(parts)).min(range.end);
            let (local, own) = (at - range.start..end - range.start, at - from..end - from);
            let prefix = with_prefix.then(|| Part::Own(&self.prefix[local.clone()]));
            let shards = parts.iter().map(|p| Part::Own(&p[own.clone()]));
            let summed: Vec<Part<'_>> = prefix.into_iter().chain(shards).collect();
            sum_into(&mut self.sum[local], &summed);
            at = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range of the running sum is summed as soon as the shards' gradients are final where it
    /// lies: the last layers' sum goes while the first layers' gradients are still to come, a
    /// range across two parts is summed piece by piece with the whole's bits, in shard order.
    #[tokio::test]
    async fn a_range_is_summed_as_soon_as_the_shards_gradients_are_final_there() {
        let g0: Vec<f32> = (0..10).map(|i| i as f32 * 0.1).collect();
        let g1: Vec<f32> = (0..10).map(|i| 1.0 / (i + 3) as f32).collect();
        let (mut prefix, mut sum) = (vec![], vec![]);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut own = OwnGradients { parts: vec![], arrivals: rx, final_from: 10, prefix: &mut prefix, sum: &mut sum };
        let expect = |range: Range<usize>, prefix: &[f32]| -> Vec<u32> {
            range.enumerate().map(|(j, i)| ((prefix[j] + g0[i]) + g1[i]).to_bits()).collect()
        };
        let wait = std::time::Duration::from_millis(50);

        tx.send((6, vec![&g0[6..], &g1[6..]])).await.unwrap();
        *own.prefix = vec![0.5; 3];
        tokio::time::timeout(wait, own.add(7..10, true)).await.expect("final there").unwrap();
        assert_eq!(own.sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expect(7..10, &[0.5; 3]));

        *own.prefix = vec![-0.25; 4];
        assert!(tokio::time::timeout(wait, own.add(3..7, true)).await.is_err(), "3..6 is not final yet");
        tx.send((0, vec![&g0[..6], &g1[..6]])).await.unwrap();
        tokio::time::timeout(wait, own.add(3..7, true)).await.expect("final now").unwrap();
        assert_eq!(own.sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expect(3..7, &[-0.25; 4]));

        drop(tx);
        let (prefix, sum) = (own.prefix, own.sum);
        let arrivals = tokio::sync::mpsc::channel(1).1;
        let mut fresh = OwnGradients { parts: vec![], arrivals, final_from: 10, prefix, sum };
        assert!(fresh.add(0..3, false).await.is_err(), "a computing that ended early is said");
    }
}
