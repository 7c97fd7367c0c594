//! One optimizer step on a global batch, as design.md describes it: shard gradients summed in
//! shard order, weight penalties added once, clipping and the optimizer, then constraints.

use crate::engine::{shard_ranges, Engine};
use dtrain_nn::{Sequential, ShardStats};
use dtrain_optim::Optimizer;
use std::ops::Range;

/// Buffers reused from step to step.
pub struct Stepper {
    shards: usize,
    grad: Vec<f32>,
    /// The weight penalty's derivative, computed while other processes compute the shards.
    penalty_terms: Vec<f32>,
    ranges: Vec<Range<usize>>,
}

#[derive(Clone, Copy, Debug)]
/// What one step did.
pub struct StepOutcome {
    /// Keras's batch loss, at the weights before the update.
    pub loss: f32,
    /// The shards' sums.
    pub stats: ShardStats,
    /// False when the loss was not finite: then nothing was updated.
    pub applied: bool,
}

impl Stepper {
    /// Buffers for `model`'s steps with `shards` shards.
    pub fn new(model: &Sequential, shards: usize) -> Self {
        let p = model.num_params();
        Stepper {
            shards,
            grad: vec![0.0; p],
            penalty_terms: Vec::new(),
            ranges: model.variables().iter().map(|v| v.range()).collect(),
        }
    }

    /// Step number `step` on the samples `batch`; `Err` is the engine's.
    pub fn step(
        &mut self,
        model: &Sequential,
        engine: &mut dyn Engine,
        params: &mut [f32],
        optimizer: &mut Optimizer,
        step: u64,
        batch: &[u32],
    ) -> Result<StepOutcome, crate::EngineError> {
        let shards = shard_ranges(batch.len(), self.shards);
        let (per_shard, penalty) = if engine.waits_on_others() {
            let mut penalty = 0.0;
            self.penalty_terms.resize(params.len(), 0.0);
            let (now, terms) = (&*params, &mut self.penalty_terms);
            let mut meanwhile = || penalty = model.weight_penalty_terms(now, terms);
            let per_shard = engine.gradients(now, step, batch, &shards, &mut self.grad, &mut meanwhile)?;
            model.add_weight_penalty_terms(&self.penalty_terms, &mut self.grad);
            (per_shard, penalty)
        } else {
            let per_shard = engine.gradients(params, step, batch, &shards, &mut self.grad, &mut || {})?;
            (per_shard, model.weight_penalty_and_grad(params, &mut self.grad))
        };
        let mut stats = ShardStats::default();
        per_shard.iter().for_each(|s| stats.add(s));
        let bs = batch.len() as f64;
        let loss = (stats.loss_sum / bs + stats.activity / bs + penalty) as f32;
        if !loss.is_finite() {
            return Ok(StepOutcome { loss, stats, applied: false });
        }
        optimizer.apply(params, &mut self.grad, &self.ranges);
        model.apply_constraints(params);
        Ok(StepOutcome { loss, stats, applied: true })
    }
}
