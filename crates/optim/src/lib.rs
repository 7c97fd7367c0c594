//! dtrain-optim: Keras's optimizers (SGD, Adam, AdamW, RMSprop, Adagrad), gradient clipping
//! and learning-rate schedules, over one flat parameter buffer, with explicit state records.

pub mod optimizer;
pub mod schedule;

pub use optimizer::{Algorithm, Clip, LearningRate, Optimizer, OptimizerConfig, OptimizerState, SlotError, Slots};
pub use schedule::Schedule;
