//! Job file -> validated domain types, once, with errors that name the key.

use crate::callbacks::{
    Callback, Callbacks, CsvLogger, Direction, EarlyStopping, ModelCheckpoint, Monitor, ReduceLrOnPlateau,
};
use crate::config::*;
use dtrain_nn::{Activation, Constraint, DenseSpec, Initializer, LayerSpec, Loss, LossKind, Regularizer, Sequential};
use dtrain_optim::{Algorithm, Clip, LearningRate, OptimizerConfig, Schedule};
use std::path::{Path, PathBuf};

/// `[fit]`, validated: what the trainer reads.
#[derive(Clone, Debug, PartialEq)]
pub struct FitSettings {
    pub batch_size: usize,
    pub epochs: usize,
    pub shuffle: bool,
    pub validation_split: f64,
    /// `validation_batch_size`, or the batch size when it is not set.
    pub validation_batch_size: usize,
    pub initial_epoch: usize,
    /// The number of shards S each batch is split into (results depend on S only).
    pub shards: usize,
}

/// A validated job, ready to run.
#[derive(Clone, Debug)]
pub struct Job {
    /// The job file as read (written to the run directory and checked at resume).
    pub config: JobConfig,
    pub fit: FitSettings,
    /// The job file's directory; relative data paths resolve against it.
    pub base_dir: PathBuf,
    pub seed: u64,
    pub model: Sequential,
    pub optimizer: OptimizerConfig,
    pub accuracy: bool,
    pub callbacks: Callbacks,
}

type R<T> = Result<T, String>;

/// False for NaN as well as for values <= 0.
fn positive(v: f64) -> bool {
    v > 0.0
}

/// False for NaN as well as for negative values.
fn non_negative(v: f64) -> bool {
    v >= 0.0
}

fn at<T>(key: &str, r: R<T>) -> R<T> {
    r.map_err(|e| format!("{key}: {e}"))
}

impl Job {
    /// Validates a parsed job file (see `session::load_job` for loading one); errors read
    /// `key: what is wrong`.
    pub fn build(config: JobConfig, base_dir: PathBuf) -> R<Job> {
        let specs = config
            .model
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| layer(l).map_err(|e| format!("model.layers[{i}].{e}")))
            .collect::<R<Vec<_>>>()?;
        let loss = at("compile.loss", loss(&config.compile.loss))?;
        let model = Sequential::new(&config.model.input_shape, &specs, loss).map_err(|e| format!("model: {e}"))?;
        let optimizer = at("compile.optimizer", optimizer(&config.compile.optimizer))?;
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
        data(&config.data)?;
        let callbacks = callbacks(&config.callbacks, &optimizer)?;
        let fit = FitSettings {
            batch_size: f.batch_size,
            epochs: f.epochs,
            shuffle: f.shuffle,
            validation_split: f.validation_split,
            validation_batch_size: f.validation_batch_size.unwrap_or(f.batch_size),
            initial_epoch: f.initial_epoch,
            shards: f.shards,
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

fn activation(name: &str) -> R<Activation> {
    Activation::from_name(name).ok_or_else(|| format!("unknown activation {name:?} (known: {})", Activation::NAMES))
}

fn layer(l: &LayerConfig) -> R<LayerSpec> {
    Ok(match l {
        LayerConfig::Flatten {} => LayerSpec::Flatten,
        LayerConfig::Dropout { rate, seed } => {
            if !(0.0..1.0).contains(rate) {
                return Err(format!("rate: {rate} is outside [0, 1)"));
            }
            LayerSpec::Dropout { rate: *rate, seed: *seed }
        }
        LayerConfig::Activation { activation: a } => LayerSpec::Activation(at("activation", activation(a))?),
        LayerConfig::Dense(d) => {
            if d.units == 0 {
                return Err("units: must be at least 1".into());
            }
            let reg = |key: &str, r: &Option<RegularizerConfig>| at(key, r.as_ref().map(regularizer).transpose());
            let con = |key: &str, c: &Option<ConstraintConfig>| at(key, c.as_ref().map(constraint).transpose());
            LayerSpec::Dense(DenseSpec {
                units: d.units,
                activation: at("activation", activation(&d.activation))?,
                use_bias: d.use_bias,
                kernel_initializer: at("kernel_initializer", initializer(&d.kernel_initializer))?,
                bias_initializer: at("bias_initializer", initializer(&d.bias_initializer))?,
                kernel_regularizer: reg("kernel_regularizer", &d.kernel_regularizer)?,
                bias_regularizer: reg("bias_regularizer", &d.bias_regularizer)?,
                activity_regularizer: reg("activity_regularizer", &d.activity_regularizer)?,
                kernel_constraint: con("kernel_constraint", &d.kernel_constraint)?,
                bias_constraint: con("bias_constraint", &d.bias_constraint)?,
            })
        }
    })
}

fn initializer(i: &InitializerConfig) -> R<Initializer> {
    match i {
        InitializerConfig::Name(n) => Initializer::from_name(n)
            .ok_or_else(|| format!("unknown initializer {n:?} (known: {})", Initializer::NAMES)),
        InitializerConfig::Spec(s) => Ok(match *s {
            InitializerSpec::RandomNormal { mean, stddev } => Initializer::RandomNormal { mean, stddev },
            InitializerSpec::TruncatedNormal { mean, stddev } => Initializer::TruncatedNormal { mean, stddev },
            InitializerSpec::RandomUniform { minval, maxval } => Initializer::RandomUniform { minval, maxval },
            InitializerSpec::Constant { value } => Initializer::Constant { value },
        }),
    }
}

fn regularizer(r: &RegularizerConfig) -> R<Regularizer> {
    let reg = match r {
        RegularizerConfig::Name(n) => match n.as_str() {
            "l1" => Regularizer { l1: 0.01, l2: 0.0 },
            "l2" => Regularizer { l1: 0.0, l2: 0.01 },
            "l1_l2" => Regularizer { l1: 0.01, l2: 0.01 },
            other => return Err(format!("unknown regularizer {other:?} (known: l1, l2, l1_l2)")),
        },
        RegularizerConfig::Factors(f) => Regularizer { l1: f.l1, l2: f.l2 },
    };
    for (k, v) in [("l1", reg.l1), ("l2", reg.l2)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("{k}: {v} must be a non-negative number"));
        }
    }
    Ok(reg)
}

