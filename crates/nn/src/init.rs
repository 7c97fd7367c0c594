//! Weight initializers with Keras's names and distributions (random streams differ from
//! TensorFlow's, so only the distributions can be compared).

use crate::rng::Stream;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's weight initializers.
pub enum Initializer {
    /// Uniform in ±sqrt(6 / (fan_in + fan_out)).
    GlorotUniform,
    /// Normal, truncated at 2 sigma, of variance 2 / (fan_in + fan_out).
    GlorotNormal,
    /// Uniform in ±sqrt(6 / fan_in).
    HeUniform,
    /// Normal, truncated at 2 sigma, of variance 2 / fan_in.
    HeNormal,
    /// Uniform in ±sqrt(3 / fan_in).
    LecunUniform,
    /// Normal, truncated at 2 sigma, of variance 1 / fan_in.
    LecunNormal,
    /// Normal.
    RandomNormal {
        /// Its mean.
        mean: f32,
        /// Its standard deviation.
        stddev: f32,
    },
    /// Uniform in `[minval, maxval)`.
    RandomUniform {
        /// Lower bound.
        minval: f32,
        /// Upper bound.
        maxval: f32,
    },
    /// Normal, redrawn outside two standard deviations (the sample's deviation is then 0.88 of it).
    TruncatedNormal {
        /// Its mean.
        mean: f32,
        /// The standard deviation before truncation.
        stddev: f32,
    },
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every value the same.
    Constant {
        /// The value.
        value: f32,
    },
}

/// `stddev` of a unit normal truncated at two standard deviations.
const TRUNC_STDDEV: f64 = 0.879_625_661_034_239_8;

impl Initializer {
    /// The initializer a Keras name stands for (with Keras's default arguments).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "glorot_uniform" => Initializer::GlorotUniform,
            "glorot_normal" => Initializer::GlorotNormal,
            "he_uniform" => Initializer::HeUniform,
            "he_normal" => Initializer::HeNormal,
            "lecun_uniform" => Initializer::LecunUniform,
            "lecun_normal" => Initializer::LecunNormal,
            "random_normal" => Initializer::RandomNormal { mean: 0.0, stddev: 0.05 },
            "random_uniform" => Initializer::RandomUniform { minval: -0.05, maxval: 0.05 },
            "truncated_normal" => Initializer::TruncatedNormal { mean: 0.0, stddev: 0.05 },
            "zeros" => Initializer::Zeros,
            "ones" => Initializer::Ones,
            _ => return None,
        })
    }

    /// Every name `from_name` knows, for error messages.
    pub const NAMES: &'static str = "glorot_uniform, glorot_normal, he_uniform, he_normal, \
        lecun_uniform, lecun_normal, random_normal, random_uniform, truncated_normal, zeros, ones";

    /// Fills `out` (a variable of the given fans) from `rng`.
    pub fn fill(&self, out: &mut [f32], fan_in: usize, fan_out: usize, rng: &mut Stream) {
        let (fan_in, fan_out) = (fan_in as f64, fan_out as f64);
        let fan_avg = (fan_in + fan_out) / 2.0;
        // VarianceScaling: (scale, fan, uniform?)
        let vs = match *self {
            Initializer::GlorotUniform => Some((1.0, fan_avg, true)),
            Initializer::GlorotNormal => Some((1.0, fan_avg, false)),
            Initializer::HeUniform => Some((2.0, fan_in, true)),
            Initializer::HeNormal => Some((2.0, fan_in, false)),
            Initializer::LecunUniform => Some((1.0, fan_in, true)),
            Initializer::LecunNormal => Some((1.0, fan_in, false)),
            _ => None,
        };
        if let Some((scale, fan, uniform)) = vs {
            let scale = scale / fan.max(1.0);
            if uniform {
                let limit = (3.0 * scale).sqrt() as f32;
                out.iter_mut().for_each(|v| *v = (rng.uniform() * 2.0 - 1.0) * limit);
            } else {
                let stddev = (scale.sqrt() / TRUNC_STDDEV) as f32;
                out.iter_mut().for_each(|v| *v = truncated(rng) * stddev);
            }
            return;
        }
        match *self {
            Initializer::RandomNormal { mean, stddev } => {
                out.iter_mut().for_each(|v| *v = mean + stddev * rng.normal())
            }
            Initializer::RandomUniform { minval, maxval } => {
                out.iter_mut().for_each(|v| *v = minval + (maxval - minval) * rng.uniform())
            }
            Initializer::TruncatedNormal { mean, stddev } => {
                out.iter_mut().for_each(|v| *v = mean + stddev * truncated(rng))
            }
            Initializer::Zeros => out.fill(0.0),
            Initializer::Ones => out.fill(1.0),
            Initializer::Constant { value } => out.fill(value),
            _ => unreachable!("variance-scaling initializers returned above"),
        }
    }
}

/// A unit normal resampled until it lies within two standard deviations.
fn truncated(rng: &mut Stream) -> f32 {
    loop {
        let x = rng.normal();
        if x.abs() <= 2.0 {
            return x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(init: Initializer, fan_in: usize, fan_out: usize) -> (f64, f64, f32) {
        let mut v = vec![0.0; 200_000];
        init.fill(&mut v, fan_in, fan_out, &mut Stream::new(3, 9));
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt(), v.iter().fold(0.0f32, |m, x| m.max(x.abs())))
    }

    #[test]
    fn glorot_uniform_has_keras_limit() {
        let (mean, sd, max) = stats(Initializer::GlorotUniform, 784, 64);
        let limit = (6.0f64 / (784.0 + 64.0)).sqrt();
        assert!(mean.abs() < 1e-3);
        assert!((sd - limit / 3f64.sqrt()).abs() / sd < 0.01, "sd {sd}");
        assert!(f64::from(max) <= limit && f64::from(max) > 0.99 * limit);
    }

    #[test]
    fn he_normal_is_truncated_with_keras_stddev() {
        let (_, sd, max) = stats(Initializer::HeNormal, 100, 10);
        // Keras's stddev sqrt(2/100)/0.8796... is the pre-truncation sigma; after
        // truncation at 2 sigma the sample stddev is sqrt(2/100).
        assert!((sd - (0.02f64).sqrt()).abs() / sd < 0.01, "sd {sd}");
        assert!(f64::from(max) <= 2.0 * (0.02f64).sqrt() / TRUNC_STDDEV + 1e-6);
    }
}
