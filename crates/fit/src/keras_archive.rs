//! Keras 3 `.keras` files (what `model.save()` writes): a zip of `config.json` (the model, as
//! `to_json()` has it, and its `compile_config`), `model.weights.h5` (the weights, in HDF5) and
//! `metadata.json`. The model goes through `keras::model_from_json`; the compile config becomes
//! the job's `[compile]` keys the job file does not give; the weights become the run's initial
//! weights. HDF5 is read with libhdf5 (the `hdf5` binding); every size is checked before use.

use crate::config::{
    CompileConfig, ConstraintConfig, ConstraintSpec, InitializerConfig, InitializerSpec, JobConfig, LayerConfig,
    LearningRateConfig, ModelConfig, RegularizerConfig,
};
use dtrain_nn::Sequential;
use dtrain_optim::{LearningRate, Optimizer, OptimizerConfig, OptimizerState, Slots};
use serde_json::json;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

type R<T> = Result<T, String>;

/// Float32 values per parameter a weights file can need: the weights and at most three
/// optimizer buffers (Adam with amsgrad, RMSprop centered with momentum).
const VALUES_PER_PARAM: u64 = 4;

/// Largest `config.json` read (a Sequential's config is a few KB per layer).
const MAX_CONFIG: u64 = 16 << 20;

/// Bytes of HDF5 structure allowed beyond the weights' own values.
const H5_SLACK: u64 = 16 << 20;

/// The archive's `model.weights.h5`, opened with libhdf5, which reads files: the member goes to a
/// private temporary file, removed when the returned handle is dropped.
fn open_weights(path: &Path, model: &Sequential) -> R<(tempfile::NamedTempFile, hdf5::File)> {
    let values = (model.num_params() as u64).saturating_mul(VALUES_PER_PARAM);
    let limit = values.saturating_mul(4).saturating_add(H5_SLACK);
    let bytes = member(path, "model.weights.h5", limit)?;
    let mut tmp = tempfile::NamedTempFile::new().map_err(|e| format!("a temporary file: {e}"))?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(|e| format!("a temporary file: {e}"))?;
    let h5 = hdf5::File::open(tmp.path()).map_err(|e| format!("model.weights.h5 is not HDF5: {e}"))?;
    Ok((tmp, h5))
}

/// A member of the archive, at most `limit` bytes whatever its header claims.
fn member(path: &Path, name: &str, limit: u64) -> R<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a .keras file (a zip archive): {e}"))?;
    let entry = zip.by_name(name).map_err(|_| format!("has no {name} (not a .keras file?)"))?;
    if entry.size() > limit {
        return Err(format!("{name} is {} bytes, more than the {limit} this model can need", entry.size()));
    }
    let mut bytes = Vec::new();
    entry.take(limit + 1).read_to_end(&mut bytes).map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{name} holds more than the {limit} bytes this model can need"));
    }
    Ok(bytes)
}

/// The archive's `config.json`.
pub fn config(path: &Path) -> R<String> {
    String::from_utf8(member(path, "config.json", MAX_CONFIG)?).map_err(|_| "config.json is not UTF-8".into())
}

/// The `[compile]` keys of a `config.json`'s `compile_config`, as a job file writes them
/// (`optimizer`, `loss`, `metrics`); none if the model was not compiled. Anything dtrain does
/// not support is refused, naming it.
pub fn compile_keys(config_json: &str) -> R<Map<String, Value>> {
    let config: Value = serde_json::from_str(config_json).map_err(|e| format!("config.json: {e}"))?;
    let mut keys = Map::new();
    let c = &config["compile_config"];
    if c.is_null() {
        return Ok(keys);
    }
    for (key, value) in c.as_object().ok_or("compile_config is not an object")? {
        let default = match key.as_str() {
            "optimizer" => {
                keys.insert(
                    "optimizer".into(),
                    optimizer(value).map_err(|e| format!("compile_config.optimizer: {e}"))?,
                );
                continue;
            }
            "loss" => {
                let loss = value.as_str().ok_or_else(|| format!("compile_config.loss {value} is not supported"))?;
                keys.insert("loss".into(), Value::String(loss.into()));
                continue;
            }
            "metrics" => {
                keys.insert("metrics".into(), value.clone());
                continue;
            }
            "loss_weights" | "weighted_metrics" => Value::Null,
            "run_eagerly" => Value::Bool(false),
            "steps_per_execution" => Value::from(1),
            // How Keras compiles its own step: nothing to do with the numbers.
            "jit_compile" | "auto_scale_loss" => continue,
            other => return Err(format!("compile_config.{other} is not supported")),
        };
        if *value != default {
            return Err(format!("compile_config.{key} = {value} is not supported (only {default})"));
        }
    }
    Ok(keys)
}

