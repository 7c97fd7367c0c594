//! Hot loops compiled three times: for the baseline x86-64, for AVX2 and for AVX-512, the
//! widest the CPU has picked at run time.
//!
//! Every build gives the same bits: Rust never fuses `a * b + c` into an FMA on its own, and
//! every loop keeps its order of operations; only the vector width changes. Every call runs
//! with subnormals flushed to zero (FTZ and DAZ), on whichever thread.

/// Defines a function whose body is compiled for the baseline, AVX2 and AVX-512; calls the
/// widest build the CPU runs.
#[macro_export]
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            // Whatever thread runs it (a pool's, the caller's), subnormals flush to zero, as
            // in every forward pass: otherwise the bits would depend on which thread ran what.
            $crate::flush_denormals();
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU supports these AVX-512 subsets.
                    return unsafe { avx512($($arg),*) };
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

/// Whether the CPU has the AVX-512 subsets the wide builds use (F, BW, DQ, VL); `DTRAIN_SIMD=avx2`
/// turns them off, to compare.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        std::env::var("DTRAIN_SIMD").map_or(true, |v| v != "avx2")
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
    })
}

/// Element-wise work on vectors at least this long is split across threads; shorter ones are
/// not worth the hand-off. Splitting never changes results: each element is computed alone.
pub const PARALLEL_MIN: usize = 1 << 17;

simd_dispatch! {
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

simd_dispatch! {
    /// `row += r` for every row of `rows` (rows of `r.len()` values), e.g. a bias.
    pub fn add_to_rows(rows: &mut [f32], r: &[f32]) {
        for row in rows.chunks_mut(r.len().max(1)) {
            row.iter_mut().zip(r).for_each(|(d, s)| *d += s);
        }
    }
}

simd_dispatch! {
    /// `sum += row` for every row of `rows` in order (rows of `sum.len()` values): column sums.
    pub fn add_rows_to(sum: &mut [f32], rows: &[f32]) {
        for row in rows.chunks(sum.len().max(1)) {
            sum.iter_mut().zip(row).for_each(|(d, s)| *d += s);
        }
    }
}

simd_dispatch! {
    /// `dst *= src`, element by element.
    pub fn mul_into(dst: &mut [f32], src: &[f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d *= s);
    }
}

/// 1 if `x` is a NaN or an infinity (all exponent bits set); branch-free, so folds vectorize.
#[inline(always)]
fn not_finite(x: &f32) -> u32 {
    u32::from((x.to_bits() & 0x7f80_0000) == 0x7f80_0000)
}

simd_dispatch! {
    /// Whether every value of `v` is finite.
    pub fn all_finite(v: &[f32]) -> bool {
        v.chunks(64).all(|c| c.iter().fold(0, |acc, x| acc | not_finite(x)) == 0)
    }
}

/// A vector in memory another process may write at any time (shared memory). It is read only
/// with volatile loads, never through a reference, so a concurrent write can at worst tear
/// values (which the reader then checks), never invalidate what this process assumes.
#[derive(Clone, Copy, Debug)]
pub struct Volatile<'a> {
    ptr: *const f32,
    len: usize,
    _mapping: std::marker::PhantomData<&'a [f32]>,
}

// SAFETY: a `Volatile` only ever performs volatile reads of plain f32 values, which any thread
// may do at any time; the mapping it points into outlives it ('a).
unsafe impl Send for Volatile<'_> {}
// SAFETY: as for Send: shared use is volatile reads only.
unsafe impl Sync for Volatile<'_> {}

impl<'a> Volatile<'a> {
    /// # Safety
    /// `ptr` must be 4-byte aligned and valid for reads of `len` f32 values for 'a (a mapping
    /// that stays mapped), outside any Rust allocation.
    pub unsafe fn new(ptr: *const f32, len: usize) -> Self {
        Volatile { ptr, len, _mapping: std::marker::PhantomData }
    }

