//! A keyed digest of a tensor, for auditing a chain: each member reports the digest of the
//! running sum it received and of the one it sent, under a key only it and the coordinator
//! know (so its predecessor cannot make other values with the same digest). When an audited
//! step's sum is wrong, the coordinator recomputes every prefix and finds the first member
//! whose digests disagree with it.
//!
//! A polynomial hash modulo the prime 2^61 - 1 evaluated at the secret key: for two different
//! tensors of n values, the chance that their digests agree is at most n / 2^61 over the key.

/// 2^61 - 1.
const P: u64 = (1 << 61) - 1;

/// `a * b mod P`, for `a, b < P`.
fn mul(a: u64, b: u64) -> u64 {
    let x = u128::from(a) * u128::from(b);
    let s = (x as u64 & P) + (x >> 61) as u64;
    if s >= P {
        s - P
    } else {
        s
    }
}

/// `a + b mod P`, for `a, b < P`.
fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P {
        s - P
    } else {
        s
    }
}

/// `b^e mod P`.
fn pow(mut b: u64, mut e: u64) -> u64 {
    let mut out = 1;
    while e > 0 {
        if e & 1 == 1 {
            out = mul(out, b);
        }
        b = mul(b, b);
        e >>= 1;
    }
    out
}

/// A value's bits plus one: never 0, so leading zeros count.
fn value(v: f32) -> u64 {
    u64::from(v.to_bits()) + 1
}

/// A digest being made, chunk by chunk (the chunks' sizes do not matter).
#[derive(Clone, Copy, Debug)]
pub struct Digest {
    r: u64,
    h: u64,
    len: u64,
}

impl Digest {
    /// Under `key` (any value: it is reduced to a point of the field other than 0 and 1).
    pub fn new(key: u64) -> Digest {
        Digest { r: (key % P).max(2), h: 0, len: 0 }
    }

    /// Adds values (their bits: -0.0 and 0.0 differ, as do NaNs).
    ///
    /// The digest is Horner's `h = h·r + y` over the values, but one multiplication waits on the
    /// one before, which made it a fifth of a chain member's CPU. So whole blocks of `LANES`
    /// values go through `LANES` independent accumulators, `a_j = a_j·r^LANES + y_(block, j)`, and
    /// join as `h·r^(LANES·blocks) + Σ a_j·r^(LANES-1-j)`: the same polynomial, evaluated exactly
    /// (arithmetic mod P has no rounding), so the same digest.
    pub fn update(&mut self, values: &[f32]) {
        const LANES: usize = 8;
        let blocks = values.chunks_exact(LANES);
        let rest = blocks.remainder();
        if blocks.len() > 0 {
            let r_lanes = pow(self.r, LANES as u64);
            let mut a = [0u64; LANES];
            for block in blocks.clone() {
                for (a, v) in a.iter_mut().zip(block) {
                    *a = add(mul(*a, r_lanes), value(*v));
                }
            }
            // Σ a_j·r^(LANES-1-j), by Horner over the lanes.
            let joined = a.iter().fold(0, |acc, &a| add(mul(acc, self.r), a));
            self.h = add(mul(self.h, pow(r_lanes, blocks.len() as u64)), joined);
        }
        for v in rest {
            self.h = add(mul(self.h, self.r), value(*v));
        }
        self.len += values.len() as u64;
    }

    /// The digest (the length is part of it).
    pub fn finish(&self) -> u64 {
        add(mul(self.h, self.r), self.len % P)
    }
}

/// The digest of `values` under `key`.
pub fn digest(key: u64, values: &[f32]) -> u64 {
    let mut d = Digest::new(key);
    d.update(values);
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest's definition, one value at a time.
    fn horner(key: u64, values: &[f32]) -> u64 {
        let r = (key % P).max(2);
        let h = values.iter().fold(0, |h, v| add(mul(h, r), value(*v)));
        add(mul(h, r), values.len() as u64 % P)
    }

    #[test]
    fn blocks_of_lanes_give_horners_digest() {
        let v: Vec<f32> = (0..2000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))).collect();
        for key in [0, 1, 2, 42, P - 1, P, u64::MAX] {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 2000] {
                assert_eq!(digest(key, &v[..len]), horner(key, &v[..len]), "key {key}, {len} values");
            }
            for chunk in [1, 3, 8, 13, 77, 512] {
                let mut d = Digest::new(key);
                v.chunks(chunk).for_each(|c| d.update(c));
                assert_eq!(d.finish(), horner(key, &v), "key {key}, chunks of {chunk}");
            }
        }
        assert_eq!(pow(3, 0), 1);
        assert_eq!(pow(P - 1, 2), 1);
        assert_eq!(pow(2, 61), 1, "2^61 = 1 mod 2^61 - 1");
    }

    #[test]
    fn digests_depend_on_every_bit_the_order_and_the_key_not_the_chunks() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let whole = digest(42, &v);
        let mut chunked = Digest::new(42);
        v.chunks(77).for_each(|c| chunked.update(c));
        assert_eq!(chunked.finish(), whole);
        let mut one_bit = v.clone();
        one_bit[500] = f32::from_bits(one_bit[500].to_bits() ^ 1);
        assert_ne!(digest(42, &one_bit), whole);
        let mut swapped = v.clone();
        swapped.swap(1, 2);
        assert_ne!(digest(42, &swapped), whole);
        assert_ne!(digest(43, &v), whole);
        assert_ne!(digest(42, &[0.0]), digest(42, &[-0.0]));
        assert_ne!(digest(42, &[0.0]), digest(42, &[0.0, 0.0]), "length counts");
        assert_eq!(mul(P - 1, P - 1), 1, "(-1)(-1) = 1");
    }
}
