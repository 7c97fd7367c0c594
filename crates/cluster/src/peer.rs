//! A worker's part in a chain (see `topology`): its peer port, where the predecessor's lane
//! comes in, and a member's step. The parameters arrive in chunks and are passed on as they
//! arrive; the member computes its shards; then, chunk by chunk from the tensor's end, it adds
//! its shards' gradients in shard order to the running sum from its predecessor and passes the
//! result on (the last member to the coordinator), its last shard's gradient as the backward
//! pass finishes each layer. Anything that goes wrong with a peer is reported to the
//! coordinator as a broken link, and the coordinator computes the step over the star instead.

use crate::digest::Digest;
use crate::lane::{Arrivals, LaneStream, LaneTls};
use crate::timeline;
use crate::worker::{Compute, OwnGradients};
use crate::ClusterError;
use dtrain_proto::lane::{write_frame, Expected, FrameHeader, FrameReader, LaneError, LaneKind, Place};
use dtrain_proto::{
    check_finite, copy_f32s, f32_bytes, read_f32s, ChainRole, Chunk, ChunkStream, Connection, FromWorker, ShardResult,
    Tensor, ToWorker, Work,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tonic::Status;

/// How long a member waits for the next chunk before it reports the link broken. The
/// coordinator usually notices first (a member left, or reported) and sends other work.
const CHAIN_WAIT: Duration = Duration::from_secs(30);

/// Connections to the peer port still in their first bytes or their lane hello; more are
/// closed at once.
const HANDSHAKES: usize = 64;

/// How long a connection to the peer port may take to send its first byte (peers send theirs
/// as soon as they are connected), so that idle connections hold a place only briefly.
const FIRST_BYTE: Duration = Duration::from_secs(2);

/// A worker's peer port: the address it advertises, and the lanes that came in and went out.
pub struct PeerPort {
    /// Where peers reach this worker.
    pub address: String,
    /// Fault injection for tests: from this step on, the running sum this member sends is
    /// wrong (see `FAULT_VARIABLE`).
    lie_from: Option<u64>,
    /// Mutual TLS for lanes between members (with TLS to the coordinator).
    tls: Option<LaneTls>,
    /// The job token, which lanes present.
    token: Option<String>,
    /// Lanes admitted by the port, until a step takes them.
    arrivals: Arc<Arrivals>,
    /// The lane chunks come in on (with its reader's progress), kept from step to step.
    inlet: Option<(LaneStream, FrameReader)>,
    /// The lane to the successor at an address, kept while the successor stays the same.
    outlet: Option<(String, LaneStream)>,
    /// The lane the coordinator opened to take this member's sum.
    collector: Option<LaneStream>,
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

    fn lanes(&self) -> Result<LaneTls, ClusterError> {
        LaneTls::new(&self.cert, &self.key, &self.ca, &self.name)
            .map_err(|e| ClusterError::Config(format!("--peer-listen with TLS: {e}")))
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
    /// (which must then be a specific one). With `tls`, lanes both ways are mutual TLS.
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
        let tls = tls.map(|t| t.lanes()).transpose()?;
        let arrivals = Arc::new(Arrivals::default());
        tokio::spawn(admit_lanes(listener, token.clone(), tls.clone(), Arc::clone(&arrivals)));
        tracing::info!("peer port on {bound}, advertised as {address}");
        Ok(PeerPort {
            address,
            lie_from: injected_lie(),
            tls,
            token,
            arrivals,
            inlet: None,
            outlet: None,
            collector: None,
        })
    }

    /// Where this step's chunks go: the successor at `address`, on a lane (kept from the
    /// last step if it went there too).
    async fn outlet_to_successor(&mut self, address: &str) -> Result<Outlet, String> {
        match self.outlet.take() {
            Some((a, lane)) if a == address && crate::lane::still_open(&lane) => Ok(Outlet::Successor(a, lane)),
            _ => {
                let lane = crate::lane::dial(address, LaneKind::Feed, self.token.as_deref(), self.tls.as_ref()).await?;
                if self.tls.is_some() {
                    tracing::info!("a mutual-TLS lane to the successor at {address}");
                }
                Ok(Outlet::Successor(address.to_string(), lane))
            }
        }
    }

    /// The coordinator's lane for the sum: the newest it opened (waited for while the port
    /// still admits it).
    async fn outlet_to_coordinator(&mut self) -> Option<Outlet> {
        let newest = self.arrivals.take_admitted(LaneKind::Collect).await;
        newest.or_else(|| self.collector.take()).map(Outlet::Collector)
    }

    /// Keeps a lane that served this step for the next.
    fn keep(&mut self, outlet: Outlet) {
        match outlet {
            Outlet::Successor(a, lane) => self.outlet = Some((a, lane)),
            Outlet::Collector(lane) => self.collector = Some(lane),
            Outlet::Stream => {}
        }
    }
}

/// Admits the lanes that dial the peer port (`crate::lane::admit`), leaving them in `arrivals`;
/// anything else is closed. At most `HANDSHAKES` connections are in their first bytes at once.
async fn admit_lanes(
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<LaneTls>,
    arrivals: Arc<Arrivals>,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    loop {
        let s = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning.
                tracing::warn!("peer port: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else { continue };
        let (token, tls, arrivals) = (token.clone(), tls.clone(), Arc::clone(&arrivals));
        tokio::spawn(async move {
            let mut first = [0u8];
            let peeked = tokio::time::timeout(FIRST_BYTE, s.peek(&mut first)).await;
            if matches!(peeked, Ok(Ok(1))) && first[0] == dtrain_proto::lane::PREFACE[0] {
                if let Err(why) = crate::lane::admit(s, token.as_deref(), tls.as_ref(), &arrivals).await {
                    tracing::warn!("peer port: a lane refused: {why}");
                }
            }
            drop(permit);
        });
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
    /// A chunk, in place: the tensor's range it covers, and its bytes as they came if they
    /// came in a message (to pass on without encoding them again).
    Landed(std::ops::Range<usize>, Option<bytes::Bytes>),
    Interrupted(ToWorker),
    Broken(String),
}

/// Where a member's chunks come from this step.
#[derive(Clone, Copy)]
enum Inlet {
    /// The coordinator's stream (the first member's parameters, without a lane).
    Stream,
    /// A lane (the coordinator's or the predecessor's), in frames with this ticket.
    Lane(u64),
}

/// Where a member's chunks go this step.
enum Outlet {
    /// The coordinator's stream (the last member's sum, without a lane).
    Stream,
    /// A lane to the successor at an address.
    Successor(String, LaneStream),
    /// The lane the coordinator opened for the sum.
    Collector(LaneStream),
}

/// One chunk on its way out: which step's which tensor, where, and its values (with their
/// message bytes if they came in a message).
struct Outgoing<'v> {
    step: u64,
    stream: ChunkStream,
    ticket: u64,
    offset: usize,
    values: &'v [f32],
    bytes: Option<bytes::Bytes>,
}

impl Outlet {
    /// Sends a chunk: `None` once sent, else `Got::Broken` (why it could not be) or
    /// `Got::Interrupted` (a message from the coordinator came first: it gave up on the step, and
    /// a successor that left the step would never read the rest; the lane may hold half a frame
    /// and must be dropped).
    async fn send(&mut self, conn: &mut Connection, c: Outgoing<'_>) -> Result<Option<Got>, Status> {
        let chunk = |c: Outgoing<'_>| Chunk {
            step: c.step,
            stream: c.stream,
            offset: c.offset as u64,
            values: c.bytes.unwrap_or_else(|| f32_bytes(c.values)),
        };
        let lane = match self {
            Outlet::Stream => {
                let sent = conn.send(FromWorker::Chunk(chunk(c))).await;
                return Ok(sent.err().map(|e| Got::Broken(e.message().to_string())));
            }
            Outlet::Successor(_, lane) | Outlet::Collector(lane) => lane,
        };
        let header = FrameHeader {
            ticket: c.ticket,
            step: c.step,
            stream: c.stream,
            offset: c.offset as u64,
            values: c.values.len() as u32,
        };
        let write = tokio::time::timeout(CHAIN_WAIT, write_frame(lane, &header, c.values));
        tokio::pin!(write);
        loop {
            tokio::select! {
                written = &mut write => return Ok(match written {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(Got::Broken(e.to_string())),
                    Err(_) => Some(Got::Broken(format!("the lane took no chunk within {CHAIN_WAIT:?}"))),
                }),
                m = conn.next() => match m? {
                    Some(ToWorker::Chunk(_)) => {} // of a step this worker left
                    Some(other) => return Ok(Some(Got::Interrupted(other))),
                    None => return Err(Status::unavailable("the coordinator closed the stream")),
                },
            }
        }
    }
}

/// Where a member's chunks come from and go to this step.
struct Links {
    inlet: Inlet,
    outlet: Outlet,
    /// The ticket its frames carry.
    ticket_out: u64,
    /// Whether it passes the parameters on (it has a successor).
    forwards: bool,
    /// Whom a failed send is blamed on: the successor's address, or the coordinator.
    downstream: String,
}

impl Links {
    /// The outlet, taken to be kept or closed as the step ends early.
    fn take_outlet(&mut self) -> Outlet {
        std::mem::replace(&mut self.outlet, Outlet::Stream)
    }

    /// Leaves the step after a chunk that did not go out (`Outlet::send`): the outlet is
    /// dropped, closing its lane (its receiver waits for the next), and a failure is blamed
    /// downstream.
    async fn unsent(&mut self, conn: &mut Connection, step: u64, got: Got) -> Result<Next, Status> {
        drop(self.take_outlet());
        match got {
            Got::Interrupted(m) => Ok(Next::Then(m)),
            Got::Broken(why) => broken(conn, step, &self.downstream, &why).await,
            Got::Landed(..) => Ok(Next::Done),
        }
    }
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
    timeline::mark("chain work in", step);
    let (n, chunk) = (compute.num_params(), role.chunk_values as usize);
    let successor = role.successor.clone().unwrap_or_default();
    let inlet = match (role.ticket_in, role.params_lane) {
        (None, Some(ticket)) => Inlet::Lane(ticket),
        (None, None) => Inlet::Stream,
        (Some(ticket), _) => Inlet::Lane(ticket),
    };
    let outlet = match (&role.successor, role.sum_lane) {
        (Some(address), _) => match port.outlet_to_successor(address).await {
            Ok(o) => o,
            Err(why) => return broken(conn, step, &successor, &why).await,
        },
        (None, true) => match port.outlet_to_coordinator().await {
            Some(o) => o,
            None => {
                // Closed here after a failed write: the coordinator finds it closed too, and
                // computes the step over the star.
                tracing::warn!("step {step}: the coordinator's lane for the sum is closed; leaving the step");
                return Ok(Next::Done);
            }
        },
        (None, false) => Outlet::Stream,
    };
    let downstream = if role.successor.is_some() { successor.clone() } else { "the coordinator".into() };
    let mut links =
        Links { inlet, outlet, ticket_out: role.ticket_out, forwards: role.successor.is_some(), downstream };
    if let Some((_, reader)) = port.inlet.as_mut() {
        reader.new_step();
    }
    let want = Expected { ticket: 0, step, stream: ChunkStream::Params, chunk, len: n };
    if let Some(ended) = parameters(conn, port, compute, &mut links, want).await? {
        return Ok(ended);
    }

    // The shards' gradients into the running sum, the last layers' on their way while the
    // first layers' are computed; then their sums to the coordinator. The sum is driven
    // right here (`block_on`, off the runtime: this is the session's thread, see `worker`)
    // while a thread computes.
    let lie = port.lie_from.is_some_and(|from| step >= from);
    let want = Expected { stream: ChunkStream::Sum, ..want };
    let runtime = tokio::runtime::Handle::current();
    if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        // `block_in_place` would panic: the worker binary's runtime is multi-threaded, and so
        // must be any other that runs a member.
        return Err(Status::internal("a chain member needs a multi-threaded tokio runtime"));
    }
    let (computed, summed) = tokio::task::block_in_place(|| {
        compute.chained(step, work.global_batch, work.shards, |own| {
            runtime.block_on(running_sum(&mut *conn, &mut *port, own, &mut links, want, &role, lie))
        })
    })?;
    let (received, sent) = match summed? {
        Ok(digests) => digests,
        Err(ended) => return Ok(ended),
    };
    for (index, claimed, compute_micros) in computed {
        let r = ShardResult { step, index, gradient: Tensor::Chained, claimed, compute_micros };
        conn.send(FromWorker::Result(r)).await?;
    }
    timeline::mark("sum out", step);
    conn.send(FromWorker::Digest { step, received, sent }).await?;
    // A lane's bytes are in the kernel's hands; if the successor fails to take them, it (or
    // the coordinator, which waits for the sum) says so.
    port.keep(links.outlet);
    Ok(Next::Done)
}

