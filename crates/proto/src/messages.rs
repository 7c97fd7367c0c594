//! The protocol's messages as domain types, and their only conversions to and from the
//! generated ones (`From` out, `TryFrom` in: a message without its oneof is refused).

use crate::{pb, WireError};
use dtrain_nn::ShardStats;
use prost::bytes::Bytes;

/// Where a tensor of a message is: in the message (little-endian f32 bytes), or in the
/// shared memory both sides have mapped.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    /// Little-endian f32 bytes in the message.
    Inline(Bytes),
    /// In the shared-memory region for this tensor.
    Shared,
    /// Along the step's chain, in chunks: parameters come from the predecessor (or the
    /// coordinator), a gradient went into the running sum.
    Chained,
}

impl Tensor {
    /// (bytes, shared, chained)
    fn into_wire(self) -> (Bytes, bool, bool) {
        match self {
            Tensor::Inline(b) => (b, false, false),
            Tensor::Shared => (Bytes::new(), true, false),
            Tensor::Chained => (Bytes::new(), false, true),
        }
    }

    fn from_wire(bytes: Bytes, shared: bool, chained: bool) -> Result<Tensor, WireError> {
        match (shared, chained) {
            (false, false) => Ok(Tensor::Inline(bytes)),
            (true, false) => Ok(Tensor::Shared),
            (false, true) => Ok(Tensor::Chained),
            (true, true) => Err(WireError::Invalid("a tensor both shared and chained".into())),
        }
    }
}

/// Longest peer address a message may carry (host name and port).
pub const MAX_ADDRESS: usize = 256;

/// Most values a chunk may hold (16 MiB of f32).
pub const MAX_CHUNK_VALUES: u32 = 4 << 20;

/// A worker's place in a step's chain (see the protocol's `Chain`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChainRole {
    /// The successor's peer address; `None`: the last member, which sends the sum to the
    /// coordinator.
    pub successor: Option<String>,
    /// The ticket its predecessor presents; `None`: the first member (parameters from the
    /// coordinator, no running sum to receive).
    pub ticket_in: Option<u64>,
    /// The ticket it presents to its successor.
    pub ticket_out: u64,
    /// Values per chunk.
    pub chunk_values: u32,
    /// The key of its digests (`FromWorker::Digest`).
    pub digest_key: u64,
    /// The first member: the coordinator sends the parameters on its lane, in frames with
    /// this ticket (`None`: on the stream).
    pub params_lane: Option<u64>,
    /// The last member: the sum goes back on the lane the coordinator opened (else on the
    /// stream).
    pub sum_lane: bool,
}

/// Which tensor a chunk is part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkStream {
    /// The step's parameters.
    Params,
    /// The running sum of the shards' gradients.
    Sum,
}

impl ChunkStream {
    /// The ranges of a `len`-value tensor in the order its chunks of `chunk` values travel.
    /// Cut at multiples of `chunk` from the start either way, the parameters go from the
    /// start (the forward pass needs the first layer first), the running sum from the end
    /// (the backward pass finishes the last layers' gradients first, so their sum can be on
    /// its way while the first layers' are computed).
    pub fn ranges(self, len: usize, chunk: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let chunk = chunk.max(1);
        let count = len.div_ceil(chunk);
        let ordered = move |i: usize| match self {
            ChunkStream::Params => i,
            ChunkStream::Sum => count - 1 - i,
        };
        (0..count).map(move |i| {
            let start = ordered(i) * chunk;
            start..start.saturating_add(chunk).min(len)
        })
    }

    /// Where the chunk after `range` starts (`None`: `range` was the last), in `ranges`' order.
    pub fn after(self, range: &std::ops::Range<usize>, len: usize, chunk: usize) -> Option<usize> {
        match self {
            ChunkStream::Params => (range.end < len).then_some(range.end),
            ChunkStream::Sum => range.start.checked_sub(chunk.max(1)),
        }
    }

    /// Where its first chunk starts (`None` for an empty tensor).
    pub fn first(self, len: usize, chunk: usize) -> Option<usize> {
        self.ranges(len, chunk).next().map(|r| r.start)
    }
}

/// A range of a tensor that travels along the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// The step.
    pub step: u64,
    /// Which tensor.
    pub stream: ChunkStream,
    /// Index of its first value.
    pub offset: u64,
    /// Little-endian f32 bytes (unchecked).
    pub values: Bytes,
}

