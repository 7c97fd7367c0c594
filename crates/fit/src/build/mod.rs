//! Job file -> validated domain types, once, with errors that name the key: the model
//! (`model`), the optimizer (`optimizer`), the callbacks (`callbacks`) and the fit settings.

mod callbacks;
mod model;
mod optimizer;

pub use callbacks::callbacks;

use crate::callbacks::Callbacks;
use crate::config::*;
use dtrain_nn::Sequential;
use dtrain_optim::OptimizerConfig;
use std::path::{Path, PathBuf};

/// `[fit]`, validated: what the trainer reads.
#[derive(Clone, Debug, PartialEq)]
pub struct FitSettings {
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// The epoch to stop after (counting from 1; `initial_epoch` ones are skipped).
    pub epochs: usize,
    /// A new sample order every epoch.
    pub shuffle: bool,
    /// The fraction of the training samples, taken from the end, used for validation.
    pub validation_split: f64,
    /// `validation_batch_size`, or the batch size when it is not set.
    pub validation_batch_size: usize,
    /// Whose kernels' rounding the validation loss has.
    pub validation_numerics: crate::evaluate::Numerics,
    /// Epochs counted as done before training starts.
    pub initial_epoch: usize,
    /// The number of shards S each batch is split into (results depend on S only).
    pub shards: usize,
    /// The fraction of shards a second worker computes too (`None`: the coordinator's default).
    pub verify: Option<f64>,
    /// The BLAS kernel (`None`: auto, until `Job::choose_kernel`).
    pub kernel: Option<dtrain_nn::kernel::Kernel>,
}

/// A validated job, ready to run.
#[derive(Clone, Debug)]
pub struct Job {
    /// The job file as read (written to the run directory and checked at resume).
    pub config: JobConfig,
    /// `[fit]`, validated.
    pub fit: FitSettings,
    /// The job file's directory; relative data paths resolve against it.
    pub base_dir: PathBuf,
    /// Seeds initial weights, the epoch order and dropout masks.
    pub seed: u64,
    /// The model, with its loss.
    pub model: Sequential,
    /// The optimizer, with its schedule and clipping.
    pub optimizer: OptimizerConfig,
    /// Whether accuracy is a metric.
    pub accuracy: bool,
    /// The callbacks, in their initial state.
    pub callbacks: Callbacks,
}

/// A validation result: the error is a user-facing `key: what is wrong` line.
type R<T> = Result<T, String>;

/// False for NaN as well as for values <= 0.
pub(crate) fn positive(v: f64) -> bool {
    v > 0.0
}

/// False for NaN as well as for negative values.
pub(crate) fn non_negative(v: f64) -> bool {
    v >= 0.0
}

pub(crate) fn at<T>(key: &str, r: R<T>) -> R<T> {
    r.map_err(|e| format!("{key}: {e}"))
}

impl Job {
    /// Fixes the run's BLAS kernel: `fit.kernel` if this CPU (features `has`) runs it, the best
    /// one it runs for auto; recorded in the job file as written to the run directory and sent
    /// to workers. `Err` names the missing CPU feature.
    pub fn choose_kernel(&mut self, has: &dyn Fn(&str) -> bool) -> R<Option<dtrain_nn::kernel::Kernel>> {
        let kernel = dtrain_nn::kernel::resolve(self.fit.kernel, has).map_err(|e| format!("fit.kernel: {e}"))?;
        self.fit.kernel = kernel;
        self.config.fit.kernel = kernel.map(|k| k.name().to_string());
        Ok(kernel)
    }

    /// Validates a parsed job file (see `session::load_job` for loading one); errors read
    /// `key: what is wrong`.
    pub fn build(config: JobConfig, base_dir: PathBuf) -> R<Job> {
        let specs = config
            .model
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| model::layer(l).map_err(|e| format!("model.layers[{i}].{e}")))
            .collect::<R<Vec<_>>>()?;
        let loss = at("compile.loss", model::loss(&config.compile.loss))?;
        let model = Sequential::new(&config.model.input_shape, &specs, loss).map_err(|e| format!("model: {e}"))?;
        let optimizer = at("compile.optimizer", optimizer::optimizer(&config.compile.optimizer))?;
        let mut accuracy = false;
        for (i, m) in config.compile.metrics.iter().enumerate() {
            match m.as_str() {
                "accuracy" | "acc" => accuracy = true,
                "loss" => {}
                other => return Err(format!("compile.metrics[{i}]: {other:?} is not supported (use \"accuracy\")")),
            }
        }
        let f = &config.fit;
        if f.batch_size == 0 {
            return Err("fit.batch_size: must be at least 1".into());
        }
        if f.validation_batch_size == Some(0) {
            return Err("fit.validation_batch_size: must be at least 1".into());
        }
        if f.shards == 0 || f.shards > 4096 {
            return Err(format!("fit.shards: {} is outside 1..=4096", f.shards));
        }
        if !(0.0..1.0).contains(&f.validation_split) {
            return Err(format!("fit.validation_split: {} is outside [0, 1)", f.validation_split));
        }
        if f.initial_epoch > f.epochs {
            return Err(format!("fit.initial_epoch: {} is after fit.epochs {}", f.initial_epoch, f.epochs));
        }
        let verify = f.verify.as_ref().map(|v| v.fraction().map_err(|e| format!("fit.verify: {e}"))).transpose()?;
        let kernel = match &f.kernel {
            Some(k) => dtrain_nn::kernel::Kernel::parse(k).map_err(|e| format!("fit.kernel: {e}"))?,
            None => None,
        };
        let validation_numerics = match &f.validation_numerics {
            Some(n) => crate::evaluate::Numerics::parse(n).map_err(|e| format!("fit.validation_numerics: {e}"))?,
            None => crate::evaluate::Numerics::Dtrain,
        };
        validation_numerics.tensorflow_for(&model, false).map_err(|e| format!("fit.validation_numerics: {e}"))?;
        data(&config.data)?;
        let callbacks = callbacks(&config.callbacks, &optimizer)?;
        let fit = FitSettings {
            batch_size: f.batch_size,
            epochs: f.epochs,
            shuffle: f.shuffle,
            validation_split: f.validation_split,
            validation_batch_size: f.validation_batch_size.unwrap_or(f.batch_size),
            validation_numerics,
            initial_epoch: f.initial_epoch,
            shards: f.shards,
            verify,
            kernel,
        };
        Ok(Job { seed: config.seed, base_dir, model, optimizer, accuracy, callbacks, fit, config })
    }

    /// A data path from the job file, resolved against the job file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

fn data(d: &DataConfig) -> R<()> {
    let need = |v: &Option<PathBuf>, key: &str| -> R<()> {
        v.as_ref().map(|_| ()).ok_or_else(|| format!("data.{key}: required for format {:?}", d.format))
    };
    match d.format {
        DataFormat::Idx => need(&d.path, "path")?,
        DataFormat::Csv => {
            need(&d.train, "train")?;
            if d.validation == Validation::Test {
                need(&d.test, "test")?;
            }
        }
        DataFormat::Npy => {
            need(&d.x, "x")?;
            need(&d.y, "y")?;
            if d.validation == Validation::Test {
                need(&d.test_x, "test_x")?;
                need(&d.test_y, "test_y")?;
            }
        }
    }
    if !(d.rescale.is_finite() && d.rescale != 0.0) {
        return Err(format!("data.rescale: {} must be a finite, non-zero number", d.rescale));
    }
    Ok(())
}