fn constraint(c: &ConstraintConfig) -> R<Constraint> {
    let c = match c {
        ConstraintConfig::Name(n) => match n.as_str() {
            "max_norm" => Constraint::MaxNorm { max_value: 2.0, axis: 0 },
            "non_neg" => Constraint::NonNeg,
            "unit_norm" => Constraint::UnitNorm { axis: 0 },
            "min_max_norm" => Constraint::MinMaxNorm { min_value: 0.0, max_value: 1.0, rate: 1.0, axis: 0 },
            other => {
                return Err(format!("unknown constraint {other:?} (known: max_norm, non_neg, unit_norm, min_max_norm)"))
            }
        },
        ConstraintConfig::Spec(s) => match *s {
            ConstraintSpec::MaxNorm { max_value, axis } => {
                if !(max_value > 0.0 && max_value.is_finite()) {
                    return Err(format!("MaxNorm.max_value: {max_value} must be positive"));
                }
                Constraint::MaxNorm { max_value, axis }
            }
            ConstraintSpec::NonNeg {} => Constraint::NonNeg,
            ConstraintSpec::UnitNorm { axis } => Constraint::UnitNorm { axis },
            ConstraintSpec::MinMaxNorm { min_value, max_value, rate, axis } => {
                if !(0.0 <= min_value && min_value <= max_value) {
                    return Err(format!("MinMaxNorm: need 0 <= min_value ({min_value}) <= max_value ({max_value})"));
                }
                if !(0.0..=1.0).contains(&rate) {
                    return Err(format!("MinMaxNorm.rate: {rate} is outside [0, 1]"));
                }
                Constraint::MinMaxNorm { min_value, max_value, rate, axis }
            }
        },
    };
    match c {
        Constraint::MaxNorm { axis, .. } | Constraint::UnitNorm { axis } | Constraint::MinMaxNorm { axis, .. }
            if !(-1..=1).contains(&axis) =>
        {
            Err(format!("axis: {axis} is not 0, 1 or -1 (Dense variables are 1-D or 2-D)"))
        }
        c => Ok(c),
    }
}