/// `{ Adam = { learning_rate = ..., beta_1 = ... } }` from a serialized Keras optimizer.
fn optimizer(v: &Value) -> R<Value> {
    let class = v["class_name"].as_str().unwrap_or("?");
    if !["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"].contains(&class) {
        return Err(format!("{class} is not supported (Adam, AdamW, SGD, RMSprop, Adagrad)"));
    }
    let mut args = Map::new();
    for (key, value) in v["config"].as_object().ok_or("no config")? {
        let ignored_default = match key.as_str() {
            "name" => continue,
            "use_ema" => Some(Value::Bool(false)),
            "loss_scale_factor" | "gradient_accumulation_steps" | "ema_overwrite_frequency" => Some(Value::Null),
            // Meaningful only with use_ema, which must be false.
            "ema_momentum" => continue,
            _ => None,
        };
        if let Some(default) = ignored_default {
            if *value != default {
                return Err(format!("{key} = {value} is not supported (only {default})"));
            }
            continue;
        }
        if value.is_null() {
            continue; // unset: dtrain's default is Keras's
        }
        let arg = match key.as_str() {
            "learning_rate" => learning_rate(value).map_err(|e| format!("learning_rate: {e}"))?,
            _ => value.clone(),
        };
        args.insert(key.clone(), arg);
    }
    let mut spec = Map::new();
    spec.insert(class.into(), Value::Object(args));
    Ok(Value::Object(spec))
}

/// A number, or `{ ExponentialDecay = {...} }` from a serialized schedule; checked by
/// deserializing it as the job file's learning rate.
fn learning_rate(v: &Value) -> R<Value> {
    let out = match v {
        Value::Number(_) => v.clone(),
        Value::Object(o) => {
            let class = o.get("class_name").and_then(Value::as_str).unwrap_or("?");
            let mut config = o.get("config").and_then(Value::as_object).cloned().unwrap_or_default();
            config.remove("name");
            let mut spec = Map::new();
            spec.insert(class.into(), Value::Object(config));
            Value::Object(spec)
        }
        _ => return Err(format!("{v} is not a number or a schedule")),
    };
    serde_json::from_value::<LearningRateConfig>(out.clone()).map_err(|e| format!("{v}: {e}"))?;
    Ok(out)
}

/// The initial weights of `model` from the archive's `model.weights.h5`: each Dense layer's
/// `layers/<name>/vars/0` (kernel) and `vars/1` (bias), float32 in the model's shapes, finite.
pub fn weights(path: &Path, model: &Sequential) -> R<Vec<f32>> {
    let (_tmp, h5) = open_weights(path, model)?;
    read_weights(&h5, model)
}

/// `weights` and `optimizer_state` of one archive, whose weights file is opened once.
pub fn weights_and_optimizer(
    path: &Path,
    model: &Sequential,
    config: &OptimizerConfig,
) -> R<(Vec<f32>, SavedOptimizer)> {
    let (_tmp, h5) = open_weights(path, model)?;
    Ok((read_weights(&h5, model)?, read_optimizer(&h5, model, config)?))
}

fn read_weights(h5: &hdf5::File, model: &Sequential) -> R<Vec<f32>> {
    let mut params = vec![0.0; model.num_params()];
    for v in model.variables() {
        let (layer, suffix) = v.name.rsplit_once('/').unwrap_or((&v.name, ""));
        let index = if suffix == "kernel" { 0 } else { 1 };
        let at = format!("layers/{layer}/vars/{index}");
        let ds = h5.dataset(&at).map_err(|_| format!("model.weights.h5 has no {at} ({} {:?})", v.name, v.shape))?;
        if ds.shape() != v.shape {
            return Err(format!("model.weights.h5: {at} has shape {:?}, the model needs {:?}", ds.shape(), v.shape));
        }
        let dtype = ds.dtype().map_err(|e| format!("{at}: {e}"))?;
        if !dtype.is::<f32>() {
            return Err(format!("model.weights.h5: {at} is not float32"));
        }
        let values: Vec<f32> = ds.read_raw().map_err(|e| format!("{at}: {e}"))?;
        if values.len() != v.len() {
            return Err(format!("model.weights.h5: {at} holds {} values, not {}", values.len(), v.len()));
        }
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(format!("model.weights.h5: {at} value {i} is not finite"));
        }
        params[v.range()].copy_from_slice(&values);
    }
    Ok(params)
}