impl Chunk {
    /// The range of the tensor it covers, checked against the chunk the receiver expects
    /// next: starting at `next`, `chunk` values long or up to the tensor's end `len`.
    pub fn expect(&self, next: usize, chunk: usize, len: usize) -> Result<std::ops::Range<usize>, WireError> {
        let want = next..next.saturating_add(chunk).min(len);
        if self.offset != next as u64 || self.values.len() != want.len() * 4 {
            return Err(WireError::Invalid(format!(
                "a chunk at value {} with {} bytes; expected {} values at {next}",
                self.offset,
                self.values.len(),
                want.len()
            )));
        }
        Ok(want)
    }
}

impl From<Chunk> for pb::Chunk {
    fn from(c: Chunk) -> Self {
        let stream = match c.stream {
            ChunkStream::Params => pb::chunk::Stream::Params,
            ChunkStream::Sum => pb::chunk::Stream::Sum,
        };
        pb::Chunk { step: c.step, stream: stream as i32, offset: c.offset, values: c.values }
    }
}

impl TryFrom<pb::Chunk> for Chunk {
    type Error = WireError;

    fn try_from(c: pb::Chunk) -> Result<Self, WireError> {
        let stream = match pb::chunk::Stream::try_from(c.stream) {
            Ok(pb::chunk::Stream::Params) => ChunkStream::Params,
            Ok(pb::chunk::Stream::Sum) => ChunkStream::Sum,
            Err(_) => return Err(WireError::Invalid(format!("a chunk of unknown stream {}", c.stream))),
        };
        Ok(Chunk { step: c.step, stream, offset: c.offset, values: c.values })
    }
}

fn address(what: &str, a: String) -> Result<Option<String>, WireError> {
    if a.len() > MAX_ADDRESS || a.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(WireError::Invalid(format!("{what}: not a peer address")));
    }
    Ok(Some(a).filter(|a| !a.is_empty()))
}

/// A worker's first message.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    /// `PROTOCOL_VERSION` of the worker's build.
    pub protocol_version: u32,
    /// The worker's name, for log lines.
    pub name: String,
    /// Where its peers reach it (`--peer-listen`), if it takes part in chains.
    pub peer_address: Option<String>,
}

/// Shared memory offered to a worker on the coordinator's host: its gradient slots, and the
/// parameters every local worker reads; each file named by path and checked by a nonce.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedMemoryOffer {
    /// The worker's gradient slots file, and the nonce in its header.
    pub path: String,
    /// The slots file's nonce.
    pub nonce: u64,
    /// Slots in the file (one per shard).
    pub slots: u32,
    /// The parameters file every local worker reads, and its nonce.
    pub params_path: String,
    /// The parameters file's nonce.
    pub params_nonce: u64,
}

/// The coordinator's answer to Hello: the job, the worker's id, shared memory if offered.
#[derive(Clone, Debug, PartialEq)]
pub struct Welcome {
    /// The job file, with every default filled in.
    pub job_toml: String,
    /// The id the coordinator gave this worker.
    pub worker_id: u32,
    /// Shared memory, if the worker dialed over loopback.
    pub shared_memory: Option<SharedMemoryOffer>,
}

/// A step's shards for one worker, with the step's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    /// The optimizer step (keys the dropout masks).
    pub step: u64,
    /// The step's parameters.
    pub params: Tensor,
    /// The step's batch size B: losses are divided by it.
    pub global_batch: u32,
    /// The shards to compute, in shard order.
    pub shards: Vec<WireShard>,
    /// Its place in the step's chain, if it is a member (then `params` is `Chained`). Without
    /// one, `Chained` parameters are those the worker received on this step's chain.
    pub chain: Option<ChainRole>,
}

/// A shard's samples as they travel (built by `shard_to_wire`, read by `shard_from_wire`).
#[derive(Clone, Debug, PartialEq)]
pub struct WireShard(pub(crate) pb::Shard);

impl WireShard {
    /// The shard's index in the step.
    pub fn index(&self) -> u32 {
        self.0.index
    }

    /// Its number of samples.
    pub fn rows(&self) -> u32 {
        self.0.rows
    }
}

/// One shard's result: its sums as the worker claims them (check with `stats`), its
/// gradient, and how long the worker computed.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardResult {
    /// The step it belongs to.
    pub step: u64,
    /// The shard's index in the step.
    pub index: u32,
    /// The shard's gradient.
    pub gradient: Tensor,
    /// The sums as the worker reports them.
    pub claimed: ShardStats,
    /// The worker's compute time for the shard.
    pub compute_micros: u64,
}

