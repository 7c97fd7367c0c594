//! What an epoch reports: Keras's `logs` dictionary, and the f32 running mean Keras keeps.

use serde::{Deserialize, Serialize};

/// One epoch's results; missing values are `None` (no validation data, no accuracy metric).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochLogs {
    /// The epoch (0-based).
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f32,
    /// Mean training accuracy, if a metric.
    pub accuracy: Option<f32>,
    /// Validation loss, with validation data.
    pub val_loss: Option<f32>,
    /// Validation accuracy, with validation data and the metric.
    pub val_accuracy: Option<f32>,
    /// The learning rate the next step uses.
    pub learning_rate: f32,
}

impl EpochLogs {
    /// A value by its Keras name, as Keras's callbacks see it (a Python float).
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "loss" => Some(self.loss),
            "accuracy" | "acc" => self.accuracy,
            "val_loss" => self.val_loss,
            "val_accuracy" | "val_acc" => self.val_accuracy,
            "learning_rate" | "lr" => Some(self.learning_rate),
            _ => None,
        }
        .map(f64::from)
    }

    /// Keras CSVLogger's columns: epoch, then the log keys in sorted order.
    pub fn csv_header(&self, sep: &str) -> String {
        self.columns().iter().map(|(k, _)| *k).collect::<Vec<_>>().join(sep)
    }

    /// One CSVLogger row, in `csv_header`'s column order.
    pub fn csv_row(&self, sep: &str) -> String {
        self.columns().iter().map(|(_, v)| v.clone()).collect::<Vec<_>>().join(sep)
    }

    fn columns(&self) -> Vec<(&'static str, String)> {
        let f = |v: f32| f64::from(v).to_string();
        let mut c = vec![("epoch", self.epoch.to_string())];
        if let Some(a) = self.accuracy {
            c.push(("accuracy", f(a)));
        }
        c.push(("learning_rate", f(self.learning_rate)));
        c.push(("loss", f(self.loss)));
        if let Some(a) = self.val_accuracy {
            c.push(("val_accuracy", f(a)));
        }
        if let Some(l) = self.val_loss {
            c.push(("val_loss", f(l)));
        }
        c
    }
}

/// Keras's `metrics.Mean` with batch-size weights, in float32 like Keras.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mean {
    /// Weighted sum of the values.
    pub total: f32,
    /// Sum of the weights.
    pub count: f32,
}

impl Mean {
    /// Adds `value` with `weight` (its batch's size).
    pub fn add(&mut self, value: f32, weight: f32) {
        self.total += value * weight;
        self.count += weight;
    }

    /// The mean (0 before any value).
    pub fn result(&self) -> f32 {
        if self.count == 0.0 {
            0.0
        } else {
            self.total / self.count
        }
    }
}

impl Mean {
    /// Adds `n` samples whose values sum to `sum` (a metric over per-sample values).
    pub fn add_sum(&mut self, sum: f32, n: f32) {
        self.total += sum;
        self.count += n;
    }
}
