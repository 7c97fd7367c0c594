//! dtrain-fit's errors: one enum for callers (`FitError`), typed by kind inside. Strings remain
//! only where the message is the point (a job file's `key: what is wrong`, a data file's line).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A file operation that failed: which file, doing what, and the system's error.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {action}: {cause}", path.display())]
pub struct IoError {
    pub path: PathBuf,
    pub action: &'static str,
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
    #[error(transparent)]
    Io(#[from] IoError),
    /// The file is there but its contents do not fit (damaged, another model, bad values).
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error("{}: state format {found} is not this dtrain's {supported}; continue the run with the dtrain that started it", path.display())]
    Format { path: PathBuf, found: u32, supported: u32 },
    #[error("{}: this run was started from a different job file; resume it with the job in {} (only fit.epochs may change)", path.display(), job.display())]
    OtherJob { path: PathBuf, job: PathBuf },
    #[error("{}: no resume state here ({file} is missing)", dir.display())]
    NoState { dir: PathBuf, file: &'static str },
    #[error("{}: the run directory is not empty; pass --resume to continue that run, or choose another --run-dir", dir.display())]
    Occupied { dir: PathBuf },
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
    #[error("cannot start {threads} compute threads: {cause}")]
    Threads { threads: usize, cause: rayon::ThreadPoolBuildError },
    #[error("no worker joined within {waited:?}; the last checkpoint is kept")]
    NoWorkers { waited: Duration },
    #[error("only {joined} of {needed} worker(s) joined within {waited:?}")]
    TooFewWorkers { joined: usize, needed: usize, waited: Duration },
    /// The engine could not be set up (listen, TLS, start workers), as the message says.
    #[error("{0}")]
    Setup(String),
    #[error("the connection to the workers stopped")]
    Stopped,
}

/// What can end a run (or another command) early.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The job file or a flag: `file: key: what is wrong`.
    #[error("{0}")]
    Config(String),
    /// A data file: names the file and, where it can, the line.
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("loss became {loss} at epoch {epoch}, batch {batch}; training stopped, the last saved state and weights are kept")]
    NonFinite { epoch: usize, batch: usize, loss: f32 },
    #[error(
        "interrupted at epoch {epoch}, batch {batch}; the state is saved: continue with --resume --run-dir {run_dir}"
    )]
    Interrupted { epoch: usize, batch: usize, run_dir: String },
}
