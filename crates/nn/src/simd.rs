//! Hot loops compiled twice: for the baseline x86-64 and for AVX2, picked at run time.
//!
//! Both builds give the same bits: Rust never fuses `a * b + c` into an FMA on its own, and
//! every loop keeps its order of operations; only the vector width changes.

/// Defines a function whose body is compiled for the baseline and for AVX2; calls the AVX2
/// build when the CPU has AVX2.
#[macro_export]
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// Element-wise work on vectors at least this long is split across threads; shorter ones are
/// not worth the hand-off. Splitting never changes results: each element is computed alone.
pub const PARALLEL_MIN: usize = 1 << 17;

avx2_dispatch! {
    fn add_serial(dst: &mut [f32], src: &[f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    }
}

/// `dst += src`, element by element.
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    if dst.len() < PARALLEL_MIN {
        return add_serial(dst, src);
    }
    let mid = dst.len() / 2;
    let (d0, d1) = dst.split_at_mut(mid);
    let (s0, s1) = src.split_at(mid);
    rayon::join(|| add_into(d0, s0), || add_into(d1, s1));
}

/// 1 if `x` is a NaN or an infinity (all exponent bits set); branch-free, so folds vectorize.
#[inline(always)]
fn not_finite(x: &f32) -> u32 {
    u32::from((x.to_bits() & 0x7f80_0000) == 0x7f80_0000)
}

avx2_dispatch! {
    /// Whether every value of `v` is finite.
    pub fn all_finite(v: &[f32]) -> bool {
        v.chunks(64).all(|c| c.iter().fold(0, |acc, x| acc | not_finite(x)) == 0)
    }
}

/// Values per block of `sum_into`: the block's result stays in L1 while every part is added.
const BLOCK: usize = 1024;

avx2_dispatch! {
    fn sum_serial(dst: &mut [f32], parts: &[&[f32]]) -> bool {
        let mut bad = 0u32;
        for (b, d) in dst.chunks_mut(BLOCK).enumerate() {
            let block = b * BLOCK..b * BLOCK + d.len();
            d.copy_from_slice(&parts[0][block.clone()]);
            for p in &parts[1..] {
                d.iter_mut().zip(&p[block.clone()]).for_each(|(d, s)| *d += s);
            }
            bad |= d.iter().fold(0, |acc, x| acc | not_finite(x));
        }
        bad == 0
    }
}

/// `dst = parts[0] + parts[1] + ...`, added in that order for every element (the same bits
/// as adding the parts one after another). Returns whether every sum is finite: false if a
/// part holds a NaN or an infinity, or if a sum overflows. Every part is `dst`'s length.
pub fn sum_into(dst: &mut [f32], parts: &[&[f32]]) -> bool {
    assert!(!parts.is_empty() && parts.iter().all(|p| p.len() == dst.len()), "parts of the sum's length");
    if dst.len() < PARALLEL_MIN {
        return sum_serial(dst, parts);
    }
    let mid = dst.len() / 2;
    let (d0, d1) = dst.split_at_mut(mid);
    let (p0, p1): (Vec<&[f32]>, Vec<&[f32]>) = parts.iter().map(|p| p.split_at(mid)).unzip();
    let (a, b) = rayon::join(|| sum_into(d0, &p0), || sum_into(d1, &p1));
    a && b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_into_adds_in_part_order_and_flags_non_finite_sums() {
        // Long enough to split across threads and to end in a partial block.
        let n = PARALLEL_MIN * 2 + 37;
        let part =
            |k: u32| -> Vec<f32> { (0..n as u32).map(|i| ((i * 7 + k * 13) % 101) as f32 * 0.37 - 17.0).collect() };
        let parts = [part(0), part(1), part(2)];
        let views: Vec<&[f32]> = parts.iter().map(|p| &p[..]).collect();
        let mut want = parts[0].clone();
        for p in &parts[1..] {
            want.iter_mut().zip(p).for_each(|(w, x)| *w += x);
        }
        let mut got = vec![0.0; n];
        assert!(sum_into(&mut got, &views));
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(sum_into(&mut got, &views[..1]));
        assert_eq!(got, parts[0]);

        let mut bad = parts[2].clone();
        bad[n - 1] = f32::NAN;
        assert!(!sum_into(&mut got, &[&parts[0], &bad]));
        let (huge, mut small) = (vec![f32::MAX; n], vec![0.0; n]);
        small[5] = f32::MAX; // overflows to infinity: not finite either
        assert!(!sum_into(&mut got, &[&huge, &small]));
        assert!(got[5].is_infinite());
    }
}
