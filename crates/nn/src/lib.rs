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
pub mod simd;
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

/// The OpenBLAS kernel dtrain pins when `OPENBLAS_CORETYPE` is not set: the same kernel on
/// every node gives the same bits on every node (design.md), and OpenBLAS 0.3.21 falls back
/// to its slow Prescott kernel on CPUs newer than it knows. Haswell's AVX2/FMA kernel runs on
/// any x86-64 CPU that has those instructions.
pub fn default_coretype() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return Some("Haswell");
    }
    None
}

/// Restarts this program with OpenBLAS configured for dtrain unless the environment already
/// says: `OPENBLAS_CORETYPE` pinned (see `default_coretype`) and `OPENBLAS_NUM_THREADS=1`, since
/// every shard runs with one BLAS thread and OpenBLAS's idle pool threads otherwise spin on
/// `sched_yield`, taking a core from the shard threads. OpenBLAS reads both when it is loaded,
/// before `main`, so the only way to set them from the program is to exec again. Returns only
/// if nothing needed doing or the exec failed (then OpenBLAS's defaults stand, with a warning).
pub fn reexec_with_pinned_blas() {
    use std::os::unix::process::CommandExt;
    let mut set: Vec<(&str, &str)> = Vec::new();
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
        set.extend(default_coretype().map(|c| ("OPENBLAS_CORETYPE", c)));
    }
    if std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        set.push(("OPENBLAS_NUM_THREADS", "1"));
    }
    let Ok(exe) = std::env::current_exe() else { return };
    if set.is_empty() {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe).arg0(arg0).args(args).envs(set.iter().copied()).exec();
    eprintln!("warning: could not restart with {set:?} ({err}); using OpenBLAS's defaults");
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
