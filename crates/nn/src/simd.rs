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
