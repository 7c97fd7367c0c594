//! A worker's part in a chain (see `topology`): its peer port, where the predecessor's relay
//! comes in, and a member's step. The parameters arrive in chunks and are passed on as they
//! arrive; the member computes its shards; then, chunk by chunk, it adds its shards' gradients
//! in shard order to the running sum from its predecessor and passes the result on (the last
//! member to the coordinator). Anything that goes wrong with a peer is reported to the
//! coordinator as a broken link, and the coordinator computes the step over the star instead.

use crate::digest::Digest;
use crate::worker::Compute;
use crate::{ClusterError, MESSAGE_LIMIT};
use dtrain_nn::simd::{sum_into, Part};
use dtrain_proto::{
    copy_f32s, f32_bytes, read_f32s, ChainRole, Chunk, ChunkStream, Connection, FromWorker, RelayHandler, RelayInbox,
    RelayLink, ShardResult, Tensor, ToWorker, Work,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// How long a relay may take to present its ticket, and to be expected.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// How long a member waits for the next chunk before it reports the link broken. The
/// coordinator usually notices first (a member left, or reported) and sends other work.
const CHAIN_WAIT: Duration = Duration::from_secs(30);

/// Relays open at once (a chain has one predecessor; a reconnect may overlap).
const RELAYS: usize = 2;

/// Chunks queued between the port and the member's step.
const QUEUE: usize = 8;

/// A worker's peer port: the address it advertises, the ticket it expects this step, and
/// the chunks relays deliver.
pub struct PeerPort {
    /// Where peers reach this worker.
    pub address: String,
    expect: watch::Sender<Option<u64>>,
    chunks: mpsc::Receiver<Chunk>,
    headers: Vec<(&'static str, String)>,
    /// The successor's channel, kept while the successor stays the same.
    successor: Option<(String, Channel)>,
    /// Fault injection for tests: from this step on, the running sum this member sends is
    /// wrong (see `FAULT_VARIABLE`).
    lie_from: Option<u64>,
    tls: Option<PeerTls>,
}

/// Mutual TLS between chain members: this worker's certificate and key (the ones it presents
/// to the coordinator), the CA that signed every worker's, and the name every worker's
/// certificate carries (peers are dialed by address, so the address cannot be the name).
#[derive(Clone, Debug)]
pub struct PeerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    name: String,
}

impl PeerTls {
    /// Reads the PEM files; an error names the file.
    pub fn read(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
        name: String,
    ) -> Result<PeerTls, ClusterError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|cause| ClusterError::Io { what: format!("{}: cannot read", p.display()), cause })
        };
        Ok(PeerTls { cert: read(cert)?, key: read(key)?, ca: read(ca)?, name })
    }

    fn server(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    fn client(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(self.name.clone())
    }
}

/// `DTRAIN_FAULT_INJECTION=chain-sum-from-step:N` makes a worker add 1 to the first value of
/// every running sum it sends from step N on, and report the digests of what it sent: a liar
/// for the tests of chain audits. A token holder can run any code it likes; this only saves
/// the tests from writing a second chain member.
pub const FAULT_VARIABLE: &str = "DTRAIN_FAULT_INJECTION";

fn injected_lie() -> Option<u64> {
    let v = std::env::var(FAULT_VARIABLE).ok()?;
    let step = v.strip_prefix("chain-sum-from-step:")?.parse().ok()?;
    tracing::warn!("{FAULT_VARIABLE}: this worker sends wrong running sums from step {step} on");
    Some(step)
}

