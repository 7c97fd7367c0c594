//! `Engine` over the network: each step's shards go to live workers; gradients come back and
//! land in shard order. Lost, hung or faulty workers' shards are recomputed by others within
//! the same step, so the step is applied once, with the same bits as in-process. Every decision
//! is the `Round`'s (`round.rs`, pure); this file moves messages and tensors.

use crate::epoch_stats::EpochStats;
use crate::hub::{Event, Hub};
use crate::ids::{ShardIndex, WorkerId};
use crate::round::{Action, Cause, FaultLedger, Phase, Refusal, Round};
use crate::run::ClusterOptions;
use crate::shm::SharedFile;
use crate::termination::Termination;
use dtrain_data::Dataset;
use dtrain_fit::{Engine, EngineError};
use dtrain_nn::simd::Part;
use dtrain_nn::ShardStats;
use dtrain_proto::{
    check_finite, copy_f32s, shard_to_wire, ShardResult, Tensor, ToWorker, WireShard, WireTensor, Work,
};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

/// The coordinator's side of the cluster, as an `Engine` the trainer drives.
pub struct ClusterEngine<'a> {
    data: &'a Dataset,
    net: Network,
    policy: Policy,
    telemetry: Telemetry,
    prefetch: Prefetch,
    buffers: Buffers,
}

/// The workers' side of the wire: the runtime that serves them (one IO thread, so health
/// checks and joins are answered between steps too; steps block on it), the membership, and
/// the events it queues.
struct Network {
    rt: Arc<tokio::runtime::Runtime>,
    hub: Arc<Hub>,
    events: mpsc::UnboundedReceiver<Event>,
    /// SIGTERM or Ctrl-C ends a wait for workers.
    stop: Termination,
}

/// How long to wait, and whom to give up on.
struct Policy {
    /// A worker that has not answered this long after getting work is dropped.
    step_timeout: Duration,
    /// With no worker left, wait this long for one to join, then fail.
    worker_wait: Duration,
    faults: FaultLedger,
}

/// What the run shows: the epoch's cluster line and the metrics endpoint.
struct Telemetry {
    epoch: EpochStats,
    metrics: Option<Arc<dtrain_fit::metrics::Metrics>>,
}

/// The batch `prefetch` announced, and its shards built while the previous step waited.
#[derive(Default)]
struct Prefetch {
    next_batch: Vec<u32>,
    prebuilt: Option<(Vec<u32>, Vec<WireShard>)>,
}

/// Buffers reused from step to step.
#[derive(Default)]
struct Buffers {
    /// The parameters as they travel (one buffer shared by every worker's message).
    params: WireTensor,
    /// Gradients received in messages, by shard.
    received: Vec<Vec<f32>>,
    /// The gradient of an empty shard.
    zeros: Vec<f32>,
}

impl<'a> ClusterEngine<'a> {
    pub(crate) fn new(
        data: &'a Dataset,
        rt: Arc<tokio::runtime::Runtime>,
        hub: Arc<Hub>,
        events: mpsc::UnboundedReceiver<Event>,
        opts: &ClusterOptions,
        stop: Termination,
    ) -> Self {
        ClusterEngine {
            data,
            net: Network { rt, hub, events, stop },
            policy: Policy {
                step_timeout: opts.step_timeout,
                worker_wait: opts.worker_wait,
                faults: FaultLedger::default(),
            },
            telemetry: Telemetry { epoch: EpochStats::default(), metrics: opts.metrics.clone() },
            prefetch: Prefetch::default(),
            buffers: Buffers::default(),
        }
    }
}

impl Engine for ClusterEngine<'_> {
    fn gradients(
        &mut self,
        params: &[f32],
        step: u64,
        batch: &[u32],
        shards: &[Range<usize>],
        grad: &mut [f32],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<ShardStats>, EngineError> {
        let rt = self.net.rt.clone();
        let epoch = &mut self.telemetry.epoch;
        epoch.step_starts();
        let (sent, received) = (epoch.bytes_out, epoch.bytes_in);
        let r = rt.block_on(self.step(params, step, batch, shards, grad, meanwhile));
        let epoch = &mut self.telemetry.epoch;
        epoch.step_ends();
        if let Some(m) = &self.telemetry.metrics {
            m.workers(self.net.hub.alive().len() as u64);
            m.wire(epoch.bytes_out - sent, epoch.bytes_in - received);
        }
        r
    }

    fn prefetch(&mut self, batch: &[u32]) {
        self.prefetch.next_batch.clear();
        self.prefetch.next_batch.extend_from_slice(batch);
    }

    fn epoch_report(&mut self) -> Option<String> {
        std::mem::take(&mut self.telemetry.epoch).report(&self.net.hub)
    }
}

