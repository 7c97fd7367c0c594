//! A step over the chain (see `topology`): the members get their shards and their place, the
//! first gets the parameters in chunks, and the last sends the sum back in chunks, straight into
//! the trainer's gradient. Anything unexpected (a member leaves, reports a broken link, sends
//! something malformed, or the sum is late or not finite) and the step is computed over the
//! star instead, with the same bits; a member a broken link blames leaves the chain.

use super::{ClusterEngine, Outgoing, Received, StepInputs};
use crate::digest::Digest;
use crate::hub::Event;
use crate::ids::{ShardIndex, WorkerId};
use crate::lane::{LaneAccess, LaneStream};
use crate::round::Refusal;
use crate::timeline;
use crate::topology::{member_copies, plan, tail_copies, tail_due, Bench, ChainPlan, StarBecause, CHUNK_VALUES};
use crate::verify::{judge_chain, ChainVerdict};
use dtrain_fit::EngineError;
use dtrain_nn::simd::Part;
use dtrain_nn::ShardStats;
use dtrain_proto::lane::{write_frame, Expected, FrameHeader, FrameReader, LaneError, LaneKind, HEADER_BYTES};
use dtrain_proto::{copy_f32s, ChainRole, Chunk, ChunkStream, Tensor, ToWorker, WireError, Work};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// An audited step as the coordinator computed it: the sum, each shard's sums, and each
/// member's digests (received, sent) as they should be.
struct Truth {
    sum: Vec<f32>,
    /// The sum of the chain's shards alone, and each tail shard's gradient.
    /// (`None` without a tail: then it is `sum`.)
    chain_sum: Option<Vec<f32>>,
    tail: BTreeMap<ShardIndex, Vec<f32>>,
    stats: Vec<ShardStats>,
    digests: Vec<(u64, u64)>,
}

/// A running sum's digest as a member makes it: over its chunks in the order they travel.
fn sum_digest(key: u64, sum: &[f32]) -> u64 {
    let mut d = Digest::new(key);
    for r in ChunkStream::Sum.ranges(sum.len(), CHUNK) {
        d.update(&sum[r]);
    }
    d.finish()
}

/// The same sums and counts, bit for bit.
fn same_stats(a: &ShardStats, b: &ShardStats) -> bool {
    a.loss_sum.to_bits() == b.loss_sum.to_bits()
        && a.activity.to_bits() == b.activity.to_bits()
        && a.correct == b.correct
        && a.rows == b.rows
}

/// Values per chunk.
const CHUNK: usize = CHUNK_VALUES as usize;

/// A chain step under way: the ticket of the sum's frames if the sum comes back on a lane
/// (else on the last member's stream), and whether the parameters went on one.
struct Started {
    sum_lane: Option<u64>,
    params_lane: bool,
}

/// What woke the coordinator waiting for a chain step.
enum Woke {
    Event(Option<Event>),
    Frame(Result<FrameHeader, LaneError>),
    /// A tail worker's time is up.
    TailDue,
    Late,
}

/// A chain step's results as they come in.
struct ChainInbox {
    step: u64,
    sent_all: Instant,
    /// Each shard's sums (members' and the tail's).
    stats: Vec<Option<ShardStats>>,
    /// The tail's results, by shard, with who sent each (its worker, or a copy's holder).
    tail: BTreeMap<ShardIndex, (WorkerId, Received)>,
    /// When each tail worker is late, and the copies of its shards given out (shard to holder).
    due: BTreeMap<WorkerId, Instant>,
    copies: BTreeMap<ShardIndex, WorkerId>,
    /// When a chain of one is late (its shards then get copies, `topology::member_copies`),
    /// the copies' results, and whether they stood in for its sum.
    chain_due: Option<Instant>,
    stand_ins: BTreeMap<ShardIndex, (WorkerId, Received)>,
    stood_in: bool,
    /// On an audited step, each member's digests (received, sent).
    digests: Option<Vec<Option<(u64, u64)>>>,
    /// Where the sum's next chunk starts (it arrives in `ChunkStream::Sum`'s order, from the
    /// end); `None` once the whole sum is in.
    next_sum: Option<usize>,
    /// Each result's compute time, by worker: what the next chains' groups are sized by.
    intervals: Vec<(WorkerId, Duration)>,
}

impl ChainInbox {
    /// The whole sum, every shard's sums and, on an audited step, every member's digests.
    fn complete(&self) -> bool {
        let accounted = self.digests.as_ref().is_none_or(|d| d.iter().all(Option::is_some));
        self.next_sum.is_none() && self.stats.iter().all(Option::is_some) && accounted
    }

    /// The chunk of the sum at `range` (of `n` values) landed: the next is expected.
    fn landed(&mut self, range: &std::ops::Range<usize>, n: usize) {
        self.next_sum = ChunkStream::Sum.after(range, n, CHUNK);
    }

    /// The next time after `now` a tail worker with a shard neither in nor copied is late, or
    /// a chain of one whose sum is not in.
    fn next_due(&self, plan: &ChainPlan, now: Instant) -> Option<Instant> {
        let open = |ks: &[ShardIndex]| ks.iter().any(|k| self.stats[k.0].is_none() && !self.copies.contains_key(k));
        let pending = plan.tail.iter().filter(|(_, ks)| open(ks)).filter_map(|(w, _)| self.due.get(w));
        let chain = self.chain_due.filter(|_| self.next_sum.is_some());
        pending.copied().chain(chain).filter(|&t| t > now).min()
    }

