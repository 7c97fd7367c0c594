//! dtrain-fit: the job file, the training loop (Keras's `fit`), callbacks, history,
//! checkpoints and the run directory, over any `Engine` that computes shard gradients.

pub mod build;
pub mod callbacks;
pub mod checkpoint;
pub mod config;
pub mod curves;
pub mod dataload;
pub mod engine;
pub mod evaluate;
pub mod logs;
pub mod metrics;
pub mod progress;
pub mod run;
pub mod session;
pub mod step;
pub mod trainer;

pub use build::Job;
pub use engine::{shard_ranges, Engine, LocalEngine};
pub use progress::{Console, LogFormat, Observer, Report};

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Checkpoint(String),
    #[error("{0}")]
    Engine(String),
    #[error("loss became {loss} at epoch {epoch}, batch {batch}; training stopped, the last saved state and weights are kept")]
    NonFinite { epoch: usize, batch: usize, loss: f32 },
    #[error(
        "interrupted at epoch {epoch}, batch {batch}; the state is saved: continue with --resume --run-dir {run_dir}"
    )]
    Interrupted { epoch: usize, batch: usize, run_dir: String },
}
