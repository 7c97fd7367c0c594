//! `Engine` over the network: each step's shards go to live workers; gradients come back and
//! land in shard order. Lost, hung or faulty workers' shards are recomputed by others within
//! the same step, so the step is applied once, with the same bits as in-process. Some shards
//! are checked by a second party, and the coordinator recomputes any shard whose copies
//! disagree or whose result is not finite (the referee); a worker it contradicts is evicted and,
//! if its unchecked results were already used, training goes back and replays without it.
//! Every decision is the `Round`'s (`round.rs`) or the `Audit`'s (`verify.rs`), both pure; this
//! file moves messages and tensors.

use crate::epoch_stats::EpochStats;
use crate::hub::{Event, Hub};
use crate::ids::{PartyId, ShardIndex, WorkerId};
use crate::pace::Pace;
use crate::round::{Action, Cause, FaultLedger, Phase, Refusal, Round};
use crate::run::ClusterOptions;
use crate::shm::SharedFile;
use crate::termination::Termination;
use crate::topology::Topology;
use crate::verify::{Audit, Fraction, DEFAULT_VERIFY, WINDOW};
use dtrain_data::Dataset;
use dtrain_fit::engine::ShardBuffers;
use dtrain_fit::metrics::Verification;
use dtrain_fit::{Engine, EngineError, Job};
use dtrain_nn::simd::Part;
use dtrain_nn::{Mode, ShardStats};
use dtrain_proto::{copy_f32s, shard_to_wire, ShardResult, Tensor, ToWorker, WireShard, WireTensor, Work};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

mod chain;

/// The coordinator's side of the cluster, as an `Engine` the trainer drives.
pub struct ClusterEngine<'a> {
    job: &'a Job,
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

/// How long to wait, whom to give up on, and whom to check.
struct Policy {
    /// A worker that has not answered this long after getting work is dropped.
    step_timeout: Duration,
    /// With no worker left, wait this long for one to join, then fail.
    worker_wait: Duration,
    faults: FaultLedger,
    audit: Audit,
    /// The last step computed: a step at or before it means training went back.
    last_step: Option<u64>,
    /// A liar's unchecked results were used from this step on: undo them (and why).
    roll_back: Option<(u64, String)>,
    /// When a worker is a straggler, and how fast each is.
    pace: Pace,
    /// Star or chain, and what the chain knows.
    topology: Topology,
    chain: chain::Memory,
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
    /// Gradient buffers not in use (results copied from messages, or out of shared memory to be
    /// compared, and the referee's).
    free: Vec<Vec<f32>>,
    /// The gradient of an empty shard.
    zeros: Vec<f32>,
    /// The referee's computation.
    referee: ShardBuffers,
}

impl Buffers {
    fn take(&mut self, n: usize) -> Vec<f32> {
        let mut v = self.free.pop().unwrap_or_default();
        v.resize(n, 0.0);
        v
    }
}

