//! The training loop: Keras's `fit` over a deterministic step (see design.md, "The step").

use crate::build::Job;
use crate::callbacks::Callback;
use crate::checkpoint::{save_state, weights_bytes, write_atomic, TrainState};
use crate::engine::Engine;
use crate::evaluate::evaluate;
use crate::logs::{EpochLogs, Mean};
use crate::progress::{Observer, Report};
use crate::run::{RunDir, CURVES, FINAL_WEIGHTS};
use crate::step::Stepper;
use crate::FitError;
use dtrain_data::{epoch_permutation, Dataset};
use std::time::Instant;

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
    let model = &job.model;
    let f = &job.config.fit;
    let n = train.len();
    let steps = n.div_ceil(f.batch_size);
    let vbs = f.validation_batch_size.unwrap_or(f.batch_size);
    let mut stepper = Stepper::new(model, f.shards);
    let metrics = obs.metrics();
    let started = Instant::now();
    let mut samples = 0usize;
    let mut written = Vec::new();
    let ckpt_err = FitError::Checkpoint;

    while state.epoch < f.epochs && !state.stopped_early {
        let epoch = state.epoch;
        let perm = epoch_permutation(job.seed, epoch as u64, n, f.shuffle);
        obs.epoch_begin(epoch, f.epochs, steps);
        let t0 = Instant::now();
        if state.batch == 0 {
            state.loss_mean = Mean::default();
            state.acc_mean = Mean::default();
        }
        for b in state.batch..steps {
            let batch = &perm[b * f.batch_size..n.min((b + 1) * f.batch_size)];
            if b + 1 < steps {
                engine.prefetch(&perm[(b + 1) * f.batch_size..n.min((b + 2) * f.batch_size)]);
            }
            let t_step = Instant::now();
            let out = stepper
                .step(model, engine, &mut state.params, &mut state.optimizer, state.step, batch)
                .map_err(FitError::Engine)?;
            let step_seconds = t_step.elapsed().as_secs_f64();
            let (loss, tot) = (out.loss, out.stats);
            if !out.applied {
                return Err(FitError::NonFinite { epoch: epoch + 1, batch: b + 1, loss });
            }
            let bs = batch.len() as f64;
            state.step += 1;
            state.batch = b + 1;
            samples += batch.len();
            state.loss_mean.add(loss, bs as f32);
            state.acc_mean.add_sum(tot.correct as f32, bs as f32);
            let acc = job.accuracy.then(|| state.acc_mean.result());
            obs.batch_end(b, steps, state.loss_mean.result(), acc);
            if let Some(m) = &metrics {
                m.step(state.step, step_seconds, state.loss_mean.result(), acc, state.optimizer.learning_rate());
            }

            let logs = EpochLogs {
                epoch,
                loss: state.loss_mean.result(),
                accuracy: acc,
                learning_rate: state.optimizer.learning_rate(),
                ..Default::default()
            };
            for cb in &mut state.callbacks.list {
                if let Callback::ModelCheckpoint(c) = cb {
                    if c.every_batches.is_some_and(|k| state.step.is_multiple_of(k)) && c.should_save(&logs) {
                        let name = c.path_for(epoch, Some(b), &logs).map_err(ckpt_err)?;
                        write_atomic(&run.file(&name), &weights_bytes(model, &state.params)).map_err(ckpt_err)?;
                    }
                }
            }
            if state.callbacks.backup_every_batches.is_some_and(|k| state.step.is_multiple_of(k)) && b + 1 < steps {
                save_state(run.path(), state, &job.config).map_err(ckpt_err)?;
            }
            if obs.interrupted() && b + 1 < steps {
                save_state(run.path(), state, &job.config).map_err(ckpt_err)?;
                return Err(FitError::Interrupted {
                    epoch: epoch + 1,
                    batch: b + 1,
                    run_dir: run.path().display().to_string(),
                });
            }
        }

        if let Some(r) = engine.epoch_report() {
            obs.note(&r);
        }
        let ev = val.map(|v| evaluate(model, &state.params, v, vbs));
        let logs = EpochLogs {
            epoch,
            loss: state.loss_mean.result(),
            accuracy: job.accuracy.then(|| state.acc_mean.result()),
            val_loss: ev.map(|e| e.loss),
            val_accuracy: ev.filter(|_| job.accuracy).map(|e| e.accuracy),
            learning_rate: state.optimizer.learning_rate(),
        };
        let mut stop = false;
        for cb in &mut state.callbacks.list {
            match cb {
                Callback::EarlyStopping(es) => {
                    let act = es.on_epoch_end(epoch, &logs, state.best_weights.is_some());
                    if act.snapshot {
                        state.best_weights = Some(state.params.clone());
                    }
                    if act.stop {
                        stop = true;
                        obs.note(&format!("Epoch {}: early stopping", epoch + 1));
                    }
                }
                Callback::ModelCheckpoint(c) if c.every_batches.is_none() => {
                    if c.should_save(&logs) {
                        let name = c.path_for(epoch, None, &logs).map_err(ckpt_err)?;
                        write_atomic(&run.file(&name), &weights_bytes(model, &state.params)).map_err(ckpt_err)?;
                        if !written.contains(&name) {
                            written.push(name);
                        }
                    }
                }
                Callback::ModelCheckpoint(_) => {}
                Callback::ReduceLrOnPlateau(r) => {
                    if let Some(lr) = r.on_epoch_end(&logs, state.optimizer.learning_rate()) {
                        state.optimizer.set_learning_rate(lr);
                        obs.note(&format!("Epoch {}: ReduceLROnPlateau reducing learning rate to {lr}", epoch + 1));
                    }
                }
            }
        }
        if let Some(m) = &metrics {
            m.epoch(epoch as u64 + 1, &logs);
            m.learning_rate(state.optimizer.learning_rate());
        }
        state.history.push(logs.clone());
        write_history(job, run, &state.history)?;
        // A picture is a convenience: failing to draw it never stops training.
        if let Err(e) = crate::curves::draw(&run.file(CURVES), &state.history) {
            obs.note(&format!("could not draw {CURVES}: {e}"));
        }
        state.epoch += 1;
        state.batch = 0;
        state.stopped_early = stop;
        if stop || state.epoch >= f.epochs {
            finish(job, run, state, obs)?;
        }
        save_state(run.path(), state, &job.config).map_err(ckpt_err)?;
        obs.epoch_end(&logs, f.epochs, steps, t0.elapsed().as_secs_f64());
    }

    let seconds = started.elapsed().as_secs_f64();
    let best = state
        .history
        .iter()
        .filter_map(|l| l.val_loss.map(|v| (l.epoch, v, l)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(e, _, l)| (e, l.clone()));
    let stopped_early = state.history.len() + job.config.fit.initial_epoch < f.epochs;
    Ok(Report {
        epochs_run: state.history.len(),
        stopped_early,
        best,
        final_weights: run.file(FINAL_WEIGHTS).display().to_string(),
        checkpoints: written.iter().map(|w| run.file(w).display().to_string()).collect(),
        seconds,
        samples_per_second: samples as f64 / seconds.max(1e-9),
    })
}

