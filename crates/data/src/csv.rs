//! CSV files: one sample a line, a label column and feature columns, optional header.

use crate::dataset::{labels_from_values, Dataset, Features};
use crate::{file_err, DataError};
use std::path::Path;

/// Reads a CSV of numbers: (values row-major, columns, rows). A first line that does not
/// parse as numbers is taken as a header.
fn read_numbers(path: &Path) -> Result<(Vec<f64>, usize, usize), DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let mut values = Vec::new();
    let (mut width, mut rows) = (None, 0usize);
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let row: Vec<f64> = match cells.iter().map(|c| c.parse::<f64>()).collect() {
            Ok(v) => v,
            Err(_) if width.is_none() && line_no == 1 => continue, // header
            Err(_) => {
                let bad = cells.iter().position(|c| c.parse::<f64>().is_err()).unwrap_or(0);
                return Err(file_err(
                    path,
                    format!("line {line_no}, column {}: {:?} is not a number", bad + 1, cells[bad]),
                ));
            }
        };
        if let Some(bad) = row.iter().position(|v| !v.is_finite()) {
            return Err(file_err(path, format!("line {line_no}, column {}: {} is not finite", bad + 1, row[bad])));
        }
        let w = *width.get_or_insert(row.len());
        if row.len() != w {
            return Err(file_err(path, format!("line {line_no}: {} columns, earlier lines have {w}", row.len())));
        }
        values.extend(row);
        rows += 1;
    }
    let width = width.ok_or_else(|| file_err(path, "no data lines"))?;
    Ok((values, width, rows))
}

/// Loads a labelled CSV: `label_column` is the label's index (negative counts from the end).
pub fn load_csv(path: &Path, label_column: i64, sample_shape: Option<&[usize]>) -> Result<Dataset, DataError> {
    let (values, w, _) = read_numbers(path)?;
    if w < 2 {
        return Err(file_err(path, "needs a label column and at least one feature column"));
    }
    let lc = if label_column < 0 { w as i64 + label_column } else { label_column };
    if !(0..w as i64).contains(&lc) {
        return Err(file_err(path, format!("label_column {label_column} is outside the {w} columns")));
    }
    let lc = lc as usize;
    let mut features = Vec::with_capacity(values.len());
    let mut labels = Vec::with_capacity(values.len() / w);
    for row in values.chunks_exact(w) {
        labels.push(row[lc]);
        features.extend(row.iter().enumerate().filter(|(j, _)| *j != lc).map(|(_, &v)| v as f32));
    }
    let shape = sample_shape.map_or_else(|| vec![w - 1], <[usize]>::to_vec);
    if shape.iter().product::<usize>() != w - 1 {
        return Err(file_err(path, format!("{} feature columns do not match input_shape {shape:?}", w - 1)));
    }
    Dataset::new(Features::F32(features), shape, labels_from_values(labels, 1))
        .map_err(|e| file_err(path, e.to_string()))
}

/// A CSV of features only (for predict): (features, rows).
pub(crate) fn load_unlabeled(path: &Path) -> Result<(Features, usize), DataError> {
    let (values, _, rows) = read_numbers(path)?;
    Ok((Features::F32(values.into_iter().map(|v| v as f32).collect()), rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Labels;

    #[test]
    fn header_label_column_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "a,b,label\n1,2,0\n3,4,2\n").unwrap();
        let d = load_csv(&p, -1, None).unwrap();
        assert_eq!(d.labels, Labels::Classes(vec![0, 2]));
        assert_eq!(d.features, Features::F32(vec![1.0, 2.0, 3.0, 4.0]));
        std::fs::write(&p, "1,2,0\n3,x,2\n").unwrap();
        let e = load_csv(&p, -1, None).unwrap_err().to_string();
        assert!(e.ends_with("d.csv: line 2, column 2: \"x\" is not a number"), "{e}");
        std::fs::write(&p, "1,2,0\n3,nan,2\n").unwrap();
        assert!(load_csv(&p, -1, None).unwrap_err().to_string().contains("line 2, column 2: NaN is not finite"));
        std::fs::write(&p, "1,2,0\n3,2\n").unwrap();
        assert!(load_csv(&p, 0, None).unwrap_err().to_string().contains("line 2: 2 columns, earlier lines have 3"));
        std::fs::write(&p, "0.5,2,0\n").unwrap();
        assert!(matches!(load_csv(&p, 0, None).unwrap().labels, Labels::Values { .. }));
    }
}
