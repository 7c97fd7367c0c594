//! What an epoch looked like from the coordinator: the cluster line at each epoch's end.

use crate::hub::Hub;
use crate::ids::WorkerId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Default)]
/// Step times, round trips and bytes of the epoch so far.
pub struct EpochStats {
    steps: u64,
    /// Bytes sent to workers.
    pub bytes_out: u64,
    /// Bytes received from workers.
    pub bytes_in: u64,
    /// What verification did.
    pub verification: dtrain_fit::metrics::Verification,
    /// How the steps' gradients travelled: chain steps (on lanes or not), chain steps that fell
    /// back to the star, straggler shards that got a copy on an idle worker.
    pub paths: dtrain_fit::metrics::Paths,
    /// The current chain step's time spent taking in the sum.
    pub chain_reduce: Duration,
    /// Workers benched from chains at some step of the epoch (`topology::Bench`).
    pub benched: BTreeSet<WorkerId>,
    /// Per worker: time from sending its work to each shard's result arriving, in µs.
    round_trips: BTreeMap<WorkerId, Vec<u32>>,
    /// Per worker: its own compute time for each shard, in µs.
    compute: BTreeMap<WorkerId, Vec<u32>>,
    /// Per step, in µs: the coordinator's own work between steps (optimizer, constraints),
    /// building and queueing the work, waiting for the last result, reading, checking and
    /// summing the results.
    update: Vec<u32>,
    encode: Vec<u32>,
    wait: Vec<u32>,
    reduce: Vec<u32>,
    /// When the last step's gradients were handed back.
    last_return: Option<Instant>,
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// p50 of `v` in ms (sorts it).
fn median_ms(v: &mut [u32]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    percentile(v, 0.5)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

impl EpochStats {
    /// A step begins: the time since the last one ended was the coordinator's own update.
    pub fn step_starts(&mut self) {
        if let Some(t) = self.last_return {
            self.update.push(micros(t.elapsed()));
        }
        self.steps += 1;
    }

    /// A step's gradients were handed back to the trainer.
    pub fn step_ends(&mut self) {
        self.last_return = Some(Instant::now());
    }

    /// A step's building, waiting and reducing times.
    pub fn step(&mut self, encode: Duration, wait: Duration, reduce: Duration) {
        self.encode.push(micros(encode));
        self.wait.push(micros(wait));
        self.reduce.push(micros(reduce));
    }

    /// A shard's result from worker `id`, `round_trip` after its work was sent.
    pub fn round_trip(&mut self, id: WorkerId, round_trip: Duration, compute_micros: u64) {
        self.round_trips.entry(id).or_default().push(micros(round_trip));
        self.compute.entry(id).or_default().push(compute_micros.min(u64::from(u32::MAX)) as u32);
    }

    /// The cluster line and its scalars for TensorBoard, if there were steps.
    pub fn report(mut self, hub: &Hub) -> Option<dtrain_fit::engine::EpochReport> {
        if self.steps == 0 {
            return None;
        }
        let mut times = vec![];
        for (id, mut t) in self.round_trips {
            t.sort_unstable();
            let mut c = self.compute.remove(&id).unwrap_or_default();
            c.sort_unstable();
            let (c50, c99) = if c.is_empty() { (0.0, 0.0) } else { (percentile(&c, 0.5), percentile(&c, 0.99)) };
            times.push(format!(
                "{} {:.2}/{:.2} ms (compute {c50:.2}/{c99:.2}, {} shard(s))",
                hub.name(id),
                percentile(&t, 0.5),
                percentile(&t, 0.99),
                t.len()
            ));
        }
        let alive = hub.alive();
        let steps = self.steps as f32;
        let (update, encode, wait, reduce) = (
            median_ms(&mut self.update),
            median_ms(&mut self.encode),
            median_ms(&mut self.wait),
            median_ms(&mut self.reduce),
        );
        let scalars = vec![
            ("cluster/workers_alive", alive.len() as f32),
            ("cluster/step_ms", (update + encode + wait + reduce) as f32),
            ("cluster/wait_ms", wait as f32),
            ("cluster/sent_bytes_per_step", self.bytes_out as f32 / steps),
            ("cluster/received_bytes_per_step", self.bytes_in as f32 / steps),
            ("cluster/verified_shards", self.verification.checked as f32),
            ("cluster/chain_steps", self.paths.chained as f32),
            ("cluster/speculated_shards", self.paths.speculated as f32),
        ];
        let v = &self.verification;
        let benched: Vec<String> = self.benched.iter().map(|&id| hub.name(id)).collect();
        let benched =
            if benched.is_empty() { String::new() } else { format!(", benched (too slow): {}", benched.join(", ")) };
        let verification = format!(
            "; verified {} shard(s), refereed {}, evicted {}, rolled back {} time(s); speculated {} shard(s)",
            v.checked, v.refereed, v.evicted, v.rollbacks, self.paths.speculated
        );
        let line = format!(
            "cluster: {} worker(s) alive ({} on shared memory); shard round trip p50/p99: {}; per step {:.0} KB sent, {:.0} KB received; \
             step p50: update {:.2} ms, encode {:.2}, wait {:.2}, reduce {:.2}",
            alive.len(),
            alive.iter().filter(|m| hub.slots(m.id).is_some()).count(),
            times.join(", "),
            self.bytes_out as f64 / self.steps as f64 / 1024.0,
            self.bytes_in as f64 / self.steps as f64 / 1024.0,
            update,
            encode,
            wait,
            reduce,
        ) + &verification
            + &match (self.paths.chained, self.paths.fell_back) {
                (0, 0) => "; topology star".to_string(),
                (c, f) => format!(
                    "; topology chain on {c} of {} step(s), {f} fell back to the star, {} on lanes{benched}",
                    self.steps, self.paths.on_lanes
                ),
            };
        Some(dtrain_fit::engine::EpochReport { line, scalars })
    }
}
