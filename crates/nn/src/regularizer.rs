//! L1 / L2 / L1L2 penalties exactly as Keras computes them (no 1/2 factor on L2).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Regularizer {
    pub l1: f32,
    pub l2: f32,
}

impl Regularizer {
    /// `l1 * sum|x| + l2 * sum x^2`, a term skipped when its factor is 0 (as Keras does).
    pub fn penalty(&self, x: &[f32]) -> f64 {
        let mut p = 0.0;
        if self.l1 != 0.0 {
            p += f64::from(self.l1) * sum_f64(x, |v| f64::from(v.abs()));
        }
        if self.l2 != 0.0 {
            p += f64::from(self.l2) * sum_f64(x, |v| f64::from(v) * f64::from(v));
        }
        p
    }

    /// `g += scale * d(penalty)/dx`; the derivative of |x| at 0 is 0, as TF's Abs gradient.
    pub fn add_grad(&self, x: &[f32], scale: f32, g: &mut [f32]) {
        let (l1, l2) = (self.l1 * scale, 2.0 * self.l2 * scale);
        for (gv, &v) in g.iter_mut().zip(x) {
            let sign = f32::from(u8::from(v > 0.0)) - f32::from(u8::from(v < 0.0));
            *gv += l1 * sign + l2 * v;
        }
    }
}

/// `sum f(x)` in f64 over eight interleaved accumulators: a fixed order (so deterministic)
/// that the compiler can vectorize, unlike one serial chain of additions.
pub fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail: f64 = tail.iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f64>() + tail
}