impl<'a> ClusterEngine<'a> {
    pub(crate) fn new(
        job: &'a Job,
        data: &'a Dataset,
        rt: Arc<tokio::runtime::Runtime>,
        hub: Arc<Hub>,
        events: mpsc::UnboundedReceiver<Event>,
        opts: &ClusterOptions,
        stop: Termination,
    ) -> Self {
        ClusterEngine {
            job,
            data,
            net: Network { rt, hub, events, stop },
            policy: Policy {
                step_timeout: opts.step_timeout,
                worker_wait: opts.worker_wait,
                faults: FaultLedger::default(),
                // A secret, not the job's seed: workers must not foresee which results are checked.
                audit: Audit::new(verify_fraction(opts, job), crate::auth::ticket()),
                last_step: None,
                roll_back: None,
                pace: Pace::default(),
                topology: opts.topology,
                chain: chain::Memory::new(crate::run::lane_access(opts)),
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
        if self.policy.last_step.is_some_and(|last| step <= last) {
            // Training went back: what was used after `step` no longer counts, and the
            // parameters in shared memory are not this step's.
            self.policy.audit.rolled_back(step);
            self.net.hub.forget_params();
        }
        self.policy.last_step = Some(step);
        let rt = self.net.rt.clone();
        let epoch = &mut self.telemetry.epoch;
        epoch.step_starts();
        let (sent, received, verified) = (epoch.bytes_out, epoch.bytes_in, epoch.verification);
        let paths = epoch.paths;
        crate::timeline::mark("step begins", step);
        let r = rt.block_on(self.step(params, step, batch, shards, grad, meanwhile));
        crate::timeline::mark("step ends", step);
        let epoch = &mut self.telemetry.epoch;
        epoch.step_ends();
        let r = match (r, self.policy.roll_back.take()) {
            (Ok(_), Some((to_step, why))) => {
                epoch.verification.rollbacks += 1;
                Err(EngineError::Rollback { to_step, why })
            }
            (r, _) => r,
        };
        if let Some(m) = &self.telemetry.metrics {
            m.workers(self.net.hub.alive().len() as u64);
            m.wire(epoch.bytes_out - sent, epoch.bytes_in - received);
            let v = &epoch.verification;
            m.verified(&Verification {
                checked: v.checked - verified.checked,
                refereed: v.refereed - verified.refereed,
                evicted: v.evicted - verified.evicted,
                rollbacks: v.rollbacks - verified.rollbacks,
            });
            m.topology(&epoch.paths.since(&paths));
        }
        r
    }

    fn prefetch(&mut self, batch: &[u32]) {
        self.prefetch.next_batch.clear();
        self.prefetch.next_batch.extend_from_slice(batch);
    }

    fn epoch_report(&mut self) -> Option<dtrain_fit::engine::EpochReport> {
        std::mem::take(&mut self.telemetry.epoch).report(&self.net.hub)
    }

    fn waits_on_others(&self) -> bool {
        true
    }

    fn snapshot_every(&self) -> Option<u64> {
        Some(WINDOW)
    }
}

impl Drop for ClusterEngine<'_> {
    fn drop(&mut self) {
        self.net.rt.block_on(self.net.hub.stop_all("training finished", Duration::from_secs(2)));
        crate::timeline::flush();
    }
}

/// Where a result's gradient is: in the worker's shared-memory slot (kept mapped here even if
/// the worker leaves), or in a buffer of ours (copied from the message, or out of the slot to be
/// compared: what is compared is what is summed).
enum Landed {
    Slot(Arc<SharedFile>),
    Copied(Vec<f32>),
}

/// One result of a shard.
struct Received {
    stats: ShardStats,
    landed: Landed,
}

/// One step's work as it goes out: the samples of each shard, and the parameters.
struct Outgoing<'s> {
    step: u64,
    params: &'s [f32],
    global_batch: u32,
    wire: Vec<WireShard>,
    /// Whether the parameters are in shared memory; as message bytes, made once if a worker
    /// needs them.
    shared: bool,
    inline: Option<Tensor>,
}

/// What the referee needs to compute a shard itself.
struct StepInputs<'s> {
    params: &'s [f32],
    step: u64,
    batch: &'s [u32],
    shards: &'s [Range<usize>],
}

/// One step's results as they come in.
struct Inbox {
    /// Each shard's rows, and the gradient's length: what a result must match.
    rows: Vec<u64>,
    width: usize,
    /// Each shard's results, by sender.
    results: Vec<BTreeMap<WorkerId, Received>>,
    /// The referee's result, where it computed the shard.
    refereed: BTreeMap<ShardIndex, Received>,
    /// Workers with a result confirmed by another party or the referee this step.
    confirmed: BTreeSet<WorkerId>,
    /// Shards whose copies were compared and agreed (not compared again when the round reduces
    /// once more after an eviction).
    paired: BTreeSet<ShardIndex>,
    /// Time spent reading, checking, comparing and summing results.
    reduce: Duration,
}