impl ShardResult {
    /// The result's sums; rejects counts that do not fit a shard of `rows`. Sums and gradient
    /// are checked for finite values where the step uses them: a diverging model makes them
    /// non-finite on any worker.
    pub fn stats(&self, rows: u64) -> Result<ShardStats, WireError> {
        let c = &self.claimed;
        if c.rows != rows || c.correct > rows {
            return Err(WireError::Invalid(format!(
                "result counts {} rows ({} correct) for a shard of {rows}",
                c.rows, c.correct
            )));
        }
        Ok(*c)
    }
}

/// What a worker sends on its stream.
#[derive(Clone, Debug, PartialEq)]
pub enum FromWorker {
    /// Its first message.
    Hello(Hello),
    /// A shard's result.
    Result(ShardResult),
    /// It mapped the shared memory it was offered.
    Attached,
    /// The last member of a chain: a chunk of the running sum.
    Chunk(Chunk),
    /// A chain member's keyed digests of the running sum it received (0 for the first) and
    /// sent, for audits.
    Digest {
        /// The step.
        step: u64,
        /// Of the sum it received.
        received: u64,
        /// Of the sum it sent.
        sent: u64,
    },
    /// A chain member could not reach, or did not hear from, the peer at `peer`.
    Broken {
        /// The step.
        step: u64,
        /// The peer's address.
        peer: String,
        /// What happened.
        reason: String,
    },
}

/// What the coordinator sends on a worker's stream.
#[derive(Clone, Debug, PartialEq)]
pub enum ToWorker {
    /// The answer to Hello.
    Welcome(Welcome),
    /// Shards to compute.
    Work(Work),
    /// Training is over (or the coordinator is stopping).
    Stop {
        /// Why, for the worker's log.
        reason: String,
    },
    /// The first member of a chain: a chunk of the parameters.
    Chunk(Chunk),
}

impl From<FromWorker> for pb::WorkerMessage {
    fn from(m: FromWorker) -> Self {
        use pb::worker_message::Kind;
        let kind = match m {
            FromWorker::Hello(h) => Kind::Hello(pb::Hello {
                protocol_version: h.protocol_version,
                name: h.name,
                peer_address: h.peer_address.unwrap_or_default(),
            }),
            FromWorker::Result(r) => {
                let (gradient, gradient_shared, gradient_chained) = r.gradient.into_wire();
                Kind::Result(pb::ShardResult {
                    step: r.step,
                    index: r.index,
                    gradient,
                    gradient_shared,
                    gradient_chained,
                    loss_sum: r.claimed.loss_sum,
                    activity: r.claimed.activity,
                    correct: r.claimed.correct,
                    rows: r.claimed.rows,
                    compute_micros: r.compute_micros,
                })
            }
            FromWorker::Attached => Kind::Attached(pb::Attached {}),
            FromWorker::Chunk(c) => Kind::Chunk(c.into()),
            FromWorker::Broken { step, peer, reason } => Kind::Broken(pb::ChainBroken { step, peer, reason }),
            FromWorker::Digest { step, received, sent } => Kind::Digest(pb::ChainDigest { step, received, sent }),
        };
        pb::WorkerMessage { kind: Some(kind) }
    }
}

impl TryFrom<pb::WorkerMessage> for FromWorker {
    type Error = WireError;

    fn try_from(m: pb::WorkerMessage) -> Result<Self, WireError> {
        use pb::worker_message::Kind;
        Ok(match m.kind.ok_or_else(|| WireError::Invalid("an empty worker message".into()))? {
            Kind::Hello(h) => FromWorker::Hello(Hello {
                protocol_version: h.protocol_version,
                name: h.name,
                peer_address: address("peer address", h.peer_address)?,
            }),
            Kind::Result(r) => FromWorker::Result(ShardResult {
                step: r.step,
                index: r.index,
                gradient: Tensor::from_wire(r.gradient, r.gradient_shared, r.gradient_chained)?,
                claimed: ShardStats { loss_sum: r.loss_sum, activity: r.activity, correct: r.correct, rows: r.rows },
                compute_micros: r.compute_micros,
            }),
            Kind::Attached(_) => FromWorker::Attached,
            Kind::Chunk(c) => FromWorker::Chunk(c.try_into()?),
            Kind::Digest(d) => FromWorker::Digest { step: d.step, received: d.received, sent: d.sent },
            Kind::Broken(b) => {
                let reason: String = b.reason.chars().take(256).collect();
                let peer = address("broken link's peer", b.peer)?.unwrap_or_default();
                FromWorker::Broken { step: b.step, peer, reason }
            }
        })
    }
}

