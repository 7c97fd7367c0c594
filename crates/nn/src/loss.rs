//! Losses as Keras's TensorFlow backend computes them, including its logits shortcut:
//! a crossentropy on the output of a softmax (or sigmoid) is computed from the logits.

use crate::activation::{sigmoid, Activation};
use serde::{Deserialize, Serialize};

const EPSILON: f32 = 1e-7;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's losses.
pub enum LossKind {
    /// Crossentropy of class indices.
    SparseCategoricalCrossentropy,
    /// Crossentropy of one-hot (or soft) targets.
    CategoricalCrossentropy,
    /// Crossentropy of independent binary targets.
    BinaryCrossentropy,
    /// Mean of squared differences over the outputs.
    MeanSquaredError,
    /// Mean of absolute differences over the outputs.
    MeanAbsoluteError,
    /// Squared below `delta`, linear above.
    Huber {
        /// Where the quadratic part ends.
        delta: f32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
/// A loss and whether the model's outputs are logits.
pub struct Loss {
    /// Which loss.
    pub kind: LossKind,
    /// The model outputs logits (Keras `from_logits=True`).
    pub from_logits: bool,
}

/// One sample's target: a class index, or one value per output unit.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A class index.
    Class(u32),
    /// A row of target values.
    Values(&'a [f32]),
}

impl Target<'_> {
    /// The dense target of unit `j` of `units`: a class becomes one-hot, or the class
    /// value itself for a single-unit output (binary labels, regression targets).
    pub fn at(&self, j: usize, units: usize) -> f32 {
        match *self {
            Target::Class(c) if units == 1 => c as f32,
            Target::Class(c) => f32::from(u8::from(j == c as usize)),
            Target::Values(v) => v[j],
        }
    }
}

impl LossKind {
    /// Keras's name of it (the one `Loss::from_name` reads first).
    pub fn name(&self) -> &'static str {
        match self {
            LossKind::SparseCategoricalCrossentropy => "sparse_categorical_crossentropy",
            LossKind::CategoricalCrossentropy => "categorical_crossentropy",
            LossKind::BinaryCrossentropy => "binary_crossentropy",
            LossKind::MeanSquaredError => "mean_squared_error",
            LossKind::MeanAbsoluteError => "mean_absolute_error",
            LossKind::Huber { .. } => "huber",
        }
    }
}

impl Loss {
    /// The loss a Keras name stands for.
    pub fn from_name(name: &str) -> Option<LossKind> {
        Some(match name {
            "sparse_categorical_crossentropy" => LossKind::SparseCategoricalCrossentropy,
            "categorical_crossentropy" => LossKind::CategoricalCrossentropy,
            "binary_crossentropy" => LossKind::BinaryCrossentropy,
            "mean_squared_error" | "mse" => LossKind::MeanSquaredError,
            "mean_absolute_error" | "mae" => LossKind::MeanAbsoluteError,
            "huber" => LossKind::Huber { delta: 1.0 },
            _ => return None,
        })
    }

    /// Every name `from_name` knows, for error messages.
    pub const NAMES: &'static str = "sparse_categorical_crossentropy, categorical_crossentropy, \
        binary_crossentropy, mean_squared_error (mse), mean_absolute_error (mae), huber";

    /// Keras's `_get_logits`: does this loss read the pre-activation of a last layer with
    /// activation `last`, instead of its output?
    pub fn reads_logits_of(&self, last: Activation) -> bool {
        !self.from_logits
            && matches!(
                (self.kind, last),
                (LossKind::SparseCategoricalCrossentropy, Activation::Softmax)
                    | (LossKind::CategoricalCrossentropy, Activation::Softmax)
                    | (LossKind::BinaryCrossentropy, Activation::Sigmoid)
            )
    }