fn loss(l: &LossConfig) -> R<Loss> {
    match l {
        LossConfig::Name(n) => Loss::from_name(n)
            .map(|kind| Loss { kind, from_logits: false })
            .ok_or_else(|| format!("unknown loss {n:?} (known: {})", Loss::NAMES)),
        LossConfig::Spec(s) => Ok(match *s {
            LossSpec::SparseCategoricalCrossentropy { from_logits } => {
                Loss { kind: LossKind::SparseCategoricalCrossentropy, from_logits }
            }
            LossSpec::CategoricalCrossentropy { from_logits } => {
                Loss { kind: LossKind::CategoricalCrossentropy, from_logits }
            }
            LossSpec::BinaryCrossentropy { from_logits } => Loss { kind: LossKind::BinaryCrossentropy, from_logits },
            LossSpec::MeanSquaredError {} => Loss { kind: LossKind::MeanSquaredError, from_logits: false },
            LossSpec::MeanAbsoluteError {} => Loss { kind: LossKind::MeanAbsoluteError, from_logits: false },
            LossSpec::Huber { delta } => {
                if !positive(delta.into()) {
                    return Err(format!("Huber.delta: {delta} must be positive"));
                }
                Loss { kind: LossKind::Huber { delta }, from_logits: false }
            }
        }),
    }
}

