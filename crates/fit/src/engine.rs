//! Who computes the shard gradients of a step: this process (`LocalEngine`), or workers
//! elsewhere (the cluster implements `Engine` over the network).

use crate::EngineError;
use dtrain_data::{Dataset, Labels};
use dtrain_nn::{Mode, Sequential, ShardStats, Targets, Workspace};
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;
use std::ops::Range;

/// The contiguous shards of a batch of `len` samples: shard k is `[k*len/S, (k+1)*len/S)`.
pub fn shard_ranges(len: usize, shards: usize) -> Vec<Range<usize>> {
    (0..shards).map(|k| k * len / shards..(k + 1) * len / shards).collect()
}

/// An engine's account of an epoch: a line for the log, and scalars for TensorBoard.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochReport {
    /// The line (the cluster line).
    pub line: String,
    /// Tag and value, per epoch (e.g. `cluster/step_ms`).
    pub scalars: Vec<(&'static str, f32)>,
}

/// Computes the summed shard gradients of a step; in this process or on workers.
pub trait Engine {
    /// Writes to `grad` (the model's size) the sum of the shards' gradients, where shard k is
    /// `shards[k]` of `batch` (sample indices) at step `step`, scaled by 1 / batch.len(), and
    /// an empty shard counts as zeros. The sum is `dtrain_nn::simd::sum_into` over the shards
    /// in shard order, never arrival order, so it has the same bits whoever computed them.
    /// Returns each shard's sums. `meanwhile` is the caller's work that does not need the
    /// gradients (the weight penalty); it runs exactly once, while the engine waits on others
    /// if it does.
    fn gradients(
        &mut self,
        params: &[f32],
        step: u64,
        batch: &[u32],
        shards: &[Range<usize>],
        grad: &mut [f32],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<ShardStats>, EngineError>;

    /// Whether other processes compute the shards while `gradients` waits. Then the step
    /// computes the weight penalty in `meanwhile`, off the critical path; otherwise after
    /// `gradients`, folded into the gradient in one pass over the weights.
    fn waits_on_others(&self) -> bool {
        false
    }

    /// A hint: `batch` comes next. The local engine starts loading its rows into cache.
    fn prefetch(&mut self, _batch: &[u32]) {}

    /// What the epoch that just ended looked like (workers, step times, bytes), if anything.
    fn epoch_report(&mut self) -> Option<EpochReport> {
        None
    }

    /// Steps between the states the trainer keeps in memory so that `EngineError::Rollback`
    /// can be undone; `None`: this engine never asks for a rollback.
    fn snapshot_every(&self) -> Option<u64> {
        None
    }
}

/// Buffers one shard computation reuses from step to step.
#[derive(Default)]
pub struct ShardBuffers {
    ws: Workspace,
    x: Vec<f32>,
    classes: Vec<u32>,
    values: Vec<f32>,
}

impl ShardBuffers {
    /// Gathers the rows `idx` of `data` and computes their gradient into `grad`; `mode` says
    /// where the rows sit in the step's global batch.
    pub fn gradient(
        &mut self,
        model: &Sequential,
        data: &Dataset,
        params: &[f32],
        idx: &[u32],
        mode: Mode,
        grad: &mut [f32],
    ) -> ShardStats {
        if idx.is_empty() {
            grad.fill(0.0);
            return ShardStats::default();
        }
        let x = gather_rows(data, idx, &mut self.x);
        let targets = gather_targets(data, idx, &mut self.classes, &mut self.values);
        model.gradient(params, x, targets, mode, &mut self.ws, grad)
    }

    /// Loss and accuracy of rows `idx` with dropout off.
    pub fn evaluate(&mut self, model: &Sequential, data: &Dataset, params: &[f32], idx: &[u32]) -> ShardStats {
        let x = gather_rows(data, idx, &mut self.x);
        let targets = gather_targets(data, idx, &mut self.classes, &mut self.values);
        model.evaluate(params, x, targets, &mut self.ws)
    }

