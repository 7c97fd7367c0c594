//! The run directory: resolved job, history, weights and resume state of one training run.

use crate::{CheckpointError, IoError};
use std::path::{Path, PathBuf};

/// The job with every default filled in, as the run used it.
pub const JOB_FILE: &str = "job.toml";
/// The weights at the end of training (the best epoch's with restore_best_weights).
pub const FINAL_WEIGHTS: &str = "final.safetensors";
/// The same model and weights as a Keras 3 file (`keras.saving.load_model` opens it).
pub const FINAL_KERAS: &str = "final.keras";
/// Loss, accuracy and learning-rate curves.
pub const CURVES: &str = "curves.png";

#[derive(Clone, Debug)]
/// A run's directory.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates a fresh run directory: `explicit` if given (it must not hold files), else the
    /// first free `runs/<stem>-NNN`. Never reuses a directory that holds a run.
    pub fn create(explicit: Option<&Path>, stem: &str) -> Result<RunDir, CheckpointError> {
        if let Some(p) = explicit {
            if p.exists() && std::fs::read_dir(p).map_err(IoError::on(p, "read"))?.next().is_some() {
                return Err(CheckpointError::Occupied { dir: p.to_path_buf() });
            }
            std::fs::create_dir_all(p).map_err(IoError::on(p, "create"))?;
            return Ok(RunDir { path: p.to_path_buf() });
        }
        let root = Path::new("runs");
        std::fs::create_dir_all(root).map_err(IoError::on(root, "create"))?;
        let mut n = 1;
        loop {
            let p = root.join(format!("{stem}-{n:03}"));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(RunDir { path: p }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100_000 => n += 1,
                Err(e) => return Err(IoError::on(&p, "create")(e).into()),
            }
        }
    }

    /// An existing run directory to resume.
    pub fn existing(p: &Path) -> Result<RunDir, CheckpointError> {
        let file = crate::checkpoint::STATE_FILE;
        if !p.join(file).is_file() {
            return Err(CheckpointError::NoState { dir: p.to_path_buf(), file });
        }
        Ok(RunDir { path: p.to_path_buf() })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file in it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}
