//! The optimizer from the job file: one builder per Keras optimizer, each taking only its own
//! arguments, over what every optimizer shares (learning rate or schedule, clipping, weight decay).

use super::{non_negative, positive, R};
use crate::config::{LearningRateConfig, OptimizerArgs, OptimizerConfigFile, OptimizerSpec};
use dtrain_optim::{Algorithm, Clip, LearningRate, OptimizerConfig, Schedule};

pub(super) fn optimizer(o: &OptimizerConfigFile) -> R<OptimizerConfig> {
    let spec = match o {
        OptimizerConfigFile::Name(n) => by_name(n)?,
        OptimizerConfigFile::Spec(s) => s.clone(),
    };
    match &spec {
        OptimizerSpec::Adam(a) => adam("Adam", a, None),
        OptimizerSpec::AdamW(a) => adam("AdamW", a, Some(0.004)),
        OptimizerSpec::SGD(a) => sgd(a),
        OptimizerSpec::RMSprop(a) => rmsprop(a),
        OptimizerSpec::Adagrad(a) => adagrad(a),
    }
}

/// Keras's string form (`"adam"`): the optimizer with every default.
fn by_name(name: &str) -> R<OptimizerSpec> {
    let defaults = OptimizerArgs::default();
    Ok(match name.to_ascii_lowercase().as_str() {
        "adam" => OptimizerSpec::Adam(defaults),
        "adamw" => OptimizerSpec::AdamW(defaults),
        "sgd" => OptimizerSpec::SGD(defaults),
        "rmsprop" => OptimizerSpec::RMSprop(defaults),
        "adagrad" => OptimizerSpec::Adagrad(defaults),
        _ => return Err(format!("unknown optimizer {name:?} (known: adam, adamw, sgd, rmsprop, adagrad)")),
    })
}

/// Adam and AdamW (`weight_decay` defaults to 0.004 for AdamW, to none for Adam).
fn adam(name: &str, a: &OptimizerArgs, default_weight_decay: Option<f32>) -> R<OptimizerConfig> {
    only(name, a, &["beta_1", "beta_2", "epsilon", "amsgrad"])?;
    let algorithm = Algorithm::Adam {
        beta_1: unit(name, "beta_1", a.beta_1.unwrap_or(0.9))?,
        beta_2: unit(name, "beta_2", a.beta_2.unwrap_or(0.999))?,
        epsilon: epsilon(name, a)?,
        amsgrad: a.amsgrad.unwrap_or(false),
    };
    shared(name, a, algorithm, 0.001, default_weight_decay)
}

fn sgd(a: &OptimizerArgs) -> R<OptimizerConfig> {
    only("SGD", a, &["momentum", "nesterov"])?;
    let momentum = a.momentum.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&momentum) {
        return Err(format!("SGD.momentum: {momentum} is outside [0, 1]"));
    }
    shared("SGD", a, Algorithm::Sgd { momentum, nesterov: a.nesterov.unwrap_or(false) }, 0.01, None)
}

fn rmsprop(a: &OptimizerArgs) -> R<OptimizerConfig> {
    only("RMSprop", a, &["rho", "momentum", "epsilon", "centered"])?;
    let algorithm = Algorithm::Rmsprop {
        rho: unit("RMSprop", "rho", a.rho.unwrap_or(0.9))?,
        momentum: unit("RMSprop", "momentum", a.momentum.unwrap_or(0.0))?,
        epsilon: epsilon("RMSprop", a)?,
        centered: a.centered.unwrap_or(false),
    };
    shared("RMSprop", a, algorithm, 0.001, None)
}

fn adagrad(a: &OptimizerArgs) -> R<OptimizerConfig> {
    only("Adagrad", a, &["initial_accumulator_value", "epsilon"])?;
    let init = a.initial_accumulator_value.unwrap_or(0.1);
    if !non_negative(init.into()) {
        return Err(format!("Adagrad.initial_accumulator_value: {init} must be non-negative"));
    }
    let algorithm = Algorithm::Adagrad { initial_accumulator_value: init, epsilon: epsilon("Adagrad", a)? };
    shared("Adagrad", a, algorithm, 0.001, None)
}

