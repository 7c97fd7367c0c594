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

avx2_dispatch! {
    /// `dst += src`, element by element.
    pub fn add_into(dst: &mut [f32], src: &[f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    }
}
