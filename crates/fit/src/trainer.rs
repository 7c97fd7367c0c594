//! The training loop: Keras's `fit` over a deterministic step (see design.md, "The step").
//! Callbacks say what they want done (`callbacks::Action`); only `Trainer::apply` does it.

use crate::boards::Boards;
use crate::build::{FitSettings, Job};
use crate::callbacks::{Action, BatchEnd};
use crate::checkpoint::{save_state, weights_bytes, write_atomic, TrainState};
use crate::engine::Engine;
use crate::evaluate::{evaluate, evaluate_as_tensorflow, tensorflow_threads};
use crate::logging::NOTE;
use crate::logs::{EpochLogs, Mean};
use crate::metrics::Metrics;
use crate::progress::{EpochTime, Observer, Report};
use crate::run::{RunDir, CURVES, FINAL_KERAS, FINAL_WEIGHTS};
use crate::step::Stepper;
use crate::{EngineError, FitError};
use dtrain_data::{epoch_permutation, Dataset};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs (or continues) training until `fit.epochs`, an early stop, or an error. The resume
/// state in `run` is saved at every epoch end (and every N batches with BackupAndRestore).
pub fn fit(
    job: &Job,
    train: &Dataset,
    val: Option<&Dataset>,
    run: &RunDir,
    state: &mut TrainState,
    engine: &mut dyn Engine,
    obs: &mut dyn Observer,
) -> Result<Report, FitError> {
    dtrain_nn::flush_denormals(); // the optimizer runs on this thread
                                  // Validated with the job: TensorFlow's kernels are either covered or only preferred.
    let (tensorflow_validation, why_not) =
        job.fit.validation_numerics.tensorflow_for(&job.model, false).map_err(|e| FitError::Config(e.to_string()))?;
    if let (Some(why), Some(_)) = (why_not, val) {
        tracing::info!(target: NOTE, "val_loss is computed with dtrain's kernels, not TensorFlow's: {why}");
    }
    let mut t = Trainer {
        tensorflow_validation,
        job,
        fit: &job.fit,
        train,
        val,
        run,
        steps: train.len().div_ceil(job.fit.batch_size),
        stepper: Stepper::new(&job.model, job.fit.shards),
        metrics: obs.metrics(),
        engine,
        obs,
        started: Instant::now(),
        samples: 0,
        written: vec![],
        kept: VecDeque::new(),
        warned_no_boards: false,
        in_steps: Duration::ZERO,
    };
    while state.epoch < t.fit.epochs && !state.stopped_early {
        let t0 = Instant::now();
        if t.run_epoch(state)? == Flow::RolledBack {
            continue;
        }
        let logs = t.end_epoch(state)?;
        let time = EpochTime { seconds: t0.elapsed().as_secs_f64(), in_steps: t.in_steps.as_secs_f64() };
        t.obs.epoch_end(&logs, t.fit.epochs, t.steps, time);
    }
    Ok(t.report(state))
}

/// One `fit` call's inputs and running totals.
struct Trainer<'a> {
    job: &'a Job,
    fit: &'a FitSettings,
    train: &'a Dataset,
    val: Option<&'a Dataset>,
    /// The validation loss has TensorFlow's kernels' rounding (`fit.validation_numerics`).
    tensorflow_validation: bool,
    run: &'a RunDir,
    /// Batches per epoch.
    steps: usize,
    stepper: Stepper,
    metrics: Option<Arc<Metrics>>,
    engine: &'a mut dyn Engine,
    obs: &'a mut dyn Observer,
    started: Instant,
    samples: usize,
    /// Weight files callbacks wrote, in order, each once.
    written: Vec<String>,
    /// States kept in memory (oldest first) for the engine's rollbacks.
    kept: VecDeque<TrainState>,
    /// A TensorBoard callback was configured but the front end writes no event logs: said once.
    warned_no_boards: bool,
    /// Time spent in the current epoch's steps.
    in_steps: Duration,
}

/// States kept for rollbacks: a liar caught within this many windows is undone exactly.
const KEPT_STATES: usize = 4;

/// Whether training goes on from where it is, or went back to a kept state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    RolledBack,
}

