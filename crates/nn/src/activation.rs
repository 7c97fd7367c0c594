//! Activation functions with Keras's names, defaults and formulas.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's activation functions, with their Keras defaults.
pub enum Activation {
    /// The identity.
    Linear,
    /// `max(x, 0)`.
    Relu,
    /// `keras.activations.leaky_relu` (default negative_slope 0.2).
    LeakyRelu {
        /// Slope for negative inputs (Keras: 0.2).
        negative_slope: f32,
    },
    /// `keras.activations.elu` (default alpha 1.0).
    Elu {
        /// Scale of the negative part (Keras: 1).
        alpha: f32,
    },
    /// Hyperbolic tangent.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// Over each sample's units; with a crossentropy loss the gradient takes the logits path.
    Softmax,
    /// `ln(1 + e^x)`.
    Softplus,
    /// `keras.activations.gelu` (default approximate = false: the erf form).
    Gelu {
        /// The tanh approximation instead of the exact erf form.
        approximate: bool,
    },
    /// silu, also known as swish.
    Silu,
}

impl Activation {
    /// Parses a Keras activation name; `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "linear" | "None" => Activation::Linear,
            "relu" => Activation::Relu,
            "leaky_relu" => Activation::LeakyRelu { negative_slope: 0.2 },
            "elu" => Activation::Elu { alpha: 1.0 },
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "softmax" => Activation::Softmax,
            "softplus" => Activation::Softplus,
            "gelu" => Activation::Gelu { approximate: false },
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    /// Every name `from_name` knows, for error messages.
    pub const NAMES: &'static str =
        "linear, relu, leaky_relu, elu, tanh, sigmoid, softmax, softplus, gelu, silu, swish";

    /// Keras's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Relu => "relu",
            Activation::LeakyRelu { .. } => "leaky_relu",
            Activation::Elu { .. } => "elu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Softmax => "softmax",
            Activation::Softplus => "softplus",
            Activation::Gelu { .. } => "gelu",
            Activation::Silu => "silu",
        }
    }

    /// `out = f(z)` for rows of `width` units (softmax normalises each row).
    pub fn forward(&self, z: &[f32], out: &mut [f32], width: usize) {
        // One monomorphized loop per activation, so each vectorizes.
        fn map(z: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
            out.iter_mut().zip(z).for_each(|(o, &v)| *o = f(v));
        }
        match *self {
            Activation::Softmax => {
                for (z, out) in z.chunks(width.max(1)).zip(out.chunks_mut(width.max(1))) {
                    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let mut sum = 0.0f32;
                    for (o, &v) in out.iter_mut().zip(z) {
                        *o = (v - max).exp();
                        sum += *o;
                    }
                    out.iter_mut().for_each(|v| *v /= sum);
                }
            }
            Activation::Linear => out.copy_from_slice(z),
            Activation::Relu => map(z, out, |x| x.max(0.0)),
            f => map(z, out, |x| f.scalar(x)),
        }
    }

    fn scalar(&self, x: f32) -> f32 {
        match *self {
            Activation::Linear => x,
            Activation::Relu => x.max(0.0),
            Activation::LeakyRelu { negative_slope } => {
                if x > 0.0 {
                    x
                } else {
                    x * negative_slope
                }
            }
            Activation::Elu { alpha } => {
                if x > 0.0 {
                    x
                } else {
                    alpha * x.exp_m1()
                }
            }
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => sigmoid(x),
            Activation::Softplus => softplus(x),
            Activation::Gelu { approximate: false } => {
                0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
            }
            Activation::Gelu { approximate: true } => {
                let inner = GELU_C * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + inner.tanh())
            }
            Activation::Silu => x * sigmoid(x),
            Activation::Softmax => unreachable!("softmax is handled row-wise"),
        }
    }

    /// Turns `g = dL/d(out)` into `dL/dz` in place for rows of `width` units, given `z` and
    /// `out = f(z)`.
    pub fn backward(&self, z: &[f32], out: &[f32], g: &mut [f32], width: usize) {
        match *self {
            Activation::Linear => {}
            Activation::Softmax => {
                for (out, g) in out.chunks(width.max(1)).zip(g.chunks_mut(width.max(1))) {
                    let dot: f32 = out.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
                    g.iter_mut().zip(out).for_each(|(gv, &a)| *gv = a * (*gv - dot));
                }
            }
            Activation::Relu => g.iter_mut().zip(z).for_each(|(gv, &x)| *gv = if x > 0.0 { *gv } else { 0.0 }),
            f => g.iter_mut().zip(z.iter().zip(out)).for_each(|(gv, (&x, &a))| *gv *= f.derivative(x, a)),
        }
    }

    fn derivative(&self, x: f32, a: f32) -> f32 {
        match *self {
            Activation::Linear => 1.0,
            Activation::Relu => f32::from(u8::from(x > 0.0)),
            Activation::LeakyRelu { negative_slope } => {
                if x > 0.0 {
                    1.0
                } else {
                    negative_slope
                }
            }
            Activation::Elu { alpha } => {
                if x > 0.0 {
                    1.0
                } else {
                    a + alpha
                }
            }
            Activation::Tanh => 1.0 - a * a,
            Activation::Sigmoid => a * (1.0 - a),
            Activation::Softplus => sigmoid(x),
            Activation::Gelu { approximate: false } => {
                let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
                cdf + x * pdf
            }
            Activation::Gelu { approximate: true } => {
                let inner = GELU_C * (x + 0.044715 * x * x * x);
                let t = inner.tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Activation::Softmax => unreachable!("softmax is handled row-wise"),
        }
    }
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi)

/// `1 / (1 + e^-x)`, without overflow for large negative x.
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 + exp(x))` without overflow.
pub fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}
