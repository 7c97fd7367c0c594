//! `Engine` over the network: each step's shards go to live workers; gradients come back and
//! land in shard order. Lost, hung or faulty workers' shards are recomputed by others within
//! the same step, so the step is applied once, with the same bits as in-process.

use crate::assign::{assign, take_assigned};
use crate::epoch_stats::EpochStats;
use crate::hub::{Event, Hub};
use crate::run::ClusterOptions;
use crate::shm::SharedFile;
use dtrain_data::Dataset;
use dtrain_fit::Engine;
use dtrain_nn::ShardStats;
use dtrain_proto::pb::{self, coordinator_message::Kind as Out};
use dtrain_proto::{check_finite, copy_f32s, result_from_wire, shard_to_wire, WireTensor};
use prost::bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

/// Faulty results a worker may send before it is dropped.
const MAX_FAULTS: u32 = 3;

pub struct ClusterEngine<'a> {
    data: &'a Dataset,
    /// The runtime that serves the workers (one IO thread, so health checks and joins are
    /// answered between steps too); steps block on it.
    rt: Arc<tokio::runtime::Runtime>,
    hub: Arc<Hub>,
    events: mpsc::UnboundedReceiver<Event>,
    /// A worker that has not answered this long after getting work is dropped.
    step_timeout: Duration,
    /// With no worker left, wait this long for one to join, then fail.
    worker_wait: Duration,
    faults: BTreeMap<u32, u32>,
    log: Box<dyn FnMut(&str) + Send + 'a>,
    epoch: EpochStats,
    metrics: Option<Arc<dtrain_fit::metrics::Metrics>>,
    /// The batch `prefetch` announced, and its shards built while the previous step waited.
    next_batch: Vec<u32>,
    prebuilt: Option<(Vec<u32>, Vec<pb::Shard>)>,
    /// The parameters as they travel (one buffer shared by every worker's message).
    params: WireTensor,
    /// Gradients received in messages, by shard; zeros for empty shards.
    received: Vec<Vec<f32>>,
    zeros: Vec<f32>,
}

impl<'a> ClusterEngine<'a> {
    pub(crate) fn new(
        data: &'a Dataset,
        rt: Arc<tokio::runtime::Runtime>,
        hub: Arc<Hub>,
        events: mpsc::UnboundedReceiver<Event>,
        opts: &ClusterOptions,
        log: Box<dyn FnMut(&str) + Send + 'a>,
    ) -> Self {
        ClusterEngine {
            data,
            rt,
            hub,
            events,
            step_timeout: opts.step_timeout,
            worker_wait: opts.worker_wait,
            faults: Default::default(),
            log,
            epoch: Default::default(),
            metrics: opts.metrics.clone(),
            next_batch: vec![],
            prebuilt: None,
            params: Default::default(),
            received: vec![],
            zeros: vec![],
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
    ) -> Result<Vec<ShardStats>, String> {
        let rt = self.rt.clone();
        self.epoch.step_starts();
        let (sent, received) = (self.epoch.bytes_out, self.epoch.bytes_in);
        let r = rt.block_on(self.step(params, step, batch, shards, grad, meanwhile));
        self.epoch.step_ends();
        if let Some(m) = &self.metrics {
            m.workers(self.hub.alive().len() as u64);
            m.wire(self.epoch.bytes_out - sent, self.epoch.bytes_in - received);
        }
        r
    }

    fn prefetch(&mut self, batch: &[u32]) {
        self.next_batch.clear();
        self.next_batch.extend_from_slice(batch);
    }

    fn epoch_report(&mut self) -> Option<String> {
        std::mem::take(&mut self.epoch).report(&self.hub)
    }
}

impl Drop for ClusterEngine<'_> {
    fn drop(&mut self) {
        self.rt.block_on(self.hub.stop_all("training finished", Duration::from_secs(2)));
    }
}

/// Where a shard's gradient is once its result arrived: in the worker's shared-memory slot
/// (kept mapped here even if the worker leaves), or copied from the message.
enum Landed {
    Empty,
    Slot(u32, Arc<SharedFile>),
    Copied(u32),
}

impl Landed {
    fn worker(&self) -> Option<u32> {
        match self {
            Landed::Empty => None,
            Landed::Slot(id, _) | Landed::Copied(id) => Some(*id),
        }
    }
}

