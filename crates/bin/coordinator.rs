//! `coordinator`: trains, evaluates and predicts from a job file. Flags in, exit code out;
//! the work is in dtrain-fit.

use clap::{Args, Parser, Subcommand, ValueEnum};
use dtrain_fit::session::{self, TrainOptions};
use dtrain_fit::{Console, LogFormat};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Keras-exact data-parallel training: train, evaluate and predict from a job file"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the job's model; writes a run directory (history, weights, resume state).
    Train(TrainArgs),
    /// Loss (with every regularization term) and accuracy of weights on the job's validation data.
    Evaluate {
        #[arg(long, env = "DTRAIN_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Model outputs for every sample of an input file (.npy, .csv of features, or IDX images).
    Predict {
        #[arg(long, env = "DTRAIN_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Print JSON instead of CSV.
        #[arg(long)]
        json: bool,
    },
    /// Print the model table (layers, output shapes, parameter counts).
    Summary {
        #[arg(long, env = "DTRAIN_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Args)]
struct TrainArgs {
    /// The job file (TOML or JSON). With --resume it defaults to the run directory's job.toml.
    #[arg(long, env = "DTRAIN_CONFIG")]
    config: Option<PathBuf>,
    /// Train in this process (the default until workers are configured).
    #[arg(long)]
    local: bool,
    /// Where the run writes; must be new or empty unless --resume. Default: runs/<job>-NNN.
    #[arg(long, env = "DTRAIN_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Start from these weights (safetensors with the model's variable names).
    #[arg(long)]
    init_weights: Option<PathBuf>,
    /// Continue the run in --run-dir from its last saved state.
    #[arg(long, env = "DTRAIN_RESUME")]
    resume: bool,
    /// Override fit.epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override fit.batch_size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override the job's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Shards computed at once in this process (default: all cores, at most fit.shards).
    #[arg(long, env = "DTRAIN_THREADS")]
    threads: Option<usize>,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
    #[arg(long, value_enum, default_value = "text", env = "DTRAIN_LOG_FORMAT")]
    log_format: Format,
}

fn main() -> ExitCode {
    dtrain_nn::reexec_with_pinned_blas();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), dtrain_fit::FitError> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Train(a) => {
            let format = match (a.quiet, a.log_format) {
                (true, _) => LogFormat::Quiet,
                (false, Format::Text) => LogFormat::Text,
                (false, Format::Json) => LogFormat::Json,
            };
            let opts = TrainOptions {
                config: a.config,
                run_dir: a.run_dir,
                init_weights: a.init_weights,
                resume: a.resume,
                epochs: a.epochs,
                batch_size: a.batch_size,
                seed: a.seed,
                threads: a.threads,
            };
            let _ = a.local;
            session::train(&opts, &mut Console::new(format))?;
        }
        Command::Evaluate { config, weights, json } => {
            let (e, which, n) = session::evaluate_weights(&config, &weights)?;
            if json {
                let v = serde_json::json!({"loss": e.loss, "accuracy": e.accuracy, "data": which, "samples": n});
                let _ = writeln!(out, "{v}");
            } else {
                let _ = writeln!(out, "{which} data ({n} samples): loss {:.6} - accuracy {:.4}", e.loss, e.accuracy);
            }
        }
        Command::Predict { config, weights, input, json } => {
            let p = session::predict_file(&config, &weights, &input)?;
            let argmax = |r: ndarray::ArrayView1<f32>| {
                r.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
            };
            if json {
                let rows: Vec<_> = p
                    .rows()
                    .into_iter()
                    .map(|r| serde_json::json!({"class": argmax(r), "output": r.to_vec()}))
                    .collect();
                let _ = writeln!(out, "{}", serde_json::json!({ "predictions": rows }));
            } else {
                let head: Vec<String> = (0..p.ncols()).map(|i| format!("output_{i}")).collect();
                let _ = writeln!(out, "class,{}", head.join(","));
                for r in p.rows() {
                    let vals: Vec<String> = r.iter().map(|v| v.to_string()).collect();
                    let _ = writeln!(out, "{},{}", argmax(r), vals.join(","));
                }
            }
        }
        Command::Summary { config } => {
            let _ = write!(out, "{}", session::summary(&config)?);
        }
    }
    Ok(())
}
