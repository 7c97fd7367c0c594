//! A dataset in memory: features as u8 (rescaled on the fly) or f32, labels as classes or values.

use crate::DataError;

#[derive(Clone, Debug, PartialEq)]
/// Samples' features as stored: pixels stay u8 until a batch is gathered.
pub enum Features {
    /// Raw bytes, as in IDX files; `x * rescale` is computed when rows are gathered.
    U8(Vec<u8>),
    /// Features that are already floats.
    F32(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
/// Targets: class indices, or rows of values.
pub enum Labels {
    /// Class indices.
    Classes(Vec<u32>),
    /// `width` float targets per sample.
    /// `width` values per sample, row after row.
    Values {
        /// The values, sample after sample.
        data: Vec<f32>,
        /// Values per sample.
        width: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
/// Samples in memory: features, their shape, labels, and the rescale applied when gathered.
pub struct Dataset {
    /// All samples' features, sample after sample.
    pub features: Features,
    /// Shape of one sample (e.g. [28, 28]).
    pub sample_shape: Vec<usize>,
    /// One label (or row of targets) per sample.
    pub labels: Labels,
    /// Multiplier applied to every feature when gathered (Keras users divide by 255).
    pub rescale: f64,
}

impl Dataset {
    /// Samples from their parts; an error if the lengths do not agree with the shape.
    pub fn new(features: Features, sample_shape: Vec<usize>, labels: Labels) -> Result<Self, DataError> {
        let d = Dataset { features, sample_shape, labels, rescale: 1.0 };
        let width = d.width();
        let flen = match &d.features {
            Features::U8(v) => v.len(),
            Features::F32(v) => v.len(),
        };
        if width == 0 || flen % width != 0 {
            return Err(DataError::Invalid(format!(
                "{flen} feature values do not split into samples of shape {:?}",
                d.sample_shape
            )));
        }
        let n = flen / width;
        let labels = d.num_labels();
        if labels != n {
            return Err(DataError::Invalid(format!("{n} samples but {labels} labels")));
        }
        Ok(d)
    }

    /// The same samples, multiplied by `rescale` when gathered (Keras's Rescaling, 1/255 for pixels).
    pub fn with_rescale(mut self, rescale: f64) -> Self {
        self.rescale = rescale;
        self
    }

    fn num_labels(&self) -> usize {
        match &self.labels {
            Labels::Classes(c) => c.len(),
            Labels::Values { data, width } => data.len() / (*width).max(1),
        }
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.num_labels()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Features per sample.
    pub fn width(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Writes the features of `rows` (row-major, `rows.len() * width` values) into `out`.
    pub fn gather(&self, rows: &[u32], out: &mut [f32]) {
        let w = self.width();
        assert_eq!(out.len(), rows.len() * w, "output holds the gathered rows");
        match &self.features {
            Features::U8(v) => gather_u8(v, w, self.rescale, rows, out),
            Features::F32(v) => gather_f32(v, w, self.rescale, rows, out),
        }
    }

    /// Asks the CPU to start loading the features of `rows` into cache, so that gathering
    /// them a step later does not wait on memory (rows of a shuffled epoch are scattered).
    pub fn prefetch(&self, rows: &[u32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            let w = self.width();
            let (base, elem) = match &self.features {
                Features::U8(v) => (v.as_ptr(), 1),
                Features::F32(v) => (v.as_ptr().cast::<u8>(), 4),
            };
            let len = self.len() * w * elem;
            for &r in rows {
                let start = r as usize * w * elem;
                for off in (start..(start + w * elem).min(len)).step_by(64) {
                    // SAFETY: prefetching never faults, and `off` is inside the allocation.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(base.add(off).cast::<i8>()) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = rows;
    }

    /// The samples `rows`, copied as they are stored (bytes stay bytes), with the same rescale.
    pub fn subset(&self, rows: &[u32]) -> Dataset {
        let w = self.width();
        let features = match &self.features {
            Features::U8(v) => Features::U8(pick_rows(v, w, rows)),
            Features::F32(v) => Features::F32(pick_rows(v, w, rows)),
        };
        let labels = match &self.labels {
            Labels::Classes(c) => Labels::Classes(rows.iter().map(|&r| c[r as usize]).collect()),
            Labels::Values { data, width } => Labels::Values { data: pick_rows(data, *width, rows), width: *width },
        };
        Dataset { features, sample_shape: self.sample_shape.clone(), labels, rescale: self.rescale }
    }

    /// Splits off the last `fraction` of the samples (Keras's `validation_split`, taken
    /// before any shuffling): returns (train, validation).
    pub fn split_tail(self, fraction: f64) -> (Dataset, Dataset) {
        let n = self.len();
        let at = (n as f64 * (1.0 - fraction)).floor() as usize;
        let w = self.width();
        let (fa, fb) = match self.features {
            Features::U8(mut v) => {
                let b = v.split_off(at * w);
                (Features::U8(v), Features::U8(b))
            }
            Features::F32(mut v) => {
                let b = v.split_off(at * w);
                (Features::F32(v), Features::F32(b))
            }
        };
        let (la, lb) = match self.labels {
            Labels::Classes(mut c) => {
                let b = c.split_off(at);
                (Labels::Classes(c), Labels::Classes(b))
            }
            Labels::Values { mut data, width } => {
                let b = data.split_off(at * width);
                (Labels::Values { data, width }, Labels::Values { data: b, width })
            }
        };
        let shape = self.sample_shape;
        let r = self.rescale;
        (
            Dataset { features: fa, sample_shape: shape.clone(), labels: la, rescale: r },
            Dataset { features: fb, sample_shape: shape, labels: lb, rescale: r },
        )
    }

    /// The largest class index, if labels are classes.
    pub fn max_class(&self) -> Option<u32> {
        match &self.labels {
            Labels::Classes(c) => c.iter().copied().max(),
            Labels::Values { .. } => None,
        }
    }
}

dtrain_nn::simd_dispatch! {
    /// Keras users write x / 255.0: float64 arithmetic rounded once to float32.
    fn gather_u8(v: &[u8], w: usize, rescale: f64, rows: &[u32], out: &mut [f32]) {
        for (dst, &r) in out.chunks_exact_mut(w).zip(rows) {
            let src = &v[r as usize * w..][..w];
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = (f64::from(s) * rescale) as f32);
        }
    }
}

dtrain_nn::simd_dispatch! {
    fn gather_f32(v: &[f32], w: usize, rescale: f64, rows: &[u32], out: &mut [f32]) {
        for (dst, &r) in out.chunks_exact_mut(w).zip(rows) {
            let src = &v[r as usize * w..][..w];
            if rescale == 1.0 {
                dst.copy_from_slice(src);
            } else {
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d = (f64::from(s) * rescale) as f32);
            }
        }
    }
}

/// Labels from integral floats become classes; anything else stays values.
pub(crate) fn labels_from_values(values: Vec<f64>, width: usize) -> Labels {
    let integral = width == 1 && values.iter().all(|&v| v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX));
    if integral {
        Labels::Classes(values.iter().map(|&v| v as u32).collect())
    } else {
        Labels::Values { data: values.iter().map(|&v| v as f32).collect(), width }
    }
}

/// The rows `rows` of a row-major matrix `width` wide, copied row by row (a whole-row copy
/// vectorizes; an element-wise gather of a shard's 12 KB of pixels does not).
fn pick_rows<T: Copy>(v: &[T], width: usize, rows: &[u32]) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&v[r as usize * width..][..width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_rescales_bytes_like_division_by_255() {
        let d = Dataset::new(Features::U8(vec![0, 255, 128, 1]), vec![2], Labels::Classes(vec![0, 1]))
            .unwrap()
            .with_rescale(1.0 / 255.0);
        let mut out = [0.0; 4];
        d.gather(&[1, 0], &mut out);
        assert_eq!(out, [(128.0f64 / 255.0) as f32, (1.0f64 / 255.0) as f32, 0.0, 1.0]);
    }

    #[test]
    fn split_tail_takes_the_last_fraction() {
        let d = Dataset::new(
            Features::F32((0..10).map(|v| v as f32).collect()),
            vec![1],
            Labels::Classes((0..10).collect()),
        )
        .unwrap();
        let (a, b) = d.split_tail(0.2);
        assert_eq!((a.len(), b.len()), (8, 2));
        assert_eq!(b.labels, Labels::Classes(vec![8, 9]));
    }

    #[test]
    fn counts_must_agree() {
        let e = Dataset::new(Features::U8(vec![0; 6]), vec![2], Labels::Classes(vec![0, 1])).unwrap_err();
        assert_eq!(e.to_string(), "3 samples but 2 labels");
    }
}
