//! `coordinator`: trains, evaluates and predicts from a job file. Flags in, exit code out;
//! the work is in dtrain-fit.

use anyhow::Context;
use clap::Parser;
use dtrain_cluster::run::{ClusterOptions, ServerTls};
use dtrain_fit::metrics::Metrics;
use dtrain_fit::session::{self, TrainOptions};
use dtrain_fit::{Console, LogFormat};
use std::io::Write;

#[path = "coordinator_cli.rs"]
mod coordinator_cli;
use coordinator_cli::{Cli, Command, Format, Numerics};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The run's BLAS kernel, set before anything is computed (this may execute us again).
    let auto = || dtrain_nn::kernel::resolve(None, &dtrain_nn::kernel::cpu_has).ok().flatten();
    let kernel = match &cli.command {
        Command::Train(a) => session::train_kernel(&train_options(a)),
        Command::Evaluate { config, .. } | Command::Predict { config, .. } => session::job_kernel(config),
        _ => auto(),
    };
    dtrain_nn::kernel::pin(kernel.or_else(auto));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `coordinator predict ... | head`: the reader has all it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The numerics the command line asks for.
fn numerics_of(numerics: Numerics) -> session::Numerics {
    match numerics {
        Numerics::Dtrain => session::Numerics::Dtrain,
        Numerics::Tensorflow => session::Numerics::TensorFlow,
        Numerics::Auto => session::Numerics::PreferTensorFlow,
    }
}

fn train_options(a: &coordinator_cli::TrainArgs) -> TrainOptions {
    TrainOptions {
        config: a.config.clone(),
        run_dir: a.run_dir.clone(),
        init_weights: a.init_weights.clone(),
        resume: a.resume,
        auto_resume: a.auto_resume,
        epochs: a.epochs,
        batch_size: a.batch_size,
        seed: a.seed,
        threads: a.threads,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Train(a) => {
            let format = match (a.quiet, a.log_format) {
                (true, _) => LogFormat::Quiet,
                (false, Format::Text) => LogFormat::Text,
                (false, Format::Json) => LogFormat::Json,
            };
            let opts = train_options(&a);
            // SIGTERM (Kubernetes) or Ctrl-C: finish the step, save the state, tell workers to stop.
            let interrupt = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, Arc::clone(&interrupt))
                    .with_context(|| format!("cannot handle signal {sig}"))?;
            }
            dtrain_fit::logging::init("coordinator", format);
            let mut console = Console::new(format);
            if a.progress_bar {
                console = console.with_progress_bar();
            }
            let mut console =
                console.with_interrupt(interrupt).with_boards(Box::new(dtrain_tensorboard::EventFiles::default()));
            let metrics = Arc::new(Metrics::default());
            if let Some(addr) = a.metrics_listen {
                let at = dtrain_cluster::metrics_http::serve(addr, Arc::clone(&metrics))?;
                tracing::info!("metrics on http://{at}/metrics");
                console = console.with_metrics(Arc::clone(&metrics));
            }
            if a.local || (a.listen.is_none() && a.spawn_workers == 0) {
                session::train(&opts, &mut console)?;
            } else {
                let token = dtrain_cluster::auth::token(a.token_file.as_deref())?;
                let secs = |what: &str, s: f64| {
                    Duration::try_from_secs_f64(s).map_err(|_| anyhow::anyhow!("--{what}: {s} is not a duration"))
                };
                let cluster = ClusterOptions {
                    listen: a.listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("a valid address")),
                    spawn_workers: a.spawn_workers,
                    min_workers: a.min_workers.max(a.spawn_workers),
                    token,
                    insecure: a.insecure,
                    step_timeout: secs("step-timeout", a.step_timeout)?,
                    worker_wait: secs("worker-wait", a.worker_wait)?,
                    shared_memory: !a.no_shared_memory,
                    verify: a.verify,
                    topology: a.topology,
                    metrics: a.metrics_listen.map(|_| metrics),
                    tls: match (a.tls_cert, a.tls_key) {
                        (Some(cert), Some(key)) => {
                            Some(ServerTls { cert, key, client_ca: a.tls_client_ca, peer_name: a.peer_tls_name })
                        }
                        _ => None,
                    },
                };
                dtrain_cluster::run::train(&opts, &cluster, &mut console)?;
            }
        }
        Command::Evaluate { config, weights, json, numerics, tensorflow_threads } => {
            let threads = tensorflow_threads.unwrap_or_else(dtrain_fit::evaluate::tensorflow_threads);
            let (e, which, n) = session::evaluate_weights(&config, &weights, numerics_of(numerics), threads)?;
            if json {
                let v = serde_json::json!({"loss": e.loss, "accuracy": e.accuracy, "data": which, "samples": n});
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "{which} data ({n} samples): loss {:.6} - accuracy {:.4}", e.loss, e.accuracy)?;
            }
        }
        Command::Predict { config, weights, input, json, numerics } => {
            let p = session::predict_file(&config, &weights, &input, numerics_of(numerics))?;
            let argmax = |r: ndarray::ArrayView1<f32>| {
                r.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
            };
            if json {
                let rows: Vec<_> = p
                    .rows()
                    .into_iter()
                    .map(|r| serde_json::json!({"class": argmax(r), "output": r.to_vec()}))
                    .collect();
                writeln!(out, "{}", serde_json::json!({ "predictions": rows }))?;
            } else {
                let head: Vec<String> = (0..p.ncols()).map(|i| format!("output_{i}")).collect();
                writeln!(out, "class,{}", head.join(","))?;
                for r in p.rows() {
                    let vals: Vec<String> = r.iter().map(|v| v.to_string()).collect();
                    writeln!(out, "{},{}", argmax(r), vals.join(","))?;
                }
            }
        }
        Command::Summary { config } => {
            write!(out, "{}", session::summary(&config)?)?;
        }
        Command::Export { config, weights, to } => {
            session::export_keras(&config, &weights, &to)?;
            writeln!(out, "wrote {}", to.display())?;
        }
    }
    out.flush()?;
    Ok(())
}
