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
}

impl Tensor {
    fn into_wire(self) -> (Bytes, bool) {
        match self {
            Tensor::Inline(b) => (b, false),
            Tensor::Shared => (Bytes::new(), true),
        }
    }

    fn from_wire(bytes: Bytes, shared: bool) -> Tensor {
        if shared {
            Tensor::Shared
        } else {
            Tensor::Inline(bytes)
        }
    }
}

/// A worker's first message.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    /// `PROTOCOL_VERSION` of the worker's build.
    pub protocol_version: u32,
    /// The worker's name, for log lines.
    pub name: String,
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
}

impl From<FromWorker> for pb::WorkerMessage {
    fn from(m: FromWorker) -> Self {
        use pb::worker_message::Kind;
        let kind = match m {
            FromWorker::Hello(h) => Kind::Hello(pb::Hello { protocol_version: h.protocol_version, name: h.name }),
            FromWorker::Result(r) => {
                let (gradient, gradient_shared) = r.gradient.into_wire();
                Kind::Result(pb::ShardResult {
                    step: r.step,
                    index: r.index,
                    gradient,
                    gradient_shared,
                    loss_sum: r.claimed.loss_sum,
                    activity: r.claimed.activity,
                    correct: r.claimed.correct,
                    rows: r.claimed.rows,
                    compute_micros: r.compute_micros,
                })
            }
            FromWorker::Attached => Kind::Attached(pb::Attached {}),
        };
        pb::WorkerMessage { kind: Some(kind) }
    }
}

impl TryFrom<pb::WorkerMessage> for FromWorker {
    type Error = WireError;

    fn try_from(m: pb::WorkerMessage) -> Result<Self, WireError> {
        use pb::worker_message::Kind;
        Ok(match m.kind.ok_or_else(|| WireError::Invalid("an empty worker message".into()))? {
            Kind::Hello(h) => FromWorker::Hello(Hello { protocol_version: h.protocol_version, name: h.name }),
            Kind::Result(r) => FromWorker::Result(ShardResult {
                step: r.step,
                index: r.index,
                gradient: Tensor::from_wire(r.gradient, r.gradient_shared),
                claimed: ShardStats { loss_sum: r.loss_sum, activity: r.activity, correct: r.correct, rows: r.rows },
                compute_micros: r.compute_micros,
            }),
            Kind::Attached(_) => FromWorker::Attached,
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
                let (params, params_shared) = w.params.into_wire();
                Kind::Work(pb::Work {
                    step: w.step,
                    params,
                    params_shared,
                    global_batch: w.global_batch,
                    shards: w.shards.into_iter().map(|s| s.0).collect(),
                })
            }
            ToWorker::Stop { reason } => Kind::Stop(pb::Stop { reason }),
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
            Kind::Work(w) => ToWorker::Work(Work {
                step: w.step,
                params: Tensor::from_wire(w.params, w.params_shared),
                global_batch: w.global_batch,
                shards: w.shards.into_iter().map(WireShard).collect(),
            }),
            Kind::Stop(s) => ToWorker::Stop { reason: s.reason },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_through_the_wire_types() {
        let stats = ShardStats { loss_sum: 1.5, activity: 0.25, correct: 1, rows: 2 };
        let result = ShardResult {
            step: 4,
            index: 1,
            gradient: Tensor::Inline(Bytes::from_static(&[0; 8])),
            claimed: stats,
            compute_micros: 9,
        };
        for m in [
            FromWorker::Hello(Hello { protocol_version: 2, name: "w".into() }),
            FromWorker::Result(result.clone()),
            FromWorker::Result(ShardResult { gradient: Tensor::Shared, ..result }),
            FromWorker::Attached,
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
            ToWorker::Work(Work { step: 5, params: Tensor::Shared, global_batch: 30, shards: vec![] }),
            ToWorker::Work(Work {
                step: 5,
                params: Tensor::Inline(Bytes::from_static(&[1; 4])),
                global_batch: 1,
                shards: vec![],
            }),
            ToWorker::Stop { reason: "done".into() },
        ] {
            assert_eq!(ToWorker::try_from(pb::CoordinatorMessage::from(m.clone())), Ok(m));
        }
        assert!(FromWorker::try_from(pb::WorkerMessage { kind: None }).is_err());
        assert!(ToWorker::try_from(pb::CoordinatorMessage { kind: None }).is_err());
    }
}
