//! Keras's callbacks as explicit state machines whose state is saved for exact resume. Each
//! one answers the trainer's hooks with the `Action`s it wants done; the trainer alone does them.

use crate::logs::EpochLogs;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A value Keras logs at an epoch's end, which callbacks can monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Monitor {
    #[serde(rename = "loss")]
    /// The training loss (running mean over the epoch).
    Loss,
    #[serde(rename = "accuracy", alias = "acc")]
    /// The training accuracy.
    Accuracy,
    #[serde(rename = "val_loss")]
    /// The validation loss.
    ValLoss,
    #[serde(rename = "val_accuracy", alias = "val_acc")]
    /// The validation accuracy.
    ValAccuracy,
    #[serde(rename = "learning_rate", alias = "lr")]
    /// The learning rate the next step uses.
    LearningRate,
}

impl Monitor {
    /// Every monitor by its Keras name.
    pub const ALL: [Monitor; 5] =
        [Monitor::Loss, Monitor::Accuracy, Monitor::ValLoss, Monitor::ValAccuracy, Monitor::LearningRate];

    /// Keras's name, or one of its aliases (`acc`, `val_acc`, `lr`).
    pub fn parse(name: &str) -> Result<Monitor, String> {
        let alias = match name {
            "acc" => Some(Monitor::Accuracy),
            "val_acc" => Some(Monitor::ValAccuracy),
            "lr" => Some(Monitor::LearningRate),
            _ => None,
        };
        alias.or_else(|| Monitor::ALL.into_iter().find(|m| m.name() == name)).ok_or_else(|| {
            let known: Vec<&str> = Monitor::ALL.iter().map(|m| m.name()).collect();
            format!("{name:?} is not a logged value (known: {})", known.join(", "))
        })
    }

    /// Keras's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Monitor::Loss => "loss",
            Monitor::Accuracy => "accuracy",
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
            Monitor::LearningRate => "learning_rate",
        }
    }

    /// Its value in `logs` as Keras's callbacks see it (a Python float); `None` if not logged.
    pub fn of(self, logs: &EpochLogs) -> Option<f64> {
        match self {
            Monitor::Loss => Some(logs.loss),
            Monitor::Accuracy => logs.accuracy,
            Monitor::ValLoss => logs.val_loss,
            Monitor::ValAccuracy => logs.val_accuracy,
            Monitor::LearningRate => Some(logs.learning_rate),
        }
        .map(f64::from)
    }
}

impl fmt::Display for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a callback asks of the trainer.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Keep a copy of the current weights as the best so far.
    SnapshotWeights,
    /// End training after this epoch.
    Stop,
    /// Use this learning rate from the next step on.
    SetLearningRate(f32),
    /// Write the current weights to this file of the run directory.
    SaveWeights(String),
    /// Write the resume state now (not only at the epoch's end).
    SaveState,
    /// The final weights are the snapshot, not the current weights.
    RestoreSnapshot,
    /// Tell the user.
    Log(String),
    /// Write these scalars at `step` to the TensorBoard run `run` under `log_dir`.
    Scalars {
        /// The log directory, in the run directory.
        log_dir: String,
        /// `train` or `validation`, as Keras names its runs.
        run: &'static str,
        /// The step (the epoch for epoch values, the optimizer step for batch values).
        step: u64,
        /// Tag and value.
        values: Vec<(&'static str, f32)>,
    },
    /// Write a histogram of each weight of the model at `step` to `log_dir`'s `train` run.
    Histograms {
        /// The log directory, in the run directory.
        log_dir: String,
        /// The epoch.
        step: u64,
    },
}

/// Where training is when a batch ends.
#[derive(Clone, Copy, Debug)]
pub struct BatchEnd<'a> {
    /// Optimizer steps taken, this batch's included.
    pub step: u64,
    /// The epoch and batch (0-based), and whether it is the epoch's last batch.
    pub epoch: usize,
    /// The batch within the epoch (0-based).
    pub batch: usize,
    /// Whether it is the epoch's last.
    pub last_in_epoch: bool,
    /// The epoch's running values so far (no validation values yet).
    pub logs: &'a EpochLogs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
