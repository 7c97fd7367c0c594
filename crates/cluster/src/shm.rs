//! Shared memory for workers on the coordinator's host: the parameters and the gradients of a
//! step go through files in /dev/shm instead of through TCP, while gRPC still carries every
//! message (so ordering, deadlines, faults and recomputation are unchanged).
//!
//! The coordinator writes each step's parameters once, into one file that every local worker
//! maps read-only, and gives each worker a file of gradient slots (one per shard) that only
//! that worker writes. Both are offered by path and a random nonce in `Welcome`; a worker that
//! can open them and finds the nonce says `Attached`, and the slots' name is removed at once.
//! The parameters' name stays while the coordinator runs (workers may join later); a
//! coordinator that was killed leaves it, and the next coordinator on the host removes it.
//! Phases never overlap for honest peers: the coordinator writes the parameters only while no
//! work is outstanding, and reads slot k only after the result for shard k arrived. A worker
//! dropped for lateness may still be reading the parameters while the next step's are written,
//! and a hostile worker may write its slots at any time; so whatever another process writes is
//! read only with volatile loads (`simd::Volatile`), never through a slice: a worker copies
//! the parameters out before computing, and the coordinator sums slots with volatile loads.
//! Each side writes through a slice only what no other process writes.
//!
//! Layout: a 64-byte header (magic, nonce, values per region, region count), then the
//! regions, each starting on a 64-byte boundary.

use dtrain_nn::simd::Volatile;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DTRAINSM";
const HEADER: usize = 64;
/// Every file the coordinator makes is named `PREFIX<pid>-...`.
const PREFIX: &str = "dtrain-";

/// A mapped shared-memory file: a header and equal regions of f32 values.
pub struct SharedFile {
    map: MmapRaw,
    /// Values per region, and regions.
    values: usize,
    regions: usize,
    writable: bool,
}

/// A file's name, removed when this is dropped (mappings of the file stay valid).
pub struct FileName(PathBuf);

impl Drop for FileName {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl FileName {
    /// The file's path, as offered to a worker.
    pub fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

/// A random number (from the standard library's per-process random hash keys).
pub fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// The directory where the coordinator offers shared memory, if this host has one.
pub fn dir() -> Option<PathBuf> {
    // Values are shared in the host's byte order, which the checks read as little-endian.
    let d = PathBuf::from("/dev/shm");
    (cfg!(target_endian = "little") && d.is_dir()).then_some(d)
}

/// A name for a new file of this process in `dir`.
pub fn file_name(what: &str) -> String {
    format!("{PREFIX}{}-{what}-{:016x}", std::process::id(), nonce())
}

/// Removes files in `dir` left by coordinators that no longer run (killed before they could
/// clean up). Does nothing where process ids cannot be checked.
pub fn remove_stale(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|n| n.split('-').next());
        if let Some(pid) = pid.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn region_bytes(values: usize) -> usize {
    (values * 4).div_ceil(64) * 64
}

/// The file's length; `None` if the sizes (which may come from a peer's offer) overflow.
fn file_len(values: usize, regions: usize) -> Option<usize> {
    let region = values.checked_mul(4)?.div_ceil(64).checked_mul(64)?;
    region.checked_mul(regions)?.checked_add(HEADER)
}

fn header(nonce: u64, values: usize, regions: usize) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&nonce.to_le_bytes());
    h[16..24].copy_from_slice(&(values as u64).to_le_bytes());
    h[24..32].copy_from_slice(&(regions as u64).to_le_bytes());
    h
}

