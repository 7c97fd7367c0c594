//! A tensor that travels without being copied into a message: the message's `bytes` field
//! borrows the buffer, which is reused for the next step once no message holds it.

use prost::bytes::Bytes;
use std::sync::Arc;

#[derive(Default)]
/// A reusable buffer of f32 values that messages share without copying.
pub struct WireTensor(Arc<Vec<f32>>);

/// Shares a buffer whose values are stored little-endian (see `WireTensor::share`).
struct LittleEndian(Arc<Vec<f32>>);

impl AsRef<[u8]> for LittleEndian {
    fn as_ref(&self) -> &[u8] {
        let v = self.0.as_slice();
        // SAFETY: any f32 is four initialized bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }
}

impl WireTensor {
    /// The buffer, `len` values long, to be filled before `share`. It is the previous step's
    /// buffer unless a message still holds that one (then a new one).
    pub fn fill(&mut self, len: usize) -> &mut [f32] {
        if Arc::get_mut(&mut self.0).is_none() {
            self.0 = Arc::new(Vec::new());
        }
        let v = Arc::get_mut(&mut self.0).expect("just made unique");
        v.resize(len, 0.0);
        v
    }

    /// The filled buffer as little-endian f32 bytes, without a copy on little-endian machines.
    pub fn share(&mut self) -> Bytes {
        if cfg!(target_endian = "big") {
            if let Some(v) = Arc::get_mut(&mut self.0) {
                v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits().to_le()));
            }
        }
        Bytes::from_owner(LittleEndian(Arc::clone(&self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_without_copying_and_reuses_the_buffer_once_released() {
        let mut t = WireTensor::default();
        t.fill(3).copy_from_slice(&[1.0, -2.0, 0.5]);
        let b = t.share();
        assert_eq!(b, crate::f32_bytes(&[1.0, -2.0, 0.5]));
        let first = b.as_ptr();
        // Still held by a message: a new buffer, and the message keeps its values.
        t.fill(3).copy_from_slice(&[7.0, 7.0, 7.0]);
        assert_eq!(b, crate::f32_bytes(&[1.0, -2.0, 0.5]));
        let c = t.share();
        assert_ne!(c.as_ptr(), first);
        drop((b, c));
        t.fill(2).copy_from_slice(&[3.0, 4.0]);
        let d = t.share();
        assert_eq!(d, crate::f32_bytes(&[3.0, 4.0]));
    }
}
