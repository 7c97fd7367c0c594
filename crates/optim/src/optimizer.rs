//! Keras's optimizers over one flat parameter buffer, with their state as an explicit record.

use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::ops::Range;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// The update rule, with Keras's arguments.
pub enum Algorithm {
    /// SGD, with optional (Nesterov) momentum.
    Sgd {
        /// Velocity decay (0: plain SGD).
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// Adam (AdamW is Adam with weight decay), optionally amsgrad.
    Adam {
        /// Decay of the first moment.
        beta_1: f64,
        /// Decay of the second moment.
        beta_2: f64,
        /// Added to the denominator.
        epsilon: f64,
        /// Use the running maximum of the second moment.
        amsgrad: bool,
    },
    /// RMSprop, optionally with momentum and centered.
    Rmsprop {
        /// Decay of the mean square.
        rho: f64,
        /// Momentum (0: none).
        momentum: f64,
        /// Added inside the square root.
        epsilon: f64,
        /// Subtract the squared mean gradient.
        centered: bool,
    },
    /// Adagrad.
    Adagrad {
        /// The accumulator's starting value.
        initial_accumulator_value: f32,
        /// Added inside the square root.
        epsilon: f64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// A fixed learning rate or a schedule of the step.
pub enum LearningRate {
    /// The same rate at every step.
    Constant(f32),
    /// A rate that depends on the step (Keras's `LearningRateSchedule`).
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
/// An optimizer as the job describes it: algorithm, learning rate, weight decay, clipping.
pub struct OptimizerConfig {
    /// The update rule.
    pub algorithm: Algorithm,
    /// The learning rate or its schedule.
    pub learning_rate: LearningRate,
    /// Decoupled weight decay (AdamW's, or any optimizer's `weight_decay=`).
    pub weight_decay: Option<f32>,
    /// Gradient clipping, if any.
    pub clip: Option<Clip>,
}

/// Everything an optimizer carries between steps; saved in the resume checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// Completed updates (Keras's `optimizer.iterations`).
    pub iterations: u64,
    /// A learning rate set at run time (ReduceLROnPlateau); replaces a constant rate.
    pub lr_override: Option<f32>,
    /// The per-parameter buffers.
    pub slots: Slots,
}

/// The optimizer's buffers, each the size of the parameters, typed per algorithm. Keras's
/// variable names appear only in `named` and `restore`, for checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub enum Slots {
    /// SGD keeps a velocity only with momentum.
    Sgd {
        /// The velocity (Keras's `momentum` variable), with momentum only.
        momentum: Option<Vec<f32>>,
    },
    /// Adam's first and second moments, and the running maximum of the second with amsgrad.
    Adam {
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
        /// Running maximum of the second moment (amsgrad).
        v_hat: Option<Vec<f32>>,
    },
    /// RMSprop's mean square, its momentum (momentum > 0) and mean gradient (centered).
    Rmsprop {
        /// Mean square of the gradient.
        velocity: Vec<f32>,
        /// Momentum buffer (momentum > 0).
        momentum: Option<Vec<f32>>,
        /// Mean gradient (centered).
        average_gradient: Option<Vec<f32>>,
    },
    /// Adagrad's sum of squared gradients, from `initial_accumulator_value`.
    Adagrad {
        /// The accumulator.
        accumulator: Vec<f32>,
    },
}

/// Why saved slots do not fit an optimizer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SlotError {
    #[error("optimizer slot {0} is missing")]
    /// A buffer the algorithm needs is not in the checkpoint.
    Missing(&'static str),
    #[error("optimizer slot {name} has {got} values, the model has {want} parameters")]
    /// A buffer has the wrong length.
    Length {
        /// Which buffer.
        name: &'static str,
        /// Its length.
        got: usize,
        /// The model's parameter count.
        want: usize,
    },
}

impl Slots {
    /// Fresh buffers for `algorithm` over `n` parameters (Keras's initial values).
    pub fn new(algorithm: &Algorithm, n: usize) -> Slots {
        let init = match algorithm {
            Algorithm::Adagrad { initial_accumulator_value, .. } => *initial_accumulator_value,
            _ => 0.0,
        };
        let fresh = Slots::restore(algorithm, n, |_| Some(vec![init; n]));
        fresh.unwrap_or_else(|e| unreachable!("fresh buffers have the right length: {e}"))
    }

    /// Buffers for `algorithm` over `n` parameters, each taken by its Keras name from `take`
    /// (a checkpoint); an error names a missing or mis-sized one.
    pub fn restore(
        algorithm: &Algorithm,
        n: usize,
        mut take: impl FnMut(&'static str) -> Option<Vec<f32>>,
    ) -> Result<Slots, SlotError> {
        let mut get = |name: &'static str| -> Result<Vec<f32>, SlotError> {
            let v = take(name).ok_or(SlotError::Missing(name))?;
            match v.len() == n {
                true => Ok(v),
                false => Err(SlotError::Length { name, got: v.len(), want: n }),
            }
        };
        Ok(match *algorithm {
            Algorithm::Sgd { momentum, .. } => {
                Slots::Sgd { momentum: (momentum != 0.0).then(|| get("momentum")).transpose()? }
            }
            Algorithm::Adam { amsgrad, .. } => {
                Slots::Adam { m: get("m")?, v: get("v")?, v_hat: amsgrad.then(|| get("v_hat")).transpose()? }
            }
            Algorithm::Rmsprop { momentum, centered, .. } => Slots::Rmsprop {
                velocity: get("velocity")?,
                momentum: (momentum > 0.0).then(|| get("momentum")).transpose()?,
                average_gradient: centered.then(|| get("average_gradient")).transpose()?,
            },
            Algorithm::Adagrad { .. } => Slots::Adagrad { accumulator: get("accumulator")? },
        })
    }

    /// Each buffer with its Keras variable name, in a fixed order.
    pub fn named(&self) -> Vec<(&'static str, &[f32])> {
        fn opt<'a>(name: &'static str, v: &'a Option<Vec<f32>>) -> Option<(&'static str, &'a [f32])> {
            v.as_deref().map(|v| (name, v))
        }
        let all = match self {
            Slots::Sgd { momentum } => vec![opt("momentum", momentum)],
            Slots::Adam { m, v, v_hat } => vec![Some(("m", &m[..])), Some(("v", &v[..])), opt("v_hat", v_hat)],
            Slots::Rmsprop { velocity, momentum, average_gradient } => vec![
                Some(("velocity", &velocity[..])),
                opt("momentum", momentum),
                opt("average_gradient", average_gradient),
            ],
            Slots::Adagrad { accumulator } => vec![Some(("accumulator", &accumulator[..]))],
        };
        all.into_iter().flatten().collect()
    }

    fn view(&mut self) -> SlotsMut<'_> {
        match self {
            Slots::Sgd { momentum } => SlotsMut::Sgd { momentum: momentum.as_deref_mut() },
            Slots::Adam { m, v, v_hat } => SlotsMut::Adam { m, v, v_hat: v_hat.as_deref_mut() },
            Slots::Rmsprop { velocity, momentum, average_gradient } => SlotsMut::Rmsprop {
                velocity,
                momentum: momentum.as_deref_mut(),
                average_gradient: average_gradient.as_deref_mut(),
            },
            Slots::Adagrad { accumulator } => SlotsMut::Adagrad { accumulator },
        }
    }
}

