//! The `worker` command line (clap). Shared with tests/deploy_manifests.rs.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "worker", version, about = "Computes shard gradients for a dtrain coordinator; needs no data files")]
pub struct Cli {
    /// The coordinator's address, e.g. http://coordinator:50051.
    #[arg(long, env = "DTRAIN_COORDINATOR")]
    pub coordinator: String,
    /// File holding the job token (or set DTRAIN_TOKEN; there is no flag for the token itself,
    /// which the process list would show to every local user).
    #[arg(long, env = "DTRAIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Shown in the coordinator's logs (default: the host name).
    #[arg(long, env = "DTRAIN_WORKER_NAME")]
    pub name: Option<String>,
    /// Keep trying to reach the coordinator this many seconds before giving up.
    #[arg(long, env = "DTRAIN_RETRY_FOR", default_value_t = 300)]
    pub retry_for: u64,
    /// TLS (an https:// coordinator URL): the CA (PEM) that signed the coordinator's certificate.
    #[arg(long, env = "DTRAIN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this worker's certificate (PEM); needs --tls-key and --tls-ca.
    #[arg(long, env = "DTRAIN_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "DTRAIN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name to verify in the coordinator's certificate, if not the URL's host.
    #[arg(long, env = "DTRAIN_TLS_DOMAIN", requires = "tls_ca")]
    pub tls_domain: Option<String>,
    /// Take part in chains (see the coordinator's --topology): serve the peer port here, e.g.
    /// 0.0.0.0:50052. Its predecessor in the chain dials it with the job token.
    #[arg(long, env = "DTRAIN_PEER_LISTEN")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The address peers dial (HOST:PORT), when --peer-listen is not it (e.g. 0.0.0.0, NAT, a
    /// Kubernetes pod's IP).
    #[arg(long, env = "DTRAIN_PEER_ADVERTISE", requires = "peer_listen")]
    pub peer_advertise: Option<String>,
    /// With mutual TLS (--tls-cert): the DNS name every worker's certificate carries; chain
    /// lanes between workers are then mutual TLS, verified against --tls-ca and this name.
    #[arg(long, env = "DTRAIN_PEER_TLS_NAME", default_value = "dtrain-worker")]
    pub peer_tls_name: String,
    /// Serve the gRPC health service on this address (for Kubernetes probes).
    #[arg(long, env = "DTRAIN_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,
}