impl Trainer<'_> {
    /// The epoch's remaining batches (all of them, unless resumed mid-epoch).
    fn run_epoch(&mut self, state: &mut TrainState) -> Result<Flow, FitError> {
        let (n, bs) = (self.train.len(), self.fit.batch_size);
        let perm = epoch_permutation(self.job.seed, state.epoch as u64, n, self.fit.shuffle);
        self.obs.epoch_begin(state.epoch, self.fit.epochs, self.steps);
        self.in_steps = Duration::ZERO;
        if state.batch == 0 {
            state.loss_mean = Mean::default();
            state.acc_mean = Mean::default();
        }
        for b in state.batch..self.steps {
            if b + 1 < self.steps {
                self.engine.prefetch(&perm[(b + 1) * bs..n.min((b + 2) * bs)]);
            }
            if self.run_batch(state, &perm[b * bs..n.min((b + 1) * bs)])? == Flow::RolledBack {
                return Ok(Flow::RolledBack);
            }
        }
        Ok(Flow::Continue)
    }

    /// One optimizer step on `batch`, then the batch-end callbacks.
    fn run_batch(&mut self, state: &mut TrainState, batch: &[u32]) -> Result<Flow, FitError> {
        let (b, epoch) = (state.batch, state.epoch);
        let t_step = Instant::now();
        self.keep(state);
        let (model, params, optimizer) = (&self.job.model, &mut state.params, &mut state.optimizer);
        let out = match self.stepper.step(model, self.engine, params, optimizer, state.step, batch) {
            // Nothing of this step was applied: the state is whole at the previous batch.
            Err(EngineError::Interrupted) => return self.interrupted(state).map(|()| Flow::Continue),
            Err(EngineError::Rollback { to_step, why }) => return self.roll_back(state, to_step, why),
            out => out?,
        };
        if !out.applied {
            return Err(FitError::NonFinite { epoch: epoch + 1, batch: b + 1, loss: out.loss });
        }
        state.step += 1;
        state.batch = b + 1;
        self.samples += batch.len();
        state.loss_mean.add(out.loss, batch.len() as f32);
        state.acc_mean.add_sum(out.stats.correct as f32, batch.len() as f32);
        let logs = self.logs(state, None);
        self.obs.batch_end(b, self.steps, logs.loss, logs.accuracy);
        if let Some(m) = &self.metrics {
            m.step(state.step, t_step.elapsed().as_secs_f64(), logs.loss, logs.accuracy, logs.learning_rate);
        }
        let last_in_epoch = b + 1 == self.steps;
        let at = BatchEnd { step: state.step, epoch, batch: b, last_in_epoch, logs: &logs };
        for i in 0..state.callbacks.list.len() {
            let actions = state.callbacks.list[i].on_batch_end(&at)?;
            self.apply(state, actions)?;
        }
        self.in_steps += t_step.elapsed();
        if self.obs.interrupted() && !last_in_epoch {
            self.interrupted(state)?;
        }
        Ok(Flow::Continue)
    }

    /// Keeps the state at the start of each of the engine's windows (and at the run's first
    /// step), the last `KEPT_STATES` of them.
    fn keep(&mut self, state: &TrainState) {
        let Some(every) = self.engine.snapshot_every() else { return };
        let due = state.step.is_multiple_of(every.max(1)) || self.kept.is_empty();
        if due && self.kept.back().is_none_or(|k| k.step != state.step) {
            if self.kept.len() == KEPT_STATES {
                self.kept.pop_front();
            }
            self.kept.push_back(state.clone());
        }
    }

    /// Goes back to the latest kept state from before `to_step` (or the oldest kept, saying
    /// that earlier results stay), dropping the states after it. With none kept (an engine
    /// that asks without saying `snapshot_every`), the run ends with the engine's error.
    fn roll_back(&mut self, state: &mut TrainState, to_step: u64, why: String) -> Result<Flow, FitError> {
        let at = self.kept.iter().rposition(|k| k.step <= to_step).unwrap_or(0);
        self.kept.truncate(at + 1);
        let Some(kept) = self.kept.back() else {
            return Err(FitError::Engine(EngineError::Rollback { to_step, why }));
        };
        *state = kept.clone();
        if state.step > to_step {
            tracing::warn!(
                "the state from before step {to_step} is no longer kept: results used between it and step {} stay",
                state.step
            );
        }
        tracing::warn!(
            "{why}; going back to step {} (epoch {}, batch {}) and replaying without it",
            state.step,
            state.epoch + 1,
            state.batch
        );
        Ok(Flow::RolledBack)
    }

    /// SIGTERM or Ctrl-C: the state is saved where it is, and the run ends so that `--resume`
    /// continues it.
    fn interrupted(&mut self, state: &TrainState) -> Result<(), FitError> {
        self.save(state)?;
        let run_dir = self.run.path().display().to_string();
        Err(FitError::Interrupted { epoch: state.epoch + 1, batch: state.batch, run_dir })
    }

    /// The epoch's logs (with validation values when `val` is given).
    fn logs(&self, state: &TrainState, val: Option<crate::evaluate::Evaluation>) -> EpochLogs {
        let accuracy = self.job.accuracy;
        EpochLogs {
            epoch: state.epoch,
            loss: state.loss_mean.result(),
            accuracy: accuracy.then(|| state.acc_mean.result()),
            val_loss: val.map(|e| e.loss),
            val_accuracy: val.filter(|_| accuracy).map(|e| e.accuracy),
            learning_rate: state.optimizer.learning_rate(),
        }
    }

    /// Validation, the epoch-end callbacks, history, and the saved state; at the last epoch
    /// (or an early stop) the final weights.
    fn end_epoch(&mut self, state: &mut TrainState) -> Result<EpochLogs, FitError> {
        if let Some(r) = self.engine.epoch_report() {
            tracing::info!(target: NOTE, "{}", r.line);
            // The engine's own curves go beside Keras's in every TensorBoard log directory.
            let boards = state.callbacks.list.iter().filter_map(|c| match c {
                crate::callbacks::Callback::TensorBoard(t) => Some(t.log_dir.clone()),
                _ => None,
            });
            for log_dir in boards.collect::<Vec<_>>() {
                self.board(&log_dir, "train", |b, dir| b.scalars(dir, state.epoch as i64, &r.scalars));
            }
        }
        let (model, bs) = (&self.job.model, self.fit.validation_batch_size);
        let ev = match self.val {
            Some(v) if self.tensorflow_validation => Some(
                evaluate_as_tensorflow(model, &state.params, v, bs, tensorflow_threads())
                    .map_err(|e| FitError::Config(format!("fit.validation_numerics: {e}")))?,
            ),
            Some(v) => Some(evaluate(model, &state.params, v, bs)),
            None => None,
        };
        let logs = self.logs(state, ev);
        for i in 0..state.callbacks.list.len() {
            let has_snapshot = state.best_weights.is_some();
            let actions = state.callbacks.list[i].on_epoch_end(&logs, has_snapshot)?;
            self.apply(state, actions)?;
        }
        if let Some(m) = &self.metrics {
            m.epoch(state.epoch as u64 + 1, &logs);
            m.learning_rate(state.optimizer.learning_rate());
        }
        state.history.push(logs.clone());
        let csv = state.callbacks.csv.render(&state.history);
        write_atomic(&self.run.file(&state.callbacks.csv.filename), csv.as_bytes())?;
        // A picture is a convenience: failing to draw it never stops training.
        if let Err(e) = crate::curves::draw(&self.run.file(CURVES), &state.history) {
            tracing::warn!(target: NOTE, "could not draw {CURVES}: {e}");
        }
        state.epoch += 1;
        state.batch = 0;
        if state.stopped_early || state.epoch >= self.fit.epochs {
            self.finish(state)?;
        }
        self.save(state)?;
        Ok(logs)
    }

    /// Keras's on_train_end, then the final weights. The training state keeps the last
    /// weights, so a run given more epochs later continues exactly where it was.
    fn finish(&mut self, state: &mut TrainState) -> Result<(), FitError> {
        let has_snapshot = state.best_weights.is_some();
        let actions: Vec<Action> = state.callbacks.list.iter().flat_map(|c| c.on_train_end(has_snapshot)).collect();
        let restore = actions.contains(&Action::RestoreSnapshot);
        self.apply(state, actions)?;
        let weights = match (&state.best_weights, restore) {
            (Some(best), true) => best,
            _ => &state.params,
        };
        let bytes = weights_bytes(&self.job.model, weights);
        write_atomic(&self.run.file(FINAL_WEIGHTS), &bytes)?;
        let keras =
            crate::keras_archive::keras_bytes(&self.job.config, &self.job.model, weights, Some(&state.optimizer))
                .map_err(|e| FitError::Config(format!("{FINAL_KERAS}: {e}")))?;
        write_atomic(&self.run.file(FINAL_KERAS), &keras).map_err(FitError::from)
    }

    /// Weights as the file `name` wants them: a Keras `.keras` file or `.weights.h5`, else
    /// safetensors.
    fn weights_as(&self, name: &str, params: &[f32], optimizer: &dtrain_optim::Optimizer) -> Result<Vec<u8>, FitError> {
        let (job, model) = (&self.job.config, &self.job.model);
        let bytes = if name.ends_with(".keras") {
            crate::keras_archive::keras_bytes(job, model, params, Some(optimizer))
        } else if name.ends_with(".weights.h5") {
            crate::keras_archive::weights_h5_bytes(&job.model, model, params, Some(optimizer))
        } else {
            return Ok(weights_bytes(model, params));
        };
        bytes.map_err(|e| FitError::Config(format!("{name}: {e}")))
    }

    /// Carries out what a callback asked for.
    fn apply(&mut self, state: &mut TrainState, actions: Vec<Action>) -> Result<(), FitError> {
        for action in actions {
            match action {
                Action::SnapshotWeights => state.best_weights = Some(state.params.clone()),
                Action::Stop => state.stopped_early = true,
                Action::SetLearningRate(lr) => state.optimizer.set_learning_rate(lr),
                Action::SaveWeights(name) => {
                    let bytes = self.weights_as(&name, &state.params, &state.optimizer)?;
                    write_atomic(&self.run.file(&name), &bytes)?;
                    if !self.written.contains(&name) {
                        self.written.push(name);
                    }
                }
                Action::SaveState => self.save(state)?,
                Action::RestoreSnapshot => {} // only at the end, by `finish`
                Action::Log(line) => tracing::info!(target: NOTE, "{line}"),
                Action::Scalars { log_dir, run, step, values } => {
                    self.board(&log_dir, run, |b, dir| b.scalars(dir, step as i64, &values));
                }
                Action::Histograms { log_dir, step } => {
                    let (vars, params) = (self.job.model.variables(), &state.params);
                    self.board(&log_dir, "train", |b, dir| {
                        vars.iter().try_for_each(|v| b.histogram(dir, &v.name, step as i64, &params[v.range()]))
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes to the event log of TensorBoard run `run` under `log_dir`. A picture is a
    /// convenience: failing to write one warns and never stops training.
    fn board(
        &mut self,
        log_dir: &str,
        run: &'static str,
        write: impl FnOnce(&mut dyn Boards, &Path) -> std::io::Result<()>,
    ) {
        let dir = self.run.file(log_dir).join(run);
        let Some(boards) = self.obs.boards() else {
            if !std::mem::replace(&mut self.warned_no_boards, true) {
                tracing::warn!(target: NOTE, "TensorBoard logs are not written: this front end has no event-file writer");
            }
            return;
        };
        if let Err(e) = write(boards, &dir).and_then(|()| boards.flush(&dir)) {
            tracing::warn!(target: NOTE, "could not write TensorBoard logs to {}: {e}", dir.display());
        }
    }

    fn save(&self, state: &TrainState) -> Result<(), FitError> {
        save_state(self.run.path(), state, &self.job.config).map_err(FitError::from)
    }

    fn report(&self, state: &TrainState) -> Report {
        let seconds = self.started.elapsed().as_secs_f64();
        let best = state
            .history
            .iter()
            .filter_map(|l| l.val_loss.map(|v| (l.epoch, v, l)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(e, _, l)| (e, l.clone()));
        Report {
            epochs_run: state.history.len(),
            stopped_early: state.history.len() + self.fit.initial_epoch < self.fit.epochs,
            best,
            final_weights: self.run.file(FINAL_WEIGHTS).display().to_string(),
            checkpoints: self.written.iter().map(|w| self.run.file(w).display().to_string()).collect(),
            seconds,
            samples_per_second: self.samples as f64 / seconds.max(1e-9),
        }
    }
}
