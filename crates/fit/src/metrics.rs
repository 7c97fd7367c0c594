//! Run metrics in Prometheus's text format: what the trainer and the cluster report, kept in
//! one place that an HTTP endpoint can render at any time.

use std::sync::Mutex;

/// Upper bounds of the step-time histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0];

#[derive(Debug, Default)]
struct Values {
    step: u64,
    epoch: u64,
    loss: f64,
    accuracy: Option<f64>,
    val_loss: Option<f64>,
    val_accuracy: Option<f64>,
    learning_rate: f64,
    step_counts: [u64; BUCKETS.len()],
    step_sum: f64,
    step_count: u64,
    workers_alive: Option<u64>,
    bytes_sent: u64,
    bytes_received: u64,
    recomputed_shards: u64,
    rejected_messages: u64,
    verification: Verification,
}

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

#[derive(Debug, Default)]
/// The values the metrics endpoint serves, updated by the trainer and the cluster.
pub struct Metrics {
    v: Mutex<Values>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Values)) {
        f(&mut self.v.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A step finished: its number, duration, the running loss and accuracy, the next rate.
    pub fn step(&self, step: u64, seconds: f64, running_loss: f32, accuracy: Option<f32>, next_lr: f32) {
        self.with(|v| {
            v.step = step;
            v.learning_rate = next_lr.into();
            v.loss = running_loss.into();
            v.accuracy = accuracy.map(f64::from);
            v.step_sum += seconds;
            v.step_count += 1;
            for (c, &b) in v.step_counts.iter_mut().zip(&BUCKETS) {
                if seconds <= b {
                    *c += 1;
                }
            }
        });
    }

    /// An epoch finished, with its logs.
    pub fn epoch(&self, epoch: u64, logs: &crate::logs::EpochLogs) {
        self.with(|v| {
            v.epoch = epoch;
            v.loss = logs.loss.into();
            v.accuracy = logs.accuracy.map(f64::from);
            v.val_loss = logs.val_loss.map(f64::from);
            v.val_accuracy = logs.val_accuracy.map(f64::from);
            v.learning_rate = logs.learning_rate.into();
        });
    }

    /// The learning rate now.
    pub fn learning_rate(&self, lr: f32) {
        self.with(|v| v.learning_rate = lr.into());
    }

    /// Workers alive.
    pub fn workers(&self, alive: u64) {
        self.with(|v| v.workers_alive = Some(alive));
    }

    /// Bytes sent to and received from workers in a step.
    pub fn wire(&self, sent: u64, received: u64) {
        self.with(|v| {
            v.bytes_sent += sent;
            v.bytes_received += received;
        });
    }

    /// Shards computed again (lost, late or refused).
    pub fn recomputed(&self, shards: u64) {
        self.with(|v| v.recomputed_shards += shards);
    }

    /// A refused message.
    pub fn rejected(&self) {
        self.with(|v| v.rejected_messages += 1);
    }

    /// Verification's counts of a step.
    pub fn verified(&self, counts: &Verification) {
        self.with(|v| v.verification.add(counts));
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let v = self.v.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
            if let Some(x) = value {
                out += &format!("# HELP dtrain_{name} {help}\n# TYPE dtrain_{name} {kind}\ndtrain_{name} {x}\n");
            }
        };
        metric("step", "counter", "Optimizer steps taken.", Some(v.step as f64));
        metric("epoch", "gauge", "Epochs completed.", Some(v.epoch as f64));
        metric("loss", "gauge", "Training loss (running mean of the epoch).", Some(v.loss));
        metric("accuracy", "gauge", "Training accuracy (running mean of the epoch).", v.accuracy);
        metric("val_loss", "gauge", "Validation loss of the last epoch.", v.val_loss);
        metric("val_accuracy", "gauge", "Validation accuracy of the last epoch.", v.val_accuracy);
        metric("learning_rate", "gauge", "Learning rate of the next step.", Some(v.learning_rate));
        metric("workers_alive", "gauge", "Workers connected to the coordinator.", v.workers_alive.map(|w| w as f64));
        metric("wire_sent_bytes_total", "counter", "Bytes of work sent to workers.", Some(v.bytes_sent as f64));
        metric("wire_received_bytes_total", "counter", "Bytes of results received.", Some(v.bytes_received as f64));
        let ver = &v.verification;
        let counters = [
            ("recomputed_shards_total", "Shards recomputed after a worker failed.", v.recomputed_shards),
            ("rejected_messages_total", "Results rejected as malformed or not finite.", v.rejected_messages),
            ("verified_shards_total", "Shard results confirmed by a second party.", ver.checked),
            ("refereed_shards_total", "Shards the coordinator recomputed as referee.", ver.refereed),
            ("evictions_total", "Parties evicted for results the referee contradicted.", ver.evicted),
            ("rollbacks_total", "Rollbacks to undo an evicted party's results.", ver.rollbacks),
        ];
        for (name, help, n) in counters {
            metric(name, "counter", help, Some(n as f64));
        }
        out += "# HELP dtrain_step_seconds Time of one optimizer step.\n# TYPE dtrain_step_seconds histogram\n";
        for (c, b) in v.step_counts.iter().zip(BUCKETS) {
            out += &format!("dtrain_step_seconds_bucket{{le=\"{b}\"}} {c}\n");
        }
        out += &format!("dtrain_step_seconds_bucket{{le=\"+Inf\"}} {}\n", v.step_count);
        out += &format!("dtrain_step_seconds_sum {}\ndtrain_step_seconds_count {}\n", v.step_sum, v.step_count);
        out
    }
}
