//! Who computes the shard gradients of a step: this process (`LocalEngine`), or workers
//! elsewhere (the cluster implements `Engine` over the network).

use crate::spare_core::SpareCore;
use crate::EngineError;
use dtrain_data::{Dataset, Labels};
use dtrain_nn::{Mode, Sequential, ShardStats, Targets, Workspace};
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

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

    /// A hint: `batch` comes next. The local engine gathers its rows on a spare core meanwhile,
    /// or starts loading them into cache.
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
        self.gradient_streamed(model, data, params, idx, None, mode, grad, &mut |_, _| {})
    }

    /// As `gradient`, with the features of rows `idx` already gathered into `gathered` when
    /// it is `Some` (`idx.len()` rows of the input width, as `Dataset::gather` writes them),
    /// handing each part of `grad` to `ready` as soon as it is final (see
    /// `Sequential::gradient_streamed`).
    #[allow(clippy::too_many_arguments)]
    pub fn gradient_streamed<'g>(
        &mut self,
        model: &Sequential,
        data: &Dataset,
        params: &[f32],
        idx: &[u32],
        gathered: Option<&[f32]>,
        mode: Mode,
        grad: &'g mut [f32],
        ready: &mut dyn FnMut(usize, &'g [f32]),
    ) -> ShardStats {
        if idx.is_empty() {
            grad.fill(0.0);
            ready(0, grad);
            return ShardStats::default();
        }
        let x = match gathered {
            Some(rows) => {
                ArrayView2::from_shape((idx.len(), data.width()), rows).expect("gathered rows have the input width")
            }
            None => gather_rows(data, idx, &mut self.x),
        };
        let targets = gather_targets(data, idx, &mut self.classes, &mut self.values);
        model.gradient_streamed(params, x, targets, mode, &mut self.ws, grad, ready)
    }

    /// `gradient_streamed` of several shards layer by layer (`Sequential::gradients_streamed`):
    /// shard `s` is all of `shards[s].0`'s rows at `shards[s].1`, with `buffers[s]`, into
    /// `grads[s]`; `ready(from, parts)` gets each shard's final `grads[s][from..to]`, in shard
    /// order, for falling `from`. A shard without rows has a zero gradient, handed over in the
    /// same parts as the others'.
    pub fn gradients_streamed<'g>(
        model: &Sequential,
        buffers: &mut [ShardBuffers],
        shards: &[(&Dataset, Mode)],
        params: &[f32],
        grads: Vec<&'g mut [f32]>,
        ready: &mut dyn FnMut(usize, Vec<&'g [f32]>),
    ) -> Vec<ShardStats> {
        let mut passes = vec![];
        // Per shard: where its pass is among `passes`, or its zero gradient.
        let mut place: Vec<Result<usize, &'g [f32]>> = vec![];
        for ((buffers, &(data, mode)), grad) in buffers.iter_mut().zip(shards).zip(grads) {
            if data.is_empty() {
                grad.fill(0.0);
                place.push(Err(&*grad));
                continue;
            }
            let ShardBuffers { ws, x, classes, values } = buffers;
            let idx: Vec<u32> = (0..data.len() as u32).collect();
            let rows = gather_rows(data, &idx, x);
            let targets = gather_targets(data, &idx, classes, values);
            place.push(Ok(passes.len()));
            passes.push(dtrain_nn::ShardPass { x: rows, targets, mode, ws, grads: grad });
        }
        if passes.is_empty() {
            ready(0, place.iter().filter_map(|p| p.err()).collect());
            return shards.iter().map(|_| ShardStats::default()).collect();
        }
        let mut with_zeros = |from: usize, parts: Vec<&'g [f32]>| {
            let len = parts.first().map_or(0, |p| p.len());
            let all = place.iter().map(|p| match p {
                Ok(i) => parts[*i],
                Err(zeros) => &zeros[from..from + len],
            });
            ready(from, all.collect());
        };
        let mut computed = model.gradients_streamed(params, passes, &mut with_zeros).into_iter();
        place
            .iter()
            .map(|p| if p.is_ok() { computed.next().unwrap_or_default() } else { ShardStats::default() })
            .collect()
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
pub(crate) fn gather_rows<'a>(data: &Dataset, idx: &[u32], buf: &'a mut Vec<f32>) -> ArrayView2<'a, f32> {
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
    lookahead: Option<Lookahead>,
}