/// Refuses an argument that `name` does not take (beyond the shared ones).
fn only(name: &str, a: &OptimizerArgs, own: &[&str]) -> R<()> {
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
    match given.iter().find(|(k, set)| *set && !own.contains(k)) {
        Some((k, _)) => Err(format!("{name}.{k}: not an argument of {name}")),
        None => Ok(()),
    }
}

fn unit(name: &str, key: &str, v: f64) -> R<f64> {
    match (0.0..1.0).contains(&v) {
        true => Ok(v),
        false => Err(format!("{name}.{key}: {v} is outside [0, 1)")),
    }
}

fn epsilon(name: &str, a: &OptimizerArgs) -> R<f64> {
    let eps = a.epsilon.unwrap_or(1e-7);
    match positive(eps) {
        true => Ok(eps),
        false => Err(format!("{name}.epsilon: {eps} must be positive")),
    }
}

/// The arguments every optimizer takes: learning rate (or schedule), clipping, weight decay.
fn shared(
    name: &str,
    a: &OptimizerArgs,
    algorithm: Algorithm,
    default_lr: f32,
    default_weight_decay: Option<f32>,
) -> R<OptimizerConfig> {
    let learning_rate = match &a.learning_rate {
        None => LearningRate::Constant(default_lr),
        Some(LearningRateConfig::Value(v)) => {
            if !(v.is_finite() && *v >= 0.0) {
                return Err(format!("{name}.learning_rate: {v} must be a non-negative number"));
            }
            LearningRate::Constant(*v)
        }
        Some(LearningRateConfig::Schedule(s)) => {
            s.validate().map_err(|e| format!("{name}.learning_rate.{}.{e}", schedule_name(s)))?;
            LearningRate::Schedule(s.clone())
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
    let weight_decay = a.weight_decay.or(default_weight_decay);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn build(toml_value: &str) -> R<OptimizerConfig> {
        #[derive(serde::Deserialize)]
        struct T {
            o: OptimizerConfigFile,
        }
        let t: T = toml::from_str(&format!("o = {toml_value}")).unwrap();
        optimizer(&t.o)
    }

    #[test]
    fn every_name_builds_its_own_optimizer_with_keras_defaults() {
        let adagrad = build("\"adagrad\"").unwrap();
        assert_eq!(adagrad.algorithm, Algorithm::Adagrad { initial_accumulator_value: 0.1, epsilon: 1e-7 });
        assert_eq!(build("\"SGD\"").unwrap().learning_rate, LearningRate::Constant(0.01));
        assert_eq!(build("\"adamw\"").unwrap().weight_decay, Some(0.004));
        assert_eq!(build("\"adam\"").unwrap().weight_decay, None);
        assert!(matches!(build("\"rmsprop\"").unwrap().algorithm, Algorithm::Rmsprop { centered: false, .. }));
        // An unknown name is an error, never some default optimizer.
        assert!(build("\"adamax\"").unwrap_err().contains("unknown optimizer \"adamax\""));
    }

    #[test]
    fn arguments_of_another_optimizer_are_refused_by_name() {
        assert_eq!(build("{ SGD = { beta_1 = 0.9 } }").unwrap_err(), "SGD.beta_1: not an argument of SGD");
        assert_eq!(build("{ Adagrad = { rho = 0.9 } }").unwrap_err(), "Adagrad.rho: not an argument of Adagrad");
        assert!(build("{ RMSprop = { rho = 0.9, momentum = 0.5, centered = true } }").is_ok());
        assert_eq!(
            build("{ Adam = { clipnorm = 1.0, clipvalue = 1.0 } }").unwrap_err(),
            "Adam: only one of clipnorm, clipvalue and global_clipnorm can be set"
        );
    }
}
