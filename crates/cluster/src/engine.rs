//! `Engine` over the network: each step's shards go to live workers; gradients come back and
//! land in shard order. Lost, hung or faulty workers' shards are recomputed by others within
//! the same step, so the step is applied once, with the same bits as in-process.

use crate::hub::{Event, Hub};
use dtrain_data::Dataset;
use dtrain_fit::Engine;
use dtrain_nn::ShardStats;
use dtrain_proto::pb::{self, coordinator_message::Kind as Out};
use dtrain_proto::{f32_bytes, result_from_wire, shard_to_wire};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

/// Faulty results a worker may send before it is dropped.
const MAX_FAULTS: u32 = 3;

pub struct ClusterEngine<'a> {
    pub(crate) data: &'a Dataset,
    /// The runtime that serves the workers (one IO thread, so health checks and joins are
    /// answered between steps too); steps block on it.
    pub(crate) rt: Arc<tokio::runtime::Runtime>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    /// A worker that has not answered this long after getting work is dropped.
    pub(crate) step_timeout: Duration,
    /// With no worker left, wait this long for one to join, then fail.
    pub(crate) worker_wait: Duration,
    pub(crate) faults: BTreeMap<u32, u32>,
    pub(crate) log: Box<dyn FnMut(&str) + Send + 'a>,
    pub(crate) epoch: EpochStats,
    pub(crate) metrics: Option<Arc<dtrain_fit::metrics::Metrics>>,
}

/// What an epoch looked like from the coordinator.
#[derive(Default)]
pub(crate) struct EpochStats {
    steps: u64,
    bytes_out: u64,
    bytes_in: u64,
    /// Per worker: time from sending its work to each shard's result arriving, in µs.
    round_trips: BTreeMap<u32, Vec<u32>>,
    /// Per worker: its own compute time for each shard, in µs.
    compute: BTreeMap<u32, Vec<u32>>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

impl Engine for ClusterEngine<'_> {
    fn gradients(
        &mut self,
        params: &[f32],
        step: u64,
        batch: &[u32],
        shards: &[Range<usize>],
        out: &mut [Vec<f32>],
    ) -> Result<Vec<ShardStats>, String> {
        let rt = self.rt.clone();
        self.epoch.steps += 1;
        let (sent, received) = (self.epoch.bytes_out, self.epoch.bytes_in);
        let r = rt.block_on(self.step(params, step, batch, shards, out));
        if let Some(m) = &self.metrics {
            m.workers(self.hub.alive().len() as u64);
            m.wire(self.epoch.bytes_out - sent, self.epoch.bytes_in - received);
        }
        r
    }

    fn epoch_report(&mut self) -> Option<String> {
        self.report()
    }
}

impl ClusterEngine<'_> {
    fn report(&mut self) -> Option<String> {
        let e = std::mem::take(&mut self.epoch);
        if e.steps == 0 {
            return None;
        }
        let mut times = vec![];
        let mut compute = e.compute;
        for (id, mut t) in e.round_trips {
            t.sort_unstable();
            let mut c = compute.remove(&id).unwrap_or_default();
            c.sort_unstable();
            let (c50, c99) = if c.is_empty() { (0.0, 0.0) } else { (percentile(&c, 0.5), percentile(&c, 0.99)) };
            times.push(format!(
                "{} {:.2}/{:.2} ms (compute {c50:.2}/{c99:.2})",
                self.hub.name(id),
                percentile(&t, 0.5),
                percentile(&t, 0.99)
            ));
        }
        Some(format!(
            "cluster: {} worker(s) alive; shard round trip p50/p99: {}; per step {:.0} KB sent, {:.0} KB received",
            self.hub.alive().len(),
            times.join(", "),
            e.bytes_out as f64 / e.steps as f64 / 1024.0,
            e.bytes_in as f64 / e.steps as f64 / 1024.0
        ))
    }
}

impl Drop for ClusterEngine<'_> {
    fn drop(&mut self) {
        self.rt.block_on(self.hub.stop_all("training finished", Duration::from_secs(2)));
    }
}

