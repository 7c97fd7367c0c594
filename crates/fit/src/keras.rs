//! Keras models as dtrain's `[model]`: a Keras 3 `model.to_json()` file (a Sequential of
//! InputLayer, Flatten, Dense, Dropout and Activation, with every argument dtrain supports)
//! becomes the same layers a job file would list. Anything dtrain would not compute as Keras
//! does (another layer class, a mixed-precision policy, a seeded initializer, an argument with
//! a value it does not support) is refused, naming the layer, the argument and the value.

use crate::config::{
    ConstraintConfig, ConstraintSpec, DenseConfig, InitializerConfig, InitializerSpec, LayerConfig, ModelConfig,
    RegularizerConfig, RegularizerFactors,
};
use serde_json::Value;

type R<T> = Result<T, String>;

/// The model of a Keras `to_json()` text.
pub fn model_from_json(text: &str) -> R<ModelConfig> {
    let model: Value = serde_json::from_str(text).map_err(|e| format!("not Keras model JSON: {e}"))?;
    let class = model["class_name"].as_str().unwrap_or("?");
    if class != "Sequential" {
        return Err(format!("a {class} model is not supported (Sequential only)"));
    }
    let config = &model["config"];
    policy("the model", &config["dtype"])?;
    let layers = config["layers"].as_array().ok_or("the model has no layers list")?;
    let mut input_shape = shape(&config["build_input_shape"]);
    let mut out = vec![];
    for (i, layer) in layers.iter().enumerate() {
        let class = layer["class_name"].as_str().unwrap_or("?");
        let c = &layer["config"];
        let name = format!("layers[{i}] ({})", c["name"].as_str().unwrap_or(class));
        let at = |e: String| format!("{name}: {e}");
        if class != "InputLayer" {
            policy(&name, &c["dtype"])?;
        }
        match class {
            "InputLayer" => input_shape = shape(&c["batch_shape"]).or(input_shape),
            "Flatten" => {
                expect(c, "data_format", &["channels_last"]).map_err(at)?;
                out.push(LayerConfig::Flatten {});
            }
            "Dropout" => {
                if !c["noise_shape"].is_null() {
                    return Err(at(format!("noise_shape {} is not supported", c["noise_shape"])));
                }
                let rate = c["rate"].as_f64().ok_or_else(|| at("rate is not a number".into()))? as f32;
                out.push(LayerConfig::Dropout { rate, seed: c["seed"].as_u64() });
            }
            "Activation" => out.push(LayerConfig::Activation { activation: activation(&c["activation"]).map_err(at)? }),
            "Dense" => out.push(LayerConfig::Dense(Box::new(dense(c).map_err(at)?))),
            other => {
                return Err(format!(
                    "{name}: layer class {other} is not supported (InputLayer, Flatten, Dense, Dropout, Activation)"
                ))
            }
        }
    }
    let input_shape = input_shape.ok_or("the model does not say its input shape (build it or give it an Input)")?;
    Ok(ModelConfig { input_shape, layers: out, keras: None })
}

/// A batch shape `[null, d1, d2, ...]` without the batch dimension.
fn shape(v: &Value) -> Option<Vec<usize>> {
    let dims = v.as_array()?;
    dims.iter().skip(1).map(|d| d.as_u64().map(|d| d as usize)).collect()
}

/// Only float32 computes as dtrain does.
fn policy(what: &str, dtype: &Value) -> R<()> {
    let name = dtype["config"]["name"].as_str().or(dtype.as_str()).unwrap_or("float32");
    if name == "float32" {
        Ok(())
    } else {
        Err(format!("{what}: dtype policy {name} is not supported (float32 only)"))
    }
}

/// `key` is absent or one of `allowed`.
fn expect(c: &Value, key: &str, allowed: &[&str]) -> R<()> {
    match c.get(key).and_then(Value::as_str) {
        Some(v) if !allowed.contains(&v) => Err(format!("{key} {v:?} is not supported")),
        _ => Ok(()),
    }
}

fn activation(v: &Value) -> R<String> {
    v.as_str().map(str::to_string).ok_or_else(|| format!("activation {v} is not supported (a built-in name only)"))
}

