//! `worker`: computes shard gradients for a coordinator. Flags in, exit code out; the work
//! is in dtrain-cluster.

use clap::Parser;

#[path = "worker_cli.rs"]
mod worker_cli;
use dtrain_cluster::worker::{run, ClientTls, WorkerOptions};
use std::process::ExitCode;
use std::time::Duration;
use worker_cli::Cli;

fn main() -> ExitCode {
    // One BLAS thread, and the best kernel this CPU runs until the run says which (at join).
    let kernel = dtrain_nn::kernel::pinned()
        .or_else(|| dtrain_nn::kernel::resolve(None, &dtrain_nn::kernel::cpu_has).ok().flatten());
    dtrain_nn::kernel::pin(kernel);
    match run_worker(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_worker(cli: Cli) -> anyhow::Result<()> {
    dtrain_fit::logging::init("worker", dtrain_fit::LogFormat::Text);
    let token = dtrain_cluster::auth::token(cli.token_file.as_deref())?;
    let name = cli
        .name
        .unwrap_or_else(|| std::fs::read_to_string("/etc/hostname").map_or("worker".into(), |h| h.trim().into()));
    let opts = WorkerOptions {
        coordinator: cli.coordinator,
        token,
        name,
        retry_for: Duration::from_secs(cli.retry_for),
        health_listen: cli.health_listen,
        peer_listen: cli.peer_listen,
        peer_advertise: cli.peer_advertise,
        peer_tls_name: cli.peer_tls_name,
        tls: cli.tls_ca.map(|ca| ClientTls { ca, identity: cli.tls_cert.zip(cli.tls_key), domain: cli.tls_domain }),
    };
    // Shards are computed on this thread (in `block_on`); the connection is driven by the
    // runtime's own thread, so it answers the coordinator's keepalive pings while a shard is
    // computed, and a frozen or cut-off worker is told from a busy one within seconds.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|cause| anyhow::anyhow!("cannot start the network runtime: {cause}"))?;
    rt.block_on(run(opts))?;
    Ok(())
}