impl Inbox {
    /// The result that stands for shard `k`: the referee's, else the first that arrived.
    fn chosen<'r>(&'r self, round: &Round, k: ShardIndex) -> Option<&'r Received> {
        self.refereed.get(&k).or_else(|| round.results(k).first().and_then(|w| self.results[k.0].get(w)))
    }
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
        let mut meanwhile = Some(meanwhile);
        let inputs = StepInputs { params, step, batch, shards };
        if let Some(plan) = self.chain_plan(shards.len()) {
            if let Some(stats) = self.chain_step(&plan, &mut out, &inputs, grad, &mut meanwhile).await? {
                return Ok(stats);
            }
        }
        let pace = &self.policy.pace;
        let mut round = Round::new(step, shards.iter().map(|r| r.len()), self.policy.step_timeout)
            .paced(pace.speculate_after(), pace.speeds());
        let mut inbox = Inbox {
            rows: shards.iter().map(|r| r.len() as u64).collect(),
            width: params.len(),
            results: shards.iter().map(|_| BTreeMap::new()).collect(),
            refereed: BTreeMap::new(),
            confirmed: BTreeSet::new(),
            paired: BTreeSet::new(),
            reduce: Duration::ZERO,
        };
        let mut sent_all = None;
        loop {
            let actions = match round.phase() {
                Phase::Dispatch => {
                    // Workers that owe a chain step stand by while others can take the shards.
                    let mut alive = self.net.hub.alive();
                    if alive.iter().any(|m| !self.policy.chain.owes(m.id)) {
                        alive.retain(|m| !self.policy.chain.owes(m.id));
                    }
                    let audit = &mut self.policy.audit;
                    round.dispatch(&alive, Instant::now(), &mut |k, w| audit.wants_check(step, k, w))
                }
                Phase::Wait { deadline } => self.next_event(&mut round, &mut inbox, deadline).await?,
                Phase::Reduce => {
                    let r0 = Instant::now();
                    let refereed = self.settle(&round, &mut inbox, &inputs, grad);
                    inbox.reduce += r0.elapsed();
                    round.reduced(&refereed)
                }
                Phase::Done => break,
            };
            self.act(actions, &mut round, &mut out).await?;
            if matches!(round.phase(), Phase::Wait { .. }) {
                sent_all.get_or_insert_with(|| {
                    crate::timeline::mark("work sent", step);
                    Instant::now()
                });
                // While the workers compute: the caller's own work, then the next step's shards.
                meanwhile.take().into_iter().for_each(|f| self.meanwhile(f, shards.len()));
            }
        }
        meanwhile.take().into_iter().for_each(|f| f()); // every shard was empty
        let sent_all = sent_all.unwrap_or(t0);
        self.telemetry.epoch.step(sent_all - t0, sent_all.elapsed().saturating_sub(inbox.reduce), inbox.reduce);
        let stats = (0..shards.len()).map(|k| inbox.chosen(&round, ShardIndex(k)).map(|r| r.stats).unwrap_or_default());
        let stats = stats.collect();
        self.record(&round, &inbox);
        let alive: Vec<WorkerId> = self.net.hub.alive().iter().map(|m| m.id).collect();
        self.policy.pace.learn(round.intervals(), &alive);
        self.recycle(inbox);
        Ok(stats)
    }

    /// Tells the audit who was checked this step, and whose unchecked results were used.
    fn record(&mut self, round: &Round, inbox: &Inbox) {
        let mut unchecked: Vec<PartyId> = vec![];
        for k in (0..round.shard_count()).map(ShardIndex) {
            if inbox.refereed.contains_key(&k) {
                continue; // the coordinator's own value stands
            }
            let sender = round.results(k).first();
            if let Some(w) = sender.filter(|w| !inbox.confirmed.contains(w) || round.results(k).len() < 2) {
                unchecked.extend(self.net.hub.party(*w));
            }
        }
        let checked: Vec<WorkerId> = inbox.confirmed.iter().copied().collect();
        self.policy.audit.record(round.step(), &checked, &unchecked);
    }

    /// Returns the step's gradient buffers for reuse.
    fn recycle(&mut self, inbox: Inbox) {
        let landed = inbox.results.into_iter().flat_map(BTreeMap::into_values).chain(inbox.refereed.into_values());
        for r in landed {
            if let Landed::Copied(v) = r.landed {
                self.buffers.free.push(v);
            }
        }
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
        // Without shared memory the parameters' message bytes are made when a worker needs
        // them (`inline_params`): a chain with lanes sends them straight from `params`.
        let (finite, shared) = match self.net.hub.share_params(step, params) {
            Some(finite) => (finite, true),
            None => (dtrain_nn::simd::all_finite(params), false),
        };
        if !finite {
            return None;
        }
        let wire = match self.prefetch.prebuilt.take() {
            Some((b, wire)) if b == batch && wire.len() == shards.len() => wire,
            _ => self.shards_to_wire(batch, shards),
        };
        Some(Outgoing { step, params, global_batch: batch.len() as u32, wire, shared, inline: None })
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
                Action::Drop { worker, cause } => {
                    self.net.hub.drop_worker(worker, drop_status(cause));
                    if cause == Cause::MissedDeadline {
                        self.count_fault(worker, "missed deadlines");
                    }
                }
                Action::Fault { worker, shard, why } => {
                    let name = self.net.hub.name(worker);
                    self.telemetry.metrics.iter().for_each(|m| m.rejected());
                    tracing::warn!("{name} sent a bad result for shard {shard} of step {}: {why}", round.step());
                    if self.count_fault(worker, "faulty results") {
                        queue.push_back(Action::Drop { worker, cause: Cause::TooManyFaults });
                    }
                }
                Action::Lied { worker, shard } => self.evict_liar(worker, shard, round.step()),
                Action::Speculate { from, shards } => {
                    self.telemetry.epoch.paths.speculated += shards.len() as u64;
                    let name = self.net.hub.name(from);
                    tracing::debug!("step {}: {name} is late; shard(s) {shards:?} get a copy elsewhere", round.step());
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
                        Cause::Lied => format!("shard(s) {shards:?} of {name} are computed again by others"),
                        Cause::BadResult | Cause::TooManyFaults => continue,
                    };
                    tracing::warn!("{line}");
                }
            }
        }
        Ok(())
    }

    /// Counts a fault against the party behind `worker`; at `MAX_FAULTS` the party is refused
    /// for a while (true).
    fn count_fault(&mut self, worker: WorkerId, what: &str) -> bool {
        let Some(party) = self.net.hub.party(worker) else { return false };
        let Some(n) = self.policy.faults.record(party) else { return false };
        let refused = self.net.hub.evict(party, &drop_status(Cause::TooManyFaults));
        tracing::warn!("dropping {} after {n} {what}; its party is refused for {refused:?}", self.net.hub.name(worker));
        true
    }

    /// The referee contradicted `worker` on `shard`: its party is refused for a while, and if
    /// results of it that nobody checked went into earlier steps, they are undone.
    fn evict_liar(&mut self, worker: WorkerId, shard: ShardIndex, step: u64) {
        let name = self.net.hub.name(worker);
        self.telemetry.epoch.verification.evicted += 1;
        let Some(party) = self.net.hub.party(worker) else { return };
        let refused = self.net.hub.evict(party, &drop_status(Cause::Lied));
        tracing::warn!(
            "{name} sent a result for shard {shard} of step {step} that differs from the coordinator's \
             recomputation; evicting it (its party is refused for {refused:?})"
        );
        if let Some(first) = self.policy.audit.first_unchecked(party).filter(|&first| first < step) {
            let why = format!("unchecked results of {name} went into steps {first} to {}", step - 1);
            let earliest = self.policy.roll_back.as_ref().map_or(first, |(s, _)| first.min(*s));
            self.policy.roll_back = Some((earliest, why));
        }
    }

    /// Queues `shards` of this step for `worker`; false if it is gone or not keeping up.
    fn send(&mut self, worker: WorkerId, shards: &[ShardIndex], step: u64, out: &mut Outgoing<'_>) -> bool {
        let params = self.params_for(worker, out);
        self.send_with(worker, shards, step, out, params)
    }

    /// As `send`, with the parameters where `params` says.
    fn send_with(
        &mut self,
        worker: WorkerId,
        shards: &[ShardIndex],
        step: u64,
        out: &Outgoing<'_>,
        params: Tensor,
    ) -> bool {
        let work = Work {
            step,
            params,
            global_batch: out.global_batch,
            shards: shards.iter().map(|k| out.wire[k.0].clone()).collect(),
            chain: None,
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
            // Of a chain step that fell back to the star: its sums are not results of the star's.
            Ok(Some(Event::Result { result, .. })) if result.gradient == Tensor::Chained => Ok(vec![]),
            Ok(Some(Event::Chunk { .. } | Event::Broken { .. } | Event::Digest { .. })) => Ok(vec![]),
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
                let checked = received.map(|r| {
                    inbox.results[k.0].insert(id, r);
                });
                Ok(round.result(id, k, checked, Instant::now()))
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
        Tensor::Inline(self.inline_params(out))
    }

    /// The parameters as message bytes: one copy of them, made on first need, serves every
    /// message of the step.
    fn inline_params(&mut self, out: &mut Outgoing<'_>) -> bytes::Bytes {
        let (params, wire) = (out.params, &mut self.buffers.params);
        let inline = out.inline.get_or_insert_with(|| {
            wire.fill(params.len()).copy_from_slice(params);
            Tensor::Inline(wire.share())
        });
        match inline {
            Tensor::Inline(b) => b.clone(),
            Tensor::Shared | Tensor::Chained => unreachable!("only inline bytes are kept"),
        }
    }

    /// A result's sums, and where its gradient is: in the worker's shared memory, or copied
    /// from the message into a buffer of ours. Checked except for finite values (`settle`).
    fn receive(&mut self, id: WorkerId, result: &ShardResult, rows: u64, n: usize) -> Result<Received, Refusal> {
        let stats = result.stats(rows)?;
        let k = result.index as usize;
        let gradient = match &result.gradient {
            Tensor::Inline(bytes) => bytes,
            Tensor::Chained => return Err(Refusal::WrongPath),
            Tensor::Shared => {
                let slots = self.net.hub.slots(id).ok_or(Refusal::NoSharedMemory)?;
                slots.shared(k).ok_or(Refusal::SlotOutOfRange)?;
                return Ok(Received { stats, landed: Landed::Slot(slots) });
            }
        };
        let mut buf = self.buffers.take(n);
        if let Err(e) = copy_f32s("gradient", gradient, &mut buf) {
            self.buffers.free.push(buf);
            return Err(e.into());
        }
        Ok(Received { stats, landed: Landed::Copied(buf) })
    }

    /// Every result is in: compares the copies of checked shards, has the referee recompute
    /// what needs it, and sums the standing results into `grad` in shard order. Returns the
    /// shards the referee computed, each with the workers whose result differs from its own.
    fn settle(
        &mut self,
        round: &Round,
        inbox: &mut Inbox,
        inputs: &StepInputs<'_>,
        grad: &mut [f32],
    ) -> BTreeMap<ShardIndex, Vec<WorkerId>> {
        let mut refereed = BTreeMap::new();
        let open = |k: &ShardIndex| inbox.rows[k.0] > 0 && !round.refereed(*k);
        let open: Vec<ShardIndex> = (0..round.shard_count()).map(ShardIndex).filter(open).collect();
        for &k in &open {
            let senders = round.results(k);
            if inbox.paired.contains(&k) {
                continue;
            }
            let disputed = if senders.len() >= 2 {
                self.own(inbox, k);
                let agree = senders.windows(2).all(|p| same(&inbox.results[k.0][&p[0]], &inbox.results[k.0][&p[1]]));
                if agree {
                    inbox.confirmed.extend(senders);
                    self.telemetry.epoch.verification.checked += 1;
                    inbox.paired.insert(k);
                }
                !agree
            } else {
                round.check_here(k)
            };
            if disputed {
                refereed.insert(k, self.referee(round, inbox, inputs, k));
            }
        }
        if self.sum(round, inbox, grad) {
            return refereed;
        }
        // Not finite: a diverging model, or a worker that sent non-finite values or finite ones
        // that overflow. Whatever a second party did not confirm, the referee recomputes.
        let doubtful: Vec<ShardIndex> =
            open.into_iter().filter(|k| !inbox.paired.contains(k) && !refereed.contains_key(k)).collect();
        let suspects: Vec<ShardIndex> = match doubtful.iter().copied().filter(|&k| !finite(inbox, round, k)).collect() {
            none if Vec::is_empty(&none) => doubtful,
            some => some,
        };
        for &k in &suspects {
            refereed.insert(k, self.referee(round, inbox, inputs, k));
        }
        if !suspects.is_empty() {
            self.sum(round, inbox, grad);
        }
        refereed
    }

    /// Copies shard `k`'s results out of shared memory, so that what is compared is what is
    /// summed (the worker cannot change it in between).
    fn own(&mut self, inbox: &mut Inbox, k: ShardIndex) {
        for r in inbox.results[k.0].values_mut() {
            if let Landed::Slot(slots) = &r.landed {
                let mut buf = self.buffers.take(inbox.width);
                if let Some(v) = slots.shared(k.0) {
                    v.read_into(&mut buf);
                }
                r.landed = Landed::Copied(buf);
            }
        }
    }

    /// Shard `k`'s gradient (into `g`) and sums, computed by the coordinator, as any worker
    /// would.
    fn compute_here(&mut self, inputs: &StepInputs<'_>, k: ShardIndex, g: &mut [f32]) -> ShardStats {
        let range = inputs.shards[k.0].clone();
        let mode = Mode::Train {
            seed: self.job.seed,
            step: inputs.step,
            first_position: range.start as u32,
            global_batch: inputs.batch.len() as u32,
        };
        let idx = &inputs.batch[range];
        self.buffers.referee.gradient(&self.job.model, self.data, inputs.params, idx, mode, g)
    }

    /// The coordinator computes shard `k` itself; its result stands. Returns the workers whose
    /// result differs from it.
    fn referee(&mut self, round: &Round, inbox: &mut Inbox, inputs: &StepInputs<'_>, k: ShardIndex) -> Vec<WorkerId> {
        self.own(inbox, k);
        let mut g = self.buffers.take(inbox.width);
        let stats = self.compute_here(inputs, k, &mut g);
        let mine = Received { stats, landed: Landed::Copied(g) };
        let (agree, differ): (Vec<WorkerId>, Vec<WorkerId>) =
            round.results(k).iter().partition(|w| same(&inbox.results[k.0][w], &mine));
        inbox.confirmed.extend(agree);
        self.telemetry.epoch.verification.refereed += 1;
        if let Some(old) = inbox.refereed.insert(k, mine) {
            if let Landed::Copied(v) = old.landed {
                self.buffers.free.push(v);
            }
        }
        differ
    }

    /// `grad` = the standing results' gradients summed in shard order (an empty shard counts as
    /// zeros); whether the sum is finite.
    fn sum(&mut self, round: &Round, inbox: &Inbox, grad: &mut [f32]) -> bool {
        let zeros = &mut self.buffers.zeros;
        zeros.resize(grad.len(), 0.0);
        let parts: Vec<Part<'_>> = (0..round.shard_count())
            .map(|k| match inbox.chosen(round, ShardIndex(k)) {
                None => Part::Own(&zeros[..]),
                Some(r) => part(&r.landed, ShardIndex(k)),
            })
            .collect();
        let sums_finite = (0..round.shard_count())
            .filter_map(|k| inbox.chosen(round, ShardIndex(k)))
            .all(|r| r.stats.loss_sum.is_finite() && r.stats.activity.is_finite());
        dtrain_nn::simd::sum_into(grad, &parts) && sums_finite
    }

    /// Each shard's samples as they travel (empty shards too, never sent).
    fn shards_to_wire(&self, batch: &[u32], shards: &[Range<usize>]) -> Vec<WireShard> {
        let wire =
            |(k, r): (usize, &Range<usize>)| shard_to_wire(k as u32, r.start as u32, self.data, &batch[r.clone()]);
        shards.iter().enumerate().map(wire).collect()
    }
}