/// The step's parameters into `compute.params`, each chunk passed on as it arrives. `Some`
/// if the step ended meanwhile (the coordinator sent something else, or a link broke).
async fn parameters(
    conn: &mut Connection,
    port: &mut PeerPort,
    compute: &mut Compute,
    links: &mut Links,
    want: Expected,
) -> Result<Option<Next>, Status> {
    let step = want.step;
    let mut params = std::mem::take(&mut compute.params);
    compute.params_step = None;
    params.resize(want.len, 0.0);
    let mut next = 0;
    while next < want.len {
        let got = receive(conn, port, links.inlet, want, &mut params, 0, next).await?;
        let (range, bytes) = match got {
            Got::Landed(range, bytes) => (range, bytes),
            Got::Interrupted(_) | Got::Broken(_) => {
                return abandon(conn, port, step, links.take_outlet(), got).await.map(Some)
            }
        };
        if range.start == 0 {
            timeline::mark("first parameters in", step);
        }
        if links.forwards {
            let values = &params[range.clone()];
            let c =
                Outgoing { step, stream: ChunkStream::Params, ticket: links.ticket_out, offset: next, values, bytes };
            if let Some(unsent) = links.outlet.send(conn, c).await? {
                return links.unsent(conn, step, unsent).await.map(Some);
            }
        }
        next = range.end;
    }
    compute.params = params;
    compute.params_step = Some(step);
    timeline::mark("parameters in", step);
    Ok(None)
}