impl PeerPort {
    /// Serves the peer port on `listen`; peers are told `advertise`, else the bound address
    /// (which must then be a specific one). With `tls`, relays both ways are mutual TLS.
    pub async fn bind(
        listen: SocketAddr,
        advertise: Option<String>,
        token: Option<String>,
        tls: Option<PeerTls>,
    ) -> Result<PeerPort, ClusterError> {
        let what = || format!("--peer-listen {listen}");
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|cause| ClusterError::Io { what: what(), cause })?;
        let bound = listener.local_addr().map_err(|cause| ClusterError::Io { what: what(), cause })?;
        let address = match advertise {
            Some(a) => a,
            None if bound.ip().is_unspecified() => {
                return Err(ClusterError::Config(format!(
                    "--peer-listen {listen} listens on every address: say which one peers should dial with \
                     --peer-advertise HOST:PORT"
                )))
            }
            None => bound.to_string(),
        };
        if address.len() > dtrain_proto::MAX_ADDRESS || address.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ClusterError::Config(format!("--peer-advertise {address:?}: not a peer address")));
        }
        let (expect, expected) = watch::channel(None);
        let (tx, chunks) = mpsc::channel(QUEUE);
        let door = Door { token: token.clone(), expect: expected, chunks: tx, open: Arc::new(Semaphore::new(RELAYS)) };
        // tonic's serve_with_incoming ignores the builder's nodelay: set on every socket (else
        // the flow-control updates wait for Nagle, and a relay stalls for delayed ACKs).
        let incoming =
            tokio_stream::StreamExt::filter_map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
                let s = s.ok()?;
                let _ = s.set_nodelay(true);
                Some(Ok::<_, std::io::Error>(s))
            });
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = &tls {
            builder = builder
                .tls_config(t.server())
                .map_err(|e| ClusterError::Config(format!("--peer-listen with TLS: {e}")))?;
        }
        let server = crate::run::tuned_server(builder).add_service(dtrain_proto::peer_service(door, MESSAGE_LIMIT));
        tokio::spawn(server.serve_with_incoming(incoming));
        tracing::info!("peer port on {bound}, advertised as {address}");
        let headers = token.iter().map(|t| (crate::auth::HEADER, crate::auth::bearer(t))).collect();
        Ok(PeerPort { address, expect, chunks, headers, successor: None, lie_from: injected_lie(), tls })
    }

    /// A relay to the successor at `address`.
    fn link(&mut self, address: &str) -> Result<RelayLink, Status> {
        if self.successor.as_ref().is_none_or(|(a, _)| a != address) {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                .map_err(|e| Status::invalid_argument(format!("successor {address}: {e}")))?;
            if let Some(t) = &self.tls {
                endpoint =
                    endpoint.tls_config(t.client()).map_err(|e| Status::invalid_argument(format!("TLS: {e}")))?;
            }
            self.successor = Some((address.to_string(), crate::run::tuned_endpoint(endpoint).connect_lazy()));
        }
        let channel = self.successor.as_ref().map(|(_, c)| c.clone()).expect("just set");
        RelayLink::open(channel, MESSAGE_LIMIT, &self.headers)
    }
}

/// The peer service: a relay is taken if it carries the job token and, within `HANDSHAKE`,
/// the ticket this worker's current chain step expects; its chunks go to the member's step.
struct Door {
    token: Option<String>,
    expect: watch::Receiver<Option<u64>>,
    chunks: mpsc::Sender<Chunk>,
    open: Arc<Semaphore>,
}

#[tonic::async_trait]
impl RelayHandler for Door {
    async fn relay(&self, metadata: MetadataMap, mut inbound: RelayInbox) -> Result<(), Status> {
        crate::auth::check(&metadata, self.token.as_deref())?;
        let _open = Arc::clone(&self.open)
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted(format!("{RELAYS} relays are open already")))?;
        let late = |_| Status::deadline_exceeded(format!("nothing within {HANDSHAKE:?}"));
        let Some((ticket, first)) = tokio::time::timeout(HANDSHAKE, inbound.next()).await.map_err(late)?? else {
            return Ok(());
        };
        // The Work that names this ticket may still be on its way to this worker.
        let mut expect = self.expect.clone();
        let known = matches!(tokio::time::timeout(HANDSHAKE, expect.wait_for(|e| *e == Some(ticket))).await, Ok(Ok(_)));
        if !known {
            return Err(Status::permission_denied("a relay with a ticket this worker does not expect"));
        }
        let mut next = Some(first);
        while let Some(chunk) = next {
            let wait = |_| Status::deadline_exceeded(format!("the member took no chunk within {CHAIN_WAIT:?}"));
            tokio::time::timeout(CHAIN_WAIT, self.chunks.send(chunk))
                .await
                .map_err(wait)?
                .map_err(|_| Status::unavailable("the worker is gone"))?;
            let wait = |_| Status::deadline_exceeded(format!("no chunk within {CHAIN_WAIT:?}"));
            next = match tokio::time::timeout(CHAIN_WAIT, inbound.next()).await.map_err(wait)?? {
                Some((t, c)) if t == ticket => Some(c),
                Some(_) => return Err(Status::permission_denied("the ticket changed within a relay")),
                None => None,
            };
        }
        Ok(())
    }
}

