//! Counter-based random numbers (Philox4x32-10).
//!
//! Every random draw in dtrain is a pure function of a key and a counter, never of
//! how many draws came before. That is what lets any worker compute any shard's
//! dropout masks and get the same bits (see design.md, "The step").

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Salmon et al., SC'11).
pub fn philox4x32(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (ctr, key);
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// A uniform float in [0, 1) from the top 24 bits of `x` (exactly representable).
#[inline]
pub fn unit_f32(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

fn key_of(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// Philox4x32-10 on `L` counters at once, lane by lane, so the compiler can vectorize it:
/// lane `l` of the result equals `philox4x32([c[0][l], c[1][l], c[2][l], c[3][l]], key)`.
#[inline(always)]
fn philox_lanes<const L: usize>(mut c: [[u32; L]; 4], key: [u32; 2]) -> [[u32; L]; 4] {
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let mut next = [[0u32; L]; 4];
        for l in 0..L {
            let p0 = u64::from(M0) * u64::from(c[0][l]);
            let p1 = u64::from(M1) * u64::from(c[2][l]);
            next[0][l] = (p1 >> 32) as u32 ^ c[1][l] ^ k[0];
            next[1][l] = p1 as u32;
            next[2][l] = (p0 >> 32) as u32 ^ c[3][l] ^ k[1];
            next[3][l] = p0 as u32;
        }
        c = next;
    }
    c
}

/// Dropout uniforms for one sample: `out[j]` is the draw for unit `j` of the sample at
/// `position` in the global batch of optimizer step `step`, for dropout layer `layer`.
/// Counter of block `b` (units 4b..4b+4): `[b, position, step_lo, layer << 16 ^ step_hi]`.
pub fn dropout_uniforms(seed: u64, layer: u32, step: u64, position: u32, out: &mut [f32]) {
    uniforms(seed, layer, step, position, out);
}

crate::simd_dispatch! {
    fn uniforms(seed: u64, layer: u32, step: u64, position: u32, out: &mut [f32]) {
    const L: usize = 8;
    let key = key_of(seed);
    let (c1, c2, c3) = (position, step as u32, (layer << 16) ^ (step >> 32) as u32);
    for (group, chunk) in out.chunks_mut(4 * L).enumerate() {
        let first = (group * L) as u32;
        let r = philox_lanes::<L>([std::array::from_fn(|l| first + l as u32), [c1; L], [c2; L], [c3; L]], key);
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = unit_f32(r[j % 4][j / 4]);
        }
    }
    }
}

/// A sequential stream for initializers and permutations: draw `i` of `stream` is
/// `philox(i, stream)`, so streams never overlap and restarts are reproducible.
#[derive(Clone, Debug)]
pub struct Stream {
    key: [u32; 2],
    stream: u64,
    counter: u64,
    buf: [u32; 4],
    used: usize,
}

impl Stream {
    /// Stream `stream` of `seed`, from its first draw.
    pub fn new(seed: u64, stream: u64) -> Self {
        Stream { key: key_of(seed), stream, counter: 0, buf: [0; 4], used: 4 }
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            let c = self.counter;
            self.buf =
                philox4x32([c as u32, (c >> 32) as u32, self.stream as u32, (self.stream >> 32) as u32], self.key);
            self.counter += 1;
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        unit_f32(self.next_u32())
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u32) -> u32 {
        let mut m = u64::from(self.next_u32()) * u64::from(n);
        if (m as u32) < n {
            let t = n.wrapping_neg() % n;
            while (m as u32) < t {
                m = u64::from(self.next_u32()) * u64::from(n);
            }
        }
        (m >> 32) as u32
    }

    /// Standard normal (Box-Muller in f64, rounded once).
    pub fn normal(&mut self) -> f32 {
        let u1 = (f64::from(self.next_u32()) + 1.0) / 4_294_967_296.0; // (0, 1]
        let u2 = f64::from(self.next_u32()) / 4_294_967_296.0;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answer() {
        // Known-answer vectors from Random123's kat_vectors (philox4x32_10).
        assert_eq!(philox4x32([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
    }

    #[test]
    fn uniforms_are_in_range_and_roughly_uniform() {
        let mut s = Stream::new(7, 1);
        let n = 100_000;
        let mean: f64 = (0..n).map(|_| f64::from(s.uniform())).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let mut s = Stream::new(7, 2);
        let (mut m1, mut m2) = (0.0f64, 0.0f64);
        for _ in 0..n {
            let x = f64::from(s.normal());
            m1 += x;
            m2 += x * x;
        }
        assert!((m1 / n as f64).abs() < 0.02 && (m2 / n as f64 - 1.0).abs() < 0.03);
    }

    #[test]
    fn below_stays_below() {
        let mut s = Stream::new(1, 0);
        assert!((0..10_000).all(|_| s.below(7) < 7));
    }

    #[test]
    fn lanes_equal_the_scalar_generator() {
        let mut out = [0.0f32; 70];
        dropout_uniforms(99, 2, (7 << 32) + 5, 11, &mut out);
        for (b, chunk) in out.chunks(4).enumerate() {
            let r = philox4x32([b as u32, 11, 5, (2 << 16) ^ 7], key_of(99));
            let want: Vec<f32> = r.iter().take(chunk.len()).map(|&v| unit_f32(v)).collect();
            assert_eq!(chunk, want.as_slice(), "block {b}");
        }
    }

    #[test]
    fn dropout_draws_depend_only_on_their_key() {
        let mut a = [0.0; 10];
        let mut b = [0.0; 10];
        dropout_uniforms(42, 3, 17, 5, &mut a);
        dropout_uniforms(42, 3, 17, 5, &mut b);
        assert_eq!(a, b);
        dropout_uniforms(42, 3, 17, 6, &mut b);
        assert_ne!(a, b);
    }
}
