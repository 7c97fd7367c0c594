//! dtrain-fit's errors: one enum for callers (`FitError`), typed by kind inside. Strings remain
//! only where the message is the point (a job file's `key: what is wrong`, a data file's line).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A file operation that failed: which file, doing what, and the system's error.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {action}: {cause}", path.display())]
pub struct IoError {
    /// The file.
    pub path: PathBuf,
    /// What was tried ("read", "write", "create").
    pub action: &'static str,
    /// The system's error.
    pub cause: std::io::Error,
}

impl IoError {
    /// A closure for `map_err`: the error of `action` on `path`.
    pub fn on(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> IoError {
        let path = path.to_path_buf();
        move |cause| IoError { path, action, cause }
    }
}

/// A weights file or resume state that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The file is there but its contents do not fit (damaged, another model, bad values).
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The resume state was written by a dtrain with another state format.
    #[error("{}: state format {found} is not this dtrain's {supported}; continue the run with the dtrain that started it", path.display())]
    Format {
        /// The manifest.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// This dtrain's.
        supported: u32,
    },
    /// The resume state belongs to another job.
    #[error("{}: this run was started from a different job file; resume it with the job in {} (only fit.epochs may change)", path.display(), job.display())]
    OtherJob {
        /// The manifest.
        path: PathBuf,
        /// The run's own job file.
        job: PathBuf,
    },
    /// `--resume` of a directory without a resume state.
    #[error("{}: no resume state here ({file} is missing)", dir.display())]
    NoState {
        /// The directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
    },
    /// A new run in a directory that holds files.
    #[error("{}: the run directory is not empty; pass --resume to continue that run, or choose another --run-dir", dir.display())]
    Occupied {
        /// The directory.
        dir: PathBuf,
    },
}

impl CheckpointError {
    /// `path`'s contents are wrong, as `why` says.
    pub fn invalid(path: &Path, why: impl Into<String>) -> Self {
        CheckpointError::Invalid { path: path.to_path_buf(), why: why.into() }
    }
}

/// Why an engine could not compute a step's gradients.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The compute threads could not be started.
    #[error("cannot start {threads} compute threads: {cause}")]
    Threads {
        /// How many were asked for.
        threads: usize,
        /// Why they could not start.
        cause: rayon::ThreadPoolBuildError,
    },
    /// The thread that gathers batches ahead could not be started.
    #[error("cannot start the thread that gathers batches ahead: {0}")]
    GatherThread(std::io::Error),
    /// Every worker left and none joined in time.
    #[error("no worker joined within {waited:?}; the last checkpoint is kept")]
    NoWorkers {
        /// How long it waited.
        waited: Duration,
    },
    /// Too few workers joined before the first step.
    #[error("only {joined} of {needed} worker(s) joined within {waited:?}")]
    TooFewWorkers {
        /// How many joined.
        joined: usize,
        /// How many were needed.
        needed: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The engine could not be set up (listen, TLS, start workers), as the message says.
    #[error("{0}")]
    Setup(String),
    /// The connection to the workers ended.
    #[error("the connection to the workers stopped")]
    Stopped,
    /// SIGTERM or Ctrl-C arrived while the engine waited (for workers): the step was not applied.
    #[error("interrupted while waiting for workers")]
    Interrupted,
    /// A worker was caught lying, and gradients of steps from `to_step` on used results of it
    /// that nobody checked: nothing of this step was applied, and training must go back to a
    /// state from before `to_step` and replay without it.
    #[error("results used since step {to_step} cannot be trusted: {why}")]
    Rollback {
        /// The first step whose gradient is in doubt.
        to_step: u64,
        /// Who was caught, and how.
        why: String,
    },
}

/// What can end a run (or another command) early.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The job file or a flag: `file: key: what is wrong`.
    #[error("{0}")]
    Config(String),
    /// A data file: names the file and, where it can, the line.
    #[error(transparent)]
    Data(#[from] dtrain_data::DataError),
    /// A callback's file name could not be filled in.
    #[error(transparent)]
    Template(#[from] crate::callbacks::TemplateError),
    /// A file of the run could not be read or written.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Weights or a resume state cannot be used.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The gradients could not be computed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The loss became NaN or infinite (Keras's TerminateOnNaN).
    #[error("loss became {loss} at epoch {epoch}, batch {batch}; training stopped, the last saved state and weights are kept")]
    NonFinite {
        /// The epoch (1-based).
        epoch: usize,
        /// The batch (1-based).
        batch: usize,
        /// The loss.
        loss: f32,
    },
    /// SIGTERM or Ctrl-C: the state was saved mid-epoch.
    #[error(
        "interrupted at epoch {epoch}, batch {batch}; the state is saved: continue with --resume --run-dir {run_dir}"
    )]
    Interrupted {
        /// The epoch (1-based).
        epoch: usize,
        /// The last batch applied (1-based).
        batch: usize,
        /// The run directory to resume.
        run_dir: String,
    },
}
