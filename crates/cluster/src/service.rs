//! The Coordinator gRPC service: checks the caller, then hands the stream to the hub.

use crate::hub::Hub;
use dtrain_proto::pb::coordinator_server::Coordinator;
use dtrain_proto::pb::{self, worker_message::Kind};
use dtrain_proto::PROTOCOL_VERSION;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct CoordinatorService {
    pub hub: Arc<Hub>,
    pub token: Option<String>,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type JoinStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn join(&self, req: Request<Streaming<pb::WorkerMessage>>) -> Result<Response<Self::JoinStream>, Status> {
        crate::auth::check(req.metadata(), self.token.as_deref())?;
        // Only a worker that dialed over loopback can be on this host (shared memory).
        let local = req.remote_addr().is_some_and(|a| a.ip().is_loopback());
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::WorkerMessage { kind: Some(Kind::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not this coordinator's {PROTOCOL_VERSION}; run matching dtrain versions",
                hello.protocol_version
            )));
        }
        Ok(Response::new(ReceiverStream::new(self.hub.accept(hello.name, inbound, local))))
    }
}
