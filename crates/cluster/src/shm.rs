//! Shared memory for workers on the coordinator's host: the parameters and the gradients of a
//! step go through shared memory instead of through TCP, while gRPC still carries every
//! message (so ordering, deadlines, faults and recomputation are unchanged).
//!
//! The coordinator writes each step's parameters once, into one region that every local worker
//! maps read-only, and gives each worker its own gradient slots (one per shard) that only that
//! worker writes. Each is an anonymous memory file (`memfd`) sealed against shrinking and
//! growing, offered as the coordinator's descriptor path `/proc/<pid>/fd/<n>` with a random
//! nonce in `Welcome`. A worker that can open it, finds it sealed and finds the nonce says
//! `Attached`, and the coordinator closes the slots' descriptor at once (the mappings stay); the
//! parameters' stays open while the coordinator runs (workers may join later). Nothing is left
//! behind when a coordinator is killed: the memory goes with the last mapping.
//!
//! Why sealed: a worker may truncate a file it can write, and a process reading a mapping past
//! the end of its file dies of SIGBUS; a sealed memfd cannot shrink, whoever holds it. Why a
//! descriptor path: a worker only ever maps what the coordinator made, never a file on disk a
//! hostile coordinator names (the worker checks the path's form and the seals).
//!
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
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
#[cfg(test)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"DTRAINSM";
const HEADER: usize = 64;
/// The seals every shared region carries: its size is fixed for good.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A mapped shared-memory region file: a header and equal regions of f32 values.
pub struct SharedFile {
    map: MmapRaw,
    /// Values per region, and regions.
    values: usize,
    regions: usize,
    writable: bool,
}

/// The name a shared-memory file is offered under (`/proc/<pid>/fd/<n>`), valid while this
/// lives: dropping it closes the coordinator's descriptor (mappings of the file stay valid).
pub struct FileName {
    _file: File,
    path: String,
}

impl FileName {
    /// The path, as offered to a worker.
    pub fn path(&self) -> String {
        self.path.clone()
    }
}

/// A random number (from the standard library's per-process random hash keys).
pub fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// Whether this host can share memory with local workers: Linux's memfd and /proc, and values
/// in the byte order the checks read (little-endian).
pub fn available() -> bool {
    cfg!(target_os = "linux") && cfg!(target_endian = "little") && Path::new("/proc/self/fd").is_dir()
}