    /// Model outputs for rows `idx`, written to `out` (rows x output width).
    pub fn predict(
        &mut self,
        model: &Sequential,
        data: &Dataset,
        params: &[f32],
        idx: &[u32],
        mut out: ArrayViewMut2<f32>,
    ) {
        let x = gather_rows(data, idx, &mut self.x);
        model.forward(params, x, Mode::Infer, &mut self.ws);
        out.assign(&model.output(&self.ws));
    }
}

/// The features of rows `idx` of `data`, gathered into `buf` and viewed as a matrix.
fn gather_rows<'a>(data: &Dataset, idx: &[u32], buf: &'a mut Vec<f32>) -> ArrayView2<'a, f32> {
    let w = data.width();
    buf.resize(idx.len() * w, 0.0);
    data.gather(idx, buf);
    ArrayView2::from_shape((idx.len(), w), buf).expect("gathered rows have the input width")
}

fn gather_targets<'a>(data: &Dataset, idx: &[u32], classes: &'a mut Vec<u32>, values: &'a mut Vec<f32>) -> Targets<'a> {
    match &data.labels {
        Labels::Classes(c) => {
            classes.clear();
            classes.extend(idx.iter().map(|&i| c[i as usize]));
            Targets::Classes(classes)
        }
        Labels::Values { data: v, width } => {
            values.clear();
            for &i in idx {
                values.extend_from_slice(&v[i as usize * width..][..*width]);
            }
            Targets::Values(ArrayView2::from_shape((idx.len(), *width), values).expect("gathered targets"))
        }
    }
}

/// Computes every shard in this process, concurrently, each with one BLAS thread.
pub struct LocalEngine<'a> {
    model: &'a Sequential,
    data: &'a Dataset,
    seed: u64,
    pool: Option<rayon::ThreadPool>,
    buffers: Vec<ShardBuffers>,
    /// Each shard's gradient, when there are several to sum.
    grads: Vec<Vec<f32>>,
}

impl<'a> LocalEngine<'a> {
    /// `threads`: how many shards run at once (1 computes them in order on this thread).
    pub fn new(model: &'a Sequential, data: &'a Dataset, seed: u64, threads: usize) -> Result<Self, EngineError> {
        dtrain_nn::set_blas_threads(1);
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("dtrain-shard-{i}"))
                    .build()
                    .map_err(|cause| EngineError::Threads { threads, cause })?,
            )
        } else {
            None
        };
        Ok(LocalEngine { model, data, seed, pool, buffers: vec![], grads: vec![] })
    }
}

impl Engine for LocalEngine<'_> {
    fn prefetch(&mut self, batch: &[u32]) {
        self.data.prefetch(batch);
    }

    fn gradients(
        &mut self,
        params: &[f32],
        step: u64,
        batch: &[u32],
        shards: &[Range<usize>],
        grad: &mut [f32],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<ShardStats>, EngineError> {
        self.buffers.resize_with(shards.len(), ShardBuffers::default);
        let (model, data, seed) = (self.model, self.data, self.seed);
        let global_batch = batch.len() as u32;
        let job = |((buf, grad), r): ((&mut ShardBuffers, &mut [f32]), &Range<usize>)| {
            let mode = Mode::Train { seed, step, first_position: r.start as u32, global_batch };
            buf.gradient(model, data, params, &batch[r.clone()], mode, grad)
        };
        // One shard is computed straight into `grad`; several into their own buffers, then summed.
        let mut outs: Vec<&mut [f32]> = if shards.len() == 1 {
            vec![grad]
        } else {
            self.grads.resize_with(shards.len(), || vec![0.0; model.num_params()]);
            self.grads.iter_mut().map(|g| &mut g[..]).collect()
        };
        let work = self.buffers.iter_mut().zip(outs.iter_mut().map(|g| &mut **g)).zip(shards.iter());
        let stats = match &self.pool {
            Some(pool) => {
                let items: Vec<_> = work.collect();
                pool.install(|| items.into_par_iter().map(job).collect())
            }
            None => work.map(job).collect(),
        };
        meanwhile();
        if shards.len() > 1 {
            let parts: Vec<_> = self.grads.iter().map(|g| dtrain_nn::simd::Part::Own(&g[..])).collect();
            dtrain_nn::simd::sum_into(grad, &parts);
        }
        Ok(stats)
    }
}
