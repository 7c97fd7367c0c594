//! The gRPC stream in domain messages: the coordinator's service over a `JoinHandler`, its
//! queue to each worker (`Outbox`) and what it receives (`Inbox`); the worker's `Connection`.
//! Generated types stay in this crate.

use crate::messages::{FromWorker, Hello, ToWorker};
use crate::pb;
use std::net::SocketAddr;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// The gRPC name of the coordinator's service (for health checks).
pub const COORDINATOR_SERVICE: &str = pb::coordinator_server::SERVICE_NAME;

/// What a worker's stream sends, as the gRPC server takes it.
pub type ToWorkerStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

/// The coordinator's bounded queue of messages to one worker.
#[derive(Clone, Debug)]
pub struct Outbox(mpsc::Sender<Result<pb::CoordinatorMessage, Status>>);

impl Outbox {
    /// A queue of `depth` messages and the stream it feeds.
    pub fn channel(depth: usize) -> (Outbox, ToWorkerStream) {
        let (tx, rx) = mpsc::channel(depth);
        (Outbox(tx), ReceiverStream::new(rx))
    }

    /// Queues `message` without waiting; its size on the wire, or `None` if the queue is full
    /// or the stream is gone.
    pub fn try_send(&self, message: ToWorker) -> Option<usize> {
        let m = pb::CoordinatorMessage::from(message);
        let size = prost::Message::encoded_len(&m);
        self.0.try_send(Ok(m)).ok().map(|()| size)
    }

    /// Queues `message`, waiting up to `patience` for room; its size on the wire, or `None` if
    /// the stream is gone or stayed full.
    pub async fn send_within(&self, message: ToWorker, patience: std::time::Duration) -> Option<usize> {
        let m = pb::CoordinatorMessage::from(message);
        let size = prost::Message::encoded_len(&m);
        let permit = tokio::time::timeout(patience, self.0.reserve()).await.ok()?.ok()?;
        permit.send(Ok(m));
        Some(size)
    }

    /// Ends the stream with `status` (if the queue has room for it).
    pub fn close_with(&self, status: Status) {
        let _ = self.0.try_send(Err(status));
    }
}

/// A worker's messages as the coordinator receives them.
pub struct Inbox(Streaming<pb::WorkerMessage>);

impl Inbox {
    /// The next message and its size on the wire; `None` once the stream ended. A message the
    /// protocol does not know is an error.
    pub async fn next(&mut self) -> Result<Option<(FromWorker, usize)>, Status> {
        let Some(m) = self.0.message().await? else { return Ok(None) };
        let size = prost::Message::encoded_len(&m);
        let m = FromWorker::try_from(m).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Some((m, size)))
    }
}

/// A worker dialing in: its call's metadata, its address, and its stream.
pub struct Join {
    /// The call's metadata (the token).
    pub metadata: MetadataMap,
    /// The worker's address, if known (loopback means this host).
    pub remote: Option<SocketAddr>,
    /// The client certificate it presented (DER), with mutual TLS.
    pub certificate: Option<Vec<u8>>,
    /// Its messages, Hello first.
    pub inbound: Inbox,
}

/// What the coordinator does with a worker that dials in.
#[tonic::async_trait]
pub trait JoinHandler: Send + Sync + 'static {
    /// Checks the caller and its Hello; returns the stream of messages to it.
    async fn join(&self, call: Join) -> Result<ToWorkerStream, Status>;
}

/// The generated gRPC service, over a `JoinHandler`.
pub struct CoordinatorGrpc<H>(H);

#[tonic::async_trait]
impl<H: JoinHandler> pb::coordinator_server::Coordinator for CoordinatorGrpc<H> {
    type JoinStream = ToWorkerStream;

    async fn join(&self, req: Request<Streaming<pb::WorkerMessage>>) -> Result<Response<ToWorkerStream>, Status> {
        let (metadata, remote) = (req.metadata().clone(), req.remote_addr());
        let certificate = req.peer_certs().and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let call = Join { metadata, remote, certificate, inbound: Inbox(req.into_inner()) };
        self.0.join(call).await.map(Response::new)
    }
}

/// The coordinator's gRPC service: `handler` for every join; messages up to `limit` bytes.
pub fn coordinator_service<H: JoinHandler>(
    handler: H,
    limit: usize,
) -> pb::coordinator_server::CoordinatorServer<CoordinatorGrpc<H>> {
    pb::coordinator_server::CoordinatorServer::new(CoordinatorGrpc(handler))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
}

/// `req` with `headers` (e.g. the token) in its metadata.
fn with_headers<T>(mut req: Request<T>, headers: &[(&'static str, String)]) -> Result<Request<T>, Status> {
    for (name, value) in headers {
        let v: MetadataValue<_> =
            value.parse().map_err(|_| Status::invalid_argument(format!("{name}: not valid header text")))?;
        req.metadata_mut().insert(*name, v);
    }
    Ok(req)
}

/// A worker's stream to the coordinator.
#[derive(Debug)]
pub struct Connection {
    outbox: mpsc::Sender<pb::WorkerMessage>,
    inbound: Streaming<pb::CoordinatorMessage>,
}

impl Connection {
    /// Joins over `channel`, with `headers` on the call (e.g. the token) and `hello` first;
    /// messages up to `limit` bytes either way.
    pub async fn open(
        channel: Channel,
        limit: usize,
        headers: &[(&'static str, String)],
        hello: Hello,
    ) -> Result<Connection, Status> {
        let mut client = pb::coordinator_client::CoordinatorClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let (outbox, rx) = mpsc::channel(8);
        outbox.send(FromWorker::Hello(hello).into()).await.map_err(|_| Status::internal("send"))?;
        let req = with_headers(Request::new(ReceiverStream::new(rx)), headers)?;
        let inbound = client.join(req).await?.into_inner();
        Ok(Connection { outbox, inbound })
    }

    /// Sends a message (waits while the stream's queue is full).
    pub async fn send(&self, m: FromWorker) -> Result<(), Status> {
        self.outbox.send(m.into()).await.map_err(|_| Status::unavailable("stream closed"))
    }

    /// The next message; `None` once the coordinator closed the stream.
    pub async fn next(&mut self) -> Result<Option<ToWorker>, Status> {
        let Some(m) = self.inbound.message().await? else { return Ok(None) };
        ToWorker::try_from(m).map(Some).map_err(|e| Status::invalid_argument(e.to_string()))
    }
}
