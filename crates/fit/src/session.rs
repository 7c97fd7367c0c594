//! The commands a user runs: train, evaluate, predict, summary. The binaries only parse
//! flags and call these.

use crate::build::Job;
use crate::checkpoint::{load_state, read_weights, TrainState};
use crate::config::JobConfig;
use crate::dataload::load_data;
use crate::engine::{Engine, LocalEngine};
pub use crate::evaluate::Numerics;
use crate::evaluate::{evaluate, evaluate_as_tensorflow, predict, predict_as_tensorflow, Evaluation};
use crate::progress::{Observer, Report};
use crate::run::{RunDir, JOB_FILE};
use crate::FitError;
use dtrain_data::{load_features, Dataset};
use dtrain_nn::kernel::Kernel;
use ndarray::Array2;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
/// What `coordinator train` was asked (its flags).
pub struct TrainOptions {
    /// The job file (on resume, the run's own copy if absent).
    pub config: Option<PathBuf>,
    /// Where the run goes (default: a new `runs/<job>-NNN`).
    pub run_dir: Option<PathBuf>,
    /// Initial weights (safetensors) instead of the initializers'.
    pub init_weights: Option<PathBuf>,
    /// Continue the run in `run_dir`.
    pub resume: bool,
    /// Resume when `run_dir` holds a saved state, start a new run there otherwise (what a
    /// restarted Kubernetes Job wants).
    pub auto_resume: bool,
    /// Overrides fit.epochs.
    pub epochs: Option<usize>,
    /// Overrides fit.batch_size.
    pub batch_size: Option<usize>,
    /// Overrides the seed.
    pub seed: Option<u64>,
    /// Shards computed at once in this process (default: min(shards, cores)).
    pub threads: Option<usize>,
}

/// Loads a job file, applies command-line overrides and validates the result.
pub fn load_job(
    path: &Path,
    epochs: Option<usize>,
    batch_size: Option<usize>,
    seed: Option<u64>,
) -> Result<Job, FitError> {
    let mut config = JobConfig::load(path).map_err(FitError::Config)?;
    if let Some(e) = epochs {
        config.fit.epochs = e;
    }
    if let Some(b) = batch_size {
        config.fit.batch_size = b;
    }
    if let Some(s) = seed {
        config.seed = s;
    }
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = std::path::absolute(&base).unwrap_or(base);
    absolutize(&mut config, &base);
    Job::build(config, base).map_err(|e| FitError::Config(format!("{}: {e}", path.display())))
}

/// Makes data paths absolute (relative ones are relative to the job file), so the copy of
/// the job in the run directory means the same thing.
fn absolutize(c: &mut JobConfig, base: &Path) {
    let d = &mut c.data;
    for p in
        [&mut d.path, &mut d.train, &mut d.test, &mut d.x, &mut d.y, &mut d.test_x, &mut d.test_y].into_iter().flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

/// How the in-process path uses the cores it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ThreadPlan {
    /// Shards computed at once.
    compute: usize,
    /// Whether a core is left over to gather the next batch meanwhile.
    lookahead: bool,
}

/// `requested` threads (default: every core) compute shards, at most one per shard; a core
/// the shards leave over gathers the next batch.
fn thread_plan(cores: usize, requested: Option<usize>, shards: usize) -> ThreadPlan {
    let compute = requested.unwrap_or(cores).clamp(1, shards.max(1));
    ThreadPlan { compute, lookahead: cores > compute }
}

/// Makes the engine that computes a run's shard gradients, once the job and data are loaded.
pub trait EngineFactory {
    /// The engine for this job and training data.
    fn engine<'a>(&mut self, job: &'a Job, train: &'a Arc<Dataset>) -> Result<Box<dyn Engine + 'a>, FitError>;
}

/// Shards computed in this process.
pub struct Local {
    /// Shards computed at once (default: min(shards, cores)).
    pub threads: Option<usize>,
}

impl EngineFactory for Local {
    fn engine<'a>(&mut self, job: &'a Job, train: &'a Arc<Dataset>) -> Result<Box<dyn Engine + 'a>, FitError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let plan = thread_plan(cores, self.threads, job.fit.shards);
        let engine = LocalEngine::new(&job.model, train, job.seed, plan.compute)?;
        Ok(Box::new(if plan.lookahead { engine.with_lookahead(train)? } else { engine }))
    }
}

/// `coordinator train --local`: trains in this process.
pub fn train(opts: &TrainOptions, obs: &mut dyn Observer) -> Result<Report, FitError> {
    train_with(opts, &mut Local { threads: opts.threads }, obs)
}

