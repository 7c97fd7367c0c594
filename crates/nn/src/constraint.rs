//! Weight constraints, applied by the optimizer after every update (Keras semantics).

use serde::{Deserialize, Serialize};

const EPSILON: f32 = 1e-7;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's weight constraints, applied after every update.
pub enum Constraint {
    /// Scales each unit's weights down to an L2 norm of at most `max_value`.
    MaxNorm {
        /// The largest norm.
        max_value: f32,
        /// The axis the norm is over (0: each unit's incoming weights).
        axis: i32,
    },
    /// Negative weights become zero.
    NonNeg,
    /// Scales each unit's weights to norm 1.
    UnitNorm {
        /// The axis the norm is over.
        axis: i32,
    },
    /// Moves each unit's norm into `[min_value, max_value]`, by `rate` of the way.
    MinMaxNorm {
        /// The smallest norm.
        min_value: f32,
        /// The largest norm.
        max_value: f32,
        /// How far to move (1: all the way).
        rate: f32,
        /// The axis the norm is over.
        axis: i32,
    },
}

impl Constraint {
    /// Applies the constraint to `w`, a row-major tensor of `shape` (1-D or 2-D).
    pub fn apply(&self, w: &mut [f32], shape: &[usize]) {
        constrain(*self, w, shape);
    }

    fn axis(&self) -> i32 {
        match *self {
            Constraint::MaxNorm { axis, .. } | Constraint::UnitNorm { axis } | Constraint::MinMaxNorm { axis, .. } => {
                axis
            }
            Constraint::NonNeg => 0,
        }
    }
}

crate::simd_dispatch! {
    fn constrain(c: Constraint, w: &mut [f32], shape: &[usize]) {
        let (min, max, rate) = match c {
            Constraint::NonNeg => {
                w.iter_mut().for_each(|v| *v = v.max(0.0));
                return;
            }
            Constraint::MaxNorm { max_value, .. } => (0.0, max_value, 1.0),
            Constraint::UnitNorm { .. } => (1.0, 1.0, 1.0),
            Constraint::MinMaxNorm { min_value, max_value, rate, .. } => (min_value, max_value, rate),
        };
        // Norms per column (axis 0 of a [in, out] kernel) or per row (axis 1; a 1-D vector is
        // one row), accumulated in f64 row by row so the loops vectorize.
        let by_row = shape.len() == 1 || c.axis() == 1 || c.axis() == -1;
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let norm = |sq: f64| sq.sqrt() as f32;
        let factor = |n: f32| -> f32 {
            match c {
                // Keras: w / (eps + n); as a factor so that one multiply serves every kind.
                Constraint::UnitNorm { .. } => 1.0 / (EPSILON + n),
                // Keras: w * (desired / (eps + n)), which also nudges columns below the limit.
                _ => (rate * n.clamp(min, max) + (1.0 - rate) * n) / (EPSILON + n),
            }
        };
        if by_row {
            for row in w.chunks_mut(cols) {
                let n = norm(row.iter().map(|&v| f64::from(v) * f64::from(v)).sum());
                let f = factor(n);
                if let Constraint::UnitNorm { .. } = c {
                    row.iter_mut().for_each(|v| *v /= EPSILON + n);
                } else {
                    row.iter_mut().for_each(|v| *v *= f);
                }
            }
            return;
        }
        let mut sq = vec![0.0f64; cols];
        for row in w.chunks(cols) {
            sq.iter_mut().zip(row).for_each(|(s, &v)| *s += f64::from(v) * f64::from(v));
        }
        let norms: Vec<f32> = sq.into_iter().map(norm).collect();
        if let Constraint::UnitNorm { .. } = c {
            for row in w.chunks_mut(cols) {
                row.iter_mut().zip(&norms).for_each(|(v, &n)| *v /= EPSILON + n);
            }
            return;
        }
        let factors: Vec<f32> = norms.into_iter().map(factor).collect();
        for row in w.chunks_mut(cols) {
            row.iter_mut().zip(&factors).for_each(|(v, &f)| *v *= f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_norm_clips_columns_and_nudges_the_rest() {
        // columns: (3, 4) has norm 5 -> scaled to ~2; (0.3, 0.4) has norm 0.5 -> ~unchanged.
        let mut w = vec![3.0, 0.3, 4.0, 0.4];
        Constraint::MaxNorm { max_value: 2.0, axis: 0 }.apply(&mut w, &[2, 2]);
        let n0 = (w[0] * w[0] + w[2] * w[2]).sqrt();
        assert!((n0 - 2.0).abs() < 1e-6 && n0 <= 2.0, "{n0}");
        assert!((w[1] - 0.3).abs() < 1e-6 && (w[3] - 0.4).abs() < 1e-6);
    }

    #[test]
    fn unit_norm_and_non_neg() {
        let mut w = vec![3.0, -4.0];
        Constraint::UnitNorm { axis: 0 }.apply(&mut w, &[2]);
        assert!((w[0] - 0.6).abs() < 1e-6 && (w[1] + 0.8).abs() < 1e-6);
        Constraint::NonNeg.apply(&mut w, &[2]);
        assert_eq!(w[1], 0.0);
    }

    #[test]
    fn axis_one_normalises_rows() {
        let mut w = vec![3.0, 4.0, 0.0, 1.0];
        Constraint::MinMaxNorm { min_value: 1.0, max_value: 1.0, rate: 1.0, axis: 1 }.apply(&mut w, &[2, 2]);
        assert!(((w[0] * w[0] + w[1] * w[1]).sqrt() - 1.0).abs() < 1e-6);
        assert!((w[3] - 1.0).abs() < 1e-6);
    }
}