impl Drop for ClusterEngine<'_> {
    fn drop(&mut self) {
        self.net.rt.block_on(self.net.hub.stop_all("training finished", Duration::from_secs(2)));
    }
}

/// Where a shard's gradient is once its result arrived: in the worker's shared-memory slot
/// (kept mapped here even if the worker leaves), or copied from the message.
enum Landed {
    Empty,
    Slot(Arc<SharedFile>),
    Copied,
}

/// One step's work as it goes out: the samples of each shard, and the parameters.
struct Outgoing<'s> {
    params: &'s [f32],
    global_batch: u32,
    wire: Vec<WireShard>,
    /// Whether the parameters are in shared memory; as message bytes, made once if a worker
    /// needs them.
    shared: bool,
    inline: Option<Tensor>,
}

/// One step's results as they come in.
struct Inbox {
    /// Each shard's rows, and the gradient's length: what a result must match.
    rows: Vec<u64>,
    width: usize,
    stats: Vec<ShardStats>,
    landed: Vec<Option<Landed>>,
    /// Time spent reading, checking and summing results.
    reduce: Duration,
}

impl ClusterEngine<'_> {
    async fn step(
        &mut self,
        params: &[f32],
        step: u64,
        batch: &[u32],
        shards: &[Range<usize>],
        grad: &mut [f32],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<ShardStats>, EngineError> {
        let t0 = Instant::now();
        // Parameters that are not finite (a diverging run) give a loss that is not finite, as
        // in process; workers would refuse them, so none is asked.
        let Some(mut out) = self.outgoing(params, step, batch, shards) else {
            meanwhile();
            grad.fill(f32::NAN);
            let nan = |r: &Range<usize>| ShardStats { loss_sum: f64::NAN, rows: r.len() as u64, ..Default::default() };
            return Ok(shards.iter().map(nan).collect());
        };
        let mut round = Round::new(step, shards.iter().map(|r| r.len()), self.policy.step_timeout);
        let mut inbox = Inbox {
            rows: shards.iter().map(|r| r.len() as u64).collect(),
            width: params.len(),
            stats: vec![ShardStats::default(); shards.len()],
            landed: shards.iter().map(|r| r.is_empty().then_some(Landed::Empty)).collect(),
            reduce: Duration::ZERO,
        };
        let mut meanwhile = Some(meanwhile);
        let mut sent_all = None;
        loop {
            let actions = match round.phase() {
                Phase::Dispatch => round.dispatch(&self.net.hub.alive(), Instant::now()),
                Phase::Wait { deadline } => self.next_event(&mut round, &mut inbox, deadline).await?,
                Phase::Reduce => {
                    let r0 = Instant::now();
                    let not_finite = self.reduce(&inbox, grad);
                    inbox.reduce += r0.elapsed();
                    round.reduced(&not_finite)
                }
                Phase::Done => break,
            };
            self.act(actions, &mut round, &mut out).await?;
            if matches!(round.phase(), Phase::Wait { .. }) {
                sent_all.get_or_insert_with(Instant::now);
                // While the workers compute: the caller's own work, then the next step's shards.
                meanwhile.take().into_iter().for_each(|f| self.meanwhile(f, shards.len()));
            }
        }
        meanwhile.take().into_iter().for_each(|f| f()); // every shard was empty
        let sent_all = sent_all.unwrap_or(t0);
        self.telemetry.epoch.step(sent_all - t0, sent_all.elapsed().saturating_sub(inbox.reduce), inbox.reduce);
        Ok(inbox.stats)
    }

    /// The step's parameters where workers read them, checked as they are copied (into shared
    /// memory, or with no local worker into the message bytes every worker gets), and its
    /// shards; `None` if the parameters are not finite.
    fn outgoing<'s>(
        &mut self,
        params: &'s [f32],
        step: u64,
        batch: &[u32],
        shards: &[Range<usize>],
    ) -> Option<Outgoing<'s>> {
        let (finite, shared, inline) = match self.net.hub.share_params(step, params) {
            Some(finite) => (finite, true, None),
            None => {
                let wire = &mut self.buffers.params;
                let finite = dtrain_nn::simd::copy_checked(wire.fill(params.len()), params);
                (finite, false, Some(Tensor::Inline(wire.share())))
            }
        };
        if !finite {
            return None;
        }
        let wire = match self.prefetch.prebuilt.take() {
            Some((b, wire)) if b == batch && wire.len() == shards.len() => wire,
            _ => self.shards_to_wire(batch, shards),
        };
        Some(Outgoing { params, global_batch: batch.len() as u32, wire, shared, inline })
    }

    /// The caller's work while workers compute, then the next step's shards.
    fn meanwhile(&mut self, f: &mut dyn FnMut(), shard_count: usize) {
        f();
        if !self.prefetch.next_batch.is_empty() {
            let next = std::mem::take(&mut self.prefetch.next_batch);
            let ranges = dtrain_fit::engine::shard_ranges(next.len(), shard_count);
            let wire = self.shards_to_wire(&next, &ranges);
            self.prefetch.prebuilt = Some((next, wire));
        }
    }

    /// Carries out the round's actions (a send that fails gives more).
    async fn act(
        &mut self,
        actions: Vec<Action>,
        round: &mut Round,
        out: &mut Outgoing<'_>,
    ) -> Result<(), EngineError> {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send { worker, shards } => {
                    if !self.send(worker, &shards, round.step(), out) {
                        queue.extend(round.send_failed(worker));
                    }
                }
                Action::AwaitWorkers => self.await_workers().await?,
                Action::Drop { worker, cause } => self.net.hub.drop_worker(worker, drop_status(cause)),
                Action::Fault { worker, shard, why } => {
                    let name = self.net.hub.name(worker);
                    self.telemetry.metrics.iter().for_each(|m| m.rejected());
                    tracing::warn!("{name} sent a bad result for shard {shard} of step {}: {why}", round.step());
                    if let Some(n) = self.policy.faults.record(worker) {
                        tracing::warn!("dropping {name} after {n} faulty results");
                        queue.push_back(Action::Drop { worker, cause: Cause::TooManyFaults });
                    }
                }
                Action::Recompute { from, shards, cause } => {
                    self.telemetry.metrics.iter().for_each(|m| m.recomputed(shards.len() as u64));
                    let (name, n) = (self.net.hub.name(from), shards.len());
                    let line = match cause {
                        Cause::Left => format!("shard(s) {shards:?} of {name} go to others"),
                        Cause::MissedDeadline => format!(
                            "{name} missed the {:?} step deadline; dropping it, shard(s) {shards:?} go to others",
                            self.policy.step_timeout
                        ),
                        Cause::NotKeepingUp => {
                            format!(
                                "{name} is not keeping up with its work queue; dropping it, {n} shard(s) go to others"
                            )
                        }
                        Cause::BadResult | Cause::SecondOpinion | Cause::TooManyFaults => continue,
                    };
                    tracing::warn!("{line}");
                }
            }
        }
        Ok(())
    }

    /// Queues `shards` of this step for `worker`; false if it is gone or not keeping up.
    fn send(&mut self, worker: WorkerId, shards: &[ShardIndex], step: u64, out: &mut Outgoing<'_>) -> bool {
        let work = Work {
            step,
            params: self.params_for(worker, out),
            global_batch: out.global_batch,
            shards: shards.iter().map(|k| out.wire[k.0].clone()).collect(),
        };
        let sent = self.net.hub.send(worker, ToWorker::Work(work));
        if let Some(size) = sent {
            self.telemetry.epoch.bytes_out += size as u64;
        }
        sent.is_some()
    }

    /// Waits for the next result or departure until `deadline`, and hands it to the round.
    async fn next_event(
        &mut self,
        round: &mut Round,
        inbox: &mut Inbox,
        deadline: Instant,
    ) -> Result<Vec<Action>, EngineError> {
        match tokio::time::timeout_at(deadline.into(), self.net.events.recv()).await {
            Ok(Some(Event::Result { id, result, size })) => {
                let k = ShardIndex(result.index as usize);
                if !round.expects(id, result.step, k) {
                    return Ok(vec![]); // a late reply from a worker this shard was taken from
                }
                self.telemetry.epoch.bytes_in += size as u64;
                if let Some(t) = round.sent_at(id) {
                    self.telemetry.epoch.round_trip(id, t.elapsed(), result.compute_micros);
                }
                let r0 = Instant::now();
                let rows = inbox.rows.get(k.0).copied().unwrap_or_default();
                let received = self.receive(id, &result, rows, inbox.width);
                inbox.reduce += r0.elapsed();
                let checked = received.map(|(stats, landed)| {
                    inbox.stats[k.0] = stats;
                    inbox.landed[k.0] = Some(landed);
                });
                Ok(round.result(id, k, checked))
            }
            Ok(Some(Event::Left { id })) => Ok(round.left(id)),
            Ok(None) => Err(EngineError::Stopped),
            Err(_) => Ok(round.deadline_passed(Instant::now().max(deadline))),
        }
    }

    /// Returns once at least one worker is alive, or fails after `worker_wait`.
    async fn await_workers(&mut self) -> Result<(), EngineError> {
        let wait = self.policy.worker_wait;
        tracing::warn!("no live worker; waiting up to {wait:?} for one to join");
        let Network { hub, stop, .. } = &mut self.net;
        tokio::select! {
            joined = hub.wait_for_workers(1, wait) => joined.map_err(|_| EngineError::NoWorkers { waited: wait }),
            () = stop.arrived() => Err(EngineError::Interrupted),
        }
    }

    /// Where `worker` finds this step's parameters (known to be finite): in shared memory if
    /// they are there and the worker has it, else in the message (one copy of them, made on
    /// first need, serves every worker).
    fn params_for(&mut self, worker: WorkerId, out: &mut Outgoing<'_>) -> Tensor {
        if out.shared && self.net.hub.slots(worker).is_some() {
            return Tensor::Shared;
        }
        let (params, wire) = (out.params, &mut self.buffers.params);
        let inline = out.inline.get_or_insert_with(|| {
            wire.fill(params.len()).copy_from_slice(params);
            Tensor::Inline(wire.share())
        });
        inline.clone()
    }

    /// A result's sums, and where its gradient is: in the worker's shared memory, or copied
    /// from the message into this shard's buffer. Checked except for finite values (`reduce`).
    fn receive(
        &mut self,
        id: WorkerId,
        result: &ShardResult,
        rows: u64,
        n: usize,
    ) -> Result<(ShardStats, Landed), Refusal> {
        let stats = result.stats(rows)?;
        let k = result.index as usize;
        let gradient = match &result.gradient {
            Tensor::Inline(bytes) => bytes,
            Tensor::Shared => {
                let slots = self.net.hub.slots(id).ok_or(Refusal::NoSharedMemory)?;
                slots.shared(k).ok_or(Refusal::SlotOutOfRange)?;
                return Ok((stats, Landed::Slot(slots)));
            }
        };
        let received = &mut self.buffers.received;
        if received.len() <= k {
            received.resize_with(k + 1, Vec::new);
        }
        let buf = &mut received[k];
        buf.resize(n, 0.0);
        copy_f32s("gradient", gradient, buf)?;
        Ok((stats, Landed::Copied))
    }

    /// `grad` = the shards' gradients summed in shard order; returns the shards whose result is
    /// not finite (its sums, or its gradient when the sum is not finite: an overflowing sum of
    /// finite gradients is kept, as in process).
    fn reduce(&mut self, inbox: &Inbox, grad: &mut [f32]) -> BTreeMap<ShardIndex, Refusal> {
        let Buffers { zeros, received, .. } = &mut self.buffers;
        zeros.resize(grad.len(), 0.0);
        let parts: Vec<Part<'_>> = inbox
            .landed
            .iter()
            .enumerate()
            .map(|(k, l)| match l {
                None | Some(Landed::Empty) => Part::Own(&zeros[..]),
                Some(Landed::Slot(slots)) => Part::Shared(slots.shared(k).expect("checked when the result arrived")),
                Some(Landed::Copied) => Part::Own(&received[k][..]),
            })
            .collect();
        let sum_finite = dtrain_nn::simd::sum_into(grad, &parts);
        let mut copy = vec![];
        let mut not_finite = |(k, (p, s)): (usize, (&Part<'_>, &ShardStats))| {
            if !(s.loss_sum.is_finite() && s.activity.is_finite()) {
                return Some((ShardIndex(k), Refusal::SumsNotFinite));
            }
            if sum_finite {
                return None;
            }
            // Rare (a diverging run or a faulty worker): check the shard's gradient on its own.
            let values = match *p {
                Part::Own(v) => v,
                Part::Shared(v) => {
                    copy.resize(v.len(), 0.0);
                    v.read_into(&mut copy);
                    &copy[..]
                }
            };
            check_finite("gradient", values).err().map(|e| (ShardIndex(k), Refusal::Wire(e)))
        };
        parts.iter().zip(&inbox.stats).enumerate().filter_map(&mut not_finite).collect()
    }

    /// Each shard's samples as they travel (empty shards too, never sent).
    fn shards_to_wire(&self, batch: &[u32], shards: &[Range<usize>]) -> Vec<WireShard> {
        let wire =
            |(k, r): (usize, &Range<usize>)| shard_to_wire(k as u32, r.start as u32, self.data, &batch[r.clone()]);
        shards.iter().enumerate().map(wire).collect()
    }
}