    /// Its number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        assert!(mid <= self.len);
        // SAFETY: both halves lie within the original range.
        unsafe { (Volatile::new(self.ptr, mid), Volatile::new(self.ptr.add(mid), self.len - mid)) }
    }

    /// Hands `each` the values of `range` in order, as (offset in the range, up to 8 values),
    /// read with volatile loads: one by one up to a 32-byte boundary, then eight at a time.
    #[inline(always)]
    fn load(self, range: std::ops::Range<usize>, mut each: impl FnMut(usize, &[f32])) {
        assert!(range.end <= self.len);
        let mut i = range.start;
        // One vector load per 8 values needs the vector's alignment (the type `[f32; 8]` would
        // be read element by element: volatile aggregate loads are never merged).
        while i < range.end && !(self.ptr.wrapping_add(i) as usize).is_multiple_of(32) {
            // SAFETY: i < len, in bounds per `new`.
            each(i - range.start, &[unsafe { std::ptr::read_volatile(self.ptr.add(i)) }]);
            i += 1;
        }
        while i + 8 <= range.end {
            let v = read8(self.ptr.wrapping_add(i));
            each(i - range.start, &v);
            i += 8;
        }
        while i < range.end {
            // SAFETY: i < len, in bounds per `new`.
            each(i - range.start, &[unsafe { std::ptr::read_volatile(self.ptr.add(i)) }]);
            i += 1;
        }
    }
}

/// Eight values at `p` (32-byte aligned, in bounds) with one volatile vector load.
#[inline(always)]
fn read8(p: *const f32) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__m256;
        // SAFETY: `p` is 32-byte aligned (`load` checks) with 8 values in bounds; __m256 and
        // [f32; 8] have the same size and any bits are valid f32s.
        unsafe { std::mem::transmute::<__m256, [f32; 8]>(std::ptr::read_volatile(p.cast::<__m256>())) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: as above; [f32; 8] needs only f32's alignment.
        unsafe { std::ptr::read_volatile(p.cast::<[f32; 8]>()) }
    }
}

simd_dispatch! {
    fn volatile_copy(src: Volatile<'_>, dst: &mut [f32]) {
        src.load(0..src.len, |i, v| dst[i..i + v.len()].copy_from_slice(v));
    }
}

impl Volatile<'_> {
    /// A private copy of the values.
    pub fn read_into(self, dst: &mut [f32]) {
        assert_eq!(dst.len(), self.len, "a copy of the whole vector");
        volatile_copy(self, dst);
    }
}