/// Gathers the next batch's features on a spare core while the current step computes, as
/// tf.data's prefetch or PyTorch's DataLoader workers do: a shuffled epoch reads rows scattered
/// over the whole dataset, and waiting on memory for them was a tenth of the seed job's step.
struct Lookahead {
    /// Gathers the batch in its slot: the one `Engine::prefetch` announced last.
    spare: SpareCore<Gathered>,
    /// The batch announced before, gathered.
    ready: Gathered,
    /// Steps that found their batch gathered.
    hits: u64,
}

#[derive(Default)]
struct Gathered {
    batch: Vec<u32>,
    x: Vec<f32>,
}

impl Gathered {
    fn gather(&mut self, data: &Dataset) {
        self.x.resize(self.batch.len() * data.width(), 0.0);
        // The prefetches go out together, so the rows' cache misses overlap.
        data.prefetch(&self.batch);
        data.gather(&self.batch, &mut self.x);
    }

    /// The features of `batch`, if these are they.
    fn rows_of(&self, batch: &[u32]) -> Option<&[f32]> {
        (!batch.is_empty() && self.batch == batch).then_some(&self.x[..])
    }
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
        Ok(LocalEngine { model, data, seed, pool, buffers: vec![], grads: vec![], lookahead: None })
    }

    /// Gathers each announced batch (`Engine::prefetch`) on a thread of its own while the
    /// step before it computes; for a machine with a core more than the shards computed at
    /// once. `data` is the engine's dataset, shared with that thread.
    ///
    /// # Panics
    /// When `data` is not the dataset the engine was made with.
    pub fn with_lookahead(mut self, data: &Arc<Dataset>) -> Result<Self, EngineError> {
        assert!(std::ptr::eq(&**data, self.data), "the lookahead gathers from the engine's own dataset");
        let data = Arc::clone(data);
        let spare = SpareCore::new("dtrain-gather", Gathered::default(), move |g: &mut Gathered| g.gather(&data))
            .map_err(EngineError::GatherThread)?;
        self.lookahead = Some(Lookahead { spare, ready: Gathered::default(), hits: 0 });
        Ok(self)
    }

    /// How many steps found their batch gathered ahead (0 without `with_lookahead`).
    pub fn batches_gathered_ahead(&self) -> u64 {
        self.lookahead.as_ref().map_or(0, |a| a.hits)
    }
}