fn optimizer(o: &OptimizerConfigFile) -> R<OptimizerConfig> {
    let (name, args) = match o {
        OptimizerConfigFile::Name(n) => {
            let canonical = match n.to_ascii_lowercase().as_str() {
                "adam" => "Adam",
                "adamw" => "AdamW",
                "sgd" => "SGD",
                "rmsprop" => "RMSprop",
                "adagrad" => "Adagrad",
                _ => return Err(format!("unknown optimizer {n:?} (known: adam, adamw, sgd, rmsprop, adagrad)")),
            };
            (canonical, OptimizerArgs::default())
        }
        OptimizerConfigFile::Spec(s) => match s {
            OptimizerSpec::Adam(a) => ("Adam", a.clone()),
            OptimizerSpec::AdamW(a) => ("AdamW", a.clone()),
            OptimizerSpec::SGD(a) => ("SGD", a.clone()),
            OptimizerSpec::RMSprop(a) => ("RMSprop", a.clone()),
            OptimizerSpec::Adagrad(a) => ("Adagrad", a.clone()),
        },
    };
    let a = &args;
    // Arguments each optimizer takes beyond learning_rate, clipping and weight_decay.
    let own: &[&str] = match name {
        "Adam" | "AdamW" => &["beta_1", "beta_2", "epsilon", "amsgrad"],
        "SGD" => &["momentum", "nesterov"],
        "RMSprop" => &["rho", "momentum", "epsilon", "centered"],
        _ => &["initial_accumulator_value", "epsilon"],
    };
    let given = [
        ("beta_1", a.beta_1.is_some()),
        ("beta_2", a.beta_2.is_some()),
        ("epsilon", a.epsilon.is_some()),
        ("amsgrad", a.amsgrad.is_some()),
        ("momentum", a.momentum.is_some()),
        ("nesterov", a.nesterov.is_some()),
        ("rho", a.rho.is_some()),
        ("centered", a.centered.is_some()),
        ("initial_accumulator_value", a.initial_accumulator_value.is_some()),
    ];
    if let Some((k, _)) = given.iter().find(|(k, set)| *set && !own.contains(k)) {
        return Err(format!("{name}.{k}: not an argument of {name}"));
    }
    let unit = |k: &str, v: f64| -> R<f64> {
        if (0.0..1.0).contains(&v) {
            Ok(v)
        } else {
            Err(format!("{name}.{k}: {v} is outside [0, 1)"))
        }
    };
    let eps = a.epsilon.unwrap_or(1e-7);
    if !positive(eps) {
        return Err(format!("{name}.epsilon: {eps} must be positive"));
    }
    let (algorithm, default_lr, default_wd) = match name {
        "Adam" | "AdamW" => (
            Algorithm::Adam {
                beta_1: unit("beta_1", a.beta_1.unwrap_or(0.9))?,
                beta_2: unit("beta_2", a.beta_2.unwrap_or(0.999))?,
                epsilon: eps,
                amsgrad: a.amsgrad.unwrap_or(false),
            },
            0.001,
            (name == "AdamW").then_some(0.004),
        ),
        "SGD" => {
            let momentum = a.momentum.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&momentum) {
                return Err(format!("SGD.momentum: {momentum} is outside [0, 1]"));
            }
            (Algorithm::Sgd { momentum, nesterov: a.nesterov.unwrap_or(false) }, 0.01, None)
        }
        "RMSprop" => (
            Algorithm::Rmsprop {
                rho: unit("rho", a.rho.unwrap_or(0.9))?,
                momentum: unit("momentum", a.momentum.unwrap_or(0.0))?,
                epsilon: eps,
                centered: a.centered.unwrap_or(false),
            },
            0.001,
            None,
        ),
        _ => {
            let init = a.initial_accumulator_value.unwrap_or(0.1);
            if !non_negative(init.into()) {
                return Err(format!("Adagrad.initial_accumulator_value: {init} must be non-negative"));
            }
            (Algorithm::Adagrad { initial_accumulator_value: init, epsilon: eps }, 0.001, None)
        }
    };
    let learning_rate = match &a.learning_rate {
        None => LearningRate::Constant(default_lr),
        Some(LearningRateConfig::Value(v)) => {
            if !(v.is_finite() && *v >= 0.0) {
                return Err(format!("{name}.learning_rate: {v} must be a non-negative number"));
            }
            LearningRate::Constant(*v)
        }
        Some(LearningRateConfig::Schedule(s)) => {
            let s = s.clone();
            s.validate().map_err(|e| format!("{name}.learning_rate.{}.{e}", schedule_name(&s)))?;
            LearningRate::Schedule(s)
        }
    };
    let clips = [
        a.clipnorm.map(|v| ("clipnorm", Clip::Norm(v), v)),
        a.global_clipnorm.map(|v| ("global_clipnorm", Clip::GlobalNorm(v), v)),
        a.clipvalue.map(|v| ("clipvalue", Clip::Value(v), v)),
    ];
    let set: Vec<_> = clips.iter().flatten().collect();
    if set.len() > 1 {
        return Err(format!("{name}: only one of clipnorm, clipvalue and global_clipnorm can be set"));
    }
    if let Some((k, _, v)) = set.first() {
        if !positive((*v).into()) {
            return Err(format!("{name}.{k}: {v} must be positive"));
        }
    }
    let weight_decay = a.weight_decay.or(default_wd);
    if let Some(wd) = weight_decay {
        if !non_negative(wd.into()) {
            return Err(format!("{name}.weight_decay: {wd} must be non-negative"));
        }
    }
    Ok(OptimizerConfig { algorithm, learning_rate, weight_decay, clip: set.first().map(|(_, c, _)| *c) })
}

fn schedule_name(s: &Schedule) -> &'static str {
    match s {
        Schedule::ExponentialDecay { .. } => "ExponentialDecay",
        Schedule::PiecewiseConstantDecay { .. } => "PiecewiseConstantDecay",
        Schedule::PolynomialDecay { .. } => "PolynomialDecay",
        Schedule::InverseTimeDecay { .. } => "InverseTimeDecay",
        Schedule::CosineDecay { .. } => "CosineDecay",
        Schedule::CosineDecayRestarts { .. } => "CosineDecayRestarts",
    }
}

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

/// A file the run writes, named by the job: a plain name inside the run directory.
fn run_file_name(key: &str, name: &str) -> R<()> {
    if name.is_empty() || Path::new(name).is_absolute() || name.contains("..") {
        return Err(format!("{key}: {name:?} must be a file name inside the run directory"));
    }
    Ok(())
}

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
                at(&key("ModelCheckpoint", "filepath"), cp.path_for(0, Some(0), &sample))?;
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
            CallbackConfig::BackupAndRestore(b) => {
                if let Some(every_batches) = save_freq(&key("BackupAndRestore", "save_freq"), &b.save_freq)? {
                    out.list.push(Callback::BackupAndRestore { every_batches });
                }
            }
        }
    }
    Ok(out)
}
