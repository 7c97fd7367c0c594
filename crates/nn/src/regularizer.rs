//! L1 / L2 / L1L2 penalties exactly as Keras computes them (no 1/2 factor on L2).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
/// Keras's L1/L2 penalty: `l1 * sum|w| + l2 * sum w^2`.
pub struct Regularizer {
    /// Factor of the sum of absolute values.
    pub l1: f32,
    /// Factor of the sum of squares.
    pub l2: f32,
}

impl Regularizer {
    /// `l1 * sum|x| + l2 * sum x^2`, a term skipped when its factor is 0 (as Keras does).
    pub fn penalty(&self, x: &[f32]) -> f64 {
        penalty_and_grad(self.l1, self.l2, x, 0.0, None, false)
    }

    /// `g += scale * d(penalty)/dx`; the derivative of |x| at 0 is 0, as TF's Abs gradient.
    pub fn add_grad(&self, x: &[f32], scale: f32, g: &mut [f32]) {
        penalty_and_grad(self.l1, self.l2, x, scale, Some(g), false);
    }

    /// The penalty of `x`, and `g += d(penalty)/dx` in the same pass over `x`.
    pub fn penalty_and_grad(&self, x: &[f32], g: &mut [f32]) -> f64 {
        penalty_and_grad(self.l1, self.l2, x, 1.0, Some(g), false)
    }

    /// The penalty of `x`, with `d(penalty)/dx` stored in `d`: adding `d` to a gradient
    /// later gives the same bits as `penalty_and_grad` on it.
    pub fn penalty_and_derivative(&self, x: &[f32], d: &mut [f32]) -> f64 {
        penalty_and_grad(self.l1, self.l2, x, 1.0, Some(d), true)
    }
}

crate::avx2_dispatch! {
    /// Sums in f64 over eight interleaved accumulators: a fixed order (deterministic) that
    /// vectorizes, unlike one serial chain of additions.
    fn penalty_and_grad(l1: f32, l2: f32, x: &[f32], scale: f32, g: Option<&mut [f32]>, store: bool) -> f64 {
        let (mut a1, mut a2) = ([0.0f64; 8], [0.0f64; 8]);
        let chunks = x.chunks_exact(8);
        let mut tail = [0.0f32; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        for c in chunks.map(|c| <&[f32; 8]>::try_from(c).expect("chunks of 8")).chain([&tail]) {
            for j in 0..8 {
                a1[j] += f64::from(c[j].abs());
                a2[j] += f64::from(c[j]) * f64::from(c[j]);
            }
        }
        let mut p = 0.0;
        if l1 != 0.0 {
            p += f64::from(l1) * a1.iter().sum::<f64>();
        }
        if l2 != 0.0 {
            p += f64::from(l2) * a2.iter().sum::<f64>();
        }
        if let Some(g) = g {
            let (k1, k2) = (l1 * scale, 2.0 * l2 * scale);
            for (gv, &v) in g.iter_mut().zip(x) {
                let sign = f32::from(u8::from(v > 0.0)) - f32::from(u8::from(v < 0.0));
                let d = k1 * sign + k2 * v;
                *gv = if store { d } else { *gv + d };
            }
        }
        p
    }
}
