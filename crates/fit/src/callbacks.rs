//! Keras's callbacks as explicit state machines whose state is saved for exact resume.

use crate::logs::EpochLogs;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    Min,
    Max,
}

impl Direction {
    /// Keras's mode: "min", "max", or "auto" (max for accuracy-like names, else min).
    pub fn parse(mode: &str, monitor: &str) -> Result<Self, String> {
        match mode {
            "min" => Ok(Direction::Min),
            "max" => Ok(Direction::Max),
            "auto" if monitor.contains("acc") => Ok(Direction::Max),
            "auto" => Ok(Direction::Min),
            m => Err(format!("mode {m:?}: expected \"auto\", \"min\" or \"max\"")),
        }
    }

    /// Keras's `MonitorCallback._is_improvement`: `monitor_op(current - min_delta, reference)`
    /// with the delta's sign set by the mode. `monitor_op` is `keras.ops.less`/`greater`, which
    /// turns both Python floats into float32 tensors: the shifted value is computed in f64,
    /// then both sides are rounded to f32 and compared strictly.
    fn beats(self, current: f64, reference: f64, delta: f64) -> bool {
        let r = reference as f32;
        match self {
            Direction::Min => ((current + delta) as f32) < r,
            Direction::Max => ((current - delta) as f32) > r,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub monitor: String,
    pub direction: Direction,
    pub min_delta: f64,
    pub patience: usize,
    pub baseline: Option<f64>,
    pub restore_best_weights: bool,
    pub start_from_epoch: usize,
    // state
    pub wait: usize,
    pub stopped_epoch: usize,
    pub best: Option<f64>,
    pub best_epoch: usize,
}

/// What EarlyStopping asks of the trainer after an epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EarlyAction {
    /// Snapshot the current weights as the best ones.
    pub snapshot: bool,
    pub stop: bool,
}

impl EarlyStopping {
    /// `has_snapshot`: whether best weights are already held.
    pub fn on_epoch_end(&mut self, epoch: usize, logs: &EpochLogs, has_snapshot: bool) -> EarlyAction {
        let mut act = EarlyAction::default();
        let Some(current) = logs.get(&self.monitor) else { return act };
        if epoch < self.start_from_epoch {
            return act;
        }
        if self.restore_best_weights && !has_snapshot {
            act.snapshot = true;
            self.best_epoch = epoch;
        }
        self.wait += 1;
        let d = self.min_delta.abs();
        if self.best.is_none_or(|b| self.direction.beats(current, b, d)) {
            self.best = Some(current);
            self.best_epoch = epoch;
            act.snapshot |= self.restore_best_weights;
            if self.baseline.is_none_or(|b| self.direction.beats(current, b, d)) {
                self.wait = 0;
            }
            return act;
        }
        if self.wait >= self.patience && epoch > 0 {
            self.stopped_epoch = epoch;
            act.stop = true;
        }
        act
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCheckpoint {
    pub filepath: String,
    pub monitor: String,
    pub direction: Direction,
    pub save_best_only: bool,
    /// Every N batches instead of at epoch ends.
    pub every_batches: Option<u64>,
    pub best: Option<f64>,
}

impl ModelCheckpoint {
    /// Whether to save now, given the logs; updates the best value.
    pub fn should_save(&mut self, logs: &EpochLogs) -> bool {
        if !self.save_best_only {
            return true;
        }
        match logs.get(&self.monitor) {
            None => true, // Keras warns and saves
            Some(current) if self.best.is_none_or(|b| self.direction.beats(current, b, 0.0)) => {
                self.best = Some(current);
                true
            }
            Some(_) => false,
        }
    }

    /// The file name with `{epoch}` (1-based) and `{name:.4f}`-style fields filled in.
    pub fn path_for(&self, epoch: usize, batch: Option<usize>, logs: &EpochLogs) -> Result<String, String> {
        format_fields(&self.filepath, |name| match name {
            "epoch" => Some(Field::Int(epoch as i64 + 1)),
            "batch" => batch.map(|b| Field::Int(b as i64 + 1)),
            other => logs.get(other).map(Field::Float),
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Field {
    Int(i64),
    Float(f64),
}

/// Python-style `{name}` / `{name:.4f}` / `{name:02d}` replacement.
pub fn format_fields(template: &str, value: impl Fn(&str) -> Option<Field>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out += &rest[..open];
        let close = rest[open..].find('}').ok_or_else(|| format!("filepath {template:?}: unclosed '{{'"))? + open;
        let field = &rest[open + 1..close];
        let (name, spec) = field.split_once(':').unwrap_or((field, ""));
        let v = value(name).ok_or_else(|| format!("filepath {template:?}: no value named {name:?} to fill in"))?;
        let (width, prec, kind) =
            parse_spec(spec).ok_or_else(|| format!("filepath {template:?}: format {spec:?} is not supported"))?;
        let s = match (v, kind) {
            (Field::Int(i), 'f') => format!("{:0width$.prec$}", i as f64, prec = prec.unwrap_or(6)),
            (Field::Int(i), _) => format!("{i:0width$}"),
            (Field::Float(f), 'd') => format!("{:0width$}", f as i64),
            (Field::Float(f), 'f') => format!("{f:0width$.prec$}", prec = prec.unwrap_or(6)),
            (Field::Float(f), _) => format!("{f}"),
        };
        out += &s;
        rest = &rest[close + 1..];
    }
    out += rest;
    Ok(out)
}

/// `""`, `"02d"`, `".4f"`, `"08.3f"` -> (width, precision, kind).
fn parse_spec(spec: &str) -> Option<(usize, Option<usize>, char)> {
    if spec.is_empty() {
        return Some((0, None, ' '));
    }
    let kind = spec.chars().last()?;
    if kind != 'd' && kind != 'f' {
        return None;
    }
    let body = &spec[..spec.len() - 1];
    let (w, p) = body.split_once('.').map_or((body, None), |(w, p)| (w, Some(p)));
    let width = if w.is_empty() { 0 } else { w.parse().ok()? };
    let prec = match p {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((width, prec, kind))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrOnPlateau {
    pub monitor: String,
    pub direction: Direction,
    pub factor: f64,
    pub patience: usize,
    pub min_delta: f64,
    pub cooldown: usize,
    pub min_lr: f64,
    // state
    pub wait: usize,
    pub cooldown_counter: usize,
    pub best: Option<f64>,
}

impl ReduceLrOnPlateau {
    /// Keras's ReduceLROnPlateau.on_epoch_end; returns the new learning rate, if any.
    pub fn on_epoch_end(&mut self, logs: &EpochLogs, lr: f32) -> Option<f32> {
        let current = logs.get(&self.monitor)?;
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.wait = 0;
        }
        if self.best.is_none_or(|b| self.direction.beats(current, b, self.min_delta.abs())) {
            self.best = Some(current);
            self.wait = 0;
        } else if self.cooldown_counter == 0 {
            self.wait += 1;
            if self.wait >= self.patience && lr > self.min_lr as f32 {
                let new_lr = (f64::from(lr) * self.factor).max(self.min_lr);
                self.cooldown_counter = self.cooldown;
                self.wait = 0;
                return Some(new_lr as f32);
            }
        }
        None
    }
}

/// All configured callbacks, in the order the job file lists them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Callbacks {
    pub list: Vec<Callback>,
    /// History file name (CSVLogger's filename), separator and append flag.
    pub csv: (String, String, bool),
    /// Save the resume state every N batches as well as at every epoch end.
    pub backup_every_batches: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Callback {
    EarlyStopping(EarlyStopping),
    ModelCheckpoint(ModelCheckpoint),
    ReduceLrOnPlateau(ReduceLrOnPlateau),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_format_like_python() {
        let f = |n: &str| match n {
            "epoch" => Some(Field::Int(3)),
            "val_loss" => Some(Field::Float(0.123456)),
            _ => None,
        };
        assert_eq!(format_fields("w-{epoch:02d}-{val_loss:.4f}.safetensors", f).unwrap(), "w-03-0.1235.safetensors");
        assert_eq!(format_fields("{epoch}", f).unwrap(), "3");
        assert!(format_fields("{nope}", f).unwrap_err().contains("no value named \"nope\""));
        assert!(format_fields("{epoch", f).is_err());
    }
}
