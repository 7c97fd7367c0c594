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
    pub fn update(&mut self, values: &[f32]) {
        for v in values {
            // A value's bits plus one: never 0, so leading zeros count.
            self.h = add(mul(self.h, self.r), u64::from(v.to_bits()) + 1);
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
