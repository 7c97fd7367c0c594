//! dtrain-proto: the generated protocol, and the conversions between wire and domain types.
//! Nothing else in dtrain touches generated types (the `pb` module is private): the rest of
//! dtrain speaks `messages` over `transport`, and everything received is checked here
//! (lengths, shapes, finite values) before anyone uses it.

pub mod lane;
mod messages;
mod tensor;
mod transport;
pub use messages::{
    ChainRole, Chunk, ChunkStream, FromWorker, Hello, ShardResult, SharedMemoryOffer, Tensor, ToWorker, Welcome,
    WireShard, Work, MAX_ADDRESS, MAX_CHUNK_VALUES,
};
pub use tensor::WireTensor;
pub use transport::{
    coordinator_service, Connection, Inbox, Join, JoinHandler, Outbox, ToWorkerStream, COORDINATOR_SERVICE,
};

#[allow(missing_docs, clippy::all)]
mod pb {
    tonic::include_proto!("dtrain.v1");
}

use dtrain_data::{Dataset, Features, Labels};
use prost::bytes::Bytes;

/// Bumped on any incompatible change; checked when a worker joins. (6: a copy of a late shard
/// may name the parameters a member received on the step's chain, `Work::params`.)
pub const PROTOCOL_VERSION: u32 = 6;

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
/// Why a message, or a part of one, is refused.
pub enum WireError {
    /// A tensor's bytes are not a whole number of f32 values.
    #[error("{what}: {len} bytes is not a whole number of f32 values")]
    Ragged {
        /// Which tensor.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A tensor or list has the wrong number of values.
    #[error("{what}: {got} values, expected {want}")]
    Length {
        /// Which tensor.
        what: &'static str,
        /// What arrived.
        got: usize,
        /// What the model needs.
        want: usize,
    },
    /// A value is NaN or infinite.
    #[error("{what}: value {index} is not finite")]
    NotFinite {
        /// Which tensor.
        what: &'static str,
        /// The first such value.
        index: usize,
    },
    /// Anything else that does not fit the protocol or the job, as the message says.
    #[error("{0}")]
    Invalid(String),
}

/// A worker's message as the coordinator's stream decodes it, from its protobuf bytes (the
/// decoding the fuzz tests drive).
pub fn worker_message_from_bytes(bytes: &[u8]) -> Result<FromWorker, WireError> {
    let m: pb::WorkerMessage = prost::Message::decode(bytes).map_err(|e| WireError::Invalid(e.to_string()))?;
    FromWorker::try_from(m)
}

/// A coordinator's message as a worker's stream decodes it, from its protobuf bytes.
pub fn coordinator_message_from_bytes(bytes: &[u8]) -> Result<ToWorker, WireError> {
    let m: pb::CoordinatorMessage = prost::Message::decode(bytes).map_err(|e| WireError::Invalid(e.to_string()))?;
    ToWorker::try_from(m)
}

/// A worker's message as protobuf bytes.
pub fn worker_message_to_bytes(m: FromWorker) -> Vec<u8> {
    prost::Message::encode_to_vec(&pb::WorkerMessage::from(m))
}

/// A coordinator's message as protobuf bytes.
pub fn coordinator_message_to_bytes(m: ToWorker) -> Vec<u8> {
    prost::Message::encode_to_vec(&pb::CoordinatorMessage::from(m))
}

/// Little-endian f32 bytes, as tensors travel: on little-endian machines one copy.
pub fn f32_bytes(v: &[f32]) -> Bytes {
    if cfg!(target_endian = "little") {
        // SAFETY: any f32 is four initialized bytes; u8 has no alignment requirement.
        let raw = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) };
        return Bytes::copy_from_slice(raw);
    }
    let mut out = Vec::with_capacity(v.len() * 4);
    v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    Bytes::from(out)
}

/// Decodes little-endian f32 bytes into `out` (whose length is the expected count), rejecting
/// a wrong length or a non-finite value.
pub fn read_f32s(what: &'static str, b: &[u8], out: &mut [f32]) -> Result<(), WireError> {
    copy_f32s(what, b, out)?;
    check_finite(what, out)
}