impl Engine for LocalEngine<'_> {
    fn prefetch(&mut self, batch: &[u32]) {
        match &mut self.lookahead {
            Some(Lookahead { spare, ready, .. }) => spare.post(|slot| {
                // The slot holds the batch announced before, which comes now: it becomes
                // `ready`, and the slot takes this one.
                std::mem::swap(slot, ready);
                slot.batch.clear();
                slot.batch.extend_from_slice(batch);
            }),
            None => self.data.prefetch(batch),
        }
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
        let width = data.width();
        let gathered = self.lookahead.as_mut().and_then(|a| {
            let rows = a.ready.rows_of(batch);
            a.hits += u64::from(rows.is_some());
            rows
        });
        let job = |((buf, grad), r): ((&mut ShardBuffers, &mut [f32]), &Range<usize>)| {
            let mode = Mode::Train { seed, step, first_position: r.start as u32, global_batch };
            let rows = gathered.map(|x| &x[r.start * width..r.end * width]);
            buf.gradient_streamed(model, data, params, &batch[r.clone()], rows, mode, grad, &mut |_, _| {})
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

#[cfg(test)]
mod tests {
    use super::*;
    use dtrain_data::Features;
    use dtrain_nn::{Activation, DenseSpec, LayerSpec, Loss, LossKind};

    fn data() -> Dataset {
        let n = 40;
        let x: Vec<u8> = (0..n * 6).map(|i| (i * 37 % 251) as u8).collect();
        let y: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
        Dataset::new(Features::U8(x), vec![6], Labels::Classes(y)).unwrap().with_rescale(1.0 / 255.0)
    }

    /// 6 inputs, Dense 8 (ReLU), Dropout 0.5, Dense 3 (softmax).
    fn model() -> Sequential {
        let dense = |units, activation| LayerSpec::Dense(DenseSpec { activation, ..DenseSpec::new(units) });
        let layers =
            [dense(8, Activation::Relu), LayerSpec::Dropout { rate: 0.5, seed: None }, dense(3, Activation::Softmax)];
        Sequential::new(&[6], &layers, Loss { kind: LossKind::SparseCategoricalCrossentropy, from_logits: false })
            .unwrap()
    }

    #[test]
    fn gathering_ahead_gives_the_same_gradients() {
        let model = model();
        let params = model.init_params(7);
        let batches: Vec<Vec<u32>> = (0..6u32).map(|b| (0..10).map(|i| (b * 13 + i * 7) % 40).collect()).collect();
        // What the trainer announces before each step; step 3's announcement is wrong (a
        // rollback changes the plan), so step 4 gathers its own rows.
        let announced =
            |b: usize| if b == 3 { batches[0].clone() } else { batches.get(b + 1).cloned().unwrap_or_default() };
        let shared = Arc::new(data());
        let run = |mut engine: LocalEngine, shards: usize| {
            let mut grads = vec![];
            for (b, batch) in batches.iter().enumerate() {
                engine.prefetch(&announced(b));
                let mut g = vec![0.0; model.num_params()];
                let stats =
                    engine.gradients(&params, b as u64, batch, &shard_ranges(10, shards), &mut g, &mut || {}).unwrap();
                grads.push((g, stats));
            }
            (grads, engine.batches_gathered_ahead())
        };
        for (threads, shards) in [(1, 1), (2, 2), (1, 3)] {
            let (plain, none) = run(LocalEngine::new(&model, &shared, 5, threads).unwrap(), shards);
            let ahead = LocalEngine::new(&model, &shared, 5, threads).unwrap().with_lookahead(&shared).unwrap();
            let (ahead, hits) = run(ahead, shards);
            assert_eq!(none, 0);
            // Steps 1, 2, 3 and 5 find their rows gathered; step 0 (nothing announced) and step 4 do not.
            assert_eq!(hits, 4, "{threads} threads, {shards} shards");
            for ((g, s), (h, t)) in plain.iter().zip(&ahead) {
                assert_eq!(
                    g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    h.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                assert_eq!(s, t);
            }
        }
    }
    /// Shards streamed side by side, one of them without rows: each shard's gradient and sums
    /// are those `gradient` gives it alone, the empty one's zeros, and every part holds every
    /// shard's values in shard order.
    #[test]
    fn shards_side_by_side_give_each_its_own_gradient_and_an_empty_one_zeros() {
        let model = model();
        let params = model.init_params(7);
        let all = data();
        let shards = [all.subset(&[3, 9, 14, 20]), all.subset(&[]), all.subset(&[1, 2, 33])];
        let mode = |first| Mode::Train { seed: 5, step: 4, first_position: first, global_batch: 7 };
        let modes: Vec<(&Dataset, Mode)> = shards.iter().zip([0, 4, 4]).map(|(d, f)| (d, mode(f))).collect();
        let alone: Vec<(Vec<f32>, ShardStats)> = modes
            .iter()
            .map(|&(d, m)| {
                let mut g = vec![f32::NAN; params.len()];
                let idx: Vec<u32> = (0..d.len() as u32).collect();
                let stats = ShardBuffers::default().gradient(&model, d, &params, &idx, m, &mut g);
                (g, stats)
            })
            .collect();
        let mut grads = vec![vec![f32::NAN; params.len()]; 3];
        let mut buffers = vec![ShardBuffers::default(), ShardBuffers::default(), ShardBuffers::default()];
        let mut parts: Vec<(usize, Vec<Vec<f32>>)> = vec![];
        let mut ready = |from: usize, p: Vec<&[f32]>| parts.push((from, p.iter().map(|v| v.to_vec()).collect()));
        let views: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
        let stats = ShardBuffers::gradients_streamed(&model, &mut buffers, &modes, &params, views, &mut ready);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for ((g, s), (want, want_stats)) in grads.iter().zip(&stats).zip(&alone) {
            assert_eq!(bits(g), bits(want));
            assert_eq!(s, want_stats);
        }
        assert!(grads[1].iter().all(|&v| v.to_bits() == 0), "the empty shard's gradient is +0");
        assert_eq!(parts.iter().map(|(from, _)| *from).collect::<Vec<_>>(), [6 * 8 + 8, 0]);
        let mut end = params.len();
        for (from, p) in &parts {
            assert_eq!(p.len(), 3, "every shard in every part");
            for (part, g) in p.iter().zip(&grads) {
                assert_eq!(bits(part), bits(&g[*from..end]));
            }
            end = *from;
        }
    }
}