/// How a member's step ended.
pub enum Next {
    /// Done, or abandoned after reporting a broken link.
    Done,
    /// The coordinator sent something else meanwhile (the step over the star, the next one,
    /// or Stop): the step is abandoned and this is handled next.
    Then(ToWorker),
}

/// What a member waited for.
enum Got {
    Chunk(Chunk),
    Interrupted(ToWorker),
    Broken(String),
}

/// One member's step of a chain: see the module's comment.
pub async fn member_step(
    conn: &mut Connection,
    port: &mut PeerPort,
    compute: &mut Compute,
    work: Work,
    role: ChainRole,
) -> Result<Next, Status> {
    let step = work.step;
    let n = compute.num_params();
    let chunk = role.chunk_values as usize;
    port.expect.send_replace(role.ticket_in);
    let successor = role.successor.clone().unwrap_or_default();
    let mut link = match role.successor.as_deref().map(|a| port.link(a)).transpose() {
        Ok(l) => l,
        Err(e) => return broken(conn, step, &successor, e.message()).await,
    };
    let from_coordinator = role.ticket_in.is_none();

    // The parameters, passed on as they arrive.
    let mut params = std::mem::take(&mut compute.params);
    params.resize(n, 0.0);
    let mut next = 0;
    while next < n {
        let c = match receive(conn, port, from_coordinator, step, ChunkStream::Params).await? {
            Got::Chunk(c) => c,
            Got::Interrupted(m) => return Ok(Next::Then(m)),
            Got::Broken(why) => return broken(conn, step, "", &why).await,
        };
        let range = match c.expect(next, chunk, n) {
            Ok(r) => r,
            Err(e) => return broken(conn, step, "", &format!("parameters: {e}")).await,
        };
        if let Err(e) = read_f32s("parameters", &c.values, &mut params[range.clone()]) {
            return broken(conn, step, "", &e.to_string()).await;
        }
        if let Some(l) = &mut link {
            if let Err(e) = l.send(role.ticket_out, c).await {
                return broken(conn, step, &successor, e.message()).await;
            }
        }
        next = range.end;
    }
    compute.params = params;

    // The shards: their sums to the coordinator, their gradients into the running sum.
    let computed = compute.chained(step, work.global_batch, work.shards)?;
    for (index, claimed, compute_micros) in computed {
        let r = ShardResult { step, index, gradient: Tensor::Chained, claimed, compute_micros };
        conn.send(FromWorker::Result(r)).await?;
    }
    // Key 0: the coordinator audits no step, so no digests (they cost a chain member ~5% of
    // a step even made eight values at a time).
    let digests = role.digest_key != 0;
    let (mut received, mut sent) = (Digest::new(role.digest_key), Digest::new(role.digest_key));
    let lie = port.lie_from.is_some_and(|from| step >= from);
    let mut next = 0;
    while next < n {
        let range = next..next.saturating_add(chunk).min(n);
        if !from_coordinator {
            let c = match receive(conn, port, false, step, ChunkStream::Sum).await? {
                Got::Chunk(c) => c,
                Got::Interrupted(m) => return Ok(Next::Then(m)),
                Got::Broken(why) => return broken(conn, step, "", &why).await,
            };
            // Not checked for finite values: a diverging model's sums are not; the
            // coordinator looks at the whole sum.
            let prefix = &mut compute.prefix;
            prefix.resize(range.len(), 0.0);
            if let Err(e) = c.expect(next, chunk, n).and_then(|_| copy_f32s("running sum", &c.values, prefix)) {
                return broken(conn, step, "", &e.to_string()).await;
            }
            if digests {
                received.update(prefix);
            }
        }
        let values = compute.add_own(range.clone(), !from_coordinator, lie && next == 0);
        if digests {
            sent.update(&compute.sum);
        }
        let c = Chunk { step, stream: ChunkStream::Sum, offset: next as u64, values };
        match &mut link {
            Some(l) => {
                if let Err(e) = l.send(role.ticket_out, c).await {
                    return broken(conn, step, &successor, e.message()).await;
                }
            }
            None => conn.send(FromWorker::Chunk(c)).await?,
        }
        next = range.end;
    }
    let received = if from_coordinator || !digests { 0 } else { received.finish() };
    let sent = if digests { sent.finish() } else { 0 };
    conn.send(FromWorker::Digest { step, received, sent }).await?;
    // Queued is not delivered: the step is done once the successor took every chunk.
    if let Some(l) = link {
        let late = |_| Status::deadline_exceeded(format!("the successor took no chunk within {CHAIN_WAIT:?}"));
        if let Err(e) = tokio::time::timeout(CHAIN_WAIT, l.finish()).await.map_err(late).and_then(|r| r) {
            return broken(conn, step, &successor, e.message()).await;
        }
    }
    Ok(Next::Done)
}