/// `Slots` borrowed for one update, splittable into halves.
enum SlotsMut<'a> {
    Sgd { momentum: Option<&'a mut [f32]> },
    Adam { m: &'a mut [f32], v: &'a mut [f32], v_hat: Option<&'a mut [f32]> },
    Rmsprop { velocity: &'a mut [f32], momentum: Option<&'a mut [f32]>, average_gradient: Option<&'a mut [f32]> },
    Adagrad { accumulator: &'a mut [f32] },
}

type Halves<'a> = (Option<&'a mut [f32]>, Option<&'a mut [f32]>);

fn split_opt(v: Option<&mut [f32]>, mid: usize) -> Halves<'_> {
    v.map(|v| v.split_at_mut(mid)).unzip()
}

impl<'a> SlotsMut<'a> {
    fn split_at(self, mid: usize) -> (SlotsMut<'a>, SlotsMut<'a>) {
        match self {
            SlotsMut::Sgd { momentum } => {
                let (m0, m1) = split_opt(momentum, mid);
                (SlotsMut::Sgd { momentum: m0 }, SlotsMut::Sgd { momentum: m1 })
            }
            SlotsMut::Adam { m, v, v_hat } => {
                let ((m0, m1), (v0, v1), (h0, h1)) = (m.split_at_mut(mid), v.split_at_mut(mid), split_opt(v_hat, mid));
                (SlotsMut::Adam { m: m0, v: v0, v_hat: h0 }, SlotsMut::Adam { m: m1, v: v1, v_hat: h1 })
            }
            SlotsMut::Rmsprop { velocity, momentum, average_gradient } => {
                let (v0, v1) = velocity.split_at_mut(mid);
                let ((m0, m1), (a0, a1)) = (split_opt(momentum, mid), split_opt(average_gradient, mid));
                (
                    SlotsMut::Rmsprop { velocity: v0, momentum: m0, average_gradient: a0 },
                    SlotsMut::Rmsprop { velocity: v1, momentum: m1, average_gradient: a1 },
                )
            }
            SlotsMut::Adagrad { accumulator } => {
                let (a0, a1) = accumulator.split_at_mut(mid);
                (SlotsMut::Adagrad { accumulator: a0 }, SlotsMut::Adagrad { accumulator: a1 })
            }
        }
    }
}

#[derive(Clone, Debug)]
/// An optimizer and its state: applies one update per step.
pub struct Optimizer {
    config: OptimizerConfig,
    state: OptimizerState,
}

impl Optimizer {
    /// A fresh optimizer over `num_params` parameters.
    pub fn new(config: OptimizerConfig, num_params: usize) -> Self {
        let slots = Slots::new(&config.algorithm, num_params);
        Optimizer { config, state: OptimizerState { iterations: 0, lr_override: None, slots } }
    }

    /// Continues from a saved state whose slots were restored (`Slots::restore`) for this
    /// config's algorithm.
    pub fn with_state(config: OptimizerConfig, state: OptimizerState) -> Self {
        Optimizer { config, state }
    }

    /// Its state, for checkpoints.
    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Its configuration.
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
        let slots = self.state.slots.view();
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
    slots: SlotsMut<'_>,
) {
    if params.len() < dtrain_nn::simd::PARALLEL_MIN {
        return update(algorithm, weight_decay, lr, t, params, grads, slots);
    }
    let mid = params.len() / 2;
    let (p0, p1) = params.split_at_mut(mid);
    let (g0, g1) = grads.split_at(mid);
    let (s0, s1) = slots.split_at(mid);
    rayon::join(
        || update_split(algorithm, weight_decay, lr, t, p0, g0, s0),
        || update_split(algorithm, weight_decay, lr, t, p1, g1, s1),
    );
}

dtrain_nn::simd_dispatch! {
    /// Weight decay and the update of `algorithm`, for update number `t` (1-based).
    fn update(
        algorithm: &Algorithm,
        weight_decay: Option<f32>,
        lr: f32,
        t: u64,
        params: &mut [f32],
        grads: &[f32],
        slots: SlotsMut<'_>,
    ) {
            if let Some(wd) = weight_decay {
                params.iter_mut().for_each(|w| *w -= *w * wd * lr);
            }
            match (algorithm, slots) {
                (&Algorithm::Sgd { momentum, nesterov }, SlotsMut::Sgd { momentum: velocity }) => match velocity {
                    None => params.iter_mut().zip(grads.iter()).for_each(|(w, g)| *w -= g * lr),
                    Some(m) => {
                        let mu = momentum as f32;
                        for ((w, &g), m) in params.iter_mut().zip(grads.iter()).zip(m.iter_mut()) {
                            *m = *m * mu - g * lr;
                            *w += if nesterov { *m * mu - g * lr } else { *m };
                        }
                    }
                },
                (&Algorithm::Adam { beta_1, beta_2, epsilon, .. }, SlotsMut::Adam { m, v, v_hat }) => {
                    let step = t as f32;
                    let b1p = (beta_1 as f32).powf(step);
                    let b2p = (beta_2 as f32).powf(step);
                    let alpha = lr * (1.0 - b2p).sqrt() / (1.0 - b1p);
                    let (one_b1, one_b2, eps) = ((1.0 - beta_1) as f32, (1.0 - beta_2) as f32, epsilon as f32);
                    let moments = params.iter_mut().zip(grads.iter()).zip(m.iter_mut().zip(v.iter_mut()));
                    match v_hat {
                        Some(v_hat) => {
                            for (((w, &g), (m, v)), vh) in moments.zip(v_hat.iter_mut()) {
                                *m += (g - *m) * one_b1;
                                *v += (g * g - *v) * one_b2;
                                *vh = vh.max(*v);
                                *w -= *m * alpha / (vh.sqrt() + eps);
                            }
                        }
                        None => {
                            for ((w, &g), (m, v)) in moments {
                                *m += (g - *m) * one_b1;
                                *v += (g * g - *v) * one_b2;
                                *w -= *m * alpha / (v.sqrt() + eps);
                            }
                        }
                    }
                }
                (
                    &Algorithm::Rmsprop { rho, momentum, epsilon, .. },
                    SlotsMut::Rmsprop { velocity: vel, momentum: mut mom, average_gradient: mut avg },
                ) => {
                    let (r, one_r, eps, mu) = (rho as f32, (1.0 - rho) as f32, epsilon as f32, momentum as f32);
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
                (&Algorithm::Adagrad { epsilon, .. }, SlotsMut::Adagrad { accumulator: acc }) => {
                    let eps = epsilon as f32;
                    for i in 0..params.len() {
                        let g = grads[i];
                        acc[i] += g * g;
                        params[i] -= lr * g / (acc[i] + eps).sqrt();
                    }
                }
                // `Slots::new` and `Slots::restore`, the only constructors, build the slots for
                // the optimizer's own algorithm, which never changes.
                _ => unreachable!("an optimizer's slots are made for its algorithm"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &Slots) -> Vec<&'static str> {
        s.named().iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn each_algorithm_has_its_own_slots_under_keras_names() {
        let adam = |amsgrad| Algorithm::Adam { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, amsgrad };
        let rms = |momentum, centered| Algorithm::Rmsprop { rho: 0.9, momentum, epsilon: 1e-7, centered };
        let cases: [(Algorithm, &[&str]); 7] = [
            (Algorithm::Sgd { momentum: 0.0, nesterov: false }, &[]),
            (Algorithm::Sgd { momentum: 0.9, nesterov: true }, &["momentum"]),
            (adam(false), &["m", "v"]),
            (adam(true), &["m", "v", "v_hat"]),
            (rms(0.0, false), &["velocity"]),
            (rms(0.5, true), &["velocity", "momentum", "average_gradient"]),
            (Algorithm::Adagrad { initial_accumulator_value: 0.1, epsilon: 1e-7 }, &["accumulator"]),
        ];
        for (algorithm, want) in cases {
            let fresh = Slots::new(&algorithm, 3);
            assert_eq!(names(&fresh), want, "{algorithm:?}");
            // A checkpoint's buffers come back where they were, by name.
            let saved: Vec<(&str, Vec<f32>)> =
                want.iter().enumerate().map(|(i, n)| (*n, vec![i as f32 + 1.0; 3])).collect();
            let take = |name: &str| saved.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
            let restored = Slots::restore(&algorithm, 3, take).unwrap();
            let back: Vec<(&str, Vec<f32>)> = restored.named().into_iter().map(|(n, v)| (n, v.to_vec())).collect();
            assert_eq!(back, saved, "{algorithm:?}");
        }
        let adagrad = Slots::new(&Algorithm::Adagrad { initial_accumulator_value: 0.1, epsilon: 1e-7 }, 2);
        assert_eq!(adagrad, Slots::Adagrad { accumulator: vec![0.1, 0.1] }, "Keras's initial accumulator");
    }

    #[test]
    fn a_missing_or_mis_sized_slot_is_named() {
        let adam = Algorithm::Adam { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, amsgrad: true };
        let short = Slots::restore(&adam, 3, |name| Some(vec![0.0; if name == "v" { 2 } else { 3 }]));
        assert_eq!(short, Err(SlotError::Length { name: "v", got: 2, want: 3 }));
        let missing = Slots::restore(&adam, 3, |name| (name != "v_hat").then(|| vec![0.0; 3]));
        assert_eq!(missing.unwrap_err().to_string(), "optimizer slot v_hat is missing");
    }

    #[test]
    fn splitting_the_update_changes_no_bit() {
        // Long enough to be split across threads (PARALLEL_MIN), for every algorithm with slots.
        let n = dtrain_nn::simd::PARALLEL_MIN * 2 + 3;
        let grads: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for algorithm in [
            Algorithm::Sgd { momentum: 0.9, nesterov: true },
            Algorithm::Adam { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, amsgrad: true },
            Algorithm::Rmsprop { rho: 0.9, momentum: 0.5, epsilon: 1e-7, centered: true },
            Algorithm::Adagrad { initial_accumulator_value: 0.1, epsilon: 1e-7 },
        ] {
            let config = OptimizerConfig {
                algorithm: algorithm.clone(),
                learning_rate: LearningRate::Constant(0.01),
                weight_decay: Some(0.004),
                clip: None,
            };
            let mut split = Optimizer::new(config.clone(), n);
            let mut p_split = vec![0.5f32; n];
            let mut whole = Slots::new(&algorithm, n);
            let mut p_whole = vec![0.5f32; n];
            for t in 1..=3 {
                split.apply(&mut p_split, &mut grads.clone(), std::slice::from_ref(&(0..n)));
                update(&algorithm, Some(0.004), 0.01, t, &mut p_whole, &grads, whole.view());
            }
            assert!(p_split == p_whole, "{algorithm:?}: parameters");
            assert!(split.state().slots == whole, "{algorithm:?}: slots");
        }
    }
}