/// The options as they apply (`--auto-resume` decided), the job file, and the job with its
/// BLAS kernel chosen: the job's (a resumed run keeps the one it started with), else the best
/// this CPU runs.
fn run_job(opts: &TrainOptions) -> Result<(TrainOptions, PathBuf, Job), FitError> {
    let resumable = |d: &Path| d.join(crate::checkpoint::STATE_FILE).is_file();
    let resume = opts.resume || (opts.auto_resume && opts.run_dir.as_deref().is_some_and(resumable));
    let opts = TrainOptions { resume, ..opts.clone() };
    let config_path = match (&opts.config, opts.resume, &opts.run_dir) {
        (Some(c), _, _) => c.clone(),
        (None, true, Some(dir)) => dir.join(JOB_FILE),
        (None, true, None) => {
            return Err(FitError::Config("--resume needs --run-dir DIR (the run to continue)".into()))
        }
        (None, false, _) => return Err(FitError::Config("--config FILE is required".into())),
    };
    let mut job = load_job(&config_path, opts.epochs, opts.batch_size, opts.seed)?;
    if let (true, None, Some(dir)) = (opts.resume, job.fit.kernel, &opts.run_dir) {
        // Runs saved before kernels were recorded computed with the Haswell kernel dtrain pinned.
        let saved = JobConfig::load(&dir.join(JOB_FILE)).ok().map(|c| c.fit.kernel);
        job.fit.kernel = match saved {
            Some(Some(name)) => Kernel::parse(&name).ok().flatten(),
            Some(None) => Some(Kernel::Haswell),
            None => None,
        };
    }
    let on = config_path.display();
    job.choose_kernel(&dtrain_nn::kernel::cpu_has).map_err(|e| FitError::Config(format!("{on}: {e}")))?;
    Ok((opts, config_path, job))
}

/// The BLAS kernel `coordinator train` with `opts` computes with (`None` if the job cannot be
/// read: the run reports that itself).
pub fn train_kernel(opts: &TrainOptions) -> Option<Kernel> {
    run_job(opts).ok().and_then(|(_, _, job)| job.fit.kernel)
}

/// The BLAS kernel commands on the job file `config` (evaluate, predict) compute with.
pub fn job_kernel(config: &Path) -> Option<Kernel> {
    let mut job = load_job(config, None, None, None).ok()?;
    job.choose_kernel(&dtrain_nn::kernel::cpu_has).ok().flatten()
}

/// Trains with the engine `engines` makes. Everything is validated (job, data, initial
/// weights, resume state) before the run directory is created or touched.
pub fn train_with(
    opts: &TrainOptions,
    engines: &mut dyn EngineFactory,
    obs: &mut dyn Observer,
) -> Result<Report, FitError> {
    let (opts, config_path, job) = &run_job(opts)?;
    let (train, val) = load_data(job)?;
    // Shared with the thread that gathers batches ahead, when there is one.
    let train = Arc::new(train);
    let (run, mut state) = if opts.resume {
        let dir = opts.run_dir.as_deref().expect("checked above");
        let run = RunDir::existing(dir)?;
        if opts.init_weights.is_some() {
            return Err(FitError::Config("--init-weights cannot be combined with --resume".into()));
        }
        let state = load_state(run.path(), job)?;
        (run, state)
    } else {
        let (params, keras_optimizer) = match (&opts.init_weights, &job.config.initial_weights) {
            (Some(w), _) => (read_weights(w, &job.model)?, None),
            (None, Some(keras)) => {
                let (weights, optimizer) =
                    crate::keras_archive::weights_and_optimizer(keras, &job.model, &job.optimizer)
                        .map_err(|e| FitError::Config(format!("{}: {e}", keras.display())))?;
                tracing::info!(target: crate::logging::NOTE, "Initial weights: {}", keras.display());
                (weights, Some((keras, optimizer)))
            }
            (None, None) => (job.model.init_params(job.seed), None),
        };
        let stem = config_path.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned());
        let run = RunDir::create(opts.run_dir.as_deref(), &stem)?;
        crate::checkpoint::write_atomic(&run.file(JOB_FILE), job.config.to_toml().as_bytes())?;
        let mut state = TrainState::new(params, job.optimizer.clone(), job.fit.initial_epoch, job.callbacks.clone());
        if let Some((keras, saved)) = keras_optimizer {
            continue_keras_optimizer(keras, saved, job, &mut state);
        }
        // Saved before the first step, so a run killed at any point can be resumed.
        crate::checkpoint::save_state(run.path(), &state, &job.config)?;
        (run, state)
    };
    obs.train_begin(
        &job.model.summary(),
        &run.path().display().to_string(),
        train.len(),
        val.as_ref().map_or(0, Dataset::len),
    );
    let kernel =
        job.fit.kernel.map_or("OpenBLAS's own choice".into(), |k| format!("{k} ({})", dtrain_nn::kernel::running()));
    tracing::info!(target: crate::logging::NOTE, "BLAS kernel: {kernel}");
    if opts.resume {
        let (epoch, batch, step) = (state.epoch + 1, state.batch, state.step);
        tracing::info!(target: crate::logging::NOTE, "Resuming at epoch {epoch}, batch {batch} (step {step})");
    }
    let mut engine = engines.engine(job, &train)?;
    let report = crate::trainer::fit(job, &train, val.as_ref(), &run, &mut state, engine.as_mut(), obs)?;
    obs.train_end(&report);
    Ok(report)
}