/// Whether `path` has the form `/proc/<pid>/fd/<n>`: another process's descriptor.
fn is_descriptor_path(path: &Path) -> bool {
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let Some(s) = path.to_str() else { return false };
    let parts: Vec<&str> = s.split('/').collect();
    matches!(parts[..], ["", "proc", pid, "fd", n] if digits(pid) && digits(n))
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
    /// Makes a sealed memory file with `regions` regions of `values` f32 each; `what` names it
    /// in /proc for people looking.
    pub fn create(what: &str, nonce: u64, values: usize, regions: usize) -> io::Result<(Self, FileName)> {
        let len = file_len(values, regions).ok_or_else(|| io::Error::other("sizes overflow"))?;
        let name = std::ffi::CString::new(format!("dtrain-{what}")).map_err(io::Error::other)?;
        // SAFETY: memfd_create(2) reads the NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns; the File closes it.
        let mut file = unsafe { File::from_raw_fd(fd) };
        // Written out, not just sized: a full memory limit fails here, not later as SIGBUS.
        let mut head = vec![0u8; len];
        head[..32].copy_from_slice(&header(nonce, values, regions));
        std::io::Write::write_all(&mut file, &head)?;
        // SAFETY: fcntl(2) on a descriptor of ours, with integer arguments only.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, SEALS | libc::F_SEAL_SEAL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = MmapOptions::new().map_raw(&file)?;
        let path = format!("/proc/{}/fd/{fd}", std::process::id());
        Ok((SharedFile { map, values, regions, writable: true }, FileName { _file: file, path }))
    }

    /// Opens what the coordinator offered; fails unless it is a sealed memory file of the
    /// coordinator's (a descriptor path) with the offered nonce and sizes.
    pub fn open(path: &Path, nonce: u64, values: usize, regions: usize, writable: bool) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // The path comes from a peer: only a descriptor path is opened (never a file on disk
        // the worker could be made to overwrite), without blocking (a FIFO), and only a sealed
        // memory file is mapped.
        if !is_descriptor_path(path) {
            return Err(io::Error::other("not a /proc/<pid>/fd/<n> path"));
        }
        let file = OpenOptions::new().read(true).write(writable).custom_flags(libc::O_NONBLOCK).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        // SAFETY: fcntl(2) on a descriptor of ours, with integer arguments only.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(io::Error::other("not sealed shared memory"));
        }
        if file_len(values, regions).is_none_or(|len| meta.len() != len as u64) {
            return Err(io::Error::other("size does not match the job"));
        }
        let options = MmapOptions::new();
        let map = if writable { options.map_raw(&file)? } else { options.map_raw_read_only(&file)? };
        let shared = SharedFile { map, values, regions, writable };
        // SAFETY: the mapping is at least HEADER bytes long (its length was checked) and sealed
        // against shrinking.
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

    fn read(f: &SharedFile, i: usize) -> [f32; 5] {
        let mut v = [0.0; 5];
        f.shared(i).unwrap().read_into(&mut v);
        v
    }

    #[test]
    fn both_sides_see_each_others_writes_and_a_wrong_nonce_is_refused() {
        let (mut c, name) = SharedFile::create("t", 7, 5, 2).unwrap();
        c.region_mut(0).unwrap().copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let path = std::path::PathBuf::from(name.path());
        assert!(SharedFile::open(&path, 8, 5, 2, true).is_err());
        assert!(SharedFile::open(&path, 7, 6, 2, true).is_err());
        assert!(SharedFile::open(&path, 7, 5, 3, true).is_err());
        let mut w = SharedFile::open(&path, 7, 5, 2, true).unwrap();
        let mut r = SharedFile::open(&path, 7, 5, 2, false).unwrap();
        assert!(r.region_mut(1).is_none(), "a read-only mapping is never written");
        w.region_mut(1).unwrap().copy_from_slice(&[-1.0, -2.0, -3.0, -4.0, -5.0]);
        assert!(w.region_mut(2).is_none() && w.shared(2).is_none());
        assert_eq!(read(&c, 1), [-1.0, -2.0, -3.0, -4.0, -5.0]);
        assert_eq!(read(&r, 1), [-1.0, -2.0, -3.0, -4.0, -5.0]);
        drop(name);
        assert!(!path.exists(), "the offered name is gone with the coordinator's descriptor");
        assert_eq!(read(&r, 0), [1.0, 2.0, 3.0, 4.0, 5.0], "mappings stay valid");
    }

    #[test]
    fn a_worker_cannot_shrink_or_grow_the_memory_the_coordinator_reads() {
        let (c, name) = SharedFile::create("t", 7, 5, 2).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(name.path()).unwrap();
        let len = f.metadata().unwrap().len();
        assert!(f.set_len(0).is_err(), "truncating would kill readers with SIGBUS");
        assert!(f.set_len(len + 4096).is_err());
        // SAFETY: fcntl(2) on a descriptor of ours, with integer arguments only.
        assert_ne!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, 0) }, 0, "the seals are sealed");
        assert_eq!(read(&c, 1), [0.0; 5]);
    }

    #[test]
    fn only_a_sealed_descriptor_path_is_opened_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) reads the NUL-terminated path and touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let e = SharedFile::open(&fifo, 7, 5, 2, false).err().expect("a FIFO is refused");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{e}");
        assert!(e.to_string().contains("not a /proc/<pid>/fd/<n> path"), "{e}");
        // A descriptor of a FIFO: opened without blocking, then refused.
        let held = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        let path = format!("/proc/self/fd/{}", held.as_raw_fd());
        assert!(!is_descriptor_path(Path::new(&path)), "self is not a pid");
        let path = format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd());
        let e = SharedFile::open(Path::new(&path), 7, 5, 2, false).err().expect("a FIFO is refused");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // A descriptor of a file on disk (which a worker must never overwrite): refused.
        let disk = tempfile::tempfile().unwrap();
        disk.set_len(file_len(5, 2).unwrap() as u64).unwrap();
        let path = format!("/proc/{}/fd/{}", std::process::id(), disk.as_raw_fd());
        let e = SharedFile::open(Path::new(&path), 7, 5, 2, true).err().expect("an unsealed file is refused");
        assert!(e.to_string().contains("not sealed"), "{e}");
        for bad in ["/dev/shm/x", "/proc/1/fd/", "/proc/1/fd/x", "/proc/1/fd/3/..", "proc/1/fd/3", "/proc/1/cwd/3"] {
            assert!(!is_descriptor_path(Path::new(bad)), "{bad}");
        }
        let (_file, name) = SharedFile::create("real", 7, 5, 2).unwrap();
        assert!(SharedFile::open(Path::new(&name.path()), 7, 5, 2, false).is_ok());
    }
}