/// The job's model with weights `params` as a `.keras` file's bytes, which
/// `keras.saving.load_model` opens, compiled as the job compiles it: `config.json` from the
/// job's layers and `[compile]`, `model.weights.h5` in Keras's layout (`layers/<name>/vars/<i>`,
/// names counted per layer class as Keras counts them), and `metadata.json`.
///
/// With `optimizer`, its state goes in too (`optimizer/vars/<i>`, as Keras's
/// `save_own_variables` writes it), so `load_model` continues training where dtrain stopped.
pub fn keras_bytes(job: &JobConfig, model: &Sequential, params: &[f32], optimizer: Option<&Optimizer>) -> R<Vec<u8>> {
    let mut json = model_json(&job.model);
    json["compile_config"] = compile_json(&job.compile)?;
    let config_json = serde_json::to_string(&json).map_err(|e| e.to_string())?;
    let h5 = weights_h5_bytes(&job.model, model, params, optimizer)?;
    let metadata = json!({"keras_version": "3.15.1", "date_saved": "dtrain"}).to_string();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in
        [("metadata.json", metadata.as_bytes()), ("config.json", config_json.as_bytes()), ("model.weights.h5", &h5)]
    {
        zip.start_file(name, stored).map_err(|e| format!("{name}: {e}"))?;
        std::io::Write::write_all(&mut zip, bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(zip.finish().map_err(|e| e.to_string())?.into_inner())
}

/// Each layer's name in Keras's weights file: its class in snake case, counted per class
/// (`dense`, `dense_1`, ...), as Keras names the layers of a Sequential when it saves.
fn layer_names(config: &ModelConfig) -> Vec<String> {
    let mut seen: std::collections::BTreeMap<&str, usize> = Default::default();
    config
        .layers
        .iter()
        .map(|l| {
            let class = match l {
                LayerConfig::Flatten {} => "flatten",
                LayerConfig::Dense(_) => "dense",
                LayerConfig::Dropout { .. } => "dropout",
                LayerConfig::Activation { .. } => "activation",
            };
            let n = seen.entry(class).or_default();
            let name = if *n == 0 { class.to_string() } else { format!("{class}_{n}") };
            *n += 1;
            name
        })
        .collect()
}

/// A serialized Keras object.
fn object(module: &str, class: &str, config: Value) -> Value {
    json!({"module": module, "class_name": class, "config": config, "registered_name": null})
}

fn initializer_json(i: &InitializerConfig) -> Value {
    let init = |class: &str, config: Value| object("keras.initializers", class, config);
    match i {
        InitializerConfig::Name(n) => {
            let class: String = n.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
            let config = if matches!(n.as_str(), "zeros" | "ones") { json!({}) } else { json!({"seed": null}) };
            init(&class, config)
        }
        InitializerConfig::Spec(InitializerSpec::RandomNormal { mean, stddev }) => {
            init("RandomNormal", json!({"mean": mean, "stddev": stddev, "seed": null}))
        }
        InitializerConfig::Spec(InitializerSpec::TruncatedNormal { mean, stddev }) => {
            init("TruncatedNormal", json!({"mean": mean, "stddev": stddev, "seed": null}))
        }
        InitializerConfig::Spec(InitializerSpec::RandomUniform { minval, maxval }) => {
            init("RandomUniform", json!({"minval": minval, "maxval": maxval, "seed": null}))
        }
        InitializerConfig::Spec(InitializerSpec::Constant { value }) => init("Constant", json!({"value": value})),
    }
}

fn regularizer_json(r: &Option<RegularizerConfig>) -> Value {
    let reg = |class: &str, config: Value| object("keras.regularizers", class, config);
    match r {
        None => Value::Null,
        Some(RegularizerConfig::Name(n)) => match n.as_str() {
            "l1" => reg("L1", json!({"l1": 0.01f32})),
            "l2" => reg("L2", json!({"l2": 0.01f32})),
            _ => reg("L1L2", json!({"l1": 0.0, "l2": 0.0})),
        },
        Some(RegularizerConfig::Factors(f)) if f.l2 == 0.0 => reg("L1", json!({"l1": f.l1})),
        Some(RegularizerConfig::Factors(f)) if f.l1 == 0.0 => reg("L2", json!({"l2": f.l2})),
        Some(RegularizerConfig::Factors(f)) => reg("L1L2", json!({"l1": f.l1, "l2": f.l2})),
    }
}

fn constraint_json(c: &Option<ConstraintConfig>) -> Value {
    let con = |class: &str, config: Value| object("keras.constraints", class, config);
    let spec = match c {
        None => return Value::Null,
        Some(ConstraintConfig::Spec(s)) => s.clone(),
        Some(ConstraintConfig::Name(n)) => match n.as_str() {
            "max_norm" => ConstraintSpec::MaxNorm { max_value: 2.0, axis: 0 },
            "non_neg" => ConstraintSpec::NonNeg {},
            "unit_norm" => ConstraintSpec::UnitNorm { axis: 0 },
            _ => ConstraintSpec::MinMaxNorm { min_value: 0.0, max_value: 1.0, rate: 1.0, axis: 0 },
        },
    };
    match spec {
        ConstraintSpec::MaxNorm { max_value, axis } => con("MaxNorm", json!({"max_value": max_value, "axis": axis})),
        ConstraintSpec::NonNeg {} => con("NonNeg", json!({})),
        ConstraintSpec::UnitNorm { axis } => con("UnitNorm", json!({"axis": axis})),
        ConstraintSpec::MinMaxNorm { min_value, max_value, rate, axis } => {
            con("MinMaxNorm", json!({"min_value": min_value, "max_value": max_value, "rate": rate, "axis": axis}))
        }
    }
}

/// The job's layers as Keras serializes a Sequential (float32 throughout).
fn model_json(config: &ModelConfig) -> Value {
    let batch_shape: Vec<Value> =
        std::iter::once(Value::Null).chain(config.input_shape.iter().map(|&d| Value::from(d))).collect();
    let input = object(
        "keras.layers",
        "InputLayer",
        json!({"batch_shape": batch_shape, "dtype": "float32", "name": "input_layer"}),
    );
    let mut layers = vec![input];
    for (layer, name) in config.layers.iter().zip(layer_names(config)) {
        let common = json!({"name": name, "trainable": true, "dtype": "float32"});
        let mut c = common.as_object().cloned().unwrap_or_default();
        let class = match layer {
            LayerConfig::Flatten {} => {
                c.insert("data_format".into(), json!("channels_last"));
                "Flatten"
            }
            LayerConfig::Dropout { rate, seed } => {
                c.insert("rate".into(), json!(rate));
                c.insert("seed".into(), json!(seed));
                c.insert("noise_shape".into(), Value::Null);
                "Dropout"
            }
            LayerConfig::Activation { activation } => {
                c.insert("activation".into(), json!(activation));
                "Activation"
            }
            LayerConfig::Dense(d) => {
                for (k, v) in [
                    ("units", json!(d.units)),
                    ("activation", json!(d.activation)),
                    ("use_bias", json!(d.use_bias)),
                    ("kernel_initializer", initializer_json(&d.kernel_initializer)),
                    ("bias_initializer", initializer_json(&d.bias_initializer)),
                    ("kernel_regularizer", regularizer_json(&d.kernel_regularizer)),
                    ("bias_regularizer", regularizer_json(&d.bias_regularizer)),
                    ("activity_regularizer", regularizer_json(&d.activity_regularizer)),
                    ("kernel_constraint", constraint_json(&d.kernel_constraint)),
                    ("bias_constraint", constraint_json(&d.bias_constraint)),
                ] {
                    c.insert(k.into(), v);
                }
                "Dense"
            }
        };
        layers.push(object("keras.layers", class, Value::Object(c)));
    }
    let mut model = object(
        "keras",
        "Sequential",
        json!({"name": "sequential", "trainable": true, "dtype": "float32", "layers": layers,
               "build_input_shape": batch_shape}),
    );
    model["build_config"] = json!({"input_shape": batch_shape});
    model
}

/// A serialized object from a job-file table `{ Class = { args } }` (as serde writes it).
fn from_table(module: &str, table: Value) -> R<Value> {
    let Value::Object(map) = table else { return Ok(table) };
    let (class, config) = map.into_iter().next().ok_or("an empty table")?;
    Ok(object(module, &class, config))
}

/// The job's `[compile]` as Keras's `compile_config` (what `compile_keys` reads back).
fn compile_json(c: &CompileConfig) -> R<Value> {
    let optimizer = match serde_json::to_value(&c.optimizer).map_err(|e| e.to_string())? {
        Value::Object(spec) => {
            let (class, args) = spec.into_iter().next().ok_or("an empty optimizer")?;
            let mut args = args.as_object().cloned().unwrap_or_default();
            if let Some(lr) = args.get_mut("learning_rate").filter(|lr| lr.is_object()) {
                *lr = from_table("keras.optimizers.schedules", lr.take())?;
            }
            object("keras.optimizers", &class, Value::Object(args))
        }
        name => name,
    };
    let loss = from_table("keras.losses", serde_json::to_value(&c.loss).map_err(|e| e.to_string())?)?;
    // "auto", as `compile()` defaults to: each backend decides when the file is loaded (XLA on
    // JAX; TensorFlow's own kernels on a CPU-only TensorFlow, whose rounding `--numerics
    // tensorflow` reproduces). A resolved `true` would force XLA on TensorFlow.
    Ok(json!({"optimizer": optimizer, "loss": loss, "metrics": c.metrics, "loss_weights": null,
              "weighted_metrics": null, "run_eagerly": false, "steps_per_execution": 1, "jit_compile": "auto"}))
}

/// One of Keras's `optimizer.variables` (`optimizer/vars/<i>` in the weights file), with its value.
#[derive(Debug, PartialEq)]
enum OptimizerVar<'a> {
    Iteration(u64),
    LearningRate(f32),
    Slot { shape: &'a [usize], values: &'a [f32] },
}

/// Where one of Keras's `optimizer.variables` comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum VarOf {
    Iteration,
    LearningRate,
    /// Buffer `slot` (`Slots::named`) at model variable `var`.
    Slot {
        slot: &'static str,
        var: usize,
    },
}

