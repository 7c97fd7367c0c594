//! Keras's optimizers over one flat parameter buffer, with their state as an explicit record.

use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::ops::Range;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Algorithm {
    Sgd { momentum: f64, nesterov: bool },
    Adam { beta_1: f64, beta_2: f64, epsilon: f64, amsgrad: bool },
    Rmsprop { rho: f64, momentum: f64, epsilon: f64, centered: bool },
    Adagrad { initial_accumulator_value: f32, epsilon: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LearningRate {
    Constant(f32),
    Schedule(Schedule),
}

/// Gradient clipping; Keras allows at most one kind per optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Clip {
    /// Each variable's gradient scaled to an L2 norm of at most this.
    Norm(f32),
    /// All gradients scaled together to a global L2 norm of at most this.
    GlobalNorm(f32),
    /// Each element clipped to [-v, v].
    Value(f32),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub algorithm: Algorithm,
    pub learning_rate: LearningRate,
    /// Decoupled weight decay (AdamW's, or any optimizer's `weight_decay=`).
    pub weight_decay: Option<f32>,
    pub clip: Option<Clip>,
}

/// Everything an optimizer carries between steps; saved in the resume checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// Completed updates (Keras's `optimizer.iterations`).
    pub iterations: u64,
    /// A learning rate set at run time (ReduceLROnPlateau); replaces a constant rate.
    pub lr_override: Option<f32>,
    /// Named slot buffers, each the size of the parameters (Adam: `m`, `v`, ...).
    pub slots: Vec<(String, Vec<f32>)>,
}

#[derive(Clone, Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: OptimizerState,
}

impl OptimizerConfig {
    fn slot_names(&self) -> Vec<&'static str> {
        match self.algorithm {
            Algorithm::Sgd { momentum, .. } if momentum != 0.0 => vec!["momentum"],
            Algorithm::Sgd { .. } => vec![],
            Algorithm::Adam { amsgrad: false, .. } => vec!["m", "v"],
            Algorithm::Adam { amsgrad: true, .. } => vec!["m", "v", "v_hat"],
            Algorithm::Rmsprop { momentum, centered, .. } => {
                let mut s = vec!["velocity"];
                if momentum > 0.0 {
                    s.push("momentum");
                }
                if centered {
                    s.push("average_gradient");
                }
                s
            }
            Algorithm::Adagrad { .. } => vec!["accumulator"],
        }
    }
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, num_params: usize) -> Self {
        let init = match config.algorithm {
            Algorithm::Adagrad { initial_accumulator_value, .. } => initial_accumulator_value,
            _ => 0.0,
        };
        let slots = config.slot_names().into_iter().map(|n| (n.to_string(), vec![init; num_params])).collect();
        Optimizer { config, state: OptimizerState { iterations: 0, lr_override: None, slots } }
    }

    /// Restores a saved state; `Err` says what does not match this optimizer.
    pub fn with_state(config: OptimizerConfig, state: OptimizerState, num_params: usize) -> Result<Self, String> {
        let want = config.slot_names();
        let have: Vec<&str> = state.slots.iter().map(|(n, _)| n.as_str()).collect();
        if want != have {
            return Err(format!("optimizer slots {have:?} do not match this optimizer's {want:?}"));
        }
        if let Some((n, _)) = state.slots.iter().find(|(_, s)| s.len() != num_params) {
            return Err(format!("optimizer slot {n} does not have the model's {num_params} parameters"));
        }
        Ok(Optimizer { config, state })
    }

    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The learning rate the next update will use.
    pub fn learning_rate(&self) -> f32 {
        match (&self.config.learning_rate, self.state.lr_override) {
            (_, Some(lr)) => lr,
            (LearningRate::Constant(lr), None) => *lr,
            (LearningRate::Schedule(s), None) => s.at(self.state.iterations),
        }
    }

    /// Sets the learning rate (ReduceLROnPlateau); only meaningful without a schedule.
    pub fn set_learning_rate(&mut self, lr: f32) {
        self.state.lr_override = Some(lr);
    }

    /// One update, in Keras's order: clip the gradients, decay the weights, update.
    /// `vars` are the variables' ranges in the buffers (for per-variable clipping).
    /// Constraints are the caller's, right after this.
    pub fn apply(&mut self, params: &mut [f32], grads: &mut [f32], vars: &[Range<usize>]) {
        if let Some(clip) = self.config.clip {
            clip_gradients(clip, grads, vars);
        }
        let lr = self.learning_rate();
        let t = self.state.iterations + 1;
        let slots: Vec<&mut [f32]> = self.state.slots.iter_mut().map(|(_, s)| s.as_mut_slice()).collect();
        update_split(&self.config.algorithm, self.config.weight_decay, lr, t, params, grads, slots);
        self.state.iterations = t;
    }
}

/// `update` on halves in parallel for long vectors: every element's update depends on that
/// element alone, so the split never changes a bit.
fn update_split(
    algorithm: &Algorithm,
    weight_decay: Option<f32>,
    lr: f32,
    t: u64,
    params: &mut [f32],
    grads: &[f32],
    mut slots: Vec<&mut [f32]>,
) {
    if params.len() < dtrain_nn::simd::PARALLEL_MIN {
        return update(algorithm, weight_decay, lr, t, params, grads, &mut slots);
    }
    let mid = params.len() / 2;
    let (p0, p1) = params.split_at_mut(mid);
    let (g0, g1) = grads.split_at(mid);
    let (s0, s1): (Vec<_>, Vec<_>) = slots.into_iter().map(|s| s.split_at_mut(mid)).unzip();
    rayon::join(
        || update_split(algorithm, weight_decay, lr, t, p0, g0, s0),
        || update_split(algorithm, weight_decay, lr, t, p1, g1, s1),
    );
}