/// The running sum, chunk by chunk from the tensor's end (`ChunkStream::ranges`): the
/// predecessor's (unless the member is the first) plus its shards' gradients as they become
/// final, passed on. `Ok`: the digests of what came in and went out, in that order (0 under
/// digest key 0: no step is audited, and digests cost a member ~5% of a step); `Err` if the
/// step ended meanwhile. With `lie` (fault injection) the first value sent is off by 1.
async fn running_sum(
    conn: &mut Connection,
    port: &mut PeerPort,
    mut own: OwnGradients<'_>,
    links: &mut Links,
    want: Expected,
    role: &ChainRole,
    lie: bool,
) -> Result<Result<(u64, u64), Next>, Status> {
    let (step, n) = (want.step, want.len);
    let (first, digest_key) = (role.ticket_in.is_none(), role.digest_key);
    let digests = digest_key != 0;
    let (mut received, mut sent) = (Digest::new(digest_key), Digest::new(digest_key));
    for range in ChunkStream::Sum.ranges(n, want.chunk) {
        let (at, opening) = (range.start, range.end == n);
        if !first {
            // Not checked for finite values: a diverging model's sums are not; the
            // coordinator looks at the whole sum.
            own.prefix.resize(range.len(), 0.0);
            match receive(conn, port, links.inlet, want, &mut own.prefix[..], at, at).await? {
                Got::Landed(..) => {}
                got => return abandon(conn, port, step, links.take_outlet(), got).await.map(Err),
            }
            if opening {
                timeline::mark("first running sum in", step);
            }
            if digests {
                received.update(&own.prefix[..]);
            }
        }
        if let Err(why) = own.add(range.clone(), !first).await {
            return Err(Status::internal(why));
        }
        if lie && opening {
            own.sum[0] += 1.0;
        }
        if digests {
            sent.update(&own.sum[..]);
        }
        let values = &own.sum[..];
        let c = Outgoing { step, stream: ChunkStream::Sum, ticket: links.ticket_out, offset: at, values, bytes: None };
        if let Some(unsent) = links.outlet.send(conn, c).await? {
            return links.unsent(conn, step, unsent).await.map(Err);
        }
        if opening {
            timeline::mark("first sum out", step);
        }
    }
    let received = if first || !digests { 0 } else { received.finish() };
    Ok(Ok((received, if digests { sent.finish() } else { 0 })))
}