/// `read_f32s` without the finite check, for tensors checked where they are used (gradients
/// are checked as they are summed).
pub fn copy_f32s(what: &'static str, b: &[u8], out: &mut [f32]) -> Result<(), WireError> {
    if !b.len().is_multiple_of(4) {
        return Err(WireError::Ragged { what, len: b.len() });
    }
    if b.len() / 4 != out.len() {
        return Err(WireError::Length { what, got: b.len() / 4, want: out.len() });
    }
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

/// Rejects a tensor with a NaN or an infinity, naming the first.
pub fn check_finite(what: &'static str, v: &[f32]) -> Result<(), WireError> {
    if dtrain_nn::simd::all_finite(v) {
        return Ok(());
    }
    let index = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
    Err(WireError::NotFinite { what, index })
}

/// A shard of a step as it travels: the rows of `data` at `rows`, stored as stored.
pub fn shard_to_wire(index: u32, first_position: u32, data: &Dataset, rows: &[u32]) -> WireShard {
    let sub = data.subset(rows);
    let features = match sub.features {
        Features::U8(v) => pb::shard::Features::U8(Bytes::from(v)),
        Features::F32(v) => pb::shard::Features::F32(f32_bytes(&v)),
    };
    let (classes, values, target_width) = match sub.labels {
        Labels::Classes(c) => (c, Bytes::new(), 0),
        Labels::Values { data, width } => (vec![], f32_bytes(&data), width as u32),
    };
    WireShard(pb::Shard {
        index,
        first_position,
        rows: rows.len() as u32,
        features: Some(features),
        rescale: sub.rescale,
        classes,
        values,
        target_width,
    })
}

/// A received shard: (index, first position, its rows as a dataset), checked against the
/// model's sample shape and output width.
pub fn shard_from_wire(s: WireShard, sample_shape: &[usize], outputs: usize) -> Result<(u32, u32, Dataset), WireError> {
    let s = s.0;
    let rows = s.rows as usize;
    let width: usize = sample_shape.iter().product();
    // Every size is checked against the bytes that arrived before anything is allocated: a
    // message's row count alone must not decide how much memory this process takes.
    let sized = |what: &'static str, per_row: usize, elem: usize, got: usize| -> Result<usize, WireError> {
        let want = rows.checked_mul(per_row);
        match (want, want.and_then(|w| w.checked_mul(elem))) {
            (Some(want), Some(bytes)) if bytes == got => Ok(want),
            (Some(want), Some(_)) => Err(WireError::Length { what, got: got / elem, want }),
            _ => Err(WireError::Invalid(format!("{what}: {rows} rows of {per_row} values is too large"))),
        }
    };
    let features = match s.features {
        Some(pb::shard::Features::U8(b)) => {
            sized("shard features", width, 1, b.len())?;
            Features::U8(b.to_vec())
        }
        Some(pb::shard::Features::F32(b)) => {
            let mut v = vec![0.0; sized("shard features", width, 4, b.len())?];
            read_f32s("shard features", &b, &mut v)?;
            Features::F32(v)
        }
        None => return Err(WireError::Invalid("shard without features".into())),
    };
    let labels = if s.target_width == 0 {
        if s.classes.len() != rows {
            return Err(WireError::Length { what: "shard classes", got: s.classes.len(), want: rows });
        }
        if let Some(&c) = s.classes.iter().find(|&&c| outputs > 1 && c as usize >= outputs) {
            return Err(WireError::Invalid(format!("class {c} is outside the model's {outputs} outputs")));
        }
        Labels::Classes(s.classes)
    } else {
        let w = s.target_width as usize;
        if w != outputs {
            return Err(WireError::Length { what: "shard target width", got: w, want: outputs });
        }
        let mut v = vec![0.0; sized("shard targets", w, 4, s.values.len())?];
        read_f32s("shard targets", &s.values, &mut v)?;
        Labels::Values { data: v, width: w }
    };
    if !s.rescale.is_finite() {
        return Err(WireError::Invalid("shard rescale is not finite".into()));
    }
    let data = Dataset::new(features, sample_shape.to_vec(), labels)
        .map_err(|e| WireError::Invalid(e.to_string()))?
        .with_rescale(s.rescale);
    Ok((s.index, s.first_position, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtrain_nn::ShardStats;

    #[test]
    fn shards_round_trip_and_bad_tensors_are_refused() {
        let d = Dataset::new(Features::U8((0..12).collect()), vec![2, 2], Labels::Classes(vec![0, 1, 2]))
            .unwrap()
            .with_rescale(0.5);
        let wire = shard_to_wire(3, 7, &d, &[2, 0]);
        let (i, first, got) = shard_from_wire(wire.clone(), &[2, 2], 3).unwrap();
        assert_eq!((i, first), (3, 7));
        assert_eq!(got, d.subset(&[2, 0]));
        let mut bad = wire.clone();
        bad.0.rows = 3;
        assert!(matches!(shard_from_wire(bad, &[2, 2], 3), Err(WireError::Length { .. })));
        let mut bad = wire.clone();
        bad.0.classes = vec![0, 9];
        assert!(shard_from_wire(bad, &[2, 2], 3).unwrap_err().to_string().contains("class 9"));
        // A row count far beyond the bytes is refused before any allocation (it used to allocate it).
        let mut huge = wire;
        huge.0.rows = u32::MAX;
        huge.0.features = Some(pb::shard::Features::F32(Bytes::from_static(&[0; 16])));
        assert!(matches!(shard_from_wire(huge, &[1 << 16, 1 << 10], 3), Err(WireError::Length { .. })));

        let stats = ShardStats { loss_sum: 1.5, activity: 0.25, correct: 1, rows: 2 };
        let gradient = f32_bytes(&[1.0, -2.0]);
        let r = ShardResult {
            step: 4,
            index: 1,
            gradient: Tensor::Inline(gradient.clone()),
            claimed: stats,
            compute_micros: 10,
        };
        assert_eq!(r.stats(3).unwrap_err().to_string(), "result counts 2 rows (1 correct) for a shard of 3");
        assert_eq!(r.stats(2).unwrap(), stats);
        let mut g = [0.0; 2];
        copy_f32s("gradient", &gradient, &mut g).unwrap();
        assert_eq!(g, [1.0, -2.0]);
        let mut g3 = [0.0; 3];
        assert_eq!(
            copy_f32s("gradient", &gradient, &mut g3).unwrap_err(),
            WireError::Length { what: "gradient", got: 2, want: 3 }
        );
        assert_eq!(
            copy_f32s("gradient", &gradient[1..], &mut g).unwrap_err(),
            WireError::Ragged { what: "gradient", len: 7 }
        );
        let nan = f32_bytes(&[1.0, f32::NAN]);
        copy_f32s("gradient", &nan, &mut g).unwrap();
        assert_eq!(
            read_f32s("gradient", &nan, &mut g).unwrap_err(),
            WireError::NotFinite { what: "gradient", index: 1 }
        );
        assert_eq!(check_finite("gradient", &g).unwrap_err(), WireError::NotFinite { what: "gradient", index: 1 });
    }
}
