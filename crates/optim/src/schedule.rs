//! Learning-rate schedules, computed in float32 in Keras's order of operations.

use serde::{Deserialize, Serialize};
use std::f32::consts::PI;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's schedules with Keras's argument names and defaults (as a job file spells them).
#[serde(deny_unknown_fields)]
pub enum Schedule {
    /// `initial_learning_rate * decay_rate ^ (step / decay_steps)`.
    ExponentialDecay {
        /// The rate at step 0.
        initial_learning_rate: f32,
        /// Steps per decay period.
        decay_steps: u64,
        /// Factor per period.
        decay_rate: f32,
        #[serde(default)]
        /// Decay in whole periods (`floor(step / decay_steps)`).
        staircase: bool,
    },
    /// `values[i]` while the step is at most `boundaries[i]` (and past the last, the last value).
    PiecewiseConstantDecay {
        /// Step boundaries, increasing.
        boundaries: Vec<u64>,
        /// One more value than boundaries.
        values: Vec<f32>,
    },
    /// From `initial_learning_rate` to `end_learning_rate` along `(1 - step / decay_steps) ^ power`.
    PolynomialDecay {
        /// The rate at step 0.
        initial_learning_rate: f32,
        /// Steps to reach the end rate.
        decay_steps: u64,
        #[serde(default = "end_lr")]
        /// The rate from `decay_steps` on.
        end_learning_rate: f32,
        #[serde(default = "one")]
        /// The polynomial's power.
        power: f32,
        #[serde(default)]
        /// Start over past `decay_steps`, each cycle longer.
        cycle: bool,
    },
    /// `initial_learning_rate / (1 + decay_rate * step / decay_steps)`.
    InverseTimeDecay {
        /// The rate at step 0.
        initial_learning_rate: f32,
        /// Steps per unit of decay.
        decay_steps: u64,
        /// Decay per unit.
        decay_rate: f32,
        #[serde(default)]
        /// Decay in whole units.
        staircase: bool,
    },
    /// Half a cosine from `initial_learning_rate` down to `alpha` times it, after an optional linear warmup.
    CosineDecay {
        /// The rate at step 0 (or where the warmup starts).
        initial_learning_rate: f32,
        /// Steps of the cosine after the warmup.
        decay_steps: u64,
        #[serde(default)]
        /// The floor, as a fraction of the peak.
        alpha: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// The peak after the warmup, if there is one.
        warmup_target: Option<f32>,
        #[serde(default)]
        /// Steps of linear warmup.
        warmup_steps: u64,
    },
    /// Cosine decay that restarts, each period `t_mul` times longer and `m_mul` times lower.
    CosineDecayRestarts {
        /// The rate at step 0.
        initial_learning_rate: f32,
        /// Steps of the first period.
        first_decay_steps: u64,
        #[serde(default = "two")]
        /// Each period is this many times longer than the last.
        t_mul: f32,
        #[serde(default = "one")]
        /// Each period starts this many times lower.
        m_mul: f32,
        #[serde(default)]
        /// The floor, as a fraction of the period's start.
        alpha: f32,
    },
}

fn end_lr() -> f32 {
    1e-4
}
fn two() -> f32 {
    2.0
}
fn one() -> f32 {
    1.0
}

