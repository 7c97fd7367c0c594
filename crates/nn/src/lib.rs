//! dtrain-nn: the numeric core. Tensors on ndarray with BLAS, Keras's layers, activations,
//! initializers, regularizers, constraints and losses, and the Sequential model's forward
//! and backward pass on one shard of a batch.

// Links OpenBLAS (Debian's libopenblas through pkg-config) for ndarray's matrix products.
extern crate blas_src;

pub mod activation;
pub mod constraint;
pub mod init;
pub mod kernel;
pub mod layer;
pub mod loss;
pub mod model;
pub mod product;
pub mod regularizer;
pub mod rng;
pub mod simd;
mod summary;

pub use activation::Activation;
pub use constraint::Constraint;
pub use init::Initializer;
pub use layer::{DenseSpec, LayerSpec};
pub use loss::{Loss, LossKind, Target};
pub use model::{LayerInfo, Mode, Sequential, ShardPass, ShardStats, Targets, TfBatch, Variable, Workspace};
pub use regularizer::{PenaltySums, Regularizer};
pub use summary::thousands;

#[derive(Debug, thiserror::Error)]
/// Why a model cannot be built.
pub enum NnError {
    #[error("{0}")]
    /// The model's layers do not fit together, as the message says.
    Model(String),
}

/// Makes this thread flush subnormal floats to zero (FTZ and DAZ), as TensorFlow does in its
/// compute threads. Without it, weights and gradients that decay into the subnormal range make
/// every multiply take a microcode assist (epochs of the wide model slowed down 2-3x), and
/// results would depend on which thread ran what. Idempotent and cheap: every pass calls it.
#[inline]
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes this thread's SSE control register; bits 15 (FTZ) and 6 (DAZ)
    // only change how subnormal values are treated.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        let csr = _mm_getcsr();
        if csr & 0x8040 != 0x8040 {
            _mm_setcsr(csr | 0x8040);
        }
    }
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