fn dense(c: &Value) -> R<DenseConfig> {
    for unsupported in ["lora_rank", "quantization_config"] {
        if !c[unsupported].is_null() {
            return Err(format!("{unsupported} {} is not supported", c[unsupported]));
        }
    }
    Ok(DenseConfig {
        units: c["units"].as_u64().ok_or("units is not a whole number")? as usize,
        activation: activation(&c["activation"])?,
        use_bias: c["use_bias"].as_bool().unwrap_or(true),
        kernel_initializer: initializer("kernel_initializer", &c["kernel_initializer"])?,
        bias_initializer: initializer("bias_initializer", &c["bias_initializer"])?,
        kernel_regularizer: regularizer("kernel_regularizer", &c["kernel_regularizer"])?,
        bias_regularizer: regularizer("bias_regularizer", &c["bias_regularizer"])?,
        activity_regularizer: regularizer("activity_regularizer", &c["activity_regularizer"])?,
        kernel_constraint: constraint("kernel_constraint", &c["kernel_constraint"])?,
        bias_constraint: constraint("bias_constraint", &c["bias_constraint"])?,
    })
}

/// A number argument of a serialized object, as f32 (`default` when absent).
fn number(what: &str, c: &Value, key: &str, default: f32) -> R<f32> {
    match &c[key] {
        Value::Null => Ok(default),
        v => v.as_f64().map(|x| x as f32).ok_or_else(|| format!("{what}: {key} {v} is not a number")),
    }
}

fn initializer(what: &str, v: &Value) -> R<InitializerConfig> {
    let class = v["class_name"].as_str().ok_or_else(|| format!("{what} {v} is not supported"))?;
    let c = &v["config"];
    if !c["seed"].is_null() {
        return Err(format!(
            "{what}: seed {} is not supported (dtrain draws every initial weight from the job's seed)",
            c["seed"]
        ));
    }
    let named = |n: &str| Ok(InitializerConfig::Name(n.into()));
    match class {
        "GlorotUniform" => named("glorot_uniform"),
        "GlorotNormal" => named("glorot_normal"),
        "HeUniform" => named("he_uniform"),
        "HeNormal" => named("he_normal"),
        "LecunUniform" => named("lecun_uniform"),
        "LecunNormal" => named("lecun_normal"),
        "Zeros" => named("zeros"),
        "Ones" => named("ones"),
        "RandomNormal" => Ok(InitializerConfig::Spec(InitializerSpec::RandomNormal {
            mean: number(what, c, "mean", 0.0)?,
            stddev: number(what, c, "stddev", 0.05)?,
        })),
        "TruncatedNormal" => Ok(InitializerConfig::Spec(InitializerSpec::TruncatedNormal {
            mean: number(what, c, "mean", 0.0)?,
            stddev: number(what, c, "stddev", 0.05)?,
        })),
        "RandomUniform" => Ok(InitializerConfig::Spec(InitializerSpec::RandomUniform {
            minval: number(what, c, "minval", -0.05)?,
            maxval: number(what, c, "maxval", 0.05)?,
        })),
        "Constant" => Ok(InitializerConfig::Spec(InitializerSpec::Constant { value: number(what, c, "value", 0.0)? })),
        other => Err(format!("{what}: initializer {other} is not supported")),
    }
}

fn regularizer(what: &str, v: &Value) -> R<Option<RegularizerConfig>> {
    if v.is_null() {
        return Ok(None);
    }
    let c = &v["config"];
    let (l1, l2) = match v["class_name"].as_str() {
        Some("L1") => (number(what, c, "l1", 0.01)?, 0.0),
        Some("L2") => (0.0, number(what, c, "l2", 0.01)?),
        Some("L1L2") => (number(what, c, "l1", 0.0)?, number(what, c, "l2", 0.0)?),
        _ => return Err(format!("{what}: {v} is not supported (L1, L2, L1L2)")),
    };
    Ok(Some(RegularizerConfig::Factors(RegularizerFactors { l1, l2 })))
}

fn constraint(what: &str, v: &Value) -> R<Option<ConstraintConfig>> {
    if v.is_null() {
        return Ok(None);
    }
    let c = &v["config"];
    let axis = |c: &Value| match &c["axis"] {
        Value::Null => Ok(0),
        a => a.as_i64().map(|a| a as i32).ok_or_else(|| format!("{what}: axis {a} is not supported")),
    };
    let spec = match v["class_name"].as_str() {
        Some("MaxNorm") => ConstraintSpec::MaxNorm { max_value: number(what, c, "max_value", 2.0)?, axis: axis(c)? },
        Some("NonNeg") => ConstraintSpec::NonNeg {},
        Some("UnitNorm") => ConstraintSpec::UnitNorm { axis: axis(c)? },
        Some("MinMaxNorm") => ConstraintSpec::MinMaxNorm {
            min_value: number(what, c, "min_value", 0.0)?,
            max_value: number(what, c, "max_value", 1.0)?,
            rate: number(what, c, "rate", 1.0)?,
            axis: axis(c)?,
        },
        _ => return Err(format!("{what}: {v} is not supported (MaxNorm, NonNeg, UnitNorm, MinMaxNorm)")),
    };
    Ok(Some(ConstraintConfig::Spec(spec)))
}