impl ClusterEngine<'_> {
    async fn step(
        &mut self,
        params: &[f32],
        step: u64,
        batch: &[u32],
        shards: &[Range<usize>],
        out: &mut [Vec<f32>],
    ) -> Result<Vec<ShardStats>, String> {
        let mut stats = vec![ShardStats::default(); shards.len()];
        let mut pending = BTreeSet::new();
        for (k, r) in shards.iter().enumerate() {
            if r.is_empty() {
                out[k].fill(0.0);
            } else {
                pending.insert(k);
            }
        }
        let params = f32_bytes(params);
        let mut assigned: BTreeMap<usize, u32> = BTreeMap::new();
        let mut sent_at: BTreeMap<u32, Instant> = BTreeMap::new();
        let mut deadline = Instant::now() + self.step_timeout;
        while !pending.is_empty() || !assigned.is_empty() {
            if !pending.is_empty() {
                self.await_workers().await?;
                // Contiguous groups of the pending shards, one group per live worker.
                let alive = self.hub.alive();
                let todo: Vec<usize> = std::mem::take(&mut pending).into_iter().collect();
                let per = todo.len().div_ceil(alive.len());
                for (group, &id) in todo.chunks(per).zip(&alive) {
                    let work = pb::Work {
                        step,
                        params: params.clone(),
                        global_batch: batch.len() as u32,
                        shards: group
                            .iter()
                            .map(|&k| {
                                shard_to_wire(k as u32, shards[k].start as u32, self.data, &batch[shards[k].clone()])
                            })
                            .collect(),
                    };
                    let size = prost::Message::encoded_len(&work) as u64;
                    if self.hub.send(id, pb::CoordinatorMessage { kind: Some(Out::Work(work)) }) {
                        self.epoch.bytes_out += size;
                        sent_at.insert(id, Instant::now());
                        assigned.extend(group.iter().map(|&k| (k, id)));
                    } else {
                        pending.extend(group);
                        self.hub.drop_worker(id, Status::unavailable("not keeping up with its work queue"));
                    }
                }
                deadline = Instant::now() + self.step_timeout;
                continue;
            }
            match tokio::time::timeout_at(deadline.into(), self.events.recv()).await {
                Ok(Some(Event::Result { id, result })) => {
                    let k = result.index as usize;
                    if result.step != step || assigned.get(&k) != Some(&id) {
                        continue; // a late reply from a worker this shard was taken from
                    }
                    let rows = shards[k].len() as u64;
                    self.epoch.bytes_in += prost::Message::encoded_len(&result) as u64;
                    if let Some(t) = sent_at.get(&id) {
                        self.epoch.round_trips.entry(id).or_default().push(t.elapsed().as_micros() as u32);
                    }
                    self.epoch
                        .compute
                        .entry(id)
                        .or_default()
                        .push(result.compute_micros.min(u64::from(u32::MAX)) as u32);
                    match result_from_wire(&result, rows, &mut out[k]) {
                        Ok(s) => {
                            stats[k] = s;
                            assigned.remove(&k);
                        }
                        Err(e) => {
                            assigned.remove(&k);
                            pending.insert(k);
                            self.metrics.iter().for_each(|m| {
                                m.rejected();
                                m.recomputed(1);
                            });
                            self.fault(id, &format!("sent a bad result for shard {k} of step {step}: {e}"));
                        }
                    }
                }
                Ok(Some(Event::Left { id, .. })) => {
                    let lost = take_assigned(&mut assigned, id);
                    if !lost.is_empty() {
                        (self.log)(&format!("shard(s) {lost:?} of worker {id} go to others"));
                        self.metrics.iter().for_each(|m| m.recomputed(lost.len() as u64));
                    }
                    pending.extend(lost);
                }
                Ok(Some(Event::Joined { .. })) => {}
                Ok(None) => return Err("the coordinator's worker hub stopped".into()),
                Err(_) => {
                    let late: BTreeSet<u32> = assigned.values().copied().collect();
                    for id in late {
                        let lost = take_assigned(&mut assigned, id);
                        (self.log)(&format!(
                            "{} missed the {:?} step deadline; dropping it, {} shard(s) go to others",
                            self.hub.name(id),
                            self.step_timeout,
                            lost.len()
                        ));
                        self.hub.drop_worker(id, Status::deadline_exceeded("missed the step deadline"));
                        self.metrics.iter().for_each(|m| m.recomputed(lost.len() as u64));
                        pending.extend(lost);
                    }
                }
            }
        }
        Ok(stats)
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

fn take_assigned(assigned: &mut BTreeMap<usize, u32>, id: u32) -> Vec<usize> {
    let lost: Vec<usize> = assigned.iter().filter(|(_, &w)| w == id).map(|(&k, _)| k).collect();
    assigned.retain(|_, w| *w != id);
    lost
}
