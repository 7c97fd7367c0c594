//! IDX files (MNIST, Fashion-MNIST), raw or gzipped.

use crate::dataset::{Dataset, Features, Labels};
use crate::{file_err, read_maybe_gz, DataError};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Which IDX files of a directory: `train-*` or `t10k-*`.
pub enum IdxSplit {
    /// `train-images-idx3-ubyte` and `train-labels-idx1-ubyte` (raw or .gz).
    Train,
    /// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` (raw or .gz).
    Test,
}

/// Parses one IDX file of unsigned bytes: returns (dims, data).
fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(file_err(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(file_err(
            path,
            format!("IDX element type 0x{:02x} is not supported (only 0x08, unsigned byte)", bytes[2]),
        ));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(file_err(path, "truncated IDX header"));
    }
    let dims: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let body = bytes.len() - header;
    match expected {
        Some(e) if e == body => Ok((dims, bytes[header..].to_vec())),
        Some(e) => Err(file_err(path, format!("IDX header {dims:?} promises {e} bytes of data, the file has {body}"))),
        None => Err(file_err(path, format!("IDX dimensions {dims:?} are too large"))),
    }
}

/// One IDX file of bytes: (dims, data). A gzipped one is decompressed no further than its
/// header's dimensions promise.
pub(crate) fn load_file(path: &Path) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    // The header: 4 bytes, then 4 per dimension (at most 255 dimensions).
    let size = |head: &[u8]| -> Result<usize, DataError> {
        let ndim = head.get(3).map_or(0, |&n| n as usize);
        let dims = head.get(4..4 + 4 * ndim).ok_or_else(|| file_err(path, "truncated IDX header"))?;
        let body = dims
            .chunks_exact(4)
            .try_fold(1usize, |a, c| a.checked_mul(u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize));
        body.and_then(|b| b.checked_add(4 + 4 * ndim)).ok_or_else(|| file_err(path, "IDX dimensions are too large"))
    };
    parse(path, &read_maybe_gz(path, 4 + 4 * 255, size)?)
}

/// Finds `<stem>` or `<stem>.gz` in `dir`.
fn find(dir: &Path, stems: &[&str]) -> Result<PathBuf, DataError> {
    for stem in stems {
        for name in [stem.to_string(), format!("{stem}.gz")] {
            let p = dir.join(&name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(file_err(dir, format!("no {} (or .gz) in this directory", stems.join(" / "))))
}

/// Loads the train or test split of an MNIST-style IDX directory.
pub fn load_idx_dir(dir: &Path, split: IdxSplit) -> Result<Dataset, DataError> {
    let (img, lbl) = match split {
        IdxSplit::Train => (
            ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
            ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
        ),
        IdxSplit::Test => {
            (["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"], ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"])
        }
    };
    let img_path = find(dir, &img)?;
    let lbl_path = find(dir, &lbl)?;
    let (idims, pixels) = load_file(&img_path)?;
    let (ldims, labels) = load_file(&lbl_path)?;
    if ldims.len() != 1 {
        return Err(file_err(&lbl_path, format!("labels must be 1-D, the file has dimensions {ldims:?}")));
    }
    if idims[0] != ldims[0] {
        return Err(file_err(
            &lbl_path,
            format!("{} labels, but {} has {} images", ldims[0], img_path.display(), idims[0]),
        ));
    }
    let classes = labels.into_iter().map(u32::from).collect();
    Dataset::new(Features::U8(pixels), idims[1..].to_vec(), Labels::Classes(classes))
        .map_err(|e| file_err(&img_path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        dims.iter().for_each(|d| v.extend(d.to_be_bytes()));
        v.extend(data);
        v
    }

    #[test]
    fn loads_raw_and_gzip_and_rejects_damage() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), idx(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&idx(&[2], &[3, 9])).unwrap();
        std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), gz.finish().unwrap()).unwrap();
        let d = load_idx_dir(dir.path(), IdxSplit::Train).unwrap();
        assert_eq!((d.len(), d.sample_shape.clone()), (2, vec![2, 2]));
        assert_eq!(d.labels, Labels::Classes(vec![3, 9]));

        std::fs::write(dir.path().join("train-images-idx3-ubyte"), idx(&[2, 2, 2], &[1, 2, 3])).unwrap();
        let e = load_idx_dir(dir.path(), IdxSplit::Train).unwrap_err().to_string();
        assert!(
            e.contains("train-images-idx3-ubyte: IDX header [2, 2, 2] promises 8 bytes of data, the file has 3"),
            "{e}"
        );

        std::fs::write(dir.path().join("train-images-idx3-ubyte"), idx(&[3, 1, 1], &[1, 2, 3])).unwrap();
        let e = load_idx_dir(dir.path(), IdxSplit::Train).unwrap_err().to_string();
        assert!(e.contains("2 labels, but") && e.contains("has 3 images"), "{e}");

        let e = load_idx_dir(dir.path(), IdxSplit::Test).unwrap_err().to_string();
        assert!(e.contains("no t10k-images-idx3-ubyte"), "{e}");
    }

    #[test]
    fn a_gzip_stream_that_expands_past_its_header_is_stopped() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.gz");
        // The header promises 2 label bytes; the stream holds 64 MiB of zeros (64 KiB compressed).
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&idx(&[2], &[1, 2])).unwrap();
        let zeros = vec![0u8; 1 << 20];
        (0..64).for_each(|_| gz.write_all(&zeros).unwrap());
        let bytes = gz.finish().unwrap();
        assert!(bytes.len() < 1 << 20, "a small file");
        std::fs::write(&path, bytes).unwrap();
        let e = load_file(&path).unwrap_err().to_string();
        assert!(e.contains("expands past the 10 bytes its header promises"), "{e}");
    }
}
