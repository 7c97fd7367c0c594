//! Shared memory for a worker on the coordinator's host: the parameters and the gradients of
//! a step go through one file in /dev/shm instead of through TCP, while gRPC still carries
//! every message (so ordering, deadlines, faults and recomputation are unchanged).
//!
//! The coordinator creates one file per worker (mode 0600, unique name) and offers its path
//! and a random nonce in `Welcome`; a worker that can open it and finds the nonce says
//! `Attached`, and the name is removed at once (both keep their mappings). Phases never
//! overlap: the coordinator writes a worker's parameters only while no work of that worker's
//! is outstanding, and reads slot k only after the worker's result for shard k arrived.
//!
//! Layout: a 64-byte header (magic, nonce, parameter count, slot count), the parameters, then
//! one gradient slot per shard, each region starting on a 64-byte boundary.

use memmap2::MmapMut;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DTRAINSM";
const HEADER: usize = 64;

pub struct SharedTensors {
    map: MmapMut,
    params: usize,
    slots: usize,
    /// The file's name, until it is removed.
    path: Option<PathBuf>,
}

/// A random number (from the standard library's per-process random hash keys).
pub fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

fn region_bytes(params: usize) -> usize {
    (params * 4).div_ceil(64) * 64
}

fn header(nonce: u64, params: usize, slots: usize) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&nonce.to_le_bytes());
    h[16..24].copy_from_slice(&(params as u64).to_le_bytes());
    h[24..32].copy_from_slice(&(slots as u64).to_le_bytes());
    h
}

impl SharedTensors {
    /// The directory where the coordinator offers shared memory, if this host has one.
    pub fn dir() -> Option<PathBuf> {
        // Values are shared in the host's byte order, which the checks read as little-endian.
        let d = PathBuf::from("/dev/shm");
        (cfg!(target_endian = "little") && d.is_dir()).then_some(d)
    }

    /// `path`: the name to remove on `unlink` or drop (the creator's only).
    fn map(file: &File, params: usize, slots: usize, path: Option<PathBuf>) -> io::Result<Self> {
        // SAFETY: the file is ours (created 0600 or checked by nonce); its other user follows
        // the phase protocol above, and every value read from it is checked before use.
        let map = unsafe { MmapMut::map_mut(file)? };
        Ok(SharedTensors { map, params, slots, path })
    }

    /// Creates `dir/name` for `params` parameters and `slots` gradient slots.
    pub fn create(dir: &Path, name: &str, nonce: u64, params: usize, slots: usize) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        // Written out, not just sized: a full /dev/shm fails here, not later as SIGBUS on a write.
        let len = HEADER + region_bytes(params) * (1 + slots);
        let made = std::io::Write::write_all(&mut file, &vec![0u8; len])
            .and_then(|_| Self::map(&file, params, slots, Some(path.clone())));
        let mut shm = made.inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })?;
        shm.map[..32].copy_from_slice(&header(nonce, params, slots));
        Ok(shm)
    }

    /// Opens what the coordinator offered; fails unless it is the same file (nonce and sizes).
    pub fn open(path: &Path, nonce: u64, params: usize, slots: usize) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len() as usize;
        if len != HEADER + region_bytes(params) * (1 + slots) {
            return Err(io::Error::other("size does not match the job"));
        }
        let shm = Self::map(&file, params, slots, None)?;
        if shm.map[..32] != header(nonce, params, slots) {
            return Err(io::Error::other("not the offered file"));
        }
        Ok(shm)
    }

    /// Removes the file's name (the mappings stay valid).
    pub fn unlink(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Where region `i` starts: 0 is the parameters, 1 + k gradient slot k.
    fn start(&self, i: usize) -> usize {
        HEADER + region_bytes(self.params) * i
    }

    pub fn params(&self) -> &[f32] {
        // SAFETY: regions start on 64-byte boundaries of a page-aligned mapping, hold `params`
        // values inside it, and any bits are an f32.
        unsafe { std::slice::from_raw_parts(self.map[self.start(0)..].as_ptr().cast::<f32>(), self.params) }
    }

    pub fn params_mut(&mut self) -> &mut [f32] {
        let at = self.start(0);
        // SAFETY: as in `params`.
        unsafe { std::slice::from_raw_parts_mut(self.map[at..].as_mut_ptr().cast::<f32>(), self.params) }
    }

    /// Gradient slot `k` (shard k's).
    pub fn slot(&self, k: usize) -> Option<&[f32]> {
        let at = self.start(1 + k);
        // SAFETY: as in `params`.
        (k < self.slots)
            .then(|| unsafe { std::slice::from_raw_parts(self.map[at..].as_ptr().cast::<f32>(), self.params) })
    }

    /// The parameters and gradient slot `k`, for computing shard k in place.
    pub fn params_and_slot(&mut self, k: usize) -> Option<(&[f32], &mut [f32])> {
        if k >= self.slots {
            return None;
        }
        let (at, n) = (self.start(1 + k), self.params);
        let (head, tail) = self.map.split_at_mut(at);
        // SAFETY: as in `params`; the two regions do not overlap.
        unsafe {
            Some((
                std::slice::from_raw_parts(head[HEADER..].as_ptr().cast::<f32>(), n),
                std::slice::from_raw_parts_mut(tail.as_mut_ptr().cast::<f32>(), n),
            ))
        }
    }
}

impl Drop for SharedTensors {
    fn drop(&mut self) {
        self.unlink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_see_each_others_writes_and_a_wrong_nonce_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SharedTensors::create(dir.path(), "t", 7, 5, 2).unwrap();
        c.params_mut().copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let path = dir.path().join("t");
        assert!(SharedTensors::open(&path, 8, 5, 2).is_err());
        assert!(SharedTensors::open(&path, 7, 6, 2).is_err());
        let mut w = SharedTensors::open(&path, 7, 5, 2).unwrap();
        let (p, g) = w.params_and_slot(1).unwrap();
        g.iter_mut().zip(p).for_each(|(g, p)| *g = -p);
        assert!(w.params_and_slot(2).is_none());
        assert_eq!(c.slot(1).unwrap(), &[-1.0, -2.0, -3.0, -4.0, -5.0]);
        assert!(c.slot(2).is_none());
        c.unlink();
        assert!(!path.exists());
        assert_eq!(w.params(), &[1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}