impl From<ToWorker> for pb::CoordinatorMessage {
    fn from(m: ToWorker) -> Self {
        use pb::coordinator_message::Kind;
        let kind = match m {
            ToWorker::Welcome(w) => Kind::Welcome(pb::Welcome {
                job_toml: w.job_toml,
                worker_id: w.worker_id,
                shared_memory: w.shared_memory.map(|o| pb::SharedMemory {
                    path: o.path,
                    nonce: o.nonce,
                    slots: o.slots,
                    params_path: o.params_path,
                    params_nonce: o.params_nonce,
                }),
            }),
            ToWorker::Work(w) => {
                let chained = w.chain.is_none() && w.params == Tensor::Chained;
                let (params, params_shared, _) = w.params.into_wire();
                Kind::Work(pb::Work {
                    step: w.step,
                    params,
                    params_shared,
                    params_chained: chained,
                    global_batch: w.global_batch,
                    shards: w.shards.into_iter().map(|s| s.0).collect(),
                    chain: w.chain.map(|c| pb::Chain {
                        successor: c.successor.unwrap_or_default(),
                        ticket_in: c.ticket_in.unwrap_or(0),
                        ticket_out: c.ticket_out,
                        chunk_values: c.chunk_values,
                        digest_key: c.digest_key,
                        params_lane: c.params_lane.unwrap_or(0),
                        sum_lane: c.sum_lane,
                    }),
                })
            }
            ToWorker::Stop { reason } => Kind::Stop(pb::Stop { reason }),
            ToWorker::Chunk(c) => Kind::Chunk(c.into()),
        };
        pb::CoordinatorMessage { kind: Some(kind) }
    }
}

impl TryFrom<pb::CoordinatorMessage> for ToWorker {
    type Error = WireError;

    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, WireError> {
        use pb::coordinator_message::Kind;
        Ok(match m.kind.ok_or_else(|| WireError::Invalid("an empty coordinator message".into()))? {
            Kind::Welcome(w) => ToWorker::Welcome(Welcome {
                job_toml: w.job_toml,
                worker_id: w.worker_id,
                shared_memory: w.shared_memory.map(|o| SharedMemoryOffer {
                    path: o.path,
                    nonce: o.nonce,
                    slots: o.slots,
                    params_path: o.params_path,
                    params_nonce: o.params_nonce,
                }),
            }),
            Kind::Work(w) => {
                let chain = w.chain.map(chain_role).transpose()?;
                let params = match chain {
                    Some(_) if w.params_shared || !w.params.is_empty() => {
                        return Err(WireError::Invalid("a chain member's parameters come in chunks".into()))
                    }
                    Some(_) => Tensor::Chained,
                    None => Tensor::from_wire(w.params, w.params_shared, w.params_chained)?,
                };
                ToWorker::Work(Work {
                    step: w.step,
                    params,
                    global_batch: w.global_batch,
                    shards: w.shards.into_iter().map(WireShard).collect(),
                    chain,
                })
            }
            Kind::Stop(s) => ToWorker::Stop { reason: s.reason },
            Kind::Chunk(c) => ToWorker::Chunk(c.try_into()?),
        })
    }
}