/// How a dropped worker's stream is closed.
fn drop_status(cause: Cause) -> Status {
    match cause {
        Cause::MissedDeadline => Status::deadline_exceeded("missed the step deadline"),
        Cause::NotKeepingUp => Status::unavailable("not keeping up with its work queue"),
        Cause::TooManyFaults => Status::data_loss("too many faulty results"),
        Cause::Left | Cause::BadResult | Cause::SecondOpinion => Status::aborted("dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtrain_data::{Features, Labels};

    fn options(worker_wait: Duration) -> ClusterOptions {
        ClusterOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            spawn_workers: 0,
            min_workers: 0,
            token: None,
            insecure: false,
            step_timeout: Duration::from_secs(1),
            worker_wait,
            tls: None,
            shared_memory: false,
            metrics: None,
        }
    }

    #[test]
    fn parameters_that_are_not_finite_give_a_loss_that_is_not_finite_without_asking_workers() {
        let data = Dataset::new(Features::F32(vec![0.5; 8]), vec![2], Labels::Classes(vec![0, 1, 0, 1])).unwrap();
        let rt = Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap());
        let (hub, events) = Hub::new(String::new(), None);
        let opts = options(Duration::from_millis(10));
        let stop = rt.block_on(async { Termination::watch() });
        let mut e = ClusterEngine::new(&data, rt, hub, events, &opts, stop);
        let (batch, shards) = ([0, 1, 2, 3], [0..2, 2..3, 3..3]);
        let mut grad = vec![0.0; 3];
        let mut ran = 0;
        let stats = e.gradients(&[1.0, f32::INFINITY, 0.0], 1, &batch, &shards, &mut grad, &mut || ran += 1).unwrap();
        assert_eq!(ran, 1, "the caller's work runs once");
        assert!(grad.iter().all(|g| g.is_nan()));
        assert!(stats.iter().all(|s| s.loss_sum.is_nan()));
        assert_eq!(stats.iter().map(|s| s.rows).collect::<Vec<_>>(), [2, 1, 0]);
        // Finite parameters need a worker: with none, it waits `worker_wait` and says so.
        let err = e.gradients(&[1.0, 2.0, 0.0], 1, &batch, &shards, &mut grad, &mut || ()).unwrap_err();
        assert!(matches!(err, EngineError::NoWorkers { .. }), "{err}");
        assert_eq!(err.to_string(), "no worker joined within 10ms; the last checkpoint is kept");
    }
}
