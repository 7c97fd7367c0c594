//! The coordinator's side of a join: checks the caller and its Hello, then hands the stream
//! to the hub.

use crate::hub::Hub;
use dtrain_proto::{FromWorker, Join, JoinHandler, ToWorkerStream, PROTOCOL_VERSION};
use std::sync::Arc;
use tonic::Status;

/// Admits workers: checks the token and the Hello, then hands the stream to the hub.
pub struct CoordinatorService {
    /// Where admitted workers go.
    pub hub: Arc<Hub>,
    /// The job token, if one is required.
    pub token: Option<String>,
}

#[tonic::async_trait]
impl JoinHandler for CoordinatorService {
    async fn join(&self, mut call: Join) -> Result<ToWorkerStream, Status> {
        crate::auth::check(&call.metadata, self.token.as_deref())?;
        let hello = match call.inbound.next().await? {
            Some((FromWorker::Hello(h), _)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not this coordinator's {PROTOCOL_VERSION}; run matching dtrain versions",
                hello.protocol_version
            )));
        }
        let name = crate::hub::display_name(&hello.name);
        let host = call.remote.map(|a| a.ip());
        let party = crate::hub::party_key(&name, host, call.certificate.as_deref());
        self.hub.accept(name, party, host, hello.peer_address, call.inbound)
    }
}
