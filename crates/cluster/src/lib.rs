//! dtrain-cluster: the coordinator's gRPC service and the worker, on tokio and tonic.
//!
//! Workers dial the coordinator and hold one bidirectional stream (`hub`); the coordinator's
//! `ClusterEngine` implements dtrain-fit's `Engine` by sending each step's shards to live
//! workers and collecting their gradients in shard order, recomputing elsewhere the shards of
//! a worker that leaves, hangs past the step deadline or sends a bad result.

pub mod admission;
pub mod assign;
pub mod auth;
pub mod digest;
pub mod engine;
pub mod epoch_stats;
pub mod hub;
pub mod ids;
mod lane;
pub mod metrics_http;
pub mod pace;
mod peer;
pub mod round;
pub mod run;
pub mod service;
pub mod shm;
pub mod spawn;
pub mod termination;
pub mod timeline;
pub mod topology;
pub mod verify;
pub mod worker;

/// Largest message either side accepts or sends (the wide model's parameters are 2.7 MB).
pub const MESSAGE_LIMIT: usize = 64 << 20;

/// What ends a coordinator or worker run.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A flag or setting: what is wrong and what to do.
    #[error("{0}")]
    Config(String),
    /// A system resource (a socket, a runtime) this process could not get.
    #[error("{what}: {cause}")]
    Io {
        /// What this process tried.
        what: String,
        /// The system's error.
        cause: std::io::Error,
    },
    /// The trainer's error.
    #[error(transparent)]
    Fit(#[from] dtrain_fit::FitError),
    /// The coordinator refused this worker (token, protocol version): retrying cannot help.
    #[error("rejected by the coordinator: {0}")]
    Rejected(String),
    /// The coordinator could not be reached for the whole retry period.
    #[error("cannot reach the coordinator at {coordinator} for {waited:?}: {why}")]
    Unreachable {
        /// The coordinator's URL.
        coordinator: String,
        /// How long this worker kept trying.
        waited: std::time::Duration,
        /// The last failure.
        why: String,
    },
}