/// A `.keras` file's optimizer state, when it fits the job's optimizer, is where the run's
/// optimizer starts, as `load_model` then `fit` continue in Keras.
fn continue_keras_optimizer(
    keras: &Path,
    saved: crate::keras_archive::SavedOptimizer,
    job: &Job,
    state: &mut TrainState,
) {
    use crate::keras_archive::SavedOptimizer;
    match saved {
        SavedOptimizer::State(s) => {
            let iteration = s.iterations;
            state.optimizer = dtrain_optim::Optimizer::with_state(job.optimizer.clone(), s);
            tracing::info!(target: crate::logging::NOTE, "Optimizer state: {} (iteration {iteration})", keras.display());
        }
        SavedOptimizer::Unfit { saved, expected } => tracing::info!(
            target: crate::logging::NOTE,
            "Optimizer: {} holds {saved} optimizer variable(s), this job's optimizer has {expected}: it starts fresh",
            keras.display()
        ),
        SavedOptimizer::Absent => {}
    }
}

/// `coordinator evaluate`: loss (with every regularization term) and accuracy of the weights
/// on the job's validation data, or on its training data when it has none.
pub fn evaluate_weights(
    config: &Path,
    weights: &Path,
    numerics: Numerics,
    threads: usize,
) -> Result<(Evaluation, &'static str, usize), FitError> {
    let job = load_job(config, None, None, None)?;
    let params = read_weights(weights, &job.model)?;
    let (train, val) = load_data(&job)?;
    let (data, which) = match val {
        Some(v) => (v, "validation"),
        None => (train, "training"),
    };
    let bs = job.fit.validation_batch_size;
    let e = if tensorflow_numerics(numerics, &job, config, false)? {
        evaluate_as_tensorflow(&job.model, &params, &data, bs, threads)
            .map_err(|e| FitError::Config(format!("{}: numerics tensorflow: {e}", config.display())))?
    } else {
        evaluate(&job.model, &params, &data, bs)
    };
    Ok((e, which, data.len()))
}

/// Whether a command computes with TensorFlow's kernels; when they were preferred but do not
/// cover the model, a note says why.
fn tensorflow_numerics(numerics: Numerics, job: &Job, config: &Path, outputs_only: bool) -> Result<bool, FitError> {
    let (tensorflow, why_not) = numerics
        .tensorflow_for(&job.model, outputs_only)
        .map_err(|e| FitError::Config(format!("{}: numerics tensorflow: {e}", config.display())))?;
    if let Some(why) = why_not {
        tracing::info!(target: crate::logging::NOTE, "dtrain's kernels compute, not TensorFlow's: {why}");
    }
    Ok(tensorflow)
}

/// `coordinator predict`: the model's outputs for every sample of `input`.
pub fn predict_file(config: &Path, weights: &Path, input: &Path, numerics: Numerics) -> Result<Array2<f32>, FitError> {
    let job = load_job(config, None, None, None)?;
    let params = read_weights(weights, &job.model)?;
    let data = load_features(input, job.model.input_shape())?.with_rescale(job.config.data.rescale);
    crate::dataload::check_width(&job, &data, input)?;
    let bs = job.fit.batch_size.max(256);
    if tensorflow_numerics(numerics, &job, config, true)? {
        predict_as_tensorflow(&job.model, &params, &data, bs)
            .map_err(|e| FitError::Config(format!("{}: numerics tensorflow: {e}", config.display())))
    } else {
        Ok(predict(&job.model, &params, &data, bs))
    }
}

/// `coordinator summary`: the model table.
pub fn summary(config: &Path) -> Result<String, FitError> {
    Ok(load_job(config, None, None, None)?.model.summary())
}

/// `coordinator export`: safetensors weights of the job's model as a Keras 3 `.keras` file.
pub fn export_keras(config: &Path, weights: &Path, to: &Path) -> Result<(), FitError> {
    let job = load_job(config, None, None, None)?;
    let params = read_weights(weights, &job.model)?;
    // A safetensors file has no optimizer state: the export holds a fresh one (as a model that
    // never trained), so Keras loads it without warning that it starts fresh.
    let fresh = dtrain_optim::Optimizer::new(job.optimizer.clone(), params.len());
    let bytes = crate::keras_archive::keras_bytes(&job.config, &job.model, &params, Some(&fresh))
        .map_err(|e| FitError::Config(format!("{}: {e}", to.display())))?;
    crate::checkpoint::write_atomic(to, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_core_the_shards_leave_over_gathers_ahead() {
        let plan = |compute, lookahead| ThreadPlan { compute, lookahead };
        // The seed job on two cores: one shard, and the other core gathers.
        assert_eq!(thread_plan(2, None, 1), plan(1, true));
        // Two shards take both cores.
        assert_eq!(thread_plan(2, None, 2), plan(2, false));
        assert_eq!(thread_plan(2, None, 8), plan(2, false));
        assert_eq!(thread_plan(1, None, 1), plan(1, false));
        // Asked-for threads are capped at the shards, and leave the rest over.
        assert_eq!(thread_plan(4, Some(8), 2), plan(2, true));
        assert_eq!(thread_plan(4, Some(1), 2), plan(1, true));
        assert_eq!(thread_plan(2, Some(0), 1), plan(1, true));
    }
}