/// One term of `sum_into`: this process's own values, or shared memory another process writes.
#[derive(Clone, Copy, Debug)]
pub enum Part<'a> {
    /// A slice this process owns.
    Own(&'a [f32]),
    /// Shared memory another process writes.
    Shared(Volatile<'a>),
}

impl<'a> Part<'a> {
    fn len(&self) -> usize {
        match self {
            Part::Own(s) => s.len(),
            Part::Shared(v) => v.len(),
        }
    }

    fn split_at(self, mid: usize) -> (Part<'a>, Part<'a>) {
        match self {
            Part::Own(s) => {
                let (a, b) = s.split_at(mid);
                (Part::Own(a), Part::Own(b))
            }
            Part::Shared(v) => {
                let (a, b) = v.split_at(mid);
                (Part::Shared(a), Part::Shared(b))
            }
        }
    }
}

/// Values per block of `sum_into`: the block's result stays in L1 while every part is added.
const BLOCK: usize = 1024;

simd_dispatch! {
    fn sum_serial(dst: &mut [f32], parts: &[Part<'_>]) -> bool {
        let mut bad = 0u32;
        for (b, d) in dst.chunks_mut(BLOCK).enumerate() {
            let block = b * BLOCK..b * BLOCK + d.len();
            for (k, p) in parts.iter().enumerate() {
                match (*p, k) {
                    (Part::Own(p), 0) => d.copy_from_slice(&p[block.clone()]),
                    (Part::Own(p), _) => d.iter_mut().zip(&p[block.clone()]).for_each(|(d, s)| *d += s),
                    (Part::Shared(v), 0) => v.load(block.clone(), |i, x| d[i..i + x.len()].copy_from_slice(x)),
                    (Part::Shared(v), _) => v.load(block.clone(), |i, x| {
                        d[i..i + x.len()].iter_mut().zip(x).for_each(|(d, s)| *d += s)
                    }),
                }
            }
            bad |= d.iter().fold(0, |acc, x| acc | not_finite(x));
        }
        bad == 0
    }
}

/// `dst = parts[0] + parts[1] + ...`, added in that order for every element (the same bits
/// as adding the parts one after another). Returns whether every sum is finite: false if a
/// part holds a NaN or an infinity, or if a sum overflows. Every part is `dst`'s length.
pub fn sum_into(dst: &mut [f32], parts: &[Part<'_>]) -> bool {
    assert!(!parts.is_empty() && parts.iter().all(|p| p.len() == dst.len()), "parts of the sum's length");
    if dst.len() < PARALLEL_MIN {
        return sum_serial(dst, parts);
    }
    let mid = dst.len() / 2;
    let (d0, d1) = dst.split_at_mut(mid);
    let (p0, p1): (Vec<Part<'_>>, Vec<Part<'_>>) = parts.iter().map(|p| p.split_at(mid)).unzip();
    let (a, b) = rayon::join(|| sum_into(d0, &p0), || sum_into(d1, &p1));
    a && b
}

/// `dst = src`, in the same pass telling whether every value is finite.
pub fn copy_checked(dst: &mut [f32], src: &[f32]) -> bool {
    sum_into(dst, &[Part::Own(src)])
}

#[cfg(test)]
mod tests {
    #[test]
    fn hot_loops_flush_subnormals_on_any_thread() {
        // A fresh thread starts without FTZ/DAZ; the loop must not depend on that.
        let got = std::thread::spawn(|| {
            let mut dst = [f32::MIN_POSITIVE; 3];
            add_into(&mut dst, &[-f32::MIN_POSITIVE / 2.0; 3]);
            dst
        })
        .join()
        .unwrap();
        // With DAZ the subnormal addend reads as zero; without it the sum would be subnormal.
        assert_eq!(got, [f32::MIN_POSITIVE; 3]);
    }

    use super::*;

    #[test]
    fn sum_into_adds_in_part_order_and_flags_non_finite_sums() {
        // Long enough to split across threads and to end in a partial block.
        let n = PARALLEL_MIN * 2 + 37;
        let part =
            |k: u32| -> Vec<f32> { (0..n as u32).map(|i| ((i * 7 + k * 13) % 101) as f32 * 0.37 - 17.0).collect() };
        let parts = [part(0), part(1), part(2)];
        let views: Vec<Part<'_>> = parts.iter().map(|p| Part::Own(&p[..])).collect();
        let mut want = parts[0].clone();
        for p in &parts[1..] {
            want.iter_mut().zip(p).for_each(|(w, x)| *w += x);
        }
        let mut got = vec![0.0; n];
        assert!(sum_into(&mut got, &views));
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(copy_checked(&mut got, &parts[0]));
        assert_eq!(got, parts[0]);
        // Parts read from shared memory (volatile loads) give the same bits.
        // SAFETY: the vectors outlive the views and are not written meanwhile.
        let shared: Vec<Part<'_>> =
            parts.iter().map(|p| Part::Shared(unsafe { Volatile::new(p.as_ptr(), p.len()) })).collect();
        let mut mixed = vec![0.0; n];
        assert!(sum_into(&mut mixed, &[views[0], shared[1], shared[2]]));
        assert!(mixed.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut copy = vec![0.0; n];
        let Part::Shared(v) = shared[1] else { unreachable!() };
        v.read_into(&mut copy);
        assert_eq!(copy, parts[1]);
        // Every start offset: values before a 32-byte boundary are read one by one.
        for skip in 0..9 {
            // SAFETY: in bounds of parts[1], which is not written meanwhile.
            let v = unsafe { Volatile::new(parts[1].as_ptr().add(skip), 21) };
            let mut some = vec![0.0; 21];
            v.read_into(&mut some);
            assert_eq!(some, parts[1][skip..skip + 21]);
        }

        let mut bad = parts[2].clone();
        bad[n - 1] = f32::NAN;
        assert!(!sum_into(&mut got, &[Part::Own(&parts[0]), Part::Own(&bad)]));
        let (huge, mut small) = (vec![f32::MAX; n], vec![0.0; n]);
        small[5] = f32::MAX; // overflows to infinity: not finite either
        assert!(!sum_into(&mut got, &[Part::Own(&huge), Part::Own(&small)]));
        assert!(got[5].is_infinite());
    }
}
