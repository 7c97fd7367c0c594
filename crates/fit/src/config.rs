//! The job file: Keras's argument names with Keras's defaults. Parsing rejects unknown keys;
//! `build` validates once and turns the file into the domain types the trainer runs.

use dtrain_optim::Schedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A job file as written: the data, the model, compile and fit arguments, and callbacks.
pub struct JobConfig {
    /// Seeds initial weights, the epoch order and dropout masks.
    #[serde(default)]
    pub seed: u64,
    /// `[data]`: where the samples are.
    pub data: DataConfig,
    /// `[model]`: the Sequential model's layers.
    pub model: ModelConfig,
    /// `[compile]`: optimizer, loss, metrics.
    pub compile: CompileConfig,
    #[serde(default)]
    /// `[fit]`: Keras's fit arguments.
    pub fit: FitConfig,
    #[serde(default)]
    /// `[[callbacks]]`, in order.
    pub callbacks: Vec<CallbackConfig>,
    #[serde(skip)]
    /// The `.keras` file whose weights start the run (`model.keras` named one).
    pub initial_weights: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
/// The data files' format.
pub enum DataFormat {
    /// A directory of IDX files (MNIST, Fashion-MNIST).
    Idx,
    /// CSV files, the label in one column.
    Csv,
    /// NumPy .npy files of features and labels.
    Npy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
/// Where validation data comes from (besides fit.validation_split).
pub enum Validation {
    /// The format's test split: validation_data = (x_test, y_test).
    Test,
    #[default]
    /// No validation data.
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[data]`.
pub struct DataConfig {
    /// The files' format.
    pub format: DataFormat,
    /// idx: the directory with train-*/t10k-* files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// csv: training and test files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// csv: the test (validation) file.
    pub test: Option<PathBuf>,
    /// csv: index of the label column (negative counts from the end).
    #[serde(default)]
    pub label_column: i64,
    /// npy: feature and label files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// npy: labels.
    pub y: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// npy: validation features.
    pub test_x: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// npy: validation labels.
    pub test_y: Option<PathBuf>,
    #[serde(default = "one")]
    /// Features are multiplied by this when a batch is gathered (1/255 for pixels).
    pub rescale: f64,
    #[serde(default)]
    /// Where validation data comes from.
    pub validation: Validation,
}

fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[model]`: the layers, or a Keras model file that has them (`keras = "model.json"`, as
/// `model.to_json()` writes it), read when the job is loaded.
pub struct ModelConfig {
    #[serde(default)]
    /// A sample's shape (without the batch dimension).
    pub input_shape: Vec<usize>,
    #[serde(default)]
    /// The layers, in order.
    pub layers: Vec<LayerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// A Keras model file instead of `input_shape` and `layers`, relative to the job file.
    pub keras: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
/// A layer as the job file writes it (`type = "Dense"`, ...).
pub enum LayerConfig {
    /// `keras.layers.Flatten()`.
    Flatten {},
    /// `keras.layers.Dense(...)`.
    Dense(Box<DenseConfig>),
    /// `keras.layers.Dropout(rate, seed)`.
    Dropout {
        /// Fraction of units dropped in training.
        rate: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// The layer's own mask seed.
        seed: Option<u64>,
    },
    /// `keras.layers.Activation(activation)`.
    Activation {
        /// The activation's name.
        activation: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `keras.layers.Dense`'s arguments, with Keras's defaults.
pub struct DenseConfig {
    /// Output width.
    pub units: usize,
    #[serde(default = "linear")]
    /// Activation name ("linear").
    pub activation: String,
    #[serde(default = "yes")]
    /// Whether it has a bias (true).
    pub use_bias: bool,
    #[serde(default = "glorot")]
    /// Kernel initializer ("glorot_uniform").
    pub kernel_initializer: InitializerConfig,
    #[serde(default = "zeros")]
    /// Bias initializer ("zeros").
    pub bias_initializer: InitializerConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Penalty on the kernel.
    pub kernel_regularizer: Option<RegularizerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Penalty on the bias.
    pub bias_regularizer: Option<RegularizerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Penalty on the layer's output.
    pub activity_regularizer: Option<RegularizerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Constraint on the kernel.
    pub kernel_constraint: Option<ConstraintConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Constraint on the bias.
    pub bias_constraint: Option<ConstraintConfig>,
}

fn linear() -> String {
    "linear".into()
}
fn yes() -> bool {
    true
}
fn glorot() -> InitializerConfig {
    InitializerConfig::Name("glorot_uniform".into())
}
fn zeros() -> InitializerConfig {
    InitializerConfig::Name("zeros".into())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "an initializer name such as \"he_normal\" or a table such as { RandomNormal = { stddev = 0.1 } }"
)]
/// An initializer: a Keras name or a table with arguments.
pub enum InitializerConfig {
    /// `"glorot_uniform"`, ...
    Name(String),
    /// `{ RandomNormal = { mean, stddev } }`, ...
    Spec(InitializerSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// An initializer with arguments.
pub enum InitializerSpec {
    /// `keras.initializers.RandomNormal`.
    RandomNormal {
        #[serde(default)]
        /// Mean (0).
        mean: f32,
        #[serde(default = "stddev")]
        /// Standard deviation (0.05).
        stddev: f32,
    },
    /// `keras.initializers.TruncatedNormal`.
    TruncatedNormal {
        #[serde(default)]
        /// Mean (0).
        mean: f32,
        #[serde(default = "stddev")]
        /// Standard deviation before truncation (0.05).
        stddev: f32,
    },
    /// `keras.initializers.RandomUniform`.
    RandomUniform {
        #[serde(default = "minval")]
        /// Lower bound (-0.05).
        minval: f32,
        #[serde(default = "stddev")]
        /// Upper bound (0.05).
        maxval: f32,
    },
    /// `keras.initializers.Constant`.
    Constant {
        #[serde(default)]
        /// The value.
        value: f32,
    },
}

fn stddev() -> f32 {
    0.05
}
fn minval() -> f32 {
    -0.05
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a regularizer: \"l1\", \"l2\", \"l1l2\" or a table { l1 = 0.01, l2 = 0.01 }")]
/// A regularizer: a Keras name or factors.
pub enum RegularizerConfig {
    /// `"l1"`, `"l2"`, `"l1l2"`.
    Name(String),
    /// `{ l1 = .., l2 = .. }`.
    Factors(RegularizerFactors),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// L1 and L2 factors.
pub struct RegularizerFactors {
    #[serde(default)]
    /// Factor of the sum of absolute values (0).
    pub l1: f32,
    #[serde(default)]
    /// Factor of the sum of squares (0).
    pub l2: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a constraint: \"max_norm\", \"non_neg\", \"unit_norm\", \"min_max_norm\" or a table such as { MaxNorm = { max_value = 2.0 } }"
)]
/// A constraint: a Keras name or a table with arguments.
pub enum ConstraintConfig {
    /// `"max_norm"`, `"non_neg"`, `"unit_norm"`, `"min_max_norm"`.
    Name(String),
    /// `{ MaxNorm = { max_value, axis } }`, ...
    Spec(ConstraintSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A constraint with arguments.
pub enum ConstraintSpec {
    /// `keras.constraints.MaxNorm`.
    MaxNorm {
        #[serde(default = "two")]
        /// The largest norm (2).
        max_value: f32,
        #[serde(default)]
        /// The axis of the norm (0).
        axis: i32,
    },
    /// `keras.constraints.NonNeg`.
    NonNeg {},
    /// `keras.constraints.UnitNorm`.
    UnitNorm {
        #[serde(default)]
        /// The axis of the norm (0).
        axis: i32,
    },
    /// `keras.constraints.MinMaxNorm`.
    MinMaxNorm {
        #[serde(default)]
        /// The smallest norm (0).
        min_value: f32,
        #[serde(default = "onef")]
        /// The largest norm (1).
        max_value: f32,
        #[serde(default = "onef")]
        /// How far to move toward the range (1).
        rate: f32,
        #[serde(default)]
        /// The axis of the norm (0).
        axis: i32,
    },
}

fn two() -> f32 {
    2.0
}
fn onef() -> f32 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[compile]`.
pub struct CompileConfig {
    /// The optimizer.
    pub optimizer: OptimizerConfigFile,
    /// The loss.
    pub loss: LossConfig,
    #[serde(default)]
    /// `["accuracy"]` or none.
    pub metrics: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "an optimizer name such as \"adam\" or a table such as { Adam = { learning_rate = 0.001 } }"
)]
/// An optimizer: a Keras name or a table with arguments.
pub enum OptimizerConfigFile {
    /// `"adam"`, `"sgd"`, ... with Keras's defaults.
    Name(String),
    /// `{ Adam = { learning_rate = 0.001 } }`, ...
    Spec(OptimizerSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// An optimizer with arguments.
pub enum OptimizerSpec {
    /// `keras.optimizers.Adam`.
    Adam(OptimizerArgs),
    /// `keras.optimizers.AdamW`.
    AdamW(OptimizerArgs),
    /// `keras.optimizers.SGD`.
    SGD(OptimizerArgs),
    /// `keras.optimizers.RMSprop`.
    RMSprop(OptimizerArgs),
    /// `keras.optimizers.Adagrad`.
    Adagrad(OptimizerArgs),
}

/// Every optimizer argument Keras knows; `build` rejects those the chosen optimizer lacks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// A number or a schedule.
    pub learning_rate: Option<LearningRateConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Adam's first-moment decay.
    pub beta_1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Adam's second-moment decay.
    pub beta_2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Added to denominators (1e-7).
    pub epsilon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Adam's amsgrad.
    pub amsgrad: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// SGD's or RMSprop's momentum.
    pub momentum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// SGD's Nesterov momentum.
    pub nesterov: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// RMSprop's mean-square decay.
    pub rho: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// RMSprop's centered variant.
    pub centered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Adagrad's starting accumulator.
    pub initial_accumulator_value: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Decoupled weight decay (AdamW: 0.004).
    pub weight_decay: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Clip each variable's gradient norm.
    pub clipnorm: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Clip each gradient value.
    pub clipvalue: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Clip the norm of all gradients together.
    pub global_clipnorm: Option<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a number or a schedule table such as { ExponentialDecay = { initial_learning_rate = 0.1, decay_steps = 1000, decay_rate = 0.96 } }"
)]
/// A learning rate: a number or a schedule table.
pub enum LearningRateConfig {
    /// A constant rate.
    Value(f32),
    /// A schedule of the step.
    Schedule(Schedule),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a loss name such as \"sparse_categorical_crossentropy\" or a table such as { SparseCategoricalCrossentropy = { from_logits = true } }"
)]
/// A loss: a Keras name or a table with arguments.
pub enum LossConfig {
    /// `"sparse_categorical_crossentropy"`, ...
    Name(String),
    /// `{ SparseCategoricalCrossentropy = { from_logits = true } }`, ...
    Spec(LossSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A loss with arguments.
pub enum LossSpec {
    /// `keras.losses.SparseCategoricalCrossentropy`.
    SparseCategoricalCrossentropy {
        #[serde(default)]
        /// The model outputs logits.
        from_logits: bool,
    },
    /// `keras.losses.CategoricalCrossentropy`.
    CategoricalCrossentropy {
        #[serde(default)]
        /// The model outputs logits.
        from_logits: bool,
    },
    /// `keras.losses.BinaryCrossentropy`.
    BinaryCrossentropy {
        #[serde(default)]
        /// The model outputs logits.
        from_logits: bool,
    },
    /// `keras.losses.MeanSquaredError`.
    MeanSquaredError {},
    /// `keras.losses.MeanAbsoluteError`.
    MeanAbsoluteError {},
    /// `keras.losses.Huber`.
    Huber {
        #[serde(default = "onef")]
        /// Where the quadratic part ends (1).
        delta: f32,
    },
}

/// `[fit]`: Keras's `fit` arguments; every key has Keras's default (one `Default` below).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FitConfig {
    /// Samples per step (32).
    pub batch_size: usize,
    /// Epochs (1).
    pub epochs: usize,
    /// A new sample order every epoch (true).
    pub shuffle: bool,
    /// Fraction of the training samples, from the end, held out for validation (0).
    pub validation_split: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Batch size for validation (the batch size).
    pub validation_batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// dtrain: whose kernels' rounding the validation loss has: "dtrain" (the default),
    /// "tensorflow" (Keras's evaluate on TensorFlow, bit for bit; refused for a model that is
    /// not reproduced) or "auto" (TensorFlow's where the model is covered).
    pub validation_numerics: Option<String>,
    /// Epochs counted as done (0).
    pub initial_epoch: usize,
    /// dtrain: the number of shards S each batch is split into (fixed for a run; results
    /// depend on S, never on how many workers compute the shards).
    pub shards: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// dtrain: the fraction of shards a second worker computes too, to catch wrong results
    /// (a number in [0, 1], or "all"; 0.02). The coordinator's `--verify` overrides it.
    pub verify: Option<VerifyConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// dtrain: the OpenBLAS kernel the run computes with ("auto": the best this CPU runs, or
    /// "haswell", "skylakex"). The run directory's job file records the one chosen.
    pub kernel: Option<String>,
}

/// `fit.verify` as written: a fraction, or the word "all".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VerifyConfig {
    /// A fraction in [0, 1].
    Fraction(f64),
    /// "all".
    Word(String),
}

impl VerifyConfig {
    /// The fraction; `Err` says what is wrong.
    pub fn fraction(&self) -> Result<f64, String> {
        match self {
            VerifyConfig::Fraction(f) if (0.0..=1.0).contains(f) => Ok(*f),
            VerifyConfig::Word(w) if w == "all" => Ok(1.0),
            VerifyConfig::Fraction(f) => Err(format!("{f} is outside [0, 1]")),
            VerifyConfig::Word(w) => Err(format!("{w:?} is neither a fraction in [0, 1] nor \"all\"")),
        }
    }
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            batch_size: 32,
            epochs: 1,
            shuffle: true,
            validation_split: 0.0,
            validation_batch_size: None,
            validation_numerics: None,
            initial_epoch: 0,
            shards: 1,
            verify: None,
            kernel: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A callback as the job file writes it.
pub enum CallbackConfig {
    /// `keras.callbacks.EarlyStopping`.
    EarlyStopping(EarlyStoppingConfig),
    /// `keras.callbacks.ModelCheckpoint` (weights only).
    ModelCheckpoint(ModelCheckpointConfig),
    /// `keras.callbacks.ReduceLROnPlateau`.
    ReduceLROnPlateau(ReduceLrConfig),
    /// `keras.callbacks.CSVLogger`.
    CSVLogger(CsvLoggerConfig),
    /// `keras.callbacks.TerminateOnNaN` (always on).
    TerminateOnNaN {},
    /// `keras.callbacks.BackupAndRestore` (the resume state is always saved at epoch ends).
    BackupAndRestore(BackupConfig),
    /// `keras.callbacks.TensorBoard` (scalars and weight histograms).
    TensorBoard(TensorBoardConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// `TensorBoard`'s arguments.
pub struct TensorBoardConfig {
    /// The directory of the event files, inside the run directory ("logs").
    pub log_dir: String,
    /// "epoch", or also every N batches ("epoch").
    pub update_freq: SaveFreq,
    /// Weight histograms every N epochs; 0: none (0).
    pub histogram_freq: usize,
}

impl Default for TensorBoardConfig {
    fn default() -> Self {
        TensorBoardConfig { log_dir: "logs".into(), update_freq: SaveFreq::default(), histogram_freq: 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// `EarlyStopping`'s arguments.
pub struct EarlyStoppingConfig {
    /// The value watched ("val_loss").
    pub monitor: String,
    /// The least change that counts (0).
    pub min_delta: f64,
    /// Epochs without improvement before stopping (0).
    pub patience: usize,
    /// "auto", "min" or "max".
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// A value to beat.
    pub baseline: Option<f64>,
    /// End with the best epoch's weights (false).
    pub restore_best_weights: bool,
    /// Epochs before watching starts (0).
    pub start_from_epoch: usize,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        EarlyStoppingConfig {
            monitor: "val_loss".into(),
            min_delta: 0.0,
            patience: 0,
            mode: "auto".into(),
            baseline: None,
            restore_best_weights: false,
            start_from_epoch: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `ModelCheckpoint`'s arguments.
pub struct ModelCheckpointConfig {
    /// Relative to the run directory; may contain {epoch} and {val_loss:.4f}-style fields.
    pub filepath: String,
    #[serde(default = "val_loss")]
    /// The value `save_best_only` watches ("val_loss").
    pub monitor: String,
    #[serde(default)]
    /// Save only when it improves (false).
    pub save_best_only: bool,
    #[serde(default)]
    /// Accepted for Keras compatibility: dtrain saves weights only.
    pub save_weights_only: bool,
    #[serde(default = "auto")]
    /// "auto", "min" or "max".
    pub mode: String,
    #[serde(default)]
    /// "epoch" or every N batches.
    pub save_freq: SaveFreq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The value to beat first.
    pub initial_value_threshold: Option<f64>,
}

/// `"epoch"` or a number of batches (checked by `build`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "\"epoch\" or a number of batches")]
pub enum SaveFreq {
    /// `"epoch"`.
    Word(String),
    /// Every N batches.
    Batches(u64),
}

impl Default for SaveFreq {
    fn default() -> Self {
        SaveFreq::Word("epoch".into())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// `ReduceLROnPlateau`'s arguments.
pub struct ReduceLrConfig {
    /// The value watched ("val_loss").
    pub monitor: String,
    /// New rate = old rate times this (0.1).
    pub factor: f64,
    /// Epochs without improvement before reducing (10).
    pub patience: usize,
    /// "auto", "min" or "max".
    pub mode: String,
    /// The least change that counts (1e-4).
    pub min_delta: f64,
    /// Epochs to wait after a reduction (0).
    pub cooldown: usize,
    /// The lowest rate (0).
    pub min_lr: f64,
}

impl Default for ReduceLrConfig {
    fn default() -> Self {
        ReduceLrConfig {
            monitor: "val_loss".into(),
            factor: 0.1,
            patience: 10,
            mode: "auto".into(),
            min_delta: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// `CSVLogger`'s arguments.
pub struct CsvLoggerConfig {
    /// The history file ("history.csv").
    pub filename: String,
    /// Between columns (",").
    pub separator: String,
    /// Accepted; the file always holds the whole run.
    pub append: bool,
}

impl Default for CsvLoggerConfig {
    fn default() -> Self {
        CsvLoggerConfig { filename: "history.csv".into(), separator: ",".into(), append: false }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `BackupAndRestore`'s arguments.
pub struct BackupConfig {
    #[serde(default)]
    /// Also save the resume state every N batches.
    pub save_freq: SaveFreq,
}

fn val_loss() -> String {
    "val_loss".into()
}
fn auto() -> String {
    "auto".into()
}

/// A parse error as one line: `file:line:column: message`.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{}:{line}:{col}: {msg}", path.display())
        }
        None => format!("{}: {msg}", path.display()),
    }
}

/// The job file as a generic value (TOML or JSON), `Err` with the parser's message.
fn generic(path: &Path, text: &str) -> Result<serde_json::Value, String> {
    if path.extension().is_some_and(|e| e == "json") {
        return serde_json::from_str(text).map_err(|e| format!("{}:{}:{}: {e}", path.display(), e.line(), e.column()));
    }
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::to_value(table).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `.keras` archive the job's `model.keras` names, if it names one (else the job is
/// parsed as it is, with the parser's own messages).
fn keras_archive_named(path: &Path, text: &str) -> Option<String> {
    let job = generic(path, text).ok()?;
    let file = job.get("model")?.get("keras")?.as_str()?;
    file.ends_with(".keras").then(|| file.to_string())
}

impl JobConfig {
    /// Parses a TOML (or, by extension, JSON) job file; a Keras model file it names is read
    /// into its layers (so the run directory's copy of the job stands alone). A `.keras` file
    /// also gives the `[compile]` keys the job does not, and the run's initial weights.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let archive = keras_archive_named(path, &text).map(|f| dir.join(f));
        let mut config = match &archive {
            Some(a) => Self::parse_with_compile_of(path, &text, a)?,
            None => Self::parse(path, &text)?,
        };
        if let Some(file) = config.model.keras.take() {
            if !config.model.layers.is_empty() || !config.model.input_shape.is_empty() {
                return Err(format!("{}: model.keras: give a Keras model or layers, not both", path.display()));
            }
            let model_path = dir.join(&file);
            let cannot = |e: String| format!("{}: model.keras: {}: {e}", path.display(), model_path.display());
            let text = match &archive {
                Some(a) => crate::keras_archive::config(a).map_err(cannot)?,
                None => std::fs::read_to_string(&model_path).map_err(|e| cannot(format!("cannot read: {e}")))?,
            };
            config.model =
                crate::keras::model_from_json(&text).map_err(|e| format!("{}: {e}", model_path.display()))?;
            config.initial_weights = archive;
        }
        Ok(config)
    }

    /// Parses the job with the `[compile]` keys it lacks taken from the `.keras` file at
    /// `archive` (the job's own keys win).
    fn parse_with_compile_of(path: &Path, text: &str, archive: &Path) -> Result<Self, String> {
        let at = |e: String| format!("{}: model.keras: {}: {e}", path.display(), archive.display());
        let keys =
            crate::keras_archive::compile_keys(&crate::keras_archive::config(archive).map_err(at)?).map_err(at)?;
        let mut job = generic(path, text)?;
        let compile = job.as_object_mut().and_then(|j| {
            j.entry("compile").or_insert_with(|| serde_json::Value::Object(Default::default())).as_object_mut()
        });
        let compile = compile.ok_or_else(|| format!("{}: compile is not a table", path.display()))?;
        for (key, value) in keys {
            compile.entry(key).or_insert(value);
        }
        serde_json::from_value(job).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses job-file text; `path` names the file in errors (and .json selects JSON).
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        if path.extension().is_some_and(|e| e == "json") {
            return serde_json::from_str(text)
                .map_err(|e| format!("{}:{}:{}: {e}", path.display(), e.line(), e.column()));
        }
        toml::from_str(text).map_err(|e| toml_error(path, text, &e))
    }

    /// The job file with every default filled in, as written to the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# could not render the config: {e}\n"))
    }
}
