//! The callbacks from the job file, with their monitors, modes and file names checked.

use super::{at, R};
use crate::callbacks::{
    Callback, Callbacks, CsvLogger, Direction, EarlyStopping, ModelCheckpoint, Monitor, ReduceLrOnPlateau,
};
use crate::config::*;
use dtrain_optim::{LearningRate, OptimizerConfig};
use std::path::Path;

fn save_freq(key: &str, f: &SaveFreq) -> R<Option<u64>> {
    match f {
        SaveFreq::Word(w) if w == "epoch" => Ok(None),
        SaveFreq::Word(w) => Err(format!("{key}: {w:?} is not \"epoch\" or a number of batches")),
        SaveFreq::Batches(0) => Err(format!("{key}: must be at least 1")),
        SaveFreq::Batches(n) => Ok(Some(*n)),
    }
}

fn monitor(key: &str, m: &str) -> R<Monitor> {
    at(key, Monitor::parse(m))
}

/// A file the run writes, named by the job: a plain name inside the run directory that is not
/// one of the run's own files (overwriting `state.json` or `job.toml` would break `--resume`).
pub(crate) fn run_file_name(key: &str, name: &str) -> R<()> {
    use crate::checkpoint::STATE_FILE;
    use crate::run::{CURVES, FINAL_KERAS, FINAL_WEIGHTS, JOB_FILE};
    if name.is_empty() || Path::new(name).is_absolute() || name.contains("..") || name.contains(['/', '\\']) {
        return Err(format!("{key}: {name:?} must be a file name inside the run directory (no directories)"));
    }
    if [JOB_FILE, STATE_FILE, FINAL_WEIGHTS, FINAL_KERAS, CURVES].contains(&name)
        || name.starts_with("state-")
        || name.starts_with('.')
    {
        return Err(format!(
            "{key}: {name:?} is a name the run uses for its own files ({JOB_FILE}, {STATE_FILE}, state-*, \
             {FINAL_WEIGHTS}, {FINAL_KERAS}, {CURVES}, hidden temporary files); choose another"
        ));
    }
    Ok(())
}

/// The job's callbacks, validated, in the order listed, with the history file (CSVLogger's or the default).
pub fn callbacks(list: &[CallbackConfig], opt: &OptimizerConfig) -> R<Callbacks> {
    let mut out = Callbacks::default();
    for (i, c) in list.iter().enumerate() {
        let key = |name: &str, field: &str| format!("callbacks[{i}].{name}.{field}");
        match c {
            CallbackConfig::EarlyStopping(e) => {
                let monitor = monitor(&key("EarlyStopping", "monitor"), &e.monitor)?;
                let direction = at(&key("EarlyStopping", "mode"), Direction::parse(&e.mode, monitor))?;
                out.list.push(Callback::EarlyStopping(EarlyStopping {
                    monitor,
                    direction,
                    min_delta: e.min_delta,
                    patience: e.patience,
                    baseline: e.baseline,
                    restore_best_weights: e.restore_best_weights,
                    start_from_epoch: e.start_from_epoch,
                    wait: 0,
                    stopped_epoch: 0,
                    best: None,
                    best_epoch: 0,
                }));
            }
            CallbackConfig::ModelCheckpoint(m) => {
                let monitor = monitor(&key("ModelCheckpoint", "monitor"), &m.monitor)?;
                let direction = at(&key("ModelCheckpoint", "mode"), Direction::parse(&m.mode, monitor))?;
                let every_batches = save_freq(&key("ModelCheckpoint", "save_freq"), &m.save_freq)?;
                run_file_name(&key("ModelCheckpoint", "filepath"), &m.filepath)?;
                let cp = ModelCheckpoint {
                    filepath: m.filepath.clone(),
                    monitor,
                    direction,
                    save_best_only: m.save_best_only,
                    every_batches,
                    best: m.initial_value_threshold,
                };
                // Every field must be fillable: check with sample values now, not at epoch 10.
                let sample = crate::logs::EpochLogs {
                    accuracy: Some(0.0),
                    val_loss: Some(0.0),
                    val_accuracy: Some(0.0),
                    ..Default::default()
                };
                at(&key("ModelCheckpoint", "filepath"), cp.path_for(0, Some(0), &sample).map_err(|e| e.to_string()))?;
                out.list.push(Callback::ModelCheckpoint(cp));
            }
            CallbackConfig::ReduceLROnPlateau(r) => {
                let monitor = monitor(&key("ReduceLROnPlateau", "monitor"), &r.monitor)?;
                if matches!(opt.learning_rate, LearningRate::Schedule(_)) {
                    return Err(format!(
                        "callbacks[{i}].ReduceLROnPlateau: cannot change a learning-rate schedule; use a constant learning_rate"
                    ));
                }
                if !(r.factor > 0.0 && r.factor < 1.0) {
                    return Err(format!("{}: {} must be in (0, 1)", key("ReduceLROnPlateau", "factor"), r.factor));
                }
                let direction = at(&key("ReduceLROnPlateau", "mode"), Direction::parse(&r.mode, monitor))?;
                out.list.push(Callback::ReduceLrOnPlateau(ReduceLrOnPlateau {
                    monitor,
                    direction,
                    factor: r.factor,
                    patience: r.patience,
                    min_delta: r.min_delta,
                    cooldown: r.cooldown,
                    min_lr: r.min_lr,
                    wait: 0,
                    cooldown_counter: 0,
                    best: None,
                }));
            }
            CallbackConfig::CSVLogger(c) => {
                run_file_name(&key("CSVLogger", "filename"), &c.filename)?;
                out.csv = CsvLogger { filename: c.filename.clone(), separator: c.separator.clone() };
            }
            CallbackConfig::TerminateOnNaN {} => {} // always on: a non-finite loss stops the run
            CallbackConfig::TensorBoard(t) => {
                run_file_name(&key("TensorBoard", "log_dir"), &t.log_dir)?;
                let every_batches = save_freq(&key("TensorBoard", "update_freq"), &t.update_freq)?;
                let (log_dir, histogram_freq) = (t.log_dir.clone(), t.histogram_freq);
                out.list.push(Callback::TensorBoard(crate::callbacks::TensorBoard {
                    log_dir,
                    every_batches,
                    histogram_freq,
                }));
            }
            CallbackConfig::BackupAndRestore(b) => {
                if let Some(every_batches) = save_freq(&key("BackupAndRestore", "save_freq"), &b.save_freq)? {
                    out.list.push(Callback::BackupAndRestore { every_batches });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_cannot_write_over_the_runs_own_files() {
        for name in
            ["state.json", "job.toml", "final.safetensors", "curves.png", "state-0000000001-0.safetensors", ".x"]
        {
            let e = run_file_name("k", name).unwrap_err();
            assert!(e.contains("a name the run uses for its own files"), "{name}: {e}");
        }
        for name in ["sub/best.safetensors", "../x", "/tmp/x", ""] {
            assert!(run_file_name("k", name).unwrap_err().contains("inside the run directory"), "{name}");
        }
        assert_eq!(run_file_name("k", "best-{epoch:02d}.safetensors"), Ok(()));
        assert_eq!(run_file_name("k", "history.csv"), Ok(()));
    }
}
