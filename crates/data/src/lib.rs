//! dtrain-data: datasets in memory (pixels stay u8 and are rescaled when a batch is
//! gathered), loaders for IDX, CSV and NPY files, and the epoch permutation.

mod csv;
mod dataset;
mod features;
mod idx;
mod npy;
mod order;

pub use csv::load_csv;
pub use dataset::{Dataset, Features, Labels};
pub use features::load_features;
pub use idx::{load_idx_dir, IdxSplit};
pub use npy::load_npy;
pub use order::epoch_permutation;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
/// Why data could not be loaded.
pub enum DataError {
    #[error("{}: {msg}", path.display())]
    /// A file's contents are wrong or unreadable: the file and what is wrong (line and column where known).
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    #[error("{0}")]
    /// Data that does not fit together, as the message says.
    Invalid(String),
}

pub(crate) fn file_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::File { path: path.to_path_buf(), msg: msg.into() }
}

/// Reads a file, gunzipping it when it starts with the gzip magic bytes. `size` reads the
/// expected length from the first bytes (a header), so that a gzip stream that expands past
/// what its own header promises is refused after at most one byte more, not held in memory.
pub(crate) fn read_maybe_gz(
    path: &Path,
    header: usize,
    size: impl Fn(&[u8]) -> Result<usize, DataError>,
) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let raw = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let corrupt = |e: std::io::Error| file_err(path, format!("corrupt gzip data: {e}"));
    let mut gz = flate2::read::MultiGzDecoder::new(&raw[..]);
    let mut out = Vec::new();
    (&mut gz).take(header as u64).read_to_end(&mut out).map_err(corrupt)?;
    let total = size(&out)?;
    let rest = total.saturating_sub(out.len()) as u64 + 1;
    gz.take(rest).read_to_end(&mut out).map_err(corrupt)?;
    if out.len() > total {
        return Err(file_err(path, format!("the gzip data expands past the {total} bytes its header promises")));
    }
    Ok(out)
}