impl Compute {
    /// The running sum's `range` (into `sum`): the predecessor's chunk (in `prefix`) if
    /// `with_prefix`, plus this member's shards' gradients in shard order, as it travels (its
    /// first value off by 1 if `lie`: fault injection).
    fn add_own(&mut self, range: std::ops::Range<usize>, with_prefix: bool, lie: bool) -> bytes::Bytes {
        let prefix = with_prefix.then_some(Part::Own(&self.prefix[..]));
        let own = self.chain_grads.iter().map(|g| Part::Own(&g[range.clone()]));
        let parts: Vec<Part<'_>> = prefix.into_iter().chain(own).collect();
        self.sum.resize(range.len(), 0.0);
        sum_into(&mut self.sum, &parts);
        if lie {
            self.sum[0] += 1.0;
        }
        f32_bytes(&self.sum)
    }
}

/// The next chunk of `stream` for `step`: from the coordinator (the first member's
/// parameters) or from the predecessor's relay. Chunks of an abandoned step are skipped.
async fn receive(
    conn: &mut Connection,
    port: &mut PeerPort,
    from_coordinator: bool,
    step: u64,
    stream: ChunkStream,
) -> Result<Got, Status> {
    let quiet = tokio::time::sleep(CHAIN_WAIT);
    tokio::pin!(quiet);
    loop {
        let chunk = tokio::select! {
            m = conn.next() => match m? {
                Some(ToWorker::Chunk(c)) if from_coordinator => c,
                Some(ToWorker::Chunk(_)) => continue, // of a step this worker left
                Some(other) => return Ok(Got::Interrupted(other)),
                None => return Err(Status::unavailable("the coordinator closed the stream")),
            },
            c = port.chunks.recv(), if !from_coordinator => match c {
                Some(c) => c,
                None => return Ok(Got::Broken("the peer port is closed".into())),
            },
            () = &mut quiet => return Ok(Got::Broken(format!("no chunk within {CHAIN_WAIT:?}"))),
        };
        if chunk.step == step && chunk.stream == stream {
            return Ok(Got::Chunk(chunk));
        }
    }
}

/// Reports a broken link (the peer at `peer`, or upstream if empty) and abandons the step.
async fn broken(conn: &mut Connection, step: u64, peer: &str, why: &str) -> Result<Next, Status> {
    let upstream = if peer.is_empty() { "upstream" } else { peer };
    tracing::warn!("step {step}: the chain broke at {upstream}: {why}; the coordinator computes it over the star");
    let reason = why.to_string();
    conn.send(FromWorker::Broken { step, peer: peer.to_string(), reason }).await?;
    Ok(Next::Done)
}