    /// Whether a chain of one's sum is late.
    fn chain_late(&self, now: Instant) -> bool {
        self.next_sum.is_some() && self.chain_due.is_some_and(|t| t <= now)
    }

    /// If the sum is not in but every member shard's copy is, their sum, in shard order, stands
    /// in for it in `grad`: the same additions the member makes.
    fn stand_in(&mut self, plan: &ChainPlan, grad: &mut [f32]) {
        let all_in = plan.members.iter().flat_map(|m| &m.shards).all(|k| self.stand_ins.contains_key(k));
        if self.next_sum.is_none() || !all_in {
            return;
        }
        let parts: Vec<Part<'_>> = self.stand_ins.iter().map(|(&k, (_, r))| super::part(&r.landed, k)).collect();
        dtrain_nn::simd::sum_into(grad, &parts);
        self.next_sum = None;
        self.stood_in = true;
    }
}

/// The coordinator's lanes to a chain's ends (see `dtrain_proto::lane`): the parameters go
/// to the first member on one, the sum comes back from the last on another, each straight
/// between the socket and the trainer's tensors. Without one (TLS without a client CA, or a
/// peer port the coordinator cannot reach) they take the member's stream.
#[derive(Default)]
struct Lanes {
    /// `None`: lanes are off; else how they are opened.
    access: Option<LaneAccess>,
    feed: Option<(WorkerId, LaneStream)>,
    collect: Option<(WorkerId, LaneStream, FrameReader)>,
    /// Members whose peer port the coordinator could not dial (said once each).
    unreachable: BTreeSet<WorkerId>,
}

impl Lanes {
    /// Dials `kind` to `id`'s peer port at `address` unless one is open or it was
    /// unreachable before; whether one is open now.
    async fn open(&mut self, kind: LaneKind, id: WorkerId, address: &str, name: impl FnOnce() -> String) -> bool {
        let Some(access) = &self.access else { return false };
        let open = match kind {
            // The member may have closed it for another since (its predecessor's, when the chain
            // changed): only an open one is used.
            LaneKind::Feed => self.feed.as_ref().is_some_and(|(w, lane)| *w == id && crate::lane::still_open(lane)),
            LaneKind::Collect => self.collect.as_ref().is_some_and(|(w, ..)| *w == id),
        };
        if open || self.unreachable.contains(&id) {
            return open;
        }
        match crate::lane::dial(address, kind, access.token.as_deref(), access.tls.as_ref()).await {
            Ok(lane) => {
                match kind {
                    LaneKind::Feed => self.feed = Some((id, lane)),
                    LaneKind::Collect => self.collect = Some((id, lane, FrameReader::default())),
                }
                true
            }
            Err(why) => {
                tracing::info!("no lane to {}'s peer port {address} ({why}): its chunks take its stream", name());
                self.unreachable.insert(id);
                false
            }
        }
    }
}

/// What the engine remembers about chains between steps.
#[derive(Default)]
pub(super) struct Memory {
    /// Members a broken link blamed: they stay on the star.
    excluded: BTreeSet<WorkerId>,
    /// Workers too slow to take part: they stand by (`topology::Bench`).
    bench: Bench,
    /// Tail workers whose shards of a step were computed by a copy first, and members of a
    /// chain of one whose sum copies stood in for, with that step: they stand by until they
    /// are done with it (their queue would only grow).
    owing: BTreeMap<WorkerId, u64>,
    /// The last plan's members and tail, and the last reason for the star (each logged when
    /// it changes).
    members: Vec<WorkerId>,
    star: Option<StarBecause>,
    /// How long recent chain steps waited for the sum.
    waits: std::collections::VecDeque<Duration>,
    lanes: Lanes,
    /// The members' compute time per shard, which sizes their groups.
    pace: crate::pace::Pace,
}

/// Below this median compute time per shard, chain groups stay even: a few microseconds of
/// scheduling noise would decide them, and there is nothing to gain.
const SIZED_FROM: Duration = Duration::from_millis(1);

/// Chain steps remembered for the learned deadline.
const WAITS: usize = 64;

impl Memory {
    /// With `lanes` (the job token, if any), the chain's ends use lanes where they can.
    pub(super) fn new(lanes: Option<LaneAccess>) -> Memory {
        Memory { lanes: Lanes { access: lanes, ..Lanes::default() }, ..Memory::default() }
    }

    /// Each member's speed relative to the median member, once shards take long enough to
    /// tell (`SIZED_FROM`); else none (even groups).
    fn speeds(&self) -> BTreeMap<WorkerId, f64> {
        match self.pace.median() {
            Some(m) if m >= SIZED_FROM => self.pace.speeds(),
            _ => BTreeMap::new(),
        }
    }

    /// How long this step's sum may take before the step goes over the star: 4 times the
    /// median of recent chain steps, at least 1 s, at most `step_timeout` (all of it until 8
    /// steps are known). A slow member then costs one late step, not a step timeout.
    fn deadline(&self, step_timeout: Duration) -> Duration {
        self.median_wait().map_or(step_timeout, |m| (m * 4).max(Duration::from_secs(1)).min(step_timeout))
    }

