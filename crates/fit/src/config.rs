//! The job file: Keras's argument names with Keras's defaults. Parsing rejects unknown keys;
//! `build` validates once and turns the file into the domain types the trainer runs.

use dtrain_optim::Schedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Seeds initial weights, the epoch order and dropout masks.
    #[serde(default)]
    pub seed: u64,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub compile: CompileConfig,
    #[serde(default)]
    pub fit: FitConfig,
    #[serde(default)]
    pub callbacks: Vec<CallbackConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Idx,
    Csv,
    Npy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validation {
    /// The format's test split: validation_data = (x_test, y_test).
    Test,
    #[default]
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    /// idx: the directory with train-*/t10k-* files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// csv: training and test files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
    /// csv: index of the label column (negative counts from the end).
    #[serde(default)]
    pub label_column: i64,
    /// npy: feature and label files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_x: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_y: Option<PathBuf>,
    #[serde(default = "one")]
    pub rescale: f64,
    #[serde(default)]
    pub validation: Validation,
}

fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub input_shape: Vec<usize>,
    pub layers: Vec<LayerConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum LayerConfig {
    Flatten {},
    Dense(Box<DenseConfig>),
    Dropout {
        rate: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
    },
    Activation {
        activation: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseConfig {
    pub units: usize,
    #[serde(default = "linear")]
    pub activation: String,
    #[serde(default = "yes")]
    pub use_bias: bool,
    #[serde(default = "glorot")]
    pub kernel_initializer: InitializerConfig,
    #[serde(default = "zeros")]
    pub bias_initializer: InitializerConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_regularizer: Option<RegularizerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias_regularizer: Option<RegularizerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_regularizer: Option<RegularizerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_constraint: Option<ConstraintConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
pub enum InitializerConfig {
    Name(String),
    Spec(InitializerSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum InitializerSpec {
    RandomNormal {
        #[serde(default)]
        mean: f32,
        #[serde(default = "stddev")]
        stddev: f32,
    },
    TruncatedNormal {
        #[serde(default)]
        mean: f32,
        #[serde(default = "stddev")]
        stddev: f32,
    },
    RandomUniform {
        #[serde(default = "minval")]
        minval: f32,
        #[serde(default = "stddev")]
        maxval: f32,
    },
    Constant {
        #[serde(default)]
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
pub enum RegularizerConfig {
    Name(String),
    Factors(RegularizerFactors),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegularizerFactors {
    #[serde(default)]
    pub l1: f32,
    #[serde(default)]
    pub l2: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a constraint: \"max_norm\", \"non_neg\", \"unit_norm\", \"min_max_norm\" or a table such as { MaxNorm = { max_value = 2.0 } }"
)]
pub enum ConstraintConfig {
    Name(String),
    Spec(ConstraintSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ConstraintSpec {
    MaxNorm {
        #[serde(default = "two")]
        max_value: f32,
        #[serde(default)]
        axis: i32,
    },
    NonNeg {},
    UnitNorm {
        #[serde(default)]
        axis: i32,
    },
    MinMaxNorm {
        #[serde(default)]
        min_value: f32,
        #[serde(default = "onef")]
        max_value: f32,
        #[serde(default = "onef")]
        rate: f32,
        #[serde(default)]
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
pub struct CompileConfig {
    pub optimizer: OptimizerConfigFile,
    pub loss: LossConfig,
    #[serde(default)]
    pub metrics: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "an optimizer name such as \"adam\" or a table such as { Adam = { learning_rate = 0.001 } }"
)]
pub enum OptimizerConfigFile {
    Name(String),
    Spec(OptimizerSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum OptimizerSpec {
    Adam(OptimizerArgs),
    AdamW(OptimizerArgs),
    SGD(OptimizerArgs),
    RMSprop(OptimizerArgs),
    Adagrad(OptimizerArgs),
}

/// Every optimizer argument Keras knows; `build` rejects those the chosen optimizer lacks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<LearningRateConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amsgrad: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub centered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_accumulator_value: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipnorm: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipvalue: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_clipnorm: Option<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a number or a schedule table such as { ExponentialDecay = { initial_learning_rate = 0.1, decay_steps = 1000, decay_rate = 0.96 } }"
)]
pub enum LearningRateConfig {
    Value(f32),
    Schedule(Schedule),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a loss name such as \"sparse_categorical_crossentropy\" or a table such as { SparseCategoricalCrossentropy = { from_logits = true } }"
)]
pub enum LossConfig {
    Name(String),
    Spec(LossSpec),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum LossSpec {
    SparseCategoricalCrossentropy {
        #[serde(default)]
        from_logits: bool,
    },
    CategoricalCrossentropy {
        #[serde(default)]
        from_logits: bool,
    },
    BinaryCrossentropy {
        #[serde(default)]
        from_logits: bool,
    },
    MeanSquaredError {},
    MeanAbsoluteError {},
    Huber {
        #[serde(default = "onef")]
        delta: f32,
    },
}

/// `[fit]`: Keras's `fit` arguments; every key has Keras's default (one `Default` below).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FitConfig {
    pub batch_size: usize,
    pub epochs: usize,
    pub shuffle: bool,
    pub validation_split: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_batch_size: Option<usize>,
    pub initial_epoch: usize,
    /// dtrain: the number of shards S each batch is split into (fixed for a run; results
    /// depend on S, never on how many workers compute the shards).
    pub shards: usize,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            batch_size: 32,
            epochs: 1,
            shuffle: true,
            validation_split: 0.0,
            validation_batch_size: None,
            initial_epoch: 0,
            shards: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum CallbackConfig {
    EarlyStopping(EarlyStoppingConfig),
    ModelCheckpoint(ModelCheckpointConfig),
    ReduceLROnPlateau(ReduceLrConfig),
    CSVLogger(CsvLoggerConfig),
    TerminateOnNaN {},
    BackupAndRestore(BackupConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    pub monitor: String,
    pub min_delta: f64,
    pub patience: usize,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    pub restore_best_weights: bool,
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
pub struct ModelCheckpointConfig {
    /// Relative to the run directory; may contain {epoch} and {val_loss:.4f}-style fields.
    pub filepath: String,
    #[serde(default = "val_loss")]
    pub monitor: String,
    #[serde(default)]
    pub save_best_only: bool,
    #[serde(default)]
    pub save_weights_only: bool,
    #[serde(default = "auto")]
    pub mode: String,
    #[serde(default)]
    pub save_freq: SaveFreq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_value_threshold: Option<f64>,
}

/// `"epoch"` or a number of batches (checked by `build`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "\"epoch\" or a number of batches")]
pub enum SaveFreq {
    Word(String),
    Batches(u64),
}

impl Default for SaveFreq {
    fn default() -> Self {
        SaveFreq::Word("epoch".into())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReduceLrConfig {
    pub monitor: String,
    pub factor: f64,
    pub patience: usize,
    pub mode: String,
    pub min_delta: f64,
    pub cooldown: usize,
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
pub struct CsvLoggerConfig {
    pub filename: String,
    pub separator: String,
    pub append: bool,
}

impl Default for CsvLoggerConfig {
    fn default() -> Self {
        CsvLoggerConfig { filename: "history.csv".into(), separator: ",".into(), append: false }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    #[serde(default)]
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

impl JobConfig {
    /// Parses a TOML (or, by extension, JSON) job file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(path, &text)
    }

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
