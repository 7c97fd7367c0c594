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

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let raw = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| file_err(path, format!("corrupt gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}