fn chain_role(c: pb::Chain) -> Result<ChainRole, WireError> {
    if c.chunk_values == 0 || c.chunk_values > MAX_CHUNK_VALUES {
        return Err(WireError::Invalid(format!("{} values per chunk", c.chunk_values)));
    }
    Ok(ChainRole {
        successor: address("successor", c.successor)?,
        ticket_in: Some(c.ticket_in).filter(|&t| t != 0),
        ticket_out: c.ticket_out,
        chunk_values: c.chunk_values,
        digest_key: c.digest_key,
        params_lane: Some(c.params_lane).filter(|&t| t != 0),
        sum_lane: c.sum_lane,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parameters_travel_from_the_start_and_the_sum_from_the_end_in_the_same_pieces() {
        for (len, chunk) in [(10, 3), (9, 3), (1, 4), (0, 4), (7, 1), (5, 0)] {
            let up: Vec<_> = ChunkStream::Params.ranges(len, chunk).collect();
            let mut down: Vec<_> = ChunkStream::Sum.ranges(len, chunk).collect();
            assert_eq!(up.iter().map(|r| r.len()).sum::<usize>(), len);
            assert!(up.windows(2).all(|w| w[0].end == w[1].start) && up.first().is_none_or(|r| r.start == 0));
            for stream in [ChunkStream::Params, ChunkStream::Sum] {
                let ranges: Vec<_> = stream.ranges(len, chunk).collect();
                assert_eq!(stream.first(len, chunk), ranges.first().map(|r| r.start));
                for (i, r) in ranges.iter().enumerate() {
                    assert_eq!(stream.after(r, len, chunk), ranges.get(i + 1).map(|r| r.start), "{len} {chunk}");
                }
            }
            down.reverse();
            assert_eq!(up, down);
        }
        assert_eq!(ChunkStream::Sum.ranges(10, 3).collect::<Vec<_>>(), [9..10, 6..9, 3..6, 0..3]);
    }

    use super::*;

    #[test]
    fn every_message_round_trips_through_the_wire_types() {
        let stats = ShardStats { loss_sum: 1.5, activity: 0.25, correct: 1, rows: 2 };
        let chunk = Chunk { step: 2, stream: ChunkStream::Sum, offset: 4, values: Bytes::from_static(&[0; 8]) };
        let result = ShardResult {
            step: 4,
            index: 1,
            gradient: Tensor::Inline(Bytes::from_static(&[0; 8])),
            claimed: stats,
            compute_micros: 9,
        };
        for m in [
            FromWorker::Hello(Hello { protocol_version: 2, name: "w".into(), peer_address: None }),
            FromWorker::Hello(Hello { protocol_version: 2, name: "w".into(), peer_address: Some("10.0.0.2:7".into()) }),
            FromWorker::Result(result.clone()),
            FromWorker::Result(ShardResult { gradient: Tensor::Shared, ..result.clone() }),
            FromWorker::Result(ShardResult { gradient: Tensor::Chained, ..result }),
            FromWorker::Attached,
            FromWorker::Chunk(chunk.clone()),
            FromWorker::Broken { step: 3, peer: "10.0.0.3:7".into(), reason: "refused".into() },
            FromWorker::Digest { step: 3, received: 5, sent: 6 },
        ] {
            assert_eq!(FromWorker::try_from(pb::WorkerMessage::from(m.clone())), Ok(m));
        }
        let offer = SharedMemoryOffer {
            path: "/dev/shm/a".into(),
            nonce: 7,
            slots: 2,
            params_path: "/p".into(),
            params_nonce: 8,
        };
        for m in [
            ToWorker::Welcome(Welcome { job_toml: "seed = 1".into(), worker_id: 3, shared_memory: Some(offer) }),
            ToWorker::Work(Work { step: 5, params: Tensor::Shared, global_batch: 30, shards: vec![], chain: None }),
            ToWorker::Work(Work {
                step: 5,
                params: Tensor::Inline(Bytes::from_static(&[1; 4])),
                global_batch: 1,
                shards: vec![],
                chain: None,
            }),
            ToWorker::Work(Work { step: 5, params: Tensor::Chained, global_batch: 1, shards: vec![], chain: None }),
            ToWorker::Work(Work {
                step: 5,
                params: Tensor::Chained,
                global_batch: 1,
                shards: vec![],
                chain: Some(ChainRole {
                    successor: Some("w2:50052".into()),
                    ticket_in: Some(9),
                    ticket_out: 10,
                    chunk_values: 3,
                    digest_key: 11,
                    params_lane: Some(12),
                    sum_lane: true,
                }),
            }),
            ToWorker::Stop { reason: "done".into() },
            ToWorker::Chunk(Chunk { stream: ChunkStream::Params, ..chunk.clone() }),
        ] {
            assert_eq!(ToWorker::try_from(pb::CoordinatorMessage::from(m.clone())), Ok(m));
        }
        assert!(FromWorker::try_from(pb::WorkerMessage { kind: None }).is_err());
        assert!(ToWorker::try_from(pb::CoordinatorMessage { kind: None }).is_err());
        // A chunk is taken only where the receiver expects the next one.
        assert_eq!(chunk.expect(4, 2, 100), Ok(4..6));
        assert_eq!(chunk.expect(4, 8, 6), Ok(4..6), "the last chunk ends with the tensor");
        assert!(chunk.expect(0, 2, 100).is_err());
        assert!(chunk.expect(4, 3, 100).is_err());
        assert!(chunk.expect(4, 2, 5).is_err());
        let bad = pb::Chain { successor: "a b".into(), ticket_out: 1, chunk_values: 1, ..Default::default() };
        assert!(chain_role(bad).is_err());
        let none = pb::Chain { ticket_out: 1, chunk_values: 0, ..Default::default() };
        assert!(chain_role(none).is_err());
    }
}