/// Keras's on_train_end: EarlyStopping restores its best weights (even without an early
/// stop) into the final weights. The training state keeps the last weights, so a run given
/// more epochs later continues exactly where it was.
fn finish(job: &Job, run: &RunDir, state: &TrainState, obs: &mut dyn Observer) -> Result<(), FitError> {
    let mut weights = &state.params;
    for cb in &state.callbacks.list {
        if let Callback::EarlyStopping(es) = cb {
            if let (true, Some(best)) = (es.restore_best_weights, &state.best_weights) {
                obs.note(&format!("Restoring model weights from the end of the best epoch: {}", es.best_epoch + 1));
                weights = best;
            }
        }
    }
    write_atomic(&run.file(FINAL_WEIGHTS), &weights_bytes(&job.model, weights)).map_err(FitError::Checkpoint)
}

fn write_history(job: &Job, run: &RunDir, history: &[EpochLogs]) -> Result<(), FitError> {
    let (name, sep, _) = &job.callbacks.csv;
    let mut text = String::new();
    if let Some(first) = history.first() {
        text += &first.csv_header(sep);
        text.push('\n');
    }
    for h in history {
        text += &h.csv_row(sep);
        text.push('\n');
    }
    write_atomic(&run.file(name), text.as_bytes()).map_err(FitError::Checkpoint)
}