dtrain_nn::avx2_dispatch! {
    /// Weight decay and the update of `algorithm`, for update number `t` (1-based).
    fn update(
        algorithm: &Algorithm,
        weight_decay: Option<f32>,
        lr: f32,
        t: u64,
        params: &mut [f32],
        grads: &[f32],
        slots: &mut [&mut [f32]],
    ) {
            if let Some(wd) = weight_decay {
                params.iter_mut().for_each(|w| *w -= *w * wd * lr);
            }
            match *algorithm {
                Algorithm::Sgd { momentum, nesterov } => {
                    if momentum == 0.0 {
                        params.iter_mut().zip(grads.iter()).for_each(|(w, g)| *w -= g * lr);
                    } else {
                        let mu = momentum as f32;
                        let m = &mut *slots[0];
                        for ((w, &g), m) in params.iter_mut().zip(grads.iter()).zip(m.iter_mut()) {
                            *m = *m * mu - g * lr;
                            *w += if nesterov { *m * mu - g * lr } else { *m };
                        }
                    }
                }
                Algorithm::Adam { beta_1, beta_2, epsilon, amsgrad } => {
                    let step = t as f32;
                    let b1p = (beta_1 as f32).powf(step);
                    let b2p = (beta_2 as f32).powf(step);
                    let alpha = lr * (1.0 - b2p).sqrt() / (1.0 - b1p);
                    let (one_b1, one_b2, eps) = ((1.0 - beta_1) as f32, (1.0 - beta_2) as f32, epsilon as f32);
                    let [m, v, rest @ ..] = slots else { unreachable!("Adam has m and v") };
                    let moments = params.iter_mut().zip(grads.iter()).zip(m.iter_mut().zip(v.iter_mut()));
                    if amsgrad {
                        let v_hat = &mut rest[0];
                        for (((w, &g), (m, v)), vh) in moments.zip(v_hat.iter_mut()) {
                            *m += (g - *m) * one_b1;
                            *v += (g * g - *v) * one_b2;
                            *vh = vh.max(*v);
                            *w -= *m * alpha / (vh.sqrt() + eps);
                        }
                    } else {
                        for ((w, &g), (m, v)) in moments {
                            *m += (g - *m) * one_b1;
                            *v += (g * g - *v) * one_b2;
                            *w -= *m * alpha / (v.sqrt() + eps);
                        }
                    }
                }
                Algorithm::Rmsprop { rho, momentum, epsilon, .. } => {
                    let (r, one_r, eps, mu) = (rho as f32, (1.0 - rho) as f32, epsilon as f32, momentum as f32);
                    let [vel, rest @ ..] = slots else { unreachable!("RMSprop has a velocity") };
                    let (mut mom, rest) = match rest {
                        [m, rest @ ..] if momentum > 0.0 => (Some(m), rest),
                        rest => (None, rest),
                    };
                    let mut avg = rest.first_mut();
                    for i in 0..params.len() {
                        let g = grads[i];
                        vel[i] = r * vel[i] + one_r * (g * g);
                        let denom = match avg.as_deref_mut() {
                            Some(a) => {
                                a[i] = r * a[i] + one_r * g;
                                vel[i] - a[i] * a[i] + eps
                            }
                            None => vel[i] + eps,
                        };
                        let inc = lr * g / denom.sqrt();
                        match mom.as_deref_mut() {
                            Some(m) => {
                                m[i] = mu * m[i] + inc;
                                params[i] -= m[i];
                            }
                            None => params[i] -= inc,
                        }
                    }
                }
                Algorithm::Adagrad { epsilon, .. } => {
                    let eps = epsilon as f32;
                    let acc = &mut *slots[0];
                    for i in 0..params.len() {
                        let g = grads[i];
                        acc[i] += g * g;
                        params[i] -= lr * g / (acc[i] + eps).sqrt();
                    }
                }
            }
    }
}

/// Sum of squares in f64 over eight interleaved accumulators (fixed order, vectorizable).
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(a, &v)| *a += f64::from(v) * f64::from(v));
    }
    (acc.iter().sum::<f64>() + tail) as f32
}

/// Keras's `clip_by_norm`, `clip_by_global_norm` and `clipvalue`.
fn clip_gradients(clip: Clip, grads: &mut [f32], vars: &[Range<usize>]) {
    match clip {
        Clip::Value(c) => grads.iter_mut().for_each(|g| *g = g.clamp(-c, c)),
        Clip::Norm(c) => {
            for r in vars {
                let g = &mut grads[r.clone()];
                let l2 = sum_sq(g);
                let norm = if l2 > 0.0 { l2.sqrt() } else { l2 };
                let denom = norm.max(c);
                g.iter_mut().for_each(|v| *v = *v * c / denom);
            }
        }
        Clip::GlobalNorm(c) => {
            let norm = vars.iter().map(|r| sum_sq(&grads[r.clone()])).sum::<f32>().sqrt();
            // Keras adds (norm - norm) so that a NaN or infinite norm poisons every gradient.
            let nan_if_not_finite = if norm.is_finite() { 0.0 } else { f32::NAN };
            let scale = c * (1.0 / norm).min(1.0 / c) + nan_if_not_finite;
            grads.iter_mut().for_each(|g| *g *= scale);
        }
    }
}