/// `optimizer`'s variables as Keras's `optimizer.variables` lists them for `model`: the
/// iteration count; the learning rate unless it is a schedule; then the buffers, per call of
/// Keras's `add_optimizer_variables` (Adam's momentum and velocity in one call; every other
/// buffer, amsgrad's velocity_hat and RMSprop's three among them, in a call of its own), and
/// within a call per model variable, the call's buffers interleaved.
fn optimizer_layout(optimizer: &Optimizer, model: &Sequential) -> Vec<VarOf> {
    let mut out = vec![VarOf::Iteration];
    if matches!(optimizer.config().learning_rate, LearningRate::Constant(_)) {
        out.push(VarOf::LearningRate);
    }
    let slots = &optimizer.state().slots;
    let names: Vec<&'static str> = slots.named().iter().map(|(name, _)| *name).collect();
    let paired = if matches!(slots, Slots::Adam { .. }) { 2 } else { 1 };
    let (first, rest) = names.split_at(paired.min(names.len()));
    for call in std::iter::once(first).chain(rest.chunks(1)).filter(|c| !c.is_empty()) {
        for var in 0..model.variables().len() {
            out.extend(call.iter().map(|&slot| VarOf::Slot { slot, var }));
        }
    }
    out
}

/// `optimizer_layout` with the values of `optimizer`'s state.
fn optimizer_vars<'a>(optimizer: &'a Optimizer, model: &'a Sequential) -> Vec<OptimizerVar<'a>> {
    let state = optimizer.state();
    let named = state.slots.named();
    let buffer = |slot: &str| named.iter().find(|(name, _)| *name == slot).map(|(_, b)| *b).unwrap_or_default();
    optimizer_layout(optimizer, model)
        .into_iter()
        .map(|v| match v {
            VarOf::Iteration => OptimizerVar::Iteration(state.iterations),
            VarOf::LearningRate => OptimizerVar::LearningRate(optimizer.learning_rate()),
            VarOf::Slot { slot, var } => {
                let var = &model.variables()[var];
                OptimizerVar::Slot { shape: &var.shape, values: &buffer(slot)[var.range()] }
            }
        })
        .collect()
}