    #[allow(clippy::needless_range_loop)] // indexes x, the target and the gradient together
    /// Loss of one sample; with `grad`, also writes `scale * dL/dx` into it. `logits`
    /// says whether `x` holds logits (see `reads_logits_of`) or the model output.
    pub fn sample(&self, logits: bool, x: &[f32], t: Target, scale: f32, grad: Option<&mut [f32]>) -> f32 {
        let logits = logits || self.from_logits;
        let k = x.len();
        match self.kind {
            LossKind::SparseCategoricalCrossentropy | LossKind::CategoricalCrossentropy if logits => {
                // softmax_cross_entropy_with_logits: sum_j t_j (lse - x_j)
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum_exp: f32 = x.iter().map(|&v| (v - max).exp()).sum();
                let lse = max + sum_exp.ln();
                let (mut loss, mut tsum) = (0.0f32, 0.0f32);
                for j in 0..k {
                    let tj = t.at(j, k);
                    loss += tj * (lse - x[j]);
                    tsum += tj;
                }
                if let Some(g) = grad {
                    for j in 0..k {
                        g[j] = scale * ((x[j] - lse).exp() * tsum - t.at(j, k));
                    }
                }
                loss
            }
            LossKind::SparseCategoricalCrossentropy => {
                // TF backend: log(clip(p)) fed to the logits op: sum_j t_j (log(sum c) - log c_j).
                let clip = |v: f32| v.clamp(EPSILON, 1.0 - EPSILON);
                let s: f32 = x.iter().map(|&v| clip(v)).sum();
                let (mut loss, mut tsum) = (0.0f32, 0.0f32);
                for j in 0..k {
                    let tj = t.at(j, k);
                    if tj != 0.0 {
                        loss += tj * (s.ln() - clip(x[j]).ln());
                    }
                    tsum += tj;
                }
                if let Some(g) = grad {
                    for j in 0..k {
                        g[j] = scale * (tsum / s - t.at(j, k) / clip(x[j])) * inside(x[j]);
                    }
                }
                loss
            }
            LossKind::CategoricalCrossentropy => {
                // output / sum(output), clipped, -sum(t * log(.))
                let s: f32 = x.iter().sum();
                let mut loss = 0.0f32;
                let mut dq_dot_q = 0.0f32;
                for j in 0..k {
                    let q = x[j] / s;
                    loss -= t.at(j, k) * q.clamp(EPSILON, 1.0 - EPSILON).ln();
                }
                if let Some(g) = grad {
                    for j in 0..k {
                        let q = x[j] / s;
                        g[j] = -t.at(j, k) * inside(q) / q.clamp(EPSILON, 1.0 - EPSILON);
                        dq_dot_q += g[j] * q;
                    }
                    for gj in g.iter_mut() {
                        *gj = scale * (*gj - dq_dot_q) / s;
                    }
                }
                loss
            }
            LossKind::BinaryCrossentropy => {
                let mut loss = 0.0f32;
                let mut g = grad;
                for j in 0..k {
                    let (tj, v) = (t.at(j, k), x[j]);
                    let (l, d) = if logits {
                        // sigmoid_cross_entropy_with_logits
                        (v.max(0.0) - v * tj + (-v.abs()).exp().ln_1p(), sigmoid(v) - tj)
                    } else {
                        let c = v.clamp(EPSILON, 1.0 - EPSILON);
                        let l = -(tj * (c + EPSILON).ln() + (1.0 - tj) * (1.0 - c + EPSILON).ln());
                        let d = -(tj / (c + EPSILON) - (1.0 - tj) / (1.0 - c + EPSILON)) * inside(v);
                        (l, d)
                    };
                    loss += l;
                    if let Some(g) = g.as_deref_mut() {
                        g[j] = scale * d / k as f32;
                    }
                }
                loss / k as f32
            }
            LossKind::MeanSquaredError | LossKind::MeanAbsoluteError | LossKind::Huber { .. } => {
                let mut loss = 0.0f32;
                let mut g = grad;
                for j in 0..k {
                    let e = x[j] - t.at(j, k);
                    let (l, d) = match self.kind {
                        LossKind::MeanSquaredError => (e * e, 2.0 * e),
                        LossKind::MeanAbsoluteError => (e.abs(), sign(e)),
                        LossKind::Huber { delta } if e.abs() <= delta => (0.5 * e * e, e),
                        LossKind::Huber { delta } => (delta * e.abs() - 0.5 * delta * delta, delta * sign(e)),
                        _ => unreachable!(),
                    };
                    loss += l;
                    if let Some(g) = g.as_deref_mut() {
                        g[j] = scale * d / k as f32;
                    }
                }
                loss / k as f32
            }
        }
    }
}

/// TF's clip_by_value gradient: 1 where the value was inside [eps, 1 - eps], else 0.
fn inside(v: f32) -> f32 {
    f32::from(u8::from((EPSILON..=1.0 - EPSILON).contains(&v)))
}

fn sign(e: f32) -> f32 {
    if e > 0.0 {
        1.0
    } else if e < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keras's "accuracy" for this output: binary (threshold 0.5) for one unit, otherwise the
/// first argmax against the class (or the argmax of dense targets).
pub fn is_correct(output: &[f32], t: Target) -> bool {
    if output.len() == 1 {
        return f32::from(u8::from(output[0] > 0.5)) == t.at(0, 1);
    }
    let argmax = |v: &mut dyn Iterator<Item = f32>| {
        let (mut best, mut at) = (f32::NEG_INFINITY, 0usize);
        for (i, x) in v.enumerate() {
            if x > best {
                best = x;
                at = i;
            }
        }
        at
    };
    let pred = argmax(&mut output.iter().copied());
    match t {
        Target::Class(c) => pred == c as usize,
        Target::Values(v) => pred == argmax(&mut v.iter().copied()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_loss_name_reads_back_as_its_loss() {
        for kind in [
            LossKind::SparseCategoricalCrossentropy,
            LossKind::CategoricalCrossentropy,
            LossKind::BinaryCrossentropy,
            LossKind::MeanSquaredError,
            LossKind::MeanAbsoluteError,
            LossKind::Huber { delta: 1.0 },
        ] {
            assert_eq!(Loss::from_name(kind.name()), Some(kind), "{}", kind.name());
        }
    }
}