/// Which way a monitored value improves.
pub enum Direction {
    /// Lower is better.
    Min,
    /// Higher is better.
    Max,
}

impl Direction {
    /// Keras's mode: "min", "max", or "auto" (max for accuracy, else min).
    pub fn parse(mode: &str, monitor: Monitor) -> Result<Self, String> {
        match mode {
            "min" => Ok(Direction::Min),
            "max" => Ok(Direction::Max),
            "auto" if matches!(monitor, Monitor::Accuracy | Monitor::ValAccuracy) => Ok(Direction::Max),
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
/// Keras's EarlyStopping: its arguments, then its state.
pub struct EarlyStopping {
    /// The value watched.
    pub monitor: Monitor,
    /// Which way it improves.
    pub direction: Direction,
    /// The least change that counts as an improvement.
    pub min_delta: f64,
    /// Epochs without improvement before stopping.
    pub patience: usize,
    /// A value to beat before waiting counts as improving.
    pub baseline: Option<f64>,
    /// End with the best epoch's weights.
    pub restore_best_weights: bool,
    /// Epochs before watching starts.
    pub start_from_epoch: usize,
    // state
    /// State: epochs since the last improvement.
    pub wait: usize,
    /// State: the epoch it stopped at (0: none).
    pub stopped_epoch: usize,
    /// State: the best value so far.
    pub best: Option<f64>,
    /// State: the epoch of the best value.
    pub best_epoch: usize,
}

impl EarlyStopping {
    /// Keras's `on_epoch_end`; `has_snapshot`: whether best weights are already held.
    pub fn on_epoch_end(&mut self, logs: &EpochLogs, has_snapshot: bool) -> Vec<Action> {
        let epoch = logs.epoch;
        let Some(current) = self.monitor.of(logs) else { return vec![] };
        if epoch < self.start_from_epoch {
            return vec![];
        }
        let mut snapshot = false;
        if self.restore_best_weights && !has_snapshot {
            snapshot = true;
            self.best_epoch = epoch;
        }
        self.wait += 1;
        let d = self.min_delta.abs();
        let mut stop = false;
        if self.best.is_none_or(|b| self.direction.beats(current, b, d)) {
            self.best = Some(current);
            self.best_epoch = epoch;
            snapshot |= self.restore_best_weights;
            if self.baseline.is_none_or(|b| self.direction.beats(current, b, d)) {
                self.wait = 0;
            }
        } else if self.wait >= self.patience && epoch > 0 {
            self.stopped_epoch = epoch;
            stop = true;
        }
        let mut actions = vec![];
        if snapshot {
            actions.push(Action::SnapshotWeights);
        }
        if stop {
            actions.extend([Action::Log(format!("Epoch {}: early stopping", epoch + 1)), Action::Stop]);
        }
        actions
    }

    /// Keras's `on_train_end`: the best weights become the final ones (even without a stop).
    pub fn on_train_end(&self, has_snapshot: bool) -> Vec<Action> {
        if !(self.restore_best_weights && has_snapshot) {
            return vec![];
        }
        let line = format!("Restoring model weights from the end of the best epoch: {}", self.best_epoch + 1);
        vec![Action::Log(line), Action::RestoreSnapshot]
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's TensorBoard: the values Keras writes, under the names and steps it uses
/// (`epoch_loss`, `epoch_accuracy`, `epoch_learning_rate` in `train/`, the validation values
/// as `epoch_loss` and `epoch_accuracy` in `validation/`, at step = epoch; `batch_loss` and
/// `batch_accuracy` every N optimizer steps with update_freq = N).
pub struct TensorBoard {
    /// The directory of the event files, in the run directory.
    pub log_dir: String,
    /// Batch values every N optimizer steps too.
    pub every_batches: Option<u64>,
    /// Weight histograms every N epochs (0: none).
    pub histogram_freq: usize,
}

impl TensorBoard {
    fn on_batch_end(&self, at: &BatchEnd<'_>) -> Option<Action> {
        self.every_batches.filter(|&n| at.step.is_multiple_of(n))?;
        let mut values = vec![("batch_loss", at.logs.loss)];
        values.extend(at.logs.accuracy.map(|a| ("batch_accuracy", a)));
        Some(Action::Scalars { log_dir: self.log_dir.clone(), run: "train", step: at.step, values })
    }

    fn on_epoch_end(&self, logs: &EpochLogs) -> Vec<Action> {
        let (log_dir, step) = (self.log_dir.clone(), logs.epoch as u64);
        let mut train = vec![("epoch_loss", logs.loss)];
        train.extend(logs.accuracy.map(|a| ("epoch_accuracy", a)));
        train.push(("epoch_learning_rate", logs.learning_rate));
        let mut actions = vec![Action::Scalars { log_dir: log_dir.clone(), run: "train", step, values: train }];
        let mut val: Vec<(&'static str, f32)> = logs.val_loss.map(|v| ("epoch_loss", v)).into_iter().collect();
        val.extend(logs.val_accuracy.map(|a| ("epoch_accuracy", a)));
        if !val.is_empty() {
            actions.push(Action::Scalars { log_dir: log_dir.clone(), run: "validation", step, values: val });
        }
        if self.histogram_freq > 0 && logs.epoch.is_multiple_of(self.histogram_freq) {
            actions.push(Action::Histograms { log_dir, step });
        }
        actions
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's ModelCheckpoint (weights only): its arguments, then its state.
pub struct ModelCheckpoint {
    /// A file name in the run directory, with `{epoch}`-style fields.
    pub filepath: String,
    /// The value `save_best_only` watches.
    pub monitor: Monitor,
    /// Which way it improves.
    pub direction: Direction,
    /// Save only when the value improves.
    pub save_best_only: bool,
    /// Every N batches instead of at epoch ends.
    pub every_batches: Option<u64>,
    /// State: the best value so far (starts at `initial_value_threshold`).
    pub best: Option<f64>,
}

impl ModelCheckpoint {
    /// Whether to save now, given the logs; updates the best value.
    pub fn should_save(&mut self, logs: &EpochLogs) -> bool {
        if !self.save_best_only {
            return true;
        }
        match self.monitor.of(logs) {
            None => true, // Keras warns and saves
            Some(current) if self.best.is_none_or(|b| self.direction.beats(current, b, 0.0)) => {
                self.best = Some(current);
                true
            }
            Some(_) => false,
        }
    }

    /// The file name with `{epoch}` (1-based) and `{name:.4f}`-style fields filled in.
    pub fn path_for(&self, epoch: usize, batch: Option<usize>, logs: &EpochLogs) -> Result<String, TemplateError> {
        format_fields(&self.filepath, |name| match name {
            "epoch" => Some(Field::Int(epoch as i64 + 1)),
            "batch" => batch.map(|b| Field::Int(b as i64 + 1)),
            other => logs.get(other).map(Field::Float),
        })
    }
}

#[derive(Clone, Copy, Debug)]
/// A value for a file name field.
pub enum Field {
    /// An integer (epoch, batch).
    Int(i64),
    /// A logged value.
    Float(f64),
}

/// Why a file name template cannot be filled in.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`.
    #[error("filepath {template:?}: unclosed '{{'")]
    Unclosed {
        /// The template.
        template: String,
    },
    /// A field that names no logged value.
    #[error("filepath {template:?}: no value named {name:?} to fill in")]
    NoValue {
        /// The template.
        template: String,
        /// The field's name.
        name: String,
    },
    /// A format other than `d` or `f` with a width and precision of at most 64.
    #[error("filepath {template:?}: format {spec:?} is not supported")]
    Format {
        /// The template.
        template: String,
        /// The field's format.
        spec: String,
    },
}

/// Python-style `{name}` / `{name:.4f}` / `{name:02d}` replacement.
pub fn format_fields(template: &str, value: impl Fn(&str) -> Option<Field>) -> Result<String, TemplateError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out += &rest[..open];
        let close = rest[open..].find('}').ok_or_else(|| TemplateError::Unclosed { template: template.into() })? + open;
        let field = &rest[open + 1..close];
        let (name, spec) = field.split_once(':').unwrap_or((field, ""));
        let v = value(name).ok_or_else(|| TemplateError::NoValue { template: template.into(), name: name.into() })?;
        let (width, prec, kind) =
            parse_spec(spec).ok_or_else(|| TemplateError::Format { template: template.into(), spec: spec.into() })?;
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
    // Wider than any file name: refused (Python would build the string; a file system would not take it).
    (width <= 64 && prec.is_none_or(|p| p <= 64)).then_some((width, prec, kind))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Keras's ReduceLROnPlateau: its arguments, then its state.
pub struct ReduceLrOnPlateau {
    /// The value watched.
    pub monitor: Monitor,
    /// Which way it improves.
    pub direction: Direction,
    /// The new rate is the old one times this.
    pub factor: f64,
    /// Epochs without improvement before reducing.
    pub patience: usize,
    /// The least change that counts as an improvement.
    pub min_delta: f64,
    /// Epochs to wait after a reduction.
    pub cooldown: usize,
    /// The rate never goes below this.
    pub min_lr: f64,
    // state
    /// State: epochs since the last improvement.
    pub wait: usize,
    /// State: cooldown epochs left.
    pub cooldown_counter: usize,
    /// State: the best value so far.
    pub best: Option<f64>,
}

impl ReduceLrOnPlateau {
    /// Keras's ReduceLROnPlateau.on_epoch_end; returns the new learning rate, if any.
    pub fn on_epoch_end(&mut self, logs: &EpochLogs, lr: f32) -> Option<f32> {
        let current = self.monitor.of(logs)?;
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

/// Keras's CSVLogger: the history file's name and separator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CsvLogger {
    /// The file, in the run directory.
    pub filename: String,
    /// Between columns.
    pub separator: String,
}

impl Default for CsvLogger {
    /// Keras's defaults, as the job file's `CSVLogger` has them.
    fn default() -> Self {
        let keras = crate::config::CsvLoggerConfig::default();
        CsvLogger { filename: keras.filename, separator: keras.separator }
    }
}

impl CsvLogger {
    /// The whole file for `history`: Keras's header, then a row per epoch.
    pub fn render(&self, history: &[EpochLogs]) -> String {
        let mut text = String::new();
        if let Some(first) = history.first() {
            text += &first.csv_header(&self.separator);
            text.push('\n');
        }
        for h in history {
            text += &h.csv_row(&self.separator);
            text.push('\n');
        }
        text
    }
}

/// All configured callbacks, in the order the job file lists them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Callbacks {
    /// The callbacks that act, in the job file's order.
    pub list: Vec<Callback>,
    /// The history file (CSVLogger's, or the default `history.csv`).
    pub csv: CsvLogger,
}

impl Callbacks {
    /// These callbacks, as the job configures them, carrying on from `saved`'s running state
    /// (counters and bests): a resume state restores progress, never what a callback does or
    /// which files it writes. `Err` says how `saved` does not fit.
    pub fn resumed_from(&self, saved: &Callbacks) -> Result<Callbacks, String> {
        if saved.list.len() != self.list.len() {
            return Err(format!("{} callbacks saved, the job has {}", saved.list.len(), self.list.len()));
        }
        let mut out = self.clone();
        for (i, (cb, old)) in out.list.iter_mut().zip(&saved.list).enumerate() {
            cb.carry_on_from(old).map_err(|e| format!("callbacks[{i}]: {e}"))?;
        }
        Ok(out)
    }
}

/// A saved best value: finite, or none yet.
fn best(saved: Option<f64>) -> Result<Option<f64>, String> {
    match saved {
        Some(b) if !b.is_finite() => Err(format!("best {b} is not finite")),
        b => Ok(b),
    }
}

/// One callback and its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Callback {
    /// Keras's EarlyStopping.
    EarlyStopping(EarlyStopping),
    /// Keras's ModelCheckpoint.
    ModelCheckpoint(ModelCheckpoint),
    /// Keras's ReduceLROnPlateau.
    ReduceLrOnPlateau(ReduceLrOnPlateau),
    /// Keras's TensorBoard: event files TensorBoard reads.
    TensorBoard(TensorBoard),
    /// Save the resume state every N batches as well as at every epoch end.
    BackupAndRestore {
        /// Batches between saves.
        every_batches: u64,
    },
}

impl Callback {
    /// Takes the running state of `saved`, the same kind of callback saved earlier.
    fn carry_on_from(&mut self, saved: &Callback) -> Result<(), String> {
        match (self, saved) {
            (Callback::EarlyStopping(c), Callback::EarlyStopping(s)) => {
                if s.wait > c.patience.saturating_add(1) {
                    return Err(format!("EarlyStopping waited {} epochs, beyond its patience {}", s.wait, c.patience));
                }
                (c.wait, c.stopped_epoch, c.best, c.best_epoch) =
                    (s.wait, s.stopped_epoch, best(s.best)?, s.best_epoch);
            }
            (Callback::ModelCheckpoint(c), Callback::ModelCheckpoint(s)) => c.best = best(s.best)?,
            (Callback::ReduceLrOnPlateau(c), Callback::ReduceLrOnPlateau(s)) => {
                if s.wait > c.patience.saturating_add(1) || s.cooldown_counter > c.cooldown {
                    return Err("ReduceLROnPlateau's counters are beyond its patience or cooldown".into());
                }
                (c.wait, c.cooldown_counter, c.best) = (s.wait, s.cooldown_counter, best(s.best)?);
            }
            (Callback::BackupAndRestore { .. }, Callback::BackupAndRestore { .. })
            | (Callback::TensorBoard(_), Callback::TensorBoard(_)) => {}
            (c, s) => return Err(format!("{} in the job, {} in the saved state", c.kind(), s.kind())),
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        match self {
            Callback::EarlyStopping(_) => "EarlyStopping",
            Callback::ModelCheckpoint(_) => "ModelCheckpoint",
            Callback::ReduceLrOnPlateau(_) => "ReduceLROnPlateau",
            Callback::BackupAndRestore { .. } => "BackupAndRestore",
            Callback::TensorBoard(_) => "TensorBoard",
        }
    }

    /// After each optimizer step.
    pub fn on_batch_end(&mut self, at: &BatchEnd<'_>) -> Result<Vec<Action>, TemplateError> {
        match self {
            Callback::ModelCheckpoint(c) if c.every_batches.is_some_and(|k| at.step.is_multiple_of(k)) => {
                Ok(match c.should_save(at.logs) {
                    true => vec![Action::SaveWeights(c.path_for(at.epoch, Some(at.batch), at.logs)?)],
                    false => vec![],
                })
            }
            Callback::BackupAndRestore { every_batches } if at.step.is_multiple_of(*every_batches) => {
                // The epoch's end saves the state anyway.
                Ok(if at.last_in_epoch { vec![] } else { vec![Action::SaveState] })
            }
            Callback::TensorBoard(t) => Ok(t.on_batch_end(at).into_iter().collect()),
            _ => Ok(vec![]),
        }
    }

    /// After each epoch, with its validation values; `has_snapshot`: whether best weights are held.
    pub fn on_epoch_end(&mut self, logs: &EpochLogs, has_snapshot: bool) -> Result<Vec<Action>, TemplateError> {
        Ok(match self {
            Callback::EarlyStopping(es) => es.on_epoch_end(logs, has_snapshot),
            Callback::ModelCheckpoint(c) if c.every_batches.is_none() => match c.should_save(logs) {
                true => vec![Action::SaveWeights(c.path_for(logs.epoch, None, logs)?)],
                false => vec![],
            },
            Callback::ReduceLrOnPlateau(r) => match r.on_epoch_end(logs, logs.learning_rate) {
                Some(lr) => vec![
                    Action::SetLearningRate(lr),
                    Action::Log(format!("Epoch {}: ReduceLROnPlateau reducing learning rate to {lr}", logs.epoch + 1)),
                ],
                None => vec![],
            },
            Callback::TensorBoard(t) => t.on_epoch_end(logs),
            Callback::ModelCheckpoint(_) | Callback::BackupAndRestore { .. } => vec![],
        })
    }

    /// When training ends (at the last epoch or an early stop).
    pub fn on_train_end(&self, has_snapshot: bool) -> Vec<Action> {
        match self {
            Callback::EarlyStopping(es) => es.on_train_end(has_snapshot),
            _ => vec![],
        }
    }
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
        assert!(format_fields("{nope}", f).unwrap_err().to_string().contains("no value named \"nope\""));
        assert!(matches!(format_fields("{epoch", f), Err(TemplateError::Unclosed { .. })));
        assert!(matches!(format_fields("{epoch:070000d}", f), Err(TemplateError::Format { .. })), "bounded width");
        assert!(matches!(format_fields("{val_loss:.99f}", f), Err(TemplateError::Format { .. })), "bounded precision");
    }

    #[test]
    fn monitors_by_name_and_alias() {
        assert_eq!(Monitor::parse("val_acc"), Ok(Monitor::ValAccuracy));
        assert_eq!(Monitor::parse("lr"), Ok(Monitor::LearningRate));
        assert!(Monitor::parse("val_los").unwrap_err().contains("known: loss, accuracy, val_loss"));
        let logs = EpochLogs { loss: 0.5, val_loss: Some(0.25), ..Default::default() };
        assert_eq!(Monitor::ValLoss.of(&logs), Some(0.25));
        assert_eq!(Monitor::ValAccuracy.of(&logs), None);
        assert_eq!(Direction::parse("auto", Monitor::ValAccuracy), Ok(Direction::Max));
        assert_eq!(Direction::parse("auto", Monitor::Loss), Ok(Direction::Min));
    }

    fn at(step: u64, last_in_epoch: bool, logs: &EpochLogs) -> BatchEnd<'_> {
        BatchEnd { step, epoch: 0, batch: step as usize - 1, last_in_epoch, logs }
    }

    #[test]
    fn batch_hooks_save_weights_and_state_on_their_schedule() {
        let logs = EpochLogs::default();
        let mut backup = Callback::BackupAndRestore { every_batches: 2 };
        assert_eq!(backup.on_batch_end(&at(1, false, &logs)), Ok(vec![]));
        assert_eq!(backup.on_batch_end(&at(2, false, &logs)), Ok(vec![Action::SaveState]));
        assert_eq!(backup.on_batch_end(&at(4, true, &logs)), Ok(vec![]), "the epoch's end saves it");
        let mut cp = Callback::ModelCheckpoint(ModelCheckpoint {
            filepath: "b{batch}.safetensors".into(),
            monitor: Monitor::Loss,
            direction: Direction::Min,
            save_best_only: false,
            every_batches: Some(3),
            best: None,
        });
        assert_eq!(cp.on_batch_end(&at(2, false, &logs)), Ok(vec![]));
        assert_eq!(cp.on_batch_end(&at(3, false, &logs)), Ok(vec![Action::SaveWeights("b3.safetensors".into())]));
        assert_eq!(cp.on_epoch_end(&logs, false), Ok(vec![]), "saves by batches only");
    }

    #[test]
    fn early_stopping_asks_for_a_snapshot_a_stop_and_the_restore() {
        let mut es = EarlyStopping {
            monitor: Monitor::ValLoss,
            direction: Direction::Min,
            min_delta: 0.0,
            patience: 1,
            baseline: None,
            restore_best_weights: true,
            start_from_epoch: 0,
            wait: 0,
            stopped_epoch: 0,
            best: None,
            best_epoch: 0,
        };
        let logs = |epoch, v| EpochLogs { epoch, val_loss: Some(v), ..Default::default() };
        assert_eq!(es.on_epoch_end(&logs(0, 1.0), false), vec![Action::SnapshotWeights]);
        assert_eq!(es.on_epoch_end(&logs(1, 0.5), true), vec![Action::SnapshotWeights]);
        let stop = es.on_epoch_end(&logs(2, 0.7), true);
        assert_eq!(stop, vec![Action::Log("Epoch 3: early stopping".into()), Action::Stop]);
        let restore = Callback::EarlyStopping(es).on_train_end(true);
        assert_eq!(restore.last(), Some(&Action::RestoreSnapshot));
        assert!(matches!(&restore[0], Action::Log(l) if l.ends_with("best epoch: 2")));
    }

    #[test]
    fn a_resume_takes_counters_from_the_state_and_everything_else_from_the_job() {
        let cp = |filepath: &str, best| {
            Callback::ModelCheckpoint(ModelCheckpoint {
                filepath: filepath.into(),
                monitor: Monitor::Loss,
                direction: Direction::Min,
                save_best_only: true,
                every_batches: None,
                best,
            })
        };
        let job = Callbacks { list: vec![cp("best.safetensors", None)], csv: CsvLogger::default() };
        let saved = Callbacks {
            list: vec![cp("../../outside.safetensors", Some(0.25))],
            csv: CsvLogger { filename: "../x.csv".into(), separator: ";".into() },
        };
        let resumed = job.resumed_from(&saved).unwrap();
        assert_eq!(resumed.list, vec![cp("best.safetensors", Some(0.25))], "the job's file, the saved best");
        assert_eq!(resumed.csv, job.csv);
        let nan = Callbacks { list: vec![cp("best.safetensors", Some(f64::NAN))], ..job.clone() };
        assert!(job.resumed_from(&nan).unwrap_err().contains("callbacks[0]: best NaN is not finite"));
        let other = Callbacks { list: vec![Callback::BackupAndRestore { every_batches: 5 }], ..job.clone() };
        assert!(job
            .resumed_from(&other)
            .unwrap_err()
            .contains("ModelCheckpoint in the job, BackupAndRestore in the saved"));
        assert!(job.resumed_from(&Callbacks::default()).unwrap_err().contains("0 callbacks saved, the job has 1"));
    }

    #[test]
    fn tensorboard_asks_for_kerass_tags_at_kerass_steps() {
        let mut tb =
            Callback::TensorBoard(TensorBoard { log_dir: "logs".into(), every_batches: Some(5), histogram_freq: 2 });
        let logs = EpochLogs {
            epoch: 2,
            loss: 0.5,
            accuracy: Some(0.75),
            val_loss: Some(0.625),
            learning_rate: 0.01,
            ..Default::default()
        };
        assert_eq!(tb.on_batch_end(&at(4, false, &logs)), Ok(vec![]));
        let batch = Action::Scalars {
            log_dir: "logs".into(),
            run: "train",
            step: 5,
            values: vec![("batch_loss", 0.5), ("batch_accuracy", 0.75)],
        };
        assert_eq!(tb.on_batch_end(&at(5, false, &logs)), Ok(vec![batch]));
        let epoch = tb.on_epoch_end(&logs, false).unwrap();
        assert_eq!(
            epoch,
            vec![
                Action::Scalars {
                    log_dir: "logs".into(),
                    run: "train",
                    step: 2,
                    values: vec![("epoch_loss", 0.5), ("epoch_accuracy", 0.75), ("epoch_learning_rate", 0.01)]
                },
                Action::Scalars {
                    log_dir: "logs".into(),
                    run: "validation",
                    step: 2,
                    values: vec![("epoch_loss", 0.625)]
                },
                Action::Histograms { log_dir: "logs".into(), step: 2 },
            ]
        );
        let odd = EpochLogs { epoch: 3, ..logs };
        assert!(!tb.on_epoch_end(&odd, false).unwrap().iter().any(|a| matches!(a, Action::Histograms { .. })));
    }
}