/// What a `.keras` file says of the optimizer's state.
#[derive(Debug, PartialEq)]
pub enum SavedOptimizer {
    /// A state this job's optimizer continues from.
    State(OptimizerState),
    /// No `optimizer/vars` group.
    Absent,
    /// A state of another shape (an optimizer that never stepped has only its iteration count
    /// and learning rate): Keras skips it, and so does dtrain.
    Unfit {
        /// Variables in the file.
        saved: usize,
        /// Variables this job's optimizer has.
        expected: usize,
    },
}

/// The optimizer state in the `.keras` file at `path`, read for an optimizer configured as
/// `config` over `model`: the iteration count (an integer scalar), the learning rate (a float32
/// scalar, when not a schedule; one that differs from the configured rate is kept as set at run
/// time, as ReduceLROnPlateau does) and each buffer, in the shapes and order Keras writes them,
/// finite.
pub fn optimizer_state(path: &Path, model: &Sequential, config: &OptimizerConfig) -> R<SavedOptimizer> {
    let (_tmp, h5) = open_weights(path, model)?;
    read_optimizer(&h5, model, config)
}

fn read_optimizer(h5: &hdf5::File, model: &Sequential, config: &OptimizerConfig) -> R<SavedOptimizer> {
    let Ok(group) = h5.group("optimizer/vars") else { return Ok(SavedOptimizer::Absent) };
    let template = Optimizer::new(config.clone(), model.num_params());
    let layout = optimizer_layout(&template, model);
    let saved = group.member_names().map_err(|e| format!("model.weights.h5: optimizer/vars: {e}"))?.len();
    if saved != layout.len() {
        return Ok(SavedOptimizer::Unfit { saved, expected: layout.len() });
    }
    let mut buffers: std::collections::BTreeMap<&str, Vec<f32>> =
        template.state().slots.named().iter().map(|(name, _)| (*name, vec![0.0; model.num_params()])).collect();
    let (mut iterations, mut learning_rate) = (0, None);
    for (i, spec) in layout.into_iter().enumerate() {
        let at = format!("model.weights.h5: optimizer/vars/{i}");
        let ds = group.dataset(&i.to_string()).map_err(|_| format!("{at} is missing"))?;
        let dtype = ds.dtype().map_err(|e| format!("{at}: {e}"))?;
        let shape = ds.shape();
        match spec {
            VarOf::Iteration => {
                let n: i64 = match (shape.is_empty(), dtype.is::<i64>(), dtype.is::<i32>()) {
                    (true, true, _) => ds.read_scalar::<i64>(),
                    (true, _, true) => ds.read_scalar::<i32>().map(i64::from),
                    _ => return Err(format!("{at} (the iteration count) is not an integer scalar")),
                }
                .map_err(|e| format!("{at}: {e}"))?;
                iterations = u64::try_from(n).map_err(|_| format!("{at}: iteration count {n} is negative"))?;
            }
            VarOf::LearningRate => {
                if !(shape.is_empty() && dtype.is::<f32>()) {
                    return Err(format!("{at} (the learning rate) is not a float32 scalar"));
                }
                let lr: f32 = ds.read_scalar().map_err(|e| format!("{at}: {e}"))?;
                if !(lr.is_finite() && lr >= 0.0) {
                    return Err(format!("{at}: learning rate {lr} is not a finite rate"));
                }
                learning_rate = Some(lr);
            }
            VarOf::Slot { slot, var } => {
                let var = &model.variables()[var];
                if shape != var.shape || !dtype.is::<f32>() {
                    return Err(format!("{at} ({} of {}) is not float32 of shape {:?}", slot, var.name, var.shape));
                }
                let values: Vec<f32> = ds.read_raw().map_err(|e| format!("{at}: {e}"))?;
                if values.len() != var.len() {
                    return Err(format!("{at} holds {} values, not {}", values.len(), var.len()));
                }
                if let Some(k) = values.iter().position(|x| !x.is_finite()) {
                    return Err(format!("{at} value {k} is not finite"));
                }
                if let Some(buffer) = buffers.get_mut(slot) {
                    buffer[var.range()].copy_from_slice(&values);
                }
            }
        }
    }
    let slots = Slots::restore(&config.algorithm, model.num_params(), |name| buffers.remove(name))
        .map_err(|e| format!("model.weights.h5: {e}"))?;
    let configured = match config.learning_rate {
        LearningRate::Constant(lr) => Some(lr.to_bits()),
        LearningRate::Schedule(_) => None,
    };
    let lr_override = learning_rate.filter(|lr| Some(lr.to_bits()) != configured);
    Ok(SavedOptimizer::State(OptimizerState { iterations, lr_override, slots }))
}