    /// When a chain of one's sum is late enough for its shards to get copies: 3 times the
    /// median of recent chain steps, at least `MIN_SPECULATION`; never until 8 are known.
    fn late_after(&self) -> Option<Duration> {
        self.median_wait().map(|m| (m * 3).max(crate::pace::MIN_SPECULATION))
    }

    /// The median wait of recent chain steps, once 8 are known.
    fn median_wait(&self) -> Option<Duration> {
        if self.waits.len() < 8 {
            return None;
        }
        let mut v: Vec<Duration> = self.waits.iter().copied().collect();
        v.sort_unstable();
        Some(v[v.len() / 2])
    }

    /// Whether `id` owes the result of a step whose shards a copy computed first: it stands by,
    /// on the star too, until it answers.
    pub(super) fn owes(&self, id: WorkerId) -> bool {
        self.owing.contains_key(&id)
    }

    fn waited(&mut self, d: Duration) {
        if self.waits.len() == WAITS {
            self.waits.pop_front();
        }
        self.waits.push_back(d);
    }
}

impl ClusterEngine<'_> {
    /// This step's chain, if the topology and the live workers make one (said in the log
    /// whenever the answer changes).
    pub(super) fn chain_plan(&mut self, shards: usize) -> Option<ChainPlan> {
        let candidates = self.net.hub.candidates();
        let live: BTreeSet<WorkerId> = candidates.iter().map(|c| c.id).collect();
        let (memory, hub) = (&mut self.policy.chain, &self.net.hub);
        let speeds = memory.speeds();
        memory.excluded.retain(|id| live.contains(id));
        memory.lanes.unreachable.retain(|id| live.contains(id));
        let (benched, rejoined) = memory.bench.update(self.policy.last_step.unwrap_or_default(), &speeds, &live);
        for w in benched {
            let speed = speeds.get(&w).copied().unwrap_or_default();
            tracing::info!(
                "{} computes at {speed:.2}x the median worker's pace: it stands by (its shards go to others)",
                hub.name(w)
            );
        }
        for w in rejoined {
            tracing::info!("{} is back from the bench: its pace is measured anew", hub.name(w));
            memory.pace.forget(w);
        }
        memory.owing.retain(|&w, &mut step| live.contains(&w) && hub.answered(w).is_none_or(|a| a < step));
        let benched = memory.bench.benched();
        self.telemetry.epoch.benched.extend(&benched);
        let mut out: BTreeSet<WorkerId> = memory.excluded.union(&benched).copied().collect();
        out.extend(memory.owing.keys());
        match plan(self.policy.topology, &candidates, &out, shards, &speeds) {
            Ok(p) => {
                let members: Vec<WorkerId> = p.members.iter().map(|m| m.id).chain(p.tail.iter().map(|t| t.0)).collect();
                if members != memory.members {
                    let names =
                        |ids: &mut dyn Iterator<Item = WorkerId>| ids.map(|id| hub.name(id)).collect::<Vec<_>>();
                    let tail = names(&mut p.tail.iter().map(|t| t.0));
                    let tail =
                        if tail.is_empty() { String::new() } else { format!(", then off it {}", tail.join(", ")) };
                    tracing::info!("topology chain: {}{tail}", names(&mut p.members.iter().map(|m| m.id)).join(" -> "));
                    memory.members = members;
                    memory.star = None;
                }
                Some(p)
            }
            Err(why) => {
                if memory.star.as_ref() != Some(&why) {
                    tracing::info!("topology star: {why}");
                    memory.star = Some(why);
                    memory.members.clear();
                }
                None
            }
        }
    }

    /// The step over `plan`: each shard's sums, with the sum of the gradients in `grad`; `None`
    /// if the chain broke and the step is to go over the star. An audited step is recomputed
    /// by the coordinator while the chain computes; if the chain's sum differs, the
    /// recomputation stands and the members' digests say who lied.
    pub(super) async fn chain_step(
        &mut self,
        plan: &ChainPlan,
        out: &mut Outgoing<'_>,
        inputs: &StepInputs<'_>,
        grad: &mut [f32],
        meanwhile: &mut Option<&mut dyn FnMut()>,
    ) -> Result<Option<Vec<ShardStats>>, EngineError> {
        let t0 = Instant::now();
        let step = out.step;
        // Without audits nobody looks at the members' digests: key 0 tells them not to make any.
        // With audits every step has keys (never 0), so a member cannot tell which are audited.
        let audits = self.policy.audit.on();
        let keys: Vec<u64> = plan.members.iter().map(|_| if audits { crate::auth::ticket() } else { 0 }).collect();
        let members: Vec<WorkerId> = plan.members.iter().map(|m| m.id).collect();
        let audited = self.policy.audit.wants_chain_check(step, &members);
        let (sum_lane, laned) = match self.start_chain(plan, &keys, out).await {
            Ok(Started { sum_lane, params_lane }) => (sum_lane, params_lane && sum_lane.is_some()),
            Err(why) => return Ok(self.fall_back(step, &why)),
        };
        let sent_all = Instant::now();
        timeline::mark("parameters sent", step);
        // While the chain computes: the caller's own work, then the next step's shards, and on
        // an audited step the recomputation of every shard.
        meanwhile.take().into_iter().for_each(|f| self.meanwhile(f, inputs.shards.len()));
        let truth = audited.then(|| self.recompute(plan, &keys, inputs));
        let mut inbox = ChainInbox {
            step,
            sent_all,
            stats: vec![None; inputs.shards.len()],
            tail: BTreeMap::new(),
            due: self.policy.chain.pace.speculate_after().map(|t| tail_due(plan, sent_all, t)).unwrap_or_default(),
            copies: BTreeMap::new(),
            // Not on an audited step: the members' digests are waited for there.
            chain_due: self.policy.chain.late_after().filter(|_| !audited).map(|d| sent_all + d),
            stand_ins: BTreeMap::new(),
            stood_in: false,
            digests: audited.then(|| vec![None; members.len()]),
            next_sum: ChunkStream::Sum.first(grad.len(), CHUNK),
            intervals: vec![],
        };
        if let Err(why) = self.collect(plan, inputs, out, &mut inbox, grad, sum_lane).await? {
            return Ok(self.fall_back(step, &why));
        }
        timeline::mark("sum in", step);
        for (w, ks) in &plan.tail {
            if ks.iter().any(|k| inbox.tail.get(k).is_some_and(|(sender, _)| sender != w)) {
                self.policy.chain.owing.insert(*w, step);
            }
        }
        if inbox.stood_in {
            // It stands by until it is done with this step. Its lane for the sum is closed, so
            // that the rest of its sum fails to go out at once (it reports the link broken,
            // which is an answer) rather than filling a lane nobody reads.
            tracing::info!(
                "step {step}: {}'s sum was late; copies of its shards stood in",
                self.net.hub.name(plan.last())
            );
            self.policy.chain.owing.insert(plan.last(), step);
            self.policy.chain.lanes.collect = None;
        }
        self.recycle_results(std::mem::take(&mut inbox.stand_ins));
        let alive: Vec<WorkerId> = self.net.hub.alive().iter().map(|m| m.id).collect();
        self.policy.chain.pace.learn(&std::mem::take(&mut inbox.intervals), &alive);
        let stats = self.complete_chain_sum(plan, truth, inbox, grad);
        let sums_finite = stats.iter().all(|s| s.loss_sum.is_finite() && s.activity.is_finite());
        if !sums_finite || !dtrain_nn::simd::all_finite(grad) {
            // A diverging model, or a worker that sent values that are not: over the star,
            // where the referee recomputes what nobody confirmed.
            return Ok(self.fall_back(step, "the sum is not finite"));
        }
        self.policy.chain.waited(sent_all.elapsed());
        let epoch = &mut self.telemetry.epoch;
        epoch.paths.chained += 1;
        epoch.paths.on_lanes += u64::from(laned);
        let reduce = std::mem::take(&mut epoch.chain_reduce);
        epoch.step(sent_all - t0, sent_all.elapsed().saturating_sub(reduce), reduce);
        Ok(Some(stats))
    }

    /// Takes the chain step's results into `inbox`, the sum's chunks straight into `grad` (on
    /// the lane with the ticket `sum_lane`, else on the last member's stream), giving late tail
    /// shards copies meanwhile, until all are in (`Ok(Ok)`) or the chain breaks (`Ok(Err)`: why),
    /// for the chain's learned deadline at most.
    async fn collect(
        &mut self,
        plan: &ChainPlan,
        inputs: &StepInputs<'_>,
        out: &mut Outgoing<'_>,
        inbox: &mut ChainInbox,
        grad: &mut [f32],
        sum_lane: Option<u64>,
    ) -> Result<Result<(), String>, EngineError> {
        let (step, sent_all, n) = (inbox.step, inbox.sent_all, grad.len());
        let patience = self.policy.chain.deadline(self.policy.step_timeout);
        if let Some((_, _, reader)) = self.policy.chain.lanes.collect.as_mut() {
            reader.new_step();
        }
        while !inbox.complete() {
            self.copy_late_shards(plan, inbox, out);
            let tail_due = inbox.next_due(plan, Instant::now());
            let want = sum_lane.map(|ticket| Expected { ticket, step, stream: ChunkStream::Sum, chunk: CHUNK, len: n });
            let woke = {
                let (events, lanes, next) = (&mut self.net.events, &mut self.policy.chain.lanes, inbox.next_sum);
                let frame = async {
                    match (want, lanes.collect.as_mut(), next) {
                        (Some(want), Some((_, lane, reader)), Some(at)) => {
                            reader.next(lane, grad, |h| h.place(&want, at)).await
                        }
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    e = events.recv() => Woke::Event(e),
                    f = frame => Woke::Frame(f),
                    () = async {
                        match tail_due {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    } => Woke::TailDue,
                    () = tokio::time::sleep_until((sent_all + patience).into()) => Woke::Late,
                }
            };
            let why = match woke {
                Woke::Event(Some(event)) => match self.take_chain_event(plan, inputs, inbox, event, grad) {
                    Ok(()) => continue,
                    Err(why) => why,
                },
                Woke::Event(None) => return Err(EngineError::Stopped),
                Woke::TailDue => continue,
                Woke::Frame(Ok(h)) => {
                    self.telemetry.epoch.bytes_in += (HEADER_BYTES + 4 * h.values as usize) as u64;
                    let range = h.offset as usize..h.offset as usize + h.values as usize;
                    if range.end == n {
                        timeline::mark("first sum frame in", step);
                    }
                    inbox.landed(&range, n);
                    continue;
                }
                Woke::Frame(Err(e)) => {
                    self.policy.chain.lanes.collect = None;
                    format!("{}'s lane with the sum: {e}", self.net.hub.name(plan.last()))
                }
                Woke::Late => format!("the sum did not arrive within {patience:?}"),
            };
            return Ok(Err(why));
        }
        Ok(Ok(()))
    }

    /// Takes one event of a chain step into `inbox` (the sum's chunks straight into `grad`);
    /// `Err` says why the chain broke.
    fn take_chain_event(
        &mut self,
        plan: &ChainPlan,
        inputs: &StepInputs<'_>,
        inbox: &mut ChainInbox,
        event: Event,
        grad: &mut [f32],
    ) -> Result<(), String> {
        let (step, n) = (inbox.step, grad.len());
        let rows = |k: ShardIndex| inputs.shards.get(k.0).map_or(0, |r| r.len() as u64);
        match event {
            Event::Result { id, result, size } => {
                let k = ShardIndex(result.index as usize);
                let copy = inbox.copies.get(&k) == Some(&id);
                let stand_in = copy && plan.owner(k).is_some();
                let tail = plan.tail_owner(k) == Some(id) || (copy && !stand_in);
                if result.step != step || !(tail || stand_in || plan.owner(k) == Some(id)) {
                    return Ok(()); // a late reply of an earlier step
                }
                self.telemetry.epoch.bytes_in += size as u64;
                self.telemetry.epoch.round_trip(id, inbox.sent_all.elapsed(), result.compute_micros);
                // Learned from either copy: a straggler's own pace counts even when its copy won.
                inbox.intervals.push((id, Duration::from_micros(result.compute_micros)));
                if inbox.tail.contains_key(&k) {
                    return Ok(()); // the second copy of a tail shard: the first won (same bits)
                }
                let hub = std::sync::Arc::clone(&self.net.hub);
                let bad = |e: Refusal| format!("{} sent a bad result for shard {k}: {e}", hub.name(id));
                if tail {
                    let r = self.receive(id, &result, rows(k), n).map_err(bad)?;
                    inbox.stats[k.0] = Some(r.stats);
                    inbox.tail.insert(k, (id, r));
                } else if stand_in {
                    if inbox.stand_ins.contains_key(&k) || inbox.next_sum.is_none() {
                        return Ok(()); // the sum is in: the member's shards need no copy
                    }
                    let r = self.receive(id, &result, rows(k), n).map_err(bad)?;
                    inbox.stats[k.0].get_or_insert(r.stats);
                    inbox.stand_ins.insert(k, (id, r));
                    inbox.stand_in(plan, grad);
                } else {
                    let checked = match result.gradient {
                        Tensor::Chained => result.stats(rows(k)).map_err(Refusal::from),
                        _ => Err(Refusal::WrongPath),
                    };
                    inbox.stats[k.0] = Some(checked.map_err(bad)?);
                }
                Ok(())
            }
            Event::Chunk { id, chunk: c, size } => {
                if id != plan.last() || c.step != step || c.stream != ChunkStream::Sum {
                    return Ok(());
                }
                self.telemetry.epoch.bytes_in += size as u64;
                let r0 = Instant::now();
                let at = inbox.next_sum.ok_or_else(|| WireError::Invalid("a chunk after the whole sum".into()));
                let landed = at.and_then(|at| c.expect(at, CHUNK, n)).and_then(|r| {
                    copy_f32s("running sum", &c.values, &mut grad[r.clone()])?;
                    Ok(r)
                });
                self.telemetry.epoch.chain_reduce += r0.elapsed();
                let range =
                    landed.map_err(|e| format!("{} sent a bad chunk of the sum: {e}", self.net.hub.name(id)))?;
                inbox.landed(&range, n);
                Ok(())
            }
            Event::Broken { id, step: s, peer, reason } => {
                if s != step || !plan.has(id) {
                    return Ok(());
                }
                if let Some(blamed) = plan.blame(id, &peer) {
                    tracing::warn!(
                        "{} cannot take part in chains ({} reports: {reason}); it stays on the star",
                        self.net.hub.name(blamed),
                        self.net.hub.name(id)
                    );
                    self.policy.chain.excluded.insert(blamed);
                }
                Err(format!("{} reports a broken link: {reason}", self.net.hub.name(id)))
            }
            Event::Digest { id, step: s, received, sent } => {
                let at = plan.members.iter().position(|m| m.id == id).filter(|_| s == step);
                if let (Some(i), Some(d)) = (at, inbox.digests.as_mut()) {
                    d[i] = Some((received, sent));
                }
                Ok(())
            }
            Event::Left { id } if plan.has(id) || plan.tail.iter().any(|(w, _)| *w == id) => {
                Err(format!("{} left", self.net.hub.name(id)))
            }
            Event::Left { .. } => Ok(()),
        }
    }

    /// Everything arrived: on an audited step the results are settled against the
    /// recomputation, else recorded as unchecked; the local shards' gradients are added to the
    /// chain's sum in `grad`, in shard order. Returns each shard's sums.
    fn complete_chain_sum(
        &mut self,
        plan: &ChainPlan,
        truth: Option<Truth>,
        mut inbox: ChainInbox,
        grad: &mut [f32],
    ) -> Vec<ShardStats> {
        let mut stats: Vec<ShardStats> = inbox.stats.iter().map(|s| s.unwrap_or_default()).collect();
        let workers: Vec<WorkerId> =
            plan.members.iter().map(|m| m.id).chain(plan.tail.iter().map(|&(w, _)| w)).collect();
        let settled = match truth {
            Some(truth) => {
                let reported = inbox.digests.take().unwrap_or_default();
                self.settle_audit(plan, truth, &reported, grad, &mut inbox.tail, &mut stats)
            }
            None => {
                let parties: Vec<_> = workers.iter().filter_map(|&w| self.net.hub.party(w)).collect();
                self.policy.audit.record(inbox.step, &[], &parties);
                false
            }
        };
        if !settled && !inbox.tail.is_empty() {
            let mut chain_sum = self.buffers.take(grad.len());
            chain_sum.copy_from_slice(grad);
            let parts: Vec<Part<'_>> = std::iter::once(Part::Own(&chain_sum[..]))
                .chain(inbox.tail.iter().map(|(&k, (_, r))| super::part(&r.landed, k)))
                .collect();
            dtrain_nn::simd::sum_into(grad, &parts);
            self.buffers.free.push(chain_sum);
        }
        self.recycle_results(inbox.tail);
        stats
    }

    /// Every shard of the step computed here, summed in shard order, with each member's
    /// digests of the running sums as they should be (under its key).
    fn recompute(&mut self, plan: &ChainPlan, keys: &[u64], inputs: &StepInputs<'_>) -> Truth {
        let n = inputs.params.len();
        let mut sum = self.buffers.take(n);
        let mut g = self.buffers.take(n);
        let mut stats = vec![ShardStats::default(); inputs.shards.len()];
        let mut digests = Vec::with_capacity(plan.members.len());
        for (i, (m, &key)) in plan.members.iter().zip(keys).enumerate() {
            let received = if i == 0 { 0 } else { sum_digest(key, &sum) };
            for &k in &m.shards {
                stats[k.0] = self.compute_here(inputs, k, &mut g);
                // The same additions, in the same order, as the members' (and the in-process sum).
                if k.0 == 0 {
                    sum.copy_from_slice(&g);
                } else {
                    sum.iter_mut().zip(&g).for_each(|(s, x)| *s += x);
                }
            }
            digests.push((received, sum_digest(key, &sum)));
        }
        let chain_sum = (!plan.tail.is_empty()).then(|| sum.clone());
        let mut tail = BTreeMap::new();
        for &k in plan.tail.iter().flat_map(|(_, ks)| ks) {
            stats[k.0] = self.compute_here(inputs, k, &mut g);
            sum.iter_mut().zip(&g).for_each(|(s, x)| *s += x);
            tail.insert(k, g.clone());
        }
        self.buffers.free.push(g);
        self.telemetry.epoch.verification.refereed += inputs.shards.len() as u64;
        Truth { sum, chain_sum, tail, stats, digests }
    }

    /// Returns the buffers of results (the tail's, or copies') for reuse.
    fn recycle_results(&mut self, results: BTreeMap<ShardIndex, (WorkerId, Received)>) {
        for (_, r) in results.into_values() {
            if let super::Landed::Copied(v) = r.landed {
                self.buffers.free.push(v);
            }
        }
    }

    /// An audited step: the chain's sum (in `grad`), the tail's results and every shard's sums
    /// against the recomputation. Equal, every worker is confirmed (false: the sum is still to
    /// be completed with the tail's results); else the whole recomputed sum stands in `grad`
    /// (true), and the judged member or sender of a tail result is evicted (its unchecked
    /// results undone) or, in a dispute, both ends leave the chain.
    fn settle_audit(
        &mut self,
        plan: &ChainPlan,
        truth: Truth,
        reported: &[Option<(u64, u64)>],
        grad: &mut [f32],
        tail: &mut BTreeMap<ShardIndex, (WorkerId, Received)>,
        stats: &mut [ShardStats],
    ) -> bool {
        let step = self.policy.last_step.unwrap_or_default();
        let members: Vec<WorkerId> = plan.members.iter().map(|m| m.id).collect();
        let bits =
            |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        // Who sent each shard's result: its member, or the tail result's sender.
        let senders: BTreeMap<ShardIndex, WorkerId> = tail.iter().map(|(&k, (w, _))| (k, *w)).collect();
        let owner = |k: ShardIndex| senders.get(&k).copied().or_else(|| plan.owner(k));
        let mut wrong: Vec<WorkerId> = (0..stats.len())
            .filter(|&k| !same_stats(&stats[k], &truth.stats[k]))
            .filter_map(|k| owner(ShardIndex(k)))
            .collect();
        for (&k, (sender, r)) in tail.iter_mut() {
            let mine = self.owned(r, k, truth.sum.len());
            if !bits(mine, &truth.tail[&k]) {
                wrong.push(*sender);
            }
        }
        let chain_right = bits(grad, truth.chain_sum.as_deref().unwrap_or(&truth.sum));
        let everyone = members.iter().copied().chain(plan.tail.iter().map(|&(w, _)| w)).chain(senders.into_values());
        if wrong.is_empty() && chain_right {
            let everyone: BTreeSet<WorkerId> = everyone.collect();
            self.policy.audit.record(step, &everyone.into_iter().collect::<Vec<_>>(), &[]);
            self.telemetry.epoch.verification.checked += stats.len() as u64;
            self.buffers.free.extend(std::iter::once(truth.sum).chain(truth.chain_sum));
            return false;
        }
        grad.copy_from_slice(&truth.sum);
        stats.copy_from_slice(&truth.stats);
        let tail_liar = wrong.iter().copied().find(|w| !members.contains(w));
        let verdict = match tail_liar {
            Some(w) if chain_right => Some(ChainVerdict::Liar(w)),
            _ => judge_chain(&members, &truth.digests, reported, &wrong),
        };
        {
            match verdict {
                Some(ChainVerdict::Liar(w)) => {
                    self.evict_liar(w, plan.shards_of(w).first().copied().unwrap_or(ShardIndex(0)), step);
                }
                Some(ChainVerdict::Dispute { sender, receiver }) => {
                    let (a, b) = (self.net.hub.name(sender), self.net.hub.name(receiver));
                    tracing::warn!(
                        "step {step}: {a} says it sent {b} the right running sum, {b} that it received another; \
                         both leave the chain (the star checks them shard by shard)"
                    );
                    self.policy.chain.excluded.extend([sender, receiver]);
                }
                None => {}
            }
        }
        self.buffers.free.extend(std::iter::once(truth.sum).chain(truth.chain_sum));
        true
    }

    /// A local result's gradient as values of ours (copied out of shared memory first, so what
    /// is compared is what would be summed).
    fn owned<'r>(&mut self, r: &'r mut Received, k: ShardIndex, n: usize) -> &'r [f32] {
        if let super::Landed::Slot(slots) = &r.landed {
            let mut buf = self.buffers.take(n);
            if let Some(v) = slots.shared(k.0) {
                v.read_into(&mut buf);
            }
            r.landed = super::Landed::Copied(buf);
        }
        match &r.landed {
            super::Landed::Copied(v) => v,
            super::Landed::Slot(_) => &[],
        }
    }

    /// Sends every member its shards, place and digest key, and the first member the
    /// parameters (on the coordinator's lane to it, else on its stream).
    async fn start_chain(&mut self, plan: &ChainPlan, keys: &[u64], out: &mut Outgoing<'_>) -> Result<Started, String> {
        let (step, n) = (out.step, out.params.len());
        let tickets: Vec<u64> = plan.members.iter().map(|_| crate::auth::ticket()).collect();
        let (first, last) = (&plan.members[0], &plan.members[plan.members.len() - 1]);
        let (lanes, hub) = (&mut self.policy.chain.lanes, &self.net.hub);
        let params_lane =
            lanes.open(LaneKind::Feed, first.id, &first.peer, || hub.name(first.id)).await.then(crate::auth::ticket);
        let sum_lane = lanes.open(LaneKind::Collect, last.id, &last.peer, || hub.name(last.id)).await;
        for (i, m) in plan.members.iter().enumerate() {
            let role = ChainRole {
                successor: plan.members.get(i + 1).map(|s| s.peer.clone()),
                ticket_in: i.checked_sub(1).map(|p| tickets[p]),
                ticket_out: tickets[i],
                chunk_values: CHUNK_VALUES,
                digest_key: keys[i],
                params_lane: params_lane.filter(|_| i == 0),
                sum_lane: sum_lane && m.id == last.id,
            };
            let work = Work {
                step,
                params: Tensor::Chained,
                global_batch: out.global_batch,
                shards: m.shards.iter().map(|k| out.wire[k.0].clone()).collect(),
                chain: Some(role),
            };
            let sums = if m.id == last.id && !sum_lane { n.div_ceil(CHUNK) } else { 0 };
            self.net.hub.chain(m.id, sums);
            let size = self.net.hub.send(m.id, ToWorker::Work(work));
            let size = size.ok_or_else(|| format!("{} is gone or not keeping up", self.net.hub.name(m.id)))?;
            self.telemetry.epoch.bytes_out += size as u64;
        }
        // The tail: its shards as on the star (through shared memory where it is local).
        for (w, ks) in &plan.tail {
            if !self.send(*w, ks, step, out) {
                return Err(format!("{} is gone or not keeping up", self.net.hub.name(*w)));
            }
        }
        timeline::mark("work sent", step);
        // A member that stops reading (partitioned, frozen) stalls the parameters by
        // backpressure, all the way up the chain: they are given the chain's learned deadline,
        // not the step timeout, and no longer than every member stays (a frozen one is dropped
        // once its keepalive pings go unanswered).
        let until = Instant::now() + self.policy.chain.deadline(self.policy.step_timeout);
        let (hub, members) =
            (std::sync::Arc::clone(&self.net.hub), plan.members.iter().map(|m| m.id).collect::<Vec<_>>());
        let fed = tokio::select! {
            fed = async {
                match params_lane {
                    Some(ticket) => self.feed_params(ticket, out, until).await,
                    None => self.stream_params(first.id, out, until).await,
                }
            } => fed,
            () = hub.any_gone(&members) => Err("a member left while the parameters were on their way".to_string()),
        };
        if fed.is_err() {
            // Possibly cut mid-frame.
            self.policy.chain.lanes.feed = None;
        }
        fed?;
        let sum_lane = sum_lane.then_some(tickets[tickets.len() - 1]);
        Ok(Started { sum_lane, params_lane: params_lane.is_some() })
    }

    /// Copies of the tail's late shards, else of a late chain of one's, to idle workers
    /// (`topology::tail_copies`, `topology::member_copies`), as on the star, the gradient in
    /// the result; a member computes at the parameters it received on
    /// the chain (its shards are in, so it has them all), the tail's workers get them as on the
    /// star.
    fn copy_late_shards(&mut self, plan: &ChainPlan, inbox: &mut ChainInbox, out: &mut Outgoing<'_>) {
        let (stats, now) = (&inbox.stats, Instant::now());
        let mut copies = tail_copies(plan, &inbox.due, now, &|k| stats[k.0].is_some(), &inbox.copies);
        if copies.is_empty() {
            copies = member_copies(plan, inbox.chain_late(now), &|k| stats[k.0].is_some(), &inbox.copies);
        }
        for (k, w) in copies {
            inbox.copies.insert(k, w);
            let params = if plan.has(w) { Tensor::Chained } else { self.params_for(w, out) };
            if self.send_with(w, &[k], inbox.step, out, params) {
                self.telemetry.epoch.paths.speculated += 1;
                let late = plan.tail_owner(k).or(plan.owner(k)).map(|o| self.net.hub.name(o)).unwrap_or_default();
                tracing::debug!(
                    "step {}: {late} is late; shard {k} gets a copy on {}",
                    inbox.step,
                    self.net.hub.name(w)
                );
            }
        }
    }

    /// The parameters in frames on the lane to the first member, straight from the trainer's
    /// tensor, all of them by `until`; a lane that fails is closed.
    async fn feed_params(&mut self, ticket: u64, out: &Outgoing<'_>, until: Instant) -> Result<(), String> {
        let Some((id, lane)) = self.policy.chain.lanes.feed.as_mut() else { return Err("no lane".into()) };
        let id = *id;
        for (i, values) in out.params.chunks(CHUNK).enumerate() {
            let offset = (i * CHUNK) as u64;
            let header = FrameHeader {
                ticket,
                step: out.step,
                stream: ChunkStream::Params,
                offset,
                values: values.len() as u32,
            };
            let sent = match tokio::time::timeout_at(until.into(), write_frame(lane, &header, values)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("the parameters did not all go out within the chain step's deadline".to_string()),
            };
            if let Err(why) = sent {
                self.policy.chain.lanes.feed = None;
                return Err(format!("the lane to {}: {why}", self.net.hub.name(id)));
            }
            self.telemetry.epoch.bytes_out += (HEADER_BYTES + 4 * values.len()) as u64;
        }
        Ok(())
    }

    /// The parameters in chunk messages on the first member's stream, all of them by `until`.
    async fn stream_params(&mut self, first: WorkerId, out: &mut Outgoing<'_>, until: Instant) -> Result<(), String> {
        let (step, n) = (out.step, out.params.len());
        let bytes = self.inline_params(out);
        for offset in (0..n).step_by(CHUNK) {
            let end = (offset + CHUNK).min(n);
            let c = Chunk {
                step,
                stream: ChunkStream::Params,
                offset: offset as u64,
                values: bytes.slice(offset * 4..end * 4),
            };
            let patience = until.saturating_duration_since(Instant::now());
            let sent = self.net.hub.send_within(first, ToWorker::Chunk(c), patience).await;
            let size = sent.ok_or_else(|| format!("{} took no parameters", self.net.hub.name(first)))?;
            self.telemetry.epoch.bytes_out += size as u64;
        }
        Ok(())
    }

    /// The chain broke: says why, and the step goes over the star.
    fn fall_back(&mut self, step: u64, why: &str) -> Option<Vec<ShardStats>> {
        tracing::warn!("step {step}: the chain broke ({why}); computing the step over the star");
        self.telemetry.epoch.paths.fell_back += 1;
        self.telemetry.epoch.chain_reduce = Default::default();
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_step_may_take_four_times_the_usual_wait_once_learned() {
        let timeout = Duration::from_secs(30);
        let mut m = Memory::default();
        for _ in 0..7 {
            m.waited(Duration::from_millis(500));
        }
        assert_eq!(m.deadline(timeout), timeout, "not learned yet");
        m.waited(Duration::from_millis(500));
        assert_eq!(m.deadline(timeout), Duration::from_secs(2));
        let mut fast = Memory::default();
        (0..8).for_each(|_| fast.waited(Duration::from_millis(5)));
        assert_eq!(fast.deadline(timeout), Duration::from_secs(1), "never below a second");
        assert_eq!(m.deadline(Duration::from_secs(1)), Duration::from_secs(1), "never beyond the step timeout");
    }
}