impl SharedFile {
    /// Creates `dir/name` with `regions` regions of `values` f32 each.
    pub fn create(dir: &Path, name: &str, nonce: u64, values: usize, regions: usize) -> io::Result<(Self, FileName)> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = FileName(dir.join(name));
        let mut file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path.0)?;
        // Written out, not just sized: a full /dev/shm fails here, not later as SIGBUS on a write.
        let len = file_len(values, regions).ok_or_else(|| io::Error::other("sizes overflow"))?;
        let mut head = vec![0u8; len];
        head[..32].copy_from_slice(&header(nonce, values, regions));
        std::io::Write::write_all(&mut file, &head)?;
        let map = MmapOptions::new().map_raw(&file)?;
        Ok((SharedFile { map, values, regions, writable: true }, path))
    }

    /// Opens what the coordinator offered; fails unless it is the same file (nonce and sizes).
    pub fn open(path: &Path, nonce: u64, values: usize, regions: usize, writable: bool) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // The path comes from a peer: a FIFO must not block the open, a symlink is not followed,
        // and only a regular file is mapped.
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        if file_len(values, regions).is_none_or(|len| meta.len() != len as u64) {
            return Err(io::Error::other("size does not match the job"));
        }
        let options = MmapOptions::new();
        let map = if writable { options.map_raw(&file)? } else { options.map_raw_read_only(&file)? };
        let shared = SharedFile { map, values, regions, writable };
        // SAFETY: the mapping is at least HEADER bytes long (its length was checked).
        let head = unsafe { std::slice::from_raw_parts(shared.map.as_ptr(), 32) };
        if head != header(nonce, values, regions) {
            return Err(io::Error::other("not the offered file"));
        }
        Ok(shared)
    }

    fn start(&self, i: usize) -> usize {
        HEADER + region_bytes(self.values) * i
    }

    /// Region `i`, as written by the other process: read it only through the volatile view.
    pub fn shared(&self, i: usize) -> Option<Volatile<'_>> {
        // SAFETY: regions start on 64-byte boundaries of a page-aligned mapping of exactly
        // `file_len` bytes that stays mapped while `self` lives, and hold `values` values each;
        // any bits are an f32. The mapping is no Rust allocation.
        (i < self.regions).then(|| unsafe { Volatile::new(self.map.as_ptr().add(self.start(i)).cast(), self.values) })
    }

    /// Region `i`, to write; `None` if out of range or mapped read-only. Only for a region no
    /// other process writes (the coordinator's parameters, a worker's own slots).
    pub fn region_mut(&mut self, i: usize) -> Option<&mut [f32]> {
        // SAFETY: laid out as in `shared`; `&mut self` makes this the only view of it in this
        // process, and no other process writes it (other processes reading it cannot change
        // what this process sees).
        (self.writable && i < self.regions).then(|| unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(self.start(i)).cast(), self.values)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_see_each_others_writes_and_a_wrong_nonce_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, name) = SharedFile::create(dir.path(), "t", 7, 5, 2).unwrap();
        c.region_mut(0).unwrap().copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let path = dir.path().join("t");
        assert!(SharedFile::open(&path, 8, 5, 2, true).is_err());
        assert!(SharedFile::open(&path, 7, 6, 2, true).is_err());
        assert!(SharedFile::open(&path, 7, 5, 3, true).is_err());
        let mut w = SharedFile::open(&path, 7, 5, 2, true).unwrap();
        let mut r = SharedFile::open(&path, 7, 5, 2, false).unwrap();
        assert!(r.region_mut(1).is_none(), "a read-only mapping is never written");
        w.region_mut(1).unwrap().copy_from_slice(&[-1.0, -2.0, -3.0, -4.0, -5.0]);
        assert!(w.region_mut(2).is_none() && w.shared(2).is_none());
        let read = |f: &SharedFile, i| {
            let mut v = [0.0; 5];
            f.shared(i).unwrap().read_into(&mut v);
            v
        };
        assert_eq!(read(&c, 1), [-1.0, -2.0, -3.0, -4.0, -5.0]);
        assert_eq!(read(&r, 1), [-1.0, -2.0, -3.0, -4.0, -5.0]);
        drop(name);
        assert!(!path.exists());
        assert_eq!(read(&r, 0), [1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn only_a_regular_file_is_opened_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) reads the NUL-terminated path and touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let e = SharedFile::open(&fifo, 7, 5, 2, false).err().expect("a FIFO is refused");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let (_file, name) = SharedFile::create(dir.path(), "real", 7, 5, 2).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(name.path(), &link).unwrap();
        assert!(SharedFile::open(&link, 7, 5, 2, false).is_err(), "a symlink is not followed");
        assert!(SharedFile::open(Path::new(&name.path()), 7, 5, 2, false).is_ok());
    }

    #[test]
    fn stale_files_of_dead_coordinators_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mine = file_name("params");
        // A process id that is not running (beyond the kernel's maximum).
        let dead = format!("{PREFIX}4194305-params-0000000000000001");
        for n in [&mine, &dead, &"other-file".to_string(), &format!("{PREFIX}x-1")] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        remove_stale(dir.path());
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        let mut want = vec![mine, "other-file".to_string(), format!("{PREFIX}x-1")];
        want.sort();
        assert_eq!(left, want);
    }
}