/// `--verify`, else `fit.verify`, else the default.
fn verify_fraction(opts: &ClusterOptions, job: &Job) -> Fraction {
    opts.verify.or_else(|| job.fit.verify.and_then(Fraction::new)).unwrap_or(DEFAULT_VERIFY)
}

/// A landed gradient as a part of the sum.
fn part(landed: &Landed, k: ShardIndex) -> Part<'_> {
    match landed {
        Landed::Copied(v) => Part::Own(v),
        // A slot that did not exist was refused when the result arrived; an empty view sums
        // as a length mismatch, never as memory out of bounds.
        Landed::Slot(slots) => slots.shared(k.0).map_or(Part::Own(&[]), Part::Shared),
    }
}

/// Whether shard `k`'s standing result is finite (its sums and every gradient value).
fn finite(inbox: &Inbox, round: &Round, k: ShardIndex) -> bool {
    let Some(r) = inbox.chosen(round, k) else { return true };
    let sums = r.stats.loss_sum.is_finite() && r.stats.activity.is_finite();
    sums && match &r.landed {
        Landed::Copied(v) => v.iter().all(|x| x.is_finite()),
        Landed::Slot(slots) => slots.shared(k.0).is_some_and(|v| {
            let mut copy = vec![0.0; v.len()];
            v.read_into(&mut copy);
            copy.iter().all(|x| x.is_finite())
        }),
    }
}

