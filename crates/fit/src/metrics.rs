//! Run metrics for Prometheus: what the trainer and the cluster report, as `prometheus-client`
//! metrics in one registry that an HTTP endpoint can encode at any time (OpenMetrics text).
//! Updates are atomic: no lock is held while a step runs or a scrape encodes.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Upper bounds of the step-time histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0];

/// The content type of `Metrics::render`'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What verification by recomputation did, as counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Shards whose result a second party (or the coordinator) confirmed.
    pub checked: u64,
    /// Shards the coordinator recomputed as the referee.
    pub refereed: u64,
    /// Parties evicted for a result the referee contradicted.
    pub evicted: u64,
    /// Times training went back to a kept state to undo a liar's results.
    pub rollbacks: u64,
}

impl Verification {
    /// Adds `o`'s counts.
    pub fn add(&mut self, o: &Verification) {
        self.checked += o.checked;
        self.refereed += o.refereed;
        self.evicted += o.evicted;
        self.rollbacks += o.rollbacks;
    }
}

/// A gauge of floating-point values.
type Value = Gauge<f64, AtomicU64>;

/// The metrics the endpoint serves, updated by the trainer and the cluster. Values not known
/// yet (validation before the first epoch ends, accuracy without the metric) are NaN.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    step: Gauge,
    epoch: Gauge,
    loss: Value,
    accuracy: Value,
    val_loss: Value,
    val_accuracy: Value,
    learning_rate: Value,
    workers_alive: Gauge,
    step_seconds: Histogram,
    sent: Counter,
    received: Counter,
    recomputed: Counter,
    rejected: Counter,
    checked: Counter,
    refereed: Counter,
    evicted: Counter,
    rollbacks: Counter,
    chain_steps: Counter,
    chain_lane_steps: Counter,
    chain_fallbacks: Counter,
    speculated: Counter,
}

/// How steps' gradients travelled (counts since the last report).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paths {
    /// Steps summed along the chain.
    pub chained: u64,
    /// Of those, steps whose parameters and sum took the coordinator's lanes.
    pub on_lanes: u64,
    /// Chain steps computed over the star instead.
    pub fell_back: u64,
    /// Straggler shards that got a copy on an idle worker.
    pub speculated: u64,
}

impl Paths {
    /// What was counted since `earlier` (counts only grow).
    pub fn since(&self, earlier: &Paths) -> Paths {
        Paths {
            chained: self.chained.saturating_sub(earlier.chained),
            on_lanes: self.on_lanes.saturating_sub(earlier.on_lanes),
            fell_back: self.fell_back.saturating_sub(earlier.fell_back),
            speculated: self.speculated.saturating_sub(earlier.speculated),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let nan = || {
            let g = Value::default();
            g.set(f64::NAN);
            g
        };
        let m = Metrics {
            registry: Registry::with_prefix("dtrain"),
            step: Gauge::default(),
            epoch: Gauge::default(),
            loss: nan(),
            accuracy: nan(),
            val_loss: nan(),
            val_accuracy: nan(),
            learning_rate: nan(),
            workers_alive: Gauge::default(),
            step_seconds: Histogram::new(BUCKETS),
            sent: Counter::default(),
            received: Counter::default(),
            recomputed: Counter::default(),
            rejected: Counter::default(),
            checked: Counter::default(),
            refereed: Counter::default(),
            evicted: Counter::default(),
            rollbacks: Counter::default(),
            chain_steps: Counter::default(),
            chain_lane_steps: Counter::default(),
            chain_fallbacks: Counter::default(),
            speculated: Counter::default(),
        };
        m.registered()
    }
}

impl Metrics {
    /// Registers every metric (they share their values with the fields: clones are handles).
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        r.register("step", "Optimizer steps taken", self.step.clone());
        r.register("epoch", "Epochs completed", self.epoch.clone());
        r.register("loss", "Training loss (running mean of the epoch)", self.loss.clone());
        r.register("accuracy", "Training accuracy (running mean of the epoch)", self.accuracy.clone());
        r.register("val_loss", "Validation loss of the last epoch", self.val_loss.clone());
        r.register("val_accuracy", "Validation accuracy of the last epoch", self.val_accuracy.clone());
        r.register("learning_rate", "Learning rate of the next step", self.learning_rate.clone());
        r.register("workers_alive", "Workers connected to the coordinator", self.workers_alive.clone());
        r.register("step_seconds", "Time of one optimizer step", self.step_seconds.clone());
        r.register("wire_sent_bytes", "Bytes of work sent to workers", self.sent.clone());
        r.register("wire_received_bytes", "Bytes of results received", self.received.clone());
        r.register("recomputed_shards", "Shards recomputed after a worker failed", self.recomputed.clone());
        r.register("rejected_messages", "Results rejected as malformed", self.rejected.clone());
        r.register("verified_shards", "Shard results confirmed by a second party", self.checked.clone());
        r.register("refereed_shards", "Shards the coordinator recomputed as referee", self.refereed.clone());
        r.register("evictions", "Parties evicted for results the referee contradicted", self.evicted.clone());
        r.register("rollbacks", "Rollbacks to undo an evicted party's results", self.rollbacks.clone());
        r.register("chain_steps", "Steps whose gradients were summed along the chain", self.chain_steps.clone());
        r.register(
            "chain_lane_steps",
            "Chain steps whose tensors took the coordinator's lanes",
            self.chain_lane_steps.clone(),
        );
        r.register("chain_fallbacks", "Chain steps computed over the star instead", self.chain_fallbacks.clone());
        r.register("speculated_shards", "Straggler shards copied to an idle worker", self.speculated.clone());
        self
    }

