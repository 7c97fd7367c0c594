//! NumPy .npy files (format 1.0-3.0, C order): features in one file, labels in another.

use crate::dataset::{labels_from_values, Dataset, Features};
use crate::{file_err, DataError};
use std::path::Path;

struct Array {
    shape: Vec<usize>,
    kind: char,
    size: usize,
    data: Vec<u8>,
}

fn parse(path: &Path) -> Result<Array, DataError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(file_err(path, "not a .npy file (bad magic)"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(file_err(path, format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| file_err(path, "truncated or unreadable .npy header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[at..].trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| file_err(path, "the .npy header has no descr"))?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(file_err(path, "Fortran-order arrays are not supported; save with np.ascontiguousarray"));
    }
    let shape_s = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| file_err(path, "the .npy header has no shape"))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| file_err(path, format!("bad shape entry {s:?}"))))
        .collect::<Result<_, _>>()?;
    let d = descr.as_bytes();
    let (order, kind) = (d.first().copied().unwrap_or(b'?'), d.get(1).copied().unwrap_or(b'?') as char);
    let size: usize = descr.get(2..).and_then(|s| s.parse().ok()).unwrap_or(0);
    let ok = matches!((kind, size), ('u', 1) | ('i', 1 | 2 | 4 | 8) | ('u', 2 | 4 | 8) | ('f', 4 | 8))
        && (order != b'>' || size == 1);
    if !ok {
        return Err(file_err(
            path,
            format!("dtype {descr:?} is not supported (use uint8, int*, float32 or float64, little-endian)"),
        ));
    }
    // The header is the file's word: its product is checked, never trusted to fit.
    let need = shape.iter().try_fold(size, |n, &d| n.checked_mul(d));
    let data = &bytes[start + hlen..]; // the header's end was checked above
    match need {
        Some(need) if need == data.len() => {}
        Some(need) => {
            let msg = format!("shape {shape:?} needs {need} bytes of data, the file has {}", data.len());
            return Err(file_err(path, msg));
        }
        None => return Err(file_err(path, format!("shape {shape:?} is larger than any file"))),
    }
    let data = data.to_vec();
    Ok(Array { shape, kind, size, data })
}

impl Array {
    fn values(&self) -> Vec<f64> {
        self.data
            .chunks_exact(self.size)
            .map(|c| match (self.kind, self.size) {
                ('u', 1) => f64::from(c[0]),
                ('i', 1) => f64::from(c[0] as i8),
                ('i', 2) => f64::from(i16::from_le_bytes([c[0], c[1]])),
                ('u', 2) => f64::from(u16::from_le_bytes([c[0], c[1]])),
                ('i', 4) => f64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))),
                ('u', 4) => f64::from(u32::from_le_bytes(c.try_into().expect("4 bytes"))),
                ('i', 8) => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
                ('u', 8) => u64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
                ('f', 4) => f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))),
                _ => f64::from_le_bytes(c.try_into().expect("8 bytes")),
            })
            .collect()
    }
}

/// Features from a .npy file (first axis = samples; uint8 stays uint8): (shape, features).
pub(crate) fn load_x(x: &Path) -> Result<(Vec<usize>, Features), DataError> {
    let xa = parse(x)?;
    if xa.shape.is_empty() {
        return Err(file_err(x, "features need at least one dimension (samples)"));
    }
    let features = if (xa.kind, xa.size) == ('u', 1) {
        Features::U8(xa.data)
    } else {
        let v = xa.values();
        if let Some(i) = v.iter().position(|f| !f.is_finite()) {
            return Err(file_err(x, format!("value {} (flat index {i}) is not finite", v[i])));
        }
        Features::F32(v.into_iter().map(|f| f as f32).collect())
    };
    Ok((xa.shape, features))
}

/// Loads features from `x` and labels from `y`.
pub fn load_npy(x: &Path, y: &Path) -> Result<Dataset, DataError> {
    let (xshape, features) = load_x(x)?;
    let ya = parse(y)?;
    let yv = ya.values();
    if let Some(i) = yv.iter().position(|f| !f.is_finite()) {
        return Err(file_err(y, format!("label {} (flat index {i}) is not finite", yv[i])));
    }
    let width = match ya.shape.len() {
        1 => 1,
        2 => ya.shape[1],
        _ => return Err(file_err(y, format!("labels must be 1-D or 2-D, shape is {:?}", ya.shape))),
    };
    if ya.shape.first() != xshape.first() {
        return Err(file_err(y, format!("{} labels, but {} has {} samples", ya.shape[0], x.display(), xshape[0])));
    }
    Dataset::new(features, xshape[1..].to_vec(), labels_from_values(yv, width)).map_err(|e| file_err(x, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Labels;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend((h.len() as u16).to_le_bytes());
        v.extend(h.as_bytes());
        v.extend(data);
        v
    }

    #[test]
    fn loads_u8_features_and_int_labels() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
        std::fs::write(&x, npy("|u1", "2, 3", &[1, 2, 3, 4, 5, 6])).unwrap();
        let labels: Vec<u8> = [1i64, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&y, npy("<i8", "2,", &labels)).unwrap();
        let d = load_npy(&x, &y).unwrap();
        assert_eq!(d.features, Features::U8(vec![1, 2, 3, 4, 5, 6]));
        assert_eq!(d.labels, Labels::Classes(vec![1, 0]));
        std::fs::write(&x, npy("<f4", "2, 1", &f32::NAN.to_le_bytes().repeat(2))).unwrap();
        assert!(load_npy(&x, &y).unwrap_err().to_string().contains("x.npy: value NaN (flat index 0) is not finite"));
        std::fs::write(&x, npy("|u1", "2, 3", &[1, 2])).unwrap();
        assert!(load_npy(&x, &y).unwrap_err().to_string().contains("needs 6 bytes of data, the file has 2"));
        // A shape whose product overflows is refused, not wrapped around to the data's length.
        std::fs::write(&x, npy("|u1", "8, 7, 7905747460161236407", &[0; 56])).unwrap();
        let e = load_npy(&x, &y).unwrap_err().to_string();
        assert!(e.contains("is larger than any file"), "{e}");
    }
}