/// The same bits: sums, counts and every gradient value (both own copies).
fn same(a: &Received, b: &Received) -> bool {
    let (x, y) = (&a.stats, &b.stats);
    let sums = x.loss_sum.to_bits() == y.loss_sum.to_bits()
        && x.activity.to_bits() == y.activity.to_bits()
        && x.correct == y.correct
        && x.rows == y.rows;
    let bits = |v: &[f32], w: &[f32]| v.len() == w.len() && v.iter().zip(w).all(|(p, q)| p.to_bits() == q.to_bits());
    sums && match (&a.landed, &b.landed) {
        (Landed::Copied(v), Landed::Copied(w)) => bits(v, w),
        _ => false,
    }
}

/// How a dropped worker's stream is closed.
fn drop_status(cause: Cause) -> Status {
    match cause {
        Cause::MissedDeadline => Status::deadline_exceeded("missed the step deadline"),
        Cause::NotKeepingUp => Status::unavailable("not keeping up with its work queue"),
        Cause::TooManyFaults => Status::data_loss("too many faulty results"),
        Cause::Lied => Status::permission_denied("evicted: a result differs from the coordinator's recomputation"),
        Cause::Left | Cause::BadResult => Status::aborted("dropped"),
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
            verify: None,
            metrics: None,
            topology: Topology::Auto,
        }
    }

    #[test]
    fn parameters_that_are_not_finite_give_a_loss_that_is_not_finite_without_asking_workers() {
        let data = Dataset::new(Features::F32(vec![0.5; 8]), vec![2], Labels::Classes(vec![0, 1, 0, 1])).unwrap();
        let rt = Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap());
        let (hub, events) = Hub::new(String::new(), None);
        let opts = options(Duration::from_millis(10));
        let stop = rt.block_on(async { Termination::watch() });
        let toml = "[data]\nformat = \"csv\"\ntrain = \"train.csv\"\nlabel_column = -1\n[model]\ninput_shape = [2]\n\
                    layers = [{ type = \"Dense\", units = 1 }]\n[compile]\noptimizer = { Adam = { learning_rate = 0.01 } }\nloss = \"mean_squared_error\"\n";
        let config = dtrain_fit::config::JobConfig::parse(std::path::Path::new("job.toml"), toml).unwrap();
        let job = Job::build(config, Default::default()).unwrap();
        assert_eq!(job.model.num_params(), 3);
        let mut e = ClusterEngine::new(&job, &data, rt, hub, events, &opts, stop);
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
