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
        let mut sums = PenaltySums::default();
        sums.add(*self, x);
        sums.penalty(*self)
    }

    /// `g += scale * d(penalty)/dx`; the derivative of |x| at 0 is 0, as TF's Abs gradient.
    pub fn add_grad(&self, x: &[f32], scale: f32, g: &mut [f32]) {
        derivative(self.l1, self.l2, x, scale, g, false);
    }

    /// The penalty of `x`, and `g += d(penalty)/dx`.
    pub fn penalty_and_grad(&self, x: &[f32], g: &mut [f32]) -> f64 {
        derivative(self.l1, self.l2, x, 1.0, g, false);
        self.penalty(x)
    }

    /// The penalty of `x`, with `d(penalty)/dx` stored in `d`: adding `d` to a gradient
    /// later gives the same bits as `penalty_and_grad` on it.
    pub fn penalty_and_derivative(&self, x: &[f32], d: &mut [f32]) -> f64 {
        derivative(self.l1, self.l2, x, 1.0, d, true);
        self.penalty(x)
    }
}

/// The running sums behind a penalty, in f64 over eight interleaved lanes: a fixed order
/// (deterministic) that vectorizes, unlike one serial chain of additions. Value `i` of
/// everything added goes to lane `i % 8`, so a buffer added row by row (while each row is in
/// cache for other work) gives the bits of the buffer added at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct PenaltySums {
    abs: [f64; 8],
    squares: [f64; 8],
    added: usize,
}

impl PenaltySums {
    /// Adds the values of `x` (only the sums `r` uses: a factor of 0 skips its term).
    pub fn add(&mut self, r: Regularizer, x: &[f32]) {
        let (abs, squares) = (r.l1 != 0.0, r.l2 != 0.0);
        // One by one up to lane 0, eight at a time, then the rest one by one: every lane
        // sees the same values in the same order as in a single pass.
        let head = ((8 - self.added % 8) % 8).min(x.len());
        let (first, rest) = x.split_at(head);
        let body = rest.len() / 8 * 8;
        let (middle, last) = rest.split_at(body);
        first.iter().for_each(|&v| self.add_one(v));
        lanes(&mut self.abs, &mut self.squares, middle, abs, squares);
        self.added += body;
        last.iter().for_each(|&v| self.add_one(v));
    }

    fn add_one(&mut self, v: f32) {
        let lane = self.added % 8;
        self.abs[lane] += f64::from(v.abs());
        self.squares[lane] += f64::from(v) * f64::from(v);
        self.added += 1;
    }

    /// `l1 * sum|x| + l2 * sum x^2` over everything added.
    pub fn penalty(&self, r: Regularizer) -> f64 {
        let mut p = 0.0;
        if r.l1 != 0.0 {
            p += f64::from(r.l1) * self.abs.iter().sum::<f64>();
        }
        if r.l2 != 0.0 {
            p += f64::from(r.l2) * self.squares.iter().sum::<f64>();
        }
        p
    }
}

crate::simd_dispatch! {
    /// Adds `x` (a multiple of 8 values, starting at lane 0) to the lanes the penalty uses.
    fn lanes(a1: &mut [f64; 8], a2: &mut [f64; 8], x: &[f32], abs: bool, squares: bool) {
        #[inline(always)]
        fn each<const ABS: bool, const SQUARES: bool>(a1: &mut [f64; 8], a2: &mut [f64; 8], x: &[f32]) {
            for c in x.chunks_exact(8) {
                for j in 0..8 {
                    if ABS {
                        a1[j] += f64::from(c[j].abs());
                    }
                    if SQUARES {
                        a2[j] += f64::from(c[j]) * f64::from(c[j]);
                    }
                }
            }
        }
        match (abs, squares) {
            (true, true) => each::<true, true>(a1, a2, x),
            (true, false) => each::<true, false>(a1, a2, x),
            (false, true) => each::<false, true>(a1, a2, x),
            (false, false) => {}
        }
    }
}

crate::simd_dispatch! {
    /// `g = d` (`store`) or `g += d`, where `d = scale * d(penalty)/dx`.
    fn derivative(l1: f32, l2: f32, x: &[f32], scale: f32, g: &mut [f32], store: bool) {
        #[inline(always)]
        fn each(x: &[f32], g: &mut [f32], store: bool, d: impl Fn(f32) -> f32) {
            for (gv, &v) in g.iter_mut().zip(x) {
                *gv = if store { d(v) } else { *gv + d(v) };
            }
        }
        let (k1, k2) = (l1 * scale, 2.0 * l2 * scale);
        if k1.to_bits() == 0 {
            // L2 alone: `k1 * sign` is +0, or -0 for a negative value; adding it as such gives
            // the same bits as the general form below, with a third of its work.
            each(x, g, store, |v| (if v < 0.0 { -0.0 } else { 0.0 }) + k2 * v);
        } else {
            each(x, g, store, |v| {
                let sign = f32::from(u8::from(v > 0.0)) - f32::from(u8::from(v < 0.0));
                k1 * sign + k2 * v
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_l2_only_derivative_has_the_bits_of_the_general_form() {
        let x = [1.5f32, -2.25, 0.0, -0.0, 1e-30, -1e-30, f32::MAX, -f32::MIN_POSITIVE, 3.0e-5];
        for (l2, scale, g0) in [(0.01f32, 1.0f32, 0.0f32), (1e-4, 1.0 / 30.0, -0.0), (0.5, 0.25, 1.25)] {
            let mut got = [g0; 9];
            derivative(0.0, l2, &x, scale, &mut got, false);
            let (k1, k2) = (0.0f32 * scale, 2.0 * l2 * scale);
            for (i, &v) in x.iter().enumerate() {
                let sign = f32::from(u8::from(v > 0.0)) - f32::from(u8::from(v < 0.0));
                let want = g0 + (k1 * sign + k2 * v);
                assert_eq!(got[i].to_bits(), want.to_bits(), "x = {v:e}, l2 = {l2}, g = {g0}");
            }
        }
    }

    #[test]
    fn sums_added_in_pieces_equal_one_pass() {
        let x: Vec<f32> = (0..1003).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.37e-3).collect();
        let r = Regularizer { l1: 0.01, l2: 0.003 };
        let whole = r.penalty(&x);
        for piece in [1, 3, 8, 13, 64, 100] {
            let mut sums = PenaltySums::default();
            x.chunks(piece).for_each(|c| sums.add(r, c));
            assert_eq!(sums.penalty(r).to_bits(), whole.to_bits(), "pieces of {piece}");
        }
        // The reference: eight lanes over the whole buffer, as a plain loop.
        let (mut a1, mut a2) = ([0.0f64; 8], [0.0f64; 8]);
        for (i, &v) in x.iter().enumerate() {
            a1[i % 8] += f64::from(v.abs());
            a2[i % 8] += f64::from(v) * f64::from(v);
        }
        let want = 0.01f32 as f64 * a1.iter().sum::<f64>() + 0.003f32 as f64 * a2.iter().sum::<f64>();
        assert_eq!(whole.to_bits(), want.to_bits());
    }
}
