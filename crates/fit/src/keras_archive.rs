//! Keras 3 `.keras` files (what `model.save()` writes): a zip of `config.json` (the model, as
//! `to_json()` has it, and its `compile_config`), `model.weights.h5` (the weights, in HDF5) and
//! `metadata.json`. The model goes through `keras::model_from_json`; the compile config becomes
//! the job's `[compile]` keys the job file does not give; the weights become the run's initial
//! weights. HDF5 is read with libhdf5 (the `hdf5` binding); every size is checked before use.

use crate::config::LearningRateConfig;
use dtrain_nn::Sequential;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

type R<T> = Result<T, String>;

/// Largest `config.json` read (a Sequential's config is a few KB per layer).
const MAX_CONFIG: u64 = 16 << 20;

/// Bytes of HDF5 structure allowed beyond the weights' own values.
const H5_SLACK: u64 = 16 << 20;

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
    let limit = (model.num_params() as u64).saturating_mul(4).saturating_add(H5_SLACK);
    let bytes = member(path, "model.weights.h5", limit)?;
    // libhdf5 reads files: the member goes to a private temporary file, removed on return.
    let mut tmp = tempfile::NamedTempFile::new().map_err(|e| format!("a temporary file: {e}"))?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(|e| format!("a temporary file: {e}"))?;
    let h5 = hdf5::File::open(tmp.path()).map_err(|e| format!("model.weights.h5 is not HDF5: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
