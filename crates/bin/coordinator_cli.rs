//! The `coordinator` command line (clap). Shared with tests/deploy_manifests.rs, which parses
//! the Kubernetes manifests' container args with it so the two cannot drift apart.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Keras-exact data-parallel training: train, evaluate and predict from a job file"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train the job's model; writes a run directory (history, weights, resume state).
    Train(Box<TrainArgs>),
    /// Loss (with every regularization term) and accuracy of weights on the job's validation data.
    Evaluate {
        #[arg(long, env = "DTRAIN_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Whose rounding to reproduce: dtrain's own kernels, or TensorFlow's CPU kernels (the
        /// loss Keras's evaluate reports on the TensorFlow backend, bit for bit), or auto
        /// (TensorFlow's where they are reproduced for the model).
        #[arg(long, value_enum, default_value = "dtrain")]
        numerics: Numerics,
        /// With --numerics tensorflow: the CPU count of the machine Keras runs on (TensorFlow
        /// splits very long sums across its threads). Default: this machine's.
        #[arg(long)]
        tensorflow_threads: Option<usize>,
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
        /// Whose rounding to reproduce: dtrain's own kernels, or TensorFlow's CPU kernels (the
        /// outputs Keras's predict gives on the TensorFlow backend, bit for bit), or auto.
        #[arg(long, value_enum, default_value = "dtrain")]
        numerics: Numerics,
    },
    /// Write weights (safetensors) as a Keras 3 `.keras` file, which `keras.saving.load_model` opens.
    Export {
        #[arg(long, env = "DTRAIN_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        /// The `.keras` file to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Print the model table (layers, output shapes, parameter counts).
    Summary {
        #[arg(long, env = "DTRAIN_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Numerics {
    Dtrain,
    Tensorflow,
    /// TensorFlow's where the model is one they are reproduced for, else dtrain's.
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The job file (TOML or JSON). With --resume it defaults to the run directory's job.toml.
    #[arg(long, env = "DTRAIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Train in this process (the default without --listen or --spawn-workers).
    #[arg(long)]
    pub local: bool,
    /// Where the run writes; must be new or empty unless --resume. Default: runs/<job>-NNN.
    #[arg(long, env = "DTRAIN_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Start from these weights (safetensors with the model's variable names).
    #[arg(long)]
    pub init_weights: Option<PathBuf>,
    /// Continue the run in --run-dir from its last saved state.
    #[arg(long, env = "DTRAIN_RESUME")]
    pub resume: bool,
    /// Resume if --run-dir holds a saved state, else start a new run there (for restarted Jobs).
    #[arg(long, env = "DTRAIN_AUTO_RESUME", conflicts_with = "resume")]
    pub auto_resume: bool,
    /// Override fit.epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override fit.batch_size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Override the job's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Shards computed at once in this process (default: all cores, at most fit.shards).
    #[arg(long, env = "DTRAIN_THREADS")]
    pub threads: Option<usize>,
    /// Serve workers on this address (host:port; port 0 picks a free one).
    #[arg(long, env = "DTRAIN_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Start this many local worker processes (the one-command local cluster); training waits
    /// for all of them, and without a token they get one made for this run.
    #[arg(long, env = "DTRAIN_SPAWN_WORKERS", default_value_t = 0)]
    pub spawn_workers: usize,
    /// Workers to wait for before the first step.
    #[arg(long, env = "DTRAIN_MIN_WORKERS", default_value_t = 1)]
    pub min_workers: usize,
    /// File holding the job token workers must present (or set DTRAIN_TOKEN; there is no
    /// flag for the token itself, which the process list would show to every local user).
    #[arg(long, env = "DTRAIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Allow listening without a token or mutual TLS (any local user, and on a public address
    /// anyone, can then join and read the job and its data).
    #[arg(long)]
    pub insecure: bool,
    /// The fraction of shards a second worker computes too ("all", or 0 to 1; 0 turns checking
    /// off; default: the job's fit.verify, else 0.02). A result that differs is recomputed by
    /// the coordinator, and the worker it contradicts is evicted.
    #[arg(long, env = "DTRAIN_VERIFY", value_parser = dtrain_cluster::verify::Fraction::parse)]
    pub verify: Option<dtrain_cluster::verify::Fraction>,
    /// How gradients and parameters travel: "chain" (each worker adds its shards to the running
    /// sum from the one before and passes it on; workers need --peer-listen; a sample of chain
    /// steps is audited, see --verify), "star" (every worker to and from the coordinator), or
    /// "auto" (the chain when a worker off this host's shared memory can take part; a chain of
    /// one sends the sum of its shards, not each shard's gradient).
    #[arg(long, env = "DTRAIN_TOPOLOGY", default_value = "auto", value_parser = dtrain_cluster::topology::Topology::parse)]
    pub topology: dtrain_cluster::topology::Topology,
    /// Seconds a worker may take for its shards of one step before they go elsewhere.
    #[arg(long, env = "DTRAIN_STEP_TIMEOUT", default_value_t = 30.0)]
    pub step_timeout: f64,
    /// Seconds to wait for workers (at start, or when none is left) before giving up.
    #[arg(long, env = "DTRAIN_WORKER_WAIT", default_value_t = 300.0)]
    pub worker_wait: f64,
    /// Keep parameters and gradients on the gRPC stream even for workers on this host (by
    /// default they go through sealed shared memory (memfd); the messages still go over gRPC).
    #[arg(long, env = "DTRAIN_NO_SHARED_MEMORY")]
    pub no_shared_memory: bool,
    /// Serve workers over TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, env = "DTRAIN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "DTRAIN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only workers whose certificate this CA (PEM) signed.
    #[arg(long, env = "DTRAIN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// With mutual TLS: the DNS name every worker's certificate carries (as the workers'
    /// --peer-tls-name); the lanes to a chain's ends check it, and present --tls-cert.
    #[arg(long, env = "DTRAIN_PEER_TLS_NAME", default_value = "dtrain-worker")]
    pub peer_tls_name: String,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "DTRAIN_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
    /// Draw the batch-by-batch progress bar on stderr even when it is not a terminal (carriage
    /// returns, no ANSI escapes), as a notebook shows Keras's; `dtrain.fit(verbose=1)` sets it.
    #[arg(long)]
    pub progress_bar: bool,
    #[arg(long, value_enum, default_value = "text", env = "DTRAIN_LOG_FORMAT")]
    pub log_format: Format,
}