impl Schedule {
    /// Checks the arguments Keras would reject or that make no schedule; `Err` names the key.
    pub fn validate(&self) -> Result<(), String> {
        let steps = match self {
            Schedule::ExponentialDecay { decay_steps, .. }
            | Schedule::PolynomialDecay { decay_steps, .. }
            | Schedule::InverseTimeDecay { decay_steps, .. }
            | Schedule::CosineDecay { decay_steps, .. } => Some(("decay_steps", *decay_steps)),
            Schedule::CosineDecayRestarts { first_decay_steps, .. } => Some(("first_decay_steps", *first_decay_steps)),
            Schedule::PiecewiseConstantDecay { boundaries, values } => {
                if values.len() != boundaries.len() + 1 {
                    return Err(format!(
                        "values: needs one more entry than boundaries ({} boundaries, {} values)",
                        boundaries.len(),
                        values.len()
                    ));
                }
                if boundaries.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("boundaries: must be strictly increasing".into());
                }
                None
            }
        };
        if let Some((key, 0)) = steps {
            return Err(format!("{key}: must be at least 1"));
        }
        if let Schedule::CosineDecayRestarts { t_mul, .. } = self {
            if *t_mul <= 0.0 {
                return Err("t_mul: must be positive".into());
            }
        }
        Ok(())
    }

    /// The learning rate of the update with 0-based index `step` (Keras reads the schedule
    /// at `optimizer.iterations` before incrementing it).
    pub fn at(&self, step: u64) -> f32 {
        let s = step as f32;
        match *self {
            Schedule::ExponentialDecay { initial_learning_rate, decay_steps, decay_rate, staircase } => {
                let mut p = s / decay_steps as f32;
                if staircase {
                    p = p.floor();
                }
                initial_learning_rate * decay_rate.powf(p)
            }
            Schedule::PiecewiseConstantDecay { ref boundaries, ref values } => {
                let i = boundaries.iter().position(|&b| step <= b).unwrap_or(boundaries.len());
                values[i]
            }
            Schedule::PolynomialDecay { initial_learning_rate, decay_steps, end_learning_rate, power, cycle } => {
                let mut ds = decay_steps as f32;
                let mut s = s;
                if cycle {
                    ds *= if s == 0.0 { 1.0 } else { (s / ds).ceil() };
                } else {
                    s = s.min(ds);
                }
                let p = s / ds;
                (initial_learning_rate - end_learning_rate) * (1.0 - p).powf(power) + end_learning_rate
            }
            Schedule::InverseTimeDecay { initial_learning_rate, decay_steps, decay_rate, staircase } => {
                let mut p = s / decay_steps as f32;
                if staircase {
                    p = p.floor();
                }
                initial_learning_rate / (1.0 + decay_rate * p)
            }
            Schedule::CosineDecay { initial_learning_rate, decay_steps, alpha, warmup_target, warmup_steps } => {
                let ds = decay_steps as f32;
                let decay = |s: f32, from: f32| {
                    let cosine = 0.5 * (1.0 + (PI * (s / ds)).cos());
                    from * ((1.0 - alpha) * cosine + alpha)
                };
                match warmup_target {
                    None => decay(s.min(ds), initial_learning_rate),
                    Some(target) => {
                        let ws = warmup_steps as f32;
                        let s = s.min(ds + ws);
                        if s < ws {
                            (target - initial_learning_rate) * (s / ws) + initial_learning_rate
                        } else {
                            decay(s - ws, target)
                        }
                    }
                }
            }
            Schedule::CosineDecayRestarts { initial_learning_rate, first_decay_steps, t_mul, m_mul, alpha } => {
                let mut f = s / first_decay_steps as f32;
                let i = if t_mul == 1.0 {
                    let i = f.floor();
                    f -= i;
                    i
                } else {
                    let i = ((1.0 - f * (1.0 - t_mul)).ln() / t_mul.ln()).floor();
                    let sum_r = (1.0 - t_mul.powf(i)) / (1.0 - t_mul);
                    f = (f - sum_r) / t_mul.powf(i);
                    i
                };
                let cosine = 0.5 * m_mul.powf(i) * (1.0 + (PI * f).cos());
                initial_learning_rate * ((1.0 - alpha) * cosine + alpha)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piecewise_boundary_belongs_to_the_lower_interval() {
        let s = Schedule::PiecewiseConstantDecay { boundaries: vec![1, 3], values: vec![0.01, 0.005, 0.001] };
        let lrs: Vec<f32> = (0..5).map(|k| s.at(k)).collect();
        assert_eq!(lrs, [0.01, 0.01, 0.005, 0.005, 0.001]);
    }

    #[test]
    fn restarts_jump_back_up() {
        let s = Schedule::CosineDecayRestarts {
            initial_learning_rate: 0.01,
            first_decay_steps: 1000,
            t_mul: 2.0,
            m_mul: 1.0,
            alpha: 0.0,
        };
        assert_eq!(s.at(0), 0.01);
        assert!(s.at(999) < 1e-6);
        assert!((s.at(1000) - 0.01).abs() < 1e-6);
        assert!(s.at(2999) < 1e-6);
    }

    #[test]
    fn zero_decay_steps_is_rejected_by_name() {
        let s = Schedule::ExponentialDecay {
            initial_learning_rate: 0.1,
            decay_steps: 0,
            decay_rate: 0.9,
            staircase: false,
        };
        assert_eq!(s.validate().unwrap_err(), "decay_steps: must be at least 1");
    }
}
