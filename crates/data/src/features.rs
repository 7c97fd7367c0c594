//! Inputs without labels, for predict: .npy, .csv (features only) or an IDX image file.

use crate::dataset::{Dataset, Features, Labels};
use crate::{file_err, DataError};
use std::path::Path;

/// Features without labels (for predict) from .npy, .csv or an IDX image file, checked against `sample_shape`.
pub fn load_features(path: &Path, sample_shape: &[usize]) -> Result<Dataset, DataError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (features, n) = if name.ends_with(".npy") {
        let (shape, f) = crate::npy::load_x(path)?;
        (f, shape.first().copied().unwrap_or(0))
    } else if name.ends_with(".csv") {
        let d = crate::csv::load_unlabeled(path)?;
        let n = d.1;
        (d.0, n)
    } else if name.contains("idx") {
        let (dims, data) = crate::idx::load_file(path)?;
        (Features::U8(data), dims[0])
    } else {
        return Err(file_err(path, "unknown input type: use .npy, .csv or an IDX images file"));
    };
    let width: usize = sample_shape.iter().product();
    let len = match &features {
        Features::U8(v) => v.len(),
        Features::F32(v) => v.len(),
    };
    if n == 0 || len != n * width {
        return Err(file_err(
            path,
            format!("{n} samples of {} values do not match input_shape {sample_shape:?}", len / n.max(1)),
        ));
    }
    Dataset::new(features, sample_shape.to_vec(), Labels::Classes(vec![0; n]))
        .map_err(|e| file_err(path, e.to_string()))
}