/// The weights file: every layer's `layers/<name>/vars` group, each variable a float32 dataset
/// `<i>` (kernel 0, bias 1), and the top-level `vars` group Keras writes (what
/// `model.load_weights` reads from a `.weights.h5` file).
/// With `optimizer`, its state as `optimizer/vars/<i>` (`optimizer_vars`), as Keras writes it
/// in both `.keras` and `.weights.h5` files.
pub fn weights_h5_bytes(
    config: &ModelConfig,
    model: &Sequential,
    params: &[f32],
    optimizer: Option<&Optimizer>,
) -> R<Vec<u8>> {
    let tmp = tempfile::NamedTempFile::new().map_err(|e| format!("a temporary file: {e}"))?;
    {
        let h5 = hdf5::File::create(tmp.path()).map_err(|e| format!("model.weights.h5: {e}"))?;
        let e = |e: hdf5::Error| format!("model.weights.h5: {e}");
        let layers = h5.create_group("layers").map_err(e)?;
        let mut dense = model
            .variables()
            .chunk_by(|a, b| a.name.rsplit_once('/').map(|x| x.0) == b.name.rsplit_once('/').map(|x| x.0));
        for (layer, name) in config.layers.iter().zip(layer_names(config)) {
            let vars = layers.create_group(&name).and_then(|g| g.create_group("vars")).map_err(e)?;
            if matches!(layer, LayerConfig::Dense(_)) {
                for (i, v) in dense.next().unwrap_or_default().iter().enumerate() {
                    let ds =
                        vars.new_dataset::<f32>().shape(v.shape.clone()).create(i.to_string().as_str()).map_err(e)?;
                    ds.write_raw(&params[v.range()]).map_err(e)?;
                }
            }
        }
        h5.create_group("vars").map_err(e)?;
        if let Some(optimizer) = optimizer {
            let vars = h5.create_group("optimizer").and_then(|g| g.create_group("vars")).map_err(e)?;
            for (i, var) in optimizer_vars(optimizer, model).into_iter().enumerate() {
                let name = i.to_string();
                match var {
                    // int64 as TensorFlow keeps it (JAX's int32 variable takes it on load).
                    OptimizerVar::Iteration(n) => {
                        let n = i64::try_from(n).map_err(|_| format!("{n} iterations do not fit an int64"))?;
                        vars.new_dataset::<i64>().create(name.as_str()).and_then(|d| d.write_scalar(&n))
                    }
                    OptimizerVar::LearningRate(lr) => {
                        vars.new_dataset::<f32>().create(name.as_str()).and_then(|d| d.write_scalar(&lr))
                    }
                    OptimizerVar::Slot { shape, values } => vars
                        .new_dataset::<f32>()
                        .shape(shape.to_vec())
                        .create(name.as_str())
                        .and_then(|d| d.write_raw(values)),
                }
                .map_err(e)?;
            }
        }
    }
    std::fs::read(tmp.path()).map_err(|e| format!("model.weights.h5: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keras's order (keras/src/optimizers/base_optimizer.py, `add_optimizer_variables`), as a
    /// model trained by Keras 3.15.1 lists `optimizer.variables`: Adam's momentum and velocity
    /// interleaved per model variable, amsgrad's velocity_hat after all of them; RMSprop's
    /// buffers one kind after the other; the learning rate only when it is not a schedule.
    #[test]
    fn optimizer_variables_come_in_keras_order() {
        use dtrain_nn::{Activation, DenseSpec, LayerSpec, Loss, LossKind};
        use dtrain_optim::{Algorithm, OptimizerConfig, OptimizerState, Schedule};
        let dense = |units| LayerSpec::Dense(DenseSpec { activation: Activation::Relu, ..DenseSpec::new(units) });
        let loss = Loss { kind: LossKind::MeanSquaredError, from_logits: false };
        let model = Sequential::new(&[2], &[dense(3), dense(1)], loss).unwrap();
        let n = model.num_params(); // kernel 2x3, bias 3, kernel 3x1, bias 1
        let buffer = |base: f32| (0..n).map(|i| base + i as f32).collect::<Vec<f32>>();
        let of = |algorithm, learning_rate, slots| {
            let config = OptimizerConfig { algorithm, learning_rate, weight_decay: None, clip: None };
            Optimizer::with_state(config, OptimizerState { iterations: 7, lr_override: None, slots })
        };
        // Each slot named by its buffer's first value at the variable: (base + offset, shape).
        let listed = |o: &Optimizer| -> Vec<String> {
            optimizer_vars(o, &model)
                .iter()
                .map(|v| match v {
                    OptimizerVar::Iteration(i) => format!("iteration {i}"),
                    OptimizerVar::LearningRate(lr) => format!("lr {lr}"),
                    OptimizerVar::Slot { shape, values } => format!("{} {shape:?}", values[0]),
                })
                .collect()
        };
        let adam = Algorithm::Adam { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, amsgrad: true };
        let slots = Slots::Adam { m: buffer(0.0), v: buffer(100.0), v_hat: Some(buffer(200.0)) };
        let o = of(adam, LearningRate::Constant(0.5), slots);
        assert_eq!(
            listed(&o),
            [
                "iteration 7",
                "lr 0.5",
                "0 [2, 3]",
                "100 [2, 3]",
                "6 [3]",
                "106 [3]",
                "9 [3, 1]",
                "109 [3, 1]",
                "12 [1]",
                "112 [1]",
                "200 [2, 3]",
                "206 [3]",
                "209 [3, 1]",
                "212 [1]",
            ]
        );
        let rmsprop = Algorithm::Rmsprop { rho: 0.9, momentum: 0.5, epsilon: 1e-7, centered: true };
        let slots = Slots::Rmsprop {
            velocity: buffer(0.0),
            momentum: Some(buffer(100.0)),
            average_gradient: Some(buffer(200.0)),
        };
        let schedule = Schedule::ExponentialDecay {
            initial_learning_rate: 0.1,
            decay_steps: 10,
            decay_rate: 0.9,
            staircase: false,
        };
        let o = of(rmsprop, LearningRate::Schedule(schedule), slots);
        assert_eq!(
            listed(&o),
            [
                "iteration 7",
                "0 [2, 3]",
                "6 [3]",
                "9 [3, 1]",
                "12 [1]",
                "100 [2, 3]",
                "106 [3]",
                "109 [3, 1]",
                "112 [1]",
                "200 [2, 3]",
                "206 [3]",
                "209 [3, 1]",
                "212 [1]",
            ]
        );
        let plain_sgd = of(
            Algorithm::Sgd { momentum: 0.0, nesterov: false },
            LearningRate::Constant(0.01),
            Slots::Sgd { momentum: None },
        );
        assert_eq!(listed(&plain_sgd), ["iteration 7", "lr 0.01"]);
    }

    #[test]
    fn a_compile_config_becomes_the_jobs_compile_keys() {
        let c = r#"{"compile_config": {
            "optimizer": {"module": "keras.optimizers", "class_name": "Adam", "config": {"name": "adam",
                "learning_rate": {"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.001,
                    "decay_steps": 100, "decay_rate": 0.9, "staircase": false, "name": "ExponentialDecay"}},
                "weight_decay": null, "clipnorm": null, "use_ema": false, "ema_momentum": 0.99,
                "loss_scale_factor": null, "beta_1": 0.9, "amsgrad": false}},
            "loss": "sparse_categorical_crossentropy", "loss_weights": null, "metrics": ["accuracy"],
            "weighted_metrics": null, "run_eagerly": false, "steps_per_execution": 1, "jit_compile": true}}"#;
        let keys = compile_keys(c).unwrap();
        assert_eq!(keys["loss"], "sparse_categorical_crossentropy");
        assert_eq!(keys["metrics"], serde_json::json!(["accuracy"]));
        let adam = &keys["optimizer"]["Adam"];
        assert_eq!(adam["beta_1"], 0.9);
        assert_eq!(adam["learning_rate"]["ExponentialDecay"]["decay_steps"], 100);
        assert!(adam.get("weight_decay").is_none() && adam.get("name").is_none());
        assert!(compile_keys("{}").unwrap().is_empty(), "not compiled");
        let refuse = |from: &str, to: &str| compile_keys(&c.replace(from, to)).unwrap_err();
        assert!(refuse("\"Adam\"", "\"Nadam\"").contains("Nadam is not supported"));
        assert!(refuse("\"use_ema\": false", "\"use_ema\": true").contains("use_ema = true"));
        assert!(refuse("\"steps_per_execution\": 1", "\"steps_per_execution\": 4").contains("steps_per_execution"));
        assert!(refuse("\"ExponentialDecay\", \"config\"", "\"Mystery\", \"config\"").contains("learning_rate"));
    }

    /// A written `.keras` leaves XLA to each backend, as `compile()` does by default: on a
    /// CPU-only TensorFlow Keras then runs its own kernels (measured: with `true` the wide
    /// job's predictions went through XLA there and 9.7% of them matched `--numerics tensorflow`).
    #[test]
    fn a_written_compile_config_leaves_jit_compile_to_the_backend() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fashion_mnist.toml");
        let job = JobConfig::load(&path).unwrap();
        assert_eq!(compile_json(&job.compile).unwrap()["jit_compile"], "auto");
    }
}
