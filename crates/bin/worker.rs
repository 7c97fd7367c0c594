//! `worker`: computes shard gradients for a coordinator. Flags in, exit code out; the work
//! is in dtrain-cluster.

use clap::Parser;
use dtrain_cluster::worker::{run, WorkerOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "worker", version, about = "Computes shard gradients for a dtrain coordinator; needs no data files")]
struct Cli {
    /// The coordinator's address, e.g. http://coordinator:50051.
    #[arg(long, env = "DTRAIN_COORDINATOR")]
    coordinator: String,
    /// File holding the job token (or set DTRAIN_TOKEN).
    #[arg(long, env = "DTRAIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The job token itself (prefer --token-file: environment variables can leak).
    #[arg(long = "token", env = "DTRAIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Shown in the coordinator's logs (default: the host name).
    #[arg(long, env = "DTRAIN_WORKER_NAME")]
    name: Option<String>,
    /// Keep trying to reach the coordinator this many seconds before giving up.
    #[arg(long, env = "DTRAIN_RETRY_FOR", default_value_t = 300)]
    retry_for: u64,
    /// Serve the gRPC health service on this address (for Kubernetes probes).
    #[arg(long, env = "DTRAIN_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    dtrain_nn::reexec_with_pinned_blas();
    let cli = Cli::parse();
    let token = match (&cli.token_file, cli.token) {
        (Some(f), _) => match dtrain_cluster::auth::read_token_file(f) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, t) => t,
    };
    let name = cli
        .name
        .unwrap_or_else(|| std::fs::read_to_string("/etc/hostname").map_or("worker".into(), |h| h.trim().into()));
    let opts = WorkerOptions {
        coordinator: cli.coordinator,
        token,
        name,
        retry_for: Duration::from_secs(cli.retry_for),
        health_listen: cli.health_listen,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the network runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts, |m| eprintln!("worker: {m}"))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