/// The next chunk of `want.stream` for `want.step`, written into `tensor` (whose first value
/// is the tensor's value `base`), starting at value `next`: from the coordinator's stream or a
/// lane (its frames with the inlet's ticket). Chunks of an abandoned
/// step on the stream are skipped; parameters are checked to be finite.
async fn receive(
    conn: &mut Connection,
    port: &mut PeerPort,
    inlet: Inlet,
    want: Expected,
    tensor: &mut [f32],
    base: usize,
    next: usize,
) -> Result<Got, Status> {
    let what = match want.stream {
        ChunkStream::Params => "parameters",
        ChunkStream::Sum => "running sum",
    };
    let got = match inlet {
        Inlet::Lane(ticket) => return from_lane(conn, port, Expected { ticket, ..want }, tensor, base, next).await,
        Inlet::Stream => from_coordinator(conn, want.step, want.stream).await?,
    };
    let c = match got {
        Ok(c) => c,
        Err(other) => return Ok(other),
    };
    let landed = c.expect(next, want.chunk, want.len).and_then(|range| {
        let into = &mut tensor[range.start - base..range.end - base];
        match want.stream {
            ChunkStream::Params => read_f32s(what, &c.values, into)?,
            ChunkStream::Sum => copy_f32s(what, &c.values, into)?,
        }
        Ok(range)
    });
    Ok(match landed {
        Ok(range) => Got::Landed(range, Some(c.values)),
        Err(e) => Got::Broken(format!("{what}: {e}")),
    })
}