    /// A step finished: its number, duration, the running loss and accuracy, the next rate.
    pub fn step(&self, step: u64, seconds: f64, running_loss: f32, accuracy: Option<f32>, next_lr: f32) {
        self.step.set(i64::try_from(step).unwrap_or(i64::MAX));
        self.learning_rate.set(next_lr.into());
        self.loss.set(running_loss.into());
        self.accuracy.set(accuracy.map_or(f64::NAN, f64::from));
        self.step_seconds.observe(seconds);
    }

    /// An epoch finished, with its logs.
    pub fn epoch(&self, epoch: u64, logs: &crate::logs::EpochLogs) {
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.loss.set(logs.loss.into());
        self.accuracy.set(logs.accuracy.map_or(f64::NAN, f64::from));
        self.val_loss.set(logs.val_loss.map_or(f64::NAN, f64::from));
        self.val_accuracy.set(logs.val_accuracy.map_or(f64::NAN, f64::from));
        self.learning_rate.set(logs.learning_rate.into());
    }

    /// The learning rate now.
    pub fn learning_rate(&self, lr: f32) {
        self.learning_rate.set(lr.into());
    }

    /// Workers alive.
    pub fn workers(&self, alive: u64) {
        self.workers_alive.set(i64::try_from(alive).unwrap_or(i64::MAX));
    }

    /// Bytes sent to and received from workers in a step.
    pub fn wire(&self, sent: u64, received: u64) {
        self.sent.inc_by(sent);
        self.received.inc_by(received);
    }

    /// Shards computed again (lost, late or refused).
    pub fn recomputed(&self, shards: u64) {
        self.recomputed.inc_by(shards);
    }

    /// A refused message.
    pub fn rejected(&self) {
        self.rejected.inc();
    }

    /// Verification's counts of a step.
    pub fn verified(&self, counts: &Verification) {
        self.checked.inc_by(counts.checked);
        self.refereed.inc_by(counts.refereed);
        self.evicted.inc_by(counts.evicted);
        self.rollbacks.inc_by(counts.rollbacks);
    }

    /// How steps' gradients travelled: over the chain (on lanes or not), or the chain fell
    /// back to the star, and how many straggler shards got a copy.
    pub fn topology(&self, p: &Paths) {
        self.chain_steps.inc_by(p.chained);
        self.chain_lane_steps.inc_by(p.on_lanes);
        self.chain_fallbacks.inc_by(p.fell_back);
        self.speculated.inc_by(p.speculated);
    }

    /// The OpenMetrics text exposition (`CONTENT_TYPE`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_reported_in_openmetrics_text() {
        let m = Metrics::default();
        m.step(7, 0.003, 0.5, None, 0.01);
        m.workers(2);
        m.wire(100, 50);
        m.verified(&Verification { checked: 3, refereed: 1, evicted: 1, rollbacks: 0 });
        m.topology(&Paths { chained: 1, on_lanes: 1, fell_back: 0, speculated: 2 });
        m.topology(&Paths { fell_back: 1, ..Paths::default() });
        let text = m.render();
        for line in [
            "# TYPE dtrain_step gauge",
            "dtrain_step 7",
            "dtrain_loss 0.5",
            "dtrain_accuracy NaN",
            "dtrain_workers_alive 2",
            "dtrain_wire_sent_bytes_total 100",
            "dtrain_verified_shards_total 3",
            "dtrain_evictions_total 1",
            "dtrain_chain_steps_total 1",
            "dtrain_chain_lane_steps_total 1",
            "dtrain_chain_fallbacks_total 1",
            "dtrain_speculated_shards_total 2",
            "dtrain_step_seconds_count 1",
            "dtrain_step_seconds_bucket{le=\"0.005\"} 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line || l.starts_with(&format!("{line} "))), "{line:?} not in:\n{text}");
        }
    }
}