/// One step's bookkeeping while its shards are out.
struct Round<'s> {
    step: u64,
    batch: &'s [u32],
    shards: &'s [Range<usize>],
    params: &'s [f32],
    /// Each shard's samples as they travel.
    wire: Vec<pb::Shard>,
    /// Whether this step's parameters are in shared memory; as message bytes, made once if a
    /// worker needs them.
    shared: bool,
    inline: Option<Bytes>,
    stats: Vec<ShardStats>,
    landed: Vec<Option<Landed>>,
    /// Shards to send, and shards out (to which worker, sent when).
    pending: BTreeSet<usize>,
    assigned: BTreeMap<usize, u32>,
    sent_at: BTreeMap<u32, Instant>,
    /// Shards whose first result was not finite: who sent it and what was wrong, until a
    /// second opinion says whether it was the worker or the model.
    doubts: BTreeMap<usize, (u32, String)>,
    deadline: Instant,
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
    ) -> Result<Vec<ShardStats>, String> {
        let t0 = Instant::now();
        // The parameters go where workers read them, checked as they are copied: into shared
        // memory, or (with no local worker) into the message bytes every worker gets.
        let (finite, shared, inline) = match self.hub.share_params(step, params) {
            Some(finite) => (finite, true, None),
            None => {
                let finite = dtrain_nn::simd::sum_into(self.params.fill(params.len()), &[params]);
                (finite, false, Some(self.params.share()))
            }
        };
        // Parameters that are not finite (a diverging run) give a loss that is not finite, as
        // in process; workers would refuse them, so none is asked.
        if !finite {
            meanwhile();
            grad.fill(f32::NAN);
            let nan = |r: &Range<usize>| ShardStats { loss_sum: f64::NAN, rows: r.len() as u64, ..Default::default() };
            return Ok(shards.iter().map(nan).collect());
        }
        let landed: Vec<Option<Landed>> = shards.iter().map(|r| r.is_empty().then_some(Landed::Empty)).collect();
        let mut round = Round {
            step,
            batch,
            shards,
            params,
            wire: match self.prebuilt.take() {
                Some((b, wire)) if b == batch && wire.len() == shards.len() => wire,
                _ => self.shards_to_wire(batch, shards),
            },
            shared,
            inline,
            stats: vec![ShardStats::default(); shards.len()],
            pending: (0..shards.len()).filter(|&k| landed[k].is_none()).collect(),
            landed,
            assigned: BTreeMap::new(),
            sent_at: BTreeMap::new(),
            doubts: BTreeMap::new(),
            deadline: Instant::now() + self.step_timeout,
            reduce: Duration::ZERO,
        };
        let mut meanwhile = Some(meanwhile);
        let mut sent_all = None;
        loop {
            while !round.pending.is_empty() || !round.assigned.is_empty() {
                if round.pending.is_empty() {
                    self.next_event(&mut round).await?;
                    continue;
                }
                self.dispatch(&mut round).await?;
                sent_all.get_or_insert_with(Instant::now);
                // While the workers compute: the caller's own work, then the next step's shards.
                if let Some(f) = meanwhile.take() {
                    f();
                    if !self.next_batch.is_empty() {
                        let next = std::mem::take(&mut self.next_batch);
                        let ranges = dtrain_fit::engine::shard_ranges(next.len(), shards.len());
                        let wire = self.shards_to_wire(&next, &ranges);
                        self.prebuilt = Some((next, wire));
                    }
                }
            }
            if self.settle(&mut round, grad) {
                break;
            }
        }
        if let Some(f) = meanwhile.take() {
            f(); // every shard was empty
        }
        let sent_all = sent_all.unwrap_or(t0);
        self.epoch.step(sent_all - t0, sent_all.elapsed().saturating_sub(round.reduce), round.reduce);
        Ok(round.stats)
    }

    /// Sends the pending shards to live workers (waiting for one if there is none).
    async fn dispatch(&mut self, round: &mut Round<'_>) -> Result<(), String> {
        self.await_workers().await?;
        let todo: Vec<usize> = std::mem::take(&mut round.pending).into_iter().collect();
        let doubts = &round.doubts;
        for (id, group) in assign(&todo, &self.hub.alive(), |k| doubts.get(&k).map(|d| d.0)) {
            let mut work = pb::Work {
                step: round.step,
                params: Bytes::new(),
                global_batch: round.batch.len() as u32,
                shards: group.iter().map(|&k| round.wire[k].clone()).collect(),
                params_shared: false,
            };
            self.attach_params(id, &mut work, round);
            let size = prost::Message::encoded_len(&work) as u64;
            if self.hub.send(id, pb::CoordinatorMessage { kind: Some(Out::Work(work)) }) {
                self.epoch.bytes_out += size;
                round.sent_at.insert(id, Instant::now());
                round.assigned.extend(group.iter().map(|&k| (k, id)));
            } else {
                round.pending.extend(&group);
                self.hub.drop_worker(id, Status::unavailable("not keeping up with its work queue"));
            }
        }
        round.deadline = Instant::now() + self.step_timeout;
        Ok(())
    }

    /// Waits for the next result, departure or deadline, and books it.
    async fn next_event(&mut self, round: &mut Round<'_>) -> Result<(), String> {
        match tokio::time::timeout_at(round.deadline.into(), self.events.recv()).await {
            Ok(Some(Event::Result { id, result })) => {
                let k = result.index as usize;
                if result.step != round.step || round.assigned.get(&k) != Some(&id) {
                    return Ok(()); // a late reply from a worker this shard was taken from
                }
                round.assigned.remove(&k);
                self.epoch.bytes_in += prost::Message::encoded_len(&result) as u64;
                if let Some(t) = round.sent_at.get(&id) {
                    self.epoch.round_trip(id, t.elapsed(), result.compute_micros);
                }
                let r0 = Instant::now();
                let received = self.receive(id, &result, round.shards[k].len() as u64, round.params.len());
                round.reduce += r0.elapsed();
                match received {
                    Ok((s, l)) => {
                        round.stats[k] = s;
                        round.landed[k] = Some(l);
                    }
                    Err(e) => {
                        self.bad_result(id, k, round.step, &e);
                        self.metrics.iter().for_each(|m| m.recomputed(1));
                        round.pending.insert(k);
                    }
                }
            }
            Ok(Some(Event::Left { id, .. })) => {
                let lost = take_assigned(&mut round.assigned, id);
                if !lost.is_empty() {
                    (self.log)(&format!("shard(s) {lost:?} of worker {id} go to others"));
                    self.metrics.iter().for_each(|m| m.recomputed(lost.len() as u64));
                }
                round.pending.extend(lost);
            }
            Ok(Some(Event::Joined { .. })) => {}
            Ok(None) => return Err("the coordinator's worker hub stopped".into()),
            Err(_) => {
                let late: BTreeSet<u32> = round.assigned.values().copied().collect();
                for id in late {
                    let lost = take_assigned(&mut round.assigned, id);
                    (self.log)(&format!(
                        "{} missed the {:?} step deadline; dropping it, {} shard(s) go to others",
                        self.hub.name(id),
                        self.step_timeout,
                        lost.len()
                    ));
                    self.hub.drop_worker(id, Status::deadline_exceeded("missed the step deadline"));
                    self.metrics.iter().for_each(|m| m.recomputed(lost.len() as u64));
                    round.pending.extend(lost);
                }
            }
        }
        Ok(())
    }

    /// Every shard is in: sums them into `grad`; true unless some must be computed again. A
    /// result that is not finite gets a second opinion from another worker: if that is not
    /// finite either, it is the model's (a diverging run then stops as in process); if it is,
    /// the first worker was at fault.
    fn settle(&mut self, round: &mut Round<'_>, grad: &mut [f32]) -> bool {
        let r0 = Instant::now();
        let landed: Vec<Landed> = round.landed.iter_mut().map(|l| l.take().expect("every shard landed")).collect();
        let not_finite = self.reduce(&landed, &round.stats, grad);
        round.reduce += r0.elapsed();
        round.landed = landed.into_iter().map(Some).collect();
        let previous = std::mem::take(&mut round.doubts);
        for (k, (first, why)) in &previous {
            if !not_finite.contains_key(k) {
                self.bad_result(*first, *k, round.step, why);
            }
        }
        for (k, why) in not_finite {
            if previous.contains_key(&k) {
                continue; // two workers agree: it is the model's value
            }
            if let Some(id) = round.landed[k].take().and_then(|l| l.worker()) {
                round.doubts.insert(k, (id, why));
                self.metrics.iter().for_each(|m| m.recomputed(1));
                round.pending.insert(k);
            }
        }
        round.pending.is_empty()
    }

    /// Returns once at least one worker is alive, or fails after `worker_wait`.
    async fn await_workers(&mut self) -> Result<(), String> {
        if !self.hub.alive().is_empty() {
            return Ok(());
        }
        (self.log)(&format!("no live worker; waiting up to {:?} for one to join", self.worker_wait));
        let until = Instant::now() + self.worker_wait;
        loop {
            match tokio::time::timeout_at(until.into(), self.events.recv()).await {
                Ok(Some(Event::Joined { .. })) => {
                    if !self.hub.alive().is_empty() {
                        return Ok(());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err("the coordinator's worker hub stopped".into()),
                Err(_) => {
                    return Err(format!("no worker joined within {:?}; the last checkpoint is kept", self.worker_wait))
                }
            }
        }
    }

    /// Puts this step's parameters (known to be finite) in `work`: in shared memory if they are
    /// there and the worker has it, else in the message (one copy of them, made on first need,
    /// serves every worker).
    fn attach_params(&mut self, id: u32, work: &mut pb::Work, round: &mut Round<'_>) {
        if round.shared && self.hub.slots(id).is_some() {
            work.params_shared = true;
            return;
        }
        let (params, wire) = (round.params, &mut self.params);
        work.params = round
            .inline
            .get_or_insert_with(|| {
                wire.fill(params.len()).copy_from_slice(params);
                wire.share()
            })
            .clone();
    }

    /// A result's sums, and where its gradient is: in the worker's shared memory, or copied
    /// from the message into this shard's buffer. Checked except for finite values (`reduce`).
    fn receive(
        &mut self,
        id: u32,
        result: &pb::ShardResult,
        rows: u64,
        n: usize,
    ) -> Result<(ShardStats, Landed), String> {
        let stats = result_from_wire(result, rows).map_err(|e| e.to_string())?;
        let k = result.index as usize;
        if result.gradient_shared {
            let slots = self.hub.slots(id).ok_or("a gradient in shared memory it does not have")?;
            slots.region(k).ok_or("a shared-memory slot out of range")?;
            return Ok((stats, Landed::Slot(id, slots)));
        }
        if self.received.len() <= k {
            self.received.resize_with(k + 1, Vec::new);
        }
        let buf = &mut self.received[k];
        buf.resize(n, 0.0);
        copy_f32s("gradient", &result.gradient, buf).map_err(|e| e.to_string())?;
        Ok((stats, Landed::Copied(id)))
    }

    /// `grad` = the shards' gradients summed in shard order; returns the shards whose result is
    /// not finite (its sums, or its gradient when the sum is not finite: an overflowing sum of
    /// finite gradients is kept, as in process).
    fn reduce(&mut self, landed: &[Landed], stats: &[ShardStats], grad: &mut [f32]) -> BTreeMap<usize, String> {
        self.zeros.resize(grad.len(), 0.0);
        let parts: Vec<&[f32]> = landed
            .iter()
            .enumerate()
            .map(|(k, l)| match l {
                Landed::Empty => &self.zeros[..],
                Landed::Slot(_, slots) => slots.region(k).expect("checked when the result arrived"),
                Landed::Copied(_) => &self.received[k][..],
            })
            .collect();
        let sum_finite = dtrain_nn::simd::sum_into(grad, &parts);
        let not_finite = |(k, (p, s)): (usize, (&&[f32], &ShardStats))| {
            if !(s.loss_sum.is_finite() && s.activity.is_finite()) {
                return Some((k, "loss sums are not finite".to_string()));
            }
            (!sum_finite).then(|| check_finite("gradient", p).err().map(|e| (k, e.to_string()))).flatten()
        };
        parts.iter().zip(stats).enumerate().filter_map(not_finite).collect()
    }

    /// A result refused: counted, and its worker dropped after repeated faults.
    fn bad_result(&mut self, id: u32, k: usize, step: u64, e: &str) {
        self.metrics.iter().for_each(|m| m.rejected());
        self.fault(id, &format!("sent a bad result for shard {k} of step {step}: {e}"));
    }

    /// Each shard's samples as they travel (empty shards too, never sent).
    fn shards_to_wire(&self, batch: &[u32], shards: &[Range<usize>]) -> Vec<pb::Shard> {
        let wire =
            |(k, r): (usize, &Range<usize>)| shard_to_wire(k as u32, r.start as u32, self.data, &batch[r.clone()]);
        shards.iter().enumerate().map(wire).collect()
    }

    fn fault(&mut self, id: u32, what: &str) {
        let n = self.faults.entry(id).or_default();
        *n += 1;
        (self.log)(&format!("{} {what}", self.hub.name(id)));
        if *n >= MAX_FAULTS {
            (self.log)(&format!("dropping {} after {n} faulty results", self.hub.name(id)));
            self.hub.drop_worker(id, Status::data_loss("too many faulty results"));
        }
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
        let (hub, events) = Hub::new(String::new(), None, |_| {});
        let opts = options(Duration::from_millis(10));
        let mut e = ClusterEngine::new(&data, rt, hub, events, &opts, Box::new(|_| {}));
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
        assert!(err.contains("no worker joined within 10ms"), "{err}");
    }
}