/// The next chunk of `stream` for `step` as a message from the coordinator (the first
/// member's parameters, without a lane); else what came instead.
async fn from_coordinator(conn: &mut Connection, step: u64, stream: ChunkStream) -> Result<Result<Chunk, Got>, Status> {
    let quiet = tokio::time::sleep(CHAIN_WAIT);
    tokio::pin!(quiet);
    loop {
        let chunk = tokio::select! {
            m = conn.next() => match m? {
                Some(ToWorker::Chunk(c)) => c,
                Some(other) => return Ok(Err(Got::Interrupted(other))),
                None => return Err(Status::unavailable("the coordinator closed the stream")),
            },
            () = &mut quiet => return Ok(Err(Got::Broken(format!("no chunk within {CHAIN_WAIT:?}")))),
        };
        if chunk.step == step && chunk.stream == stream {
            return Ok(Ok(chunk));
        }
    }
}

/// What woke a member waiting on its lane.
enum Woke {
    Message(Result<Option<ToWorker>, Status>),
    Frame(Result<FrameHeader, dtrain_proto::lane::LaneError>),
    Arrived,
    Quiet,
}

/// The next frame `want` describes, straight from the lane into `tensor` (see `receive`).
/// A lane admitted meanwhile replaces the one held (the sender dialed anew); a message from the
/// coordinator interrupts the step; any fault closes the lane.
async fn from_lane(
    conn: &mut Connection,
    port: &mut PeerPort,
    want: Expected,
    tensor: &mut [f32],
    base: usize,
    next: usize,
) -> Result<Got, Status> {
    let quiet = tokio::time::sleep(CHAIN_WAIT);
    tokio::pin!(quiet);
    loop {
        if let Some(lane) = port.arrivals.take(LaneKind::Feed) {
            port.inlet = Some((lane, FrameReader::default()));
        }
        let woke = {
            let (inlet, arrivals) = (&mut port.inlet, &port.arrivals);
            let frame = async {
                match inlet.as_mut() {
                    Some((lane, reader)) => {
                        let place = |h: &FrameHeader| {
                            Ok(match h.place(&want, next)? {
                                Place::Into(r) => Place::Into(r.start - base..r.end - base),
                                Place::Skip => Place::Skip,
                            })
                        };
                        reader.next(lane, tensor, place).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = conn.next() => Woke::Message(m),
                f = frame => Woke::Frame(f),
                () = arrivals.arrived(LaneKind::Feed) => Woke::Arrived,
                () = &mut quiet => Woke::Quiet,
            }
        };
        match woke {
            Woke::Message(m) => match m? {
                Some(ToWorker::Chunk(_)) => {} // of a step this worker left
                Some(other) => return Ok(Got::Interrupted(other)),
                None => return Err(Status::unavailable("the coordinator closed the stream")),
            },
            Woke::Frame(Ok(h)) => {
                let range = h.offset as usize..h.offset as usize + h.values as usize;
                if want.stream == ChunkStream::Params {
                    if let Err(e) = check_finite("parameters", &tensor[range.start - base..range.end - base]) {
                        port.inlet = None;
                        return Ok(Got::Broken(e.to_string()));
                    }
                }
                return Ok(Got::Landed(range, None));
            }
            // The sender closed it: it dialed a new one (its successor changed, or it gave up a
            // step mid-frame), or it left, which the coordinator learns and says. The next
            // lane is waited for.
            Woke::Frame(Err(LaneError::Closed | LaneError::Io(_))) => port.inlet = None,
            Woke::Frame(Err(e)) => {
                port.inlet = None;
                return Ok(Got::Broken(format!("lane: {e}")));
            }
            Woke::Arrived => {}
            Woke::Quiet => return Ok(Got::Broken(format!("no chunk within {CHAIN_WAIT:?}"))),
        }
    }
}

/// Leaves the step on what `got` says (the coordinator's next message, or a broken link
/// upstream). `outlet` is kept for the next step: only whole frames went out on it, and its
/// receiver reads past those of a step it left.
async fn abandon(
    conn: &mut Connection,
    port: &mut PeerPort,
    step: u64,
    outlet: Outlet,
    got: Got,
) -> Result<Next, Status> {
    port.keep(outlet);
    match got {
        Got::Interrupted(m) => Ok(Next::Then(m)),
        Got::Broken(why) => broken(conn, step, "", &why).await,
        Got::Landed(..) => Ok(Next::Done),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Connections that send nothing are closed after `FIRST_BYTE` and do not keep a lane out
    /// meanwhile; one that is not a lane is closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_neither_block_lanes_nor_stay() {
        let token = Some("a-token-of-16-bytes".to_string());
        let port = PeerPort::bind("127.0.0.1:0".parse().unwrap(), None, token.clone(), None).await.unwrap();
        let mut idle = vec![];
        for _ in 0..10 {
            idle.push(TcpStream::connect(&port.address).await.unwrap());
        }
        let lane = crate::lane::dial(&port.address, LaneKind::Feed, token.as_deref(), None).await;
        assert!(lane.is_ok(), "a lane beside idle connections: {:?}", lane.err());
        assert!(port.arrivals.take_admitted(LaneKind::Feed).await.is_some());
        let mut http = TcpStream::connect(&port.address).await.unwrap();
        http.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut b = [0u8];
        let closed = tokio::time::timeout(FIRST_BYTE, http.read(&mut b)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "not a lane, closed: {closed:?}");
        for mut s in idle {
            let mut b = [0u8];
            let closed = tokio::time::timeout(FIRST_BYTE * 3, s.read(&mut b)).await;
            assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "an idle connection stayed: {closed:?}");
        }
    }
}
