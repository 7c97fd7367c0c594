//! The run directory: resolved job, history, weights and resume state of one training run.

use std::path::{Path, PathBuf};

pub const JOB_FILE: &str = "job.toml";
pub const FINAL_WEIGHTS: &str = "final.safetensors";
pub const CURVES: &str = "curves.png";

#[derive(Clone, Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates a fresh run directory: `explicit` if given (it must not hold files), else the
    /// first free `runs/<stem>-NNN`. Never reuses a directory that holds a run.
    pub fn create(explicit: Option<&Path>, stem: &str) -> Result<RunDir, String> {
        if let Some(p) = explicit {
            if p.exists() {
                let occupied =
                    std::fs::read_dir(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))?.next().is_some();
                if occupied {
                    return Err(format!(
                        "{}: the run directory is not empty; pass --resume to continue that run, or choose another --run-dir",
                        p.display()
                    ));
                }
            }
            std::fs::create_dir_all(p).map_err(|e| format!("{}: cannot create: {e}", p.display()))?;
            return Ok(RunDir { path: p.to_path_buf() });
        }
        let root = Path::new("runs");
        std::fs::create_dir_all(root).map_err(|e| format!("{}: cannot create: {e}", root.display()))?;
        for n in 1..100_000 {
            let p = root.join(format!("{stem}-{n:03}"));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(RunDir { path: p }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("{}: cannot create: {e}", p.display())),
            }
        }
        Err(format!("{}: no free run directory name for {stem}", root.display()))
    }

    /// An existing run directory to resume.
    pub fn existing(p: &Path) -> Result<RunDir, String> {
        if !p.join(crate::checkpoint::STATE_FILE).is_file() {
            return Err(format!(
                "{}: no resume state here ({} is missing)",
                p.display(),
                crate::checkpoint::STATE_FILE
            ));
        }
        Ok(RunDir { path: p.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}
