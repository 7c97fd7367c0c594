//! dtrain-nn: the numeric core. Tensors on ndarray with BLAS, Keras's layers, activations,
//! initializers, regularizers, constraints and losses, and the Sequential model's forward
//! and backward pass on one shard of a batch.

// Links OpenBLAS (Debian's libopenblas through pkg-config) for ndarray's matrix products.
extern crate blas_src;

pub mod activation;
pub mod constraint;
pub mod init;
pub mod layer;
pub mod loss;
pub mod model;
pub mod regularizer;
pub mod rng;
mod summary;

pub use activation::Activation;
pub use constraint::Constraint;
pub use init::Initializer;
pub use layer::{DenseSpec, LayerSpec};
pub use loss::{Loss, LossKind, Target};
pub use model::{LayerInfo, Mode, Sequential, ShardStats, Targets, Variable, Workspace};
pub use regularizer::Regularizer;
pub use summary::thousands;

#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error("{0}")]
    Model(String),
}

extern "C" {
    fn openblas_set_num_threads(n: std::ffi::c_int);
}

/// Sets OpenBLAS's thread count. dtrain computes every shard with one BLAS thread, because a
/// product's last bits depend on the thread count (design.md); parallelism comes from shards.
pub fn set_blas_threads(n: usize) {
    // SAFETY: a plain setter in OpenBLAS, safe to call at any time from any thread.
    unsafe { openblas_set_num_threads(n.clamp(1, 64) as std::ffi::c_int) }
}
