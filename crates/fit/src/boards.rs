//! Where TensorBoard event logs go. Writing them (protobuf records) is a front end's concern:
//! the binaries plug in `dtrain-tensorboard`, so the training crate stays free of protobuf.

use std::io;
use std::path::Path;

/// Event logs by directory (a TensorBoard run such as `logs/train`), made on first use.
pub trait Boards {
    /// Scalars (tag, value) at `step` into the log of `dir`.
    fn scalars(&mut self, dir: &Path, step: i64, values: &[(&str, f32)]) -> io::Result<()>;
    /// A histogram of `values` under `tag` at `step` into the log of `dir`.
    fn histogram(&mut self, dir: &Path, tag: &str, step: i64, values: &[f32]) -> io::Result<()>;
    /// Writes what is buffered for `dir` to its file.
    fn flush(&mut self, dir: &Path) -> io::Result<()>;
}
