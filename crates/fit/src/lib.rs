//! dtrain-fit: the job file, the training loop (Keras's `fit`), callbacks, history,
//! checkpoints and the run directory, over any `Engine` that computes shard gradients.

pub mod boards;
pub mod build;
pub mod callbacks;
pub mod checkpoint;
pub mod config;
pub mod curves;
pub mod dataload;
pub mod engine;
mod error;
pub mod evaluate;
pub mod keras;
pub mod keras_archive;
pub mod logging;
pub mod logs;
pub mod metrics;
pub mod progress;
pub mod run;
pub mod session;
mod spare_core;
pub mod step;
pub mod trainer;

pub use build::Job;
pub use engine::{shard_ranges, Engine, LocalEngine};
pub use progress::{Console, EpochTime, LogFormat, Observer, Report};

pub use error::{CheckpointError, EngineError, FitError, IoError};
