//! The model's layers, initializers, regularizers, constraints and loss from the job file.

use super::{at, positive, R};
use crate::config::*;
use dtrain_nn::{Activation, Constraint, DenseSpec, Initializer, LayerSpec, Loss, LossKind, Regularizer};

fn activation(name: &str) -> R<Activation> {
    Activation::from_name(name).ok_or_else(|| format!("unknown activation {name:?} (known: {})", Activation::NAMES))
}

pub(super) fn layer(l: &LayerConfig) -> R<LayerSpec> {
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
            // Keras 3's `regularizers.get`: "l1l2" is L1L2() with its defaults, no penalty at all.
            "l1l2" => Regularizer { l1: 0.0, l2: 0.0 },
            "l1_l2" => {
                return Err("\"l1_l2\" is not a Keras regularizer name (Keras 3 knows l1, l2 and l1l2, which is \
                     L1L2(l1=0, l2=0)); write { l1 = 0.01, l2 = 0.01 }"
                    .into())
            }
            other => return Err(format!("unknown regularizer {other:?} (known: l1, l2, l1l2)")),
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

pub(super) fn loss(l: &LossConfig) -> R<Loss> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regularizer_names_mean_what_keras_3_reads() {
        let named = |n: &str| regularizer(&RegularizerConfig::Name(n.into()));
        assert_eq!(named("l1"), Ok(Regularizer { l1: 0.01, l2: 0.0 }));
        assert_eq!(named("l2"), Ok(Regularizer { l1: 0.0, l2: 0.01 }));
        assert_eq!(named("l1l2"), Ok(Regularizer { l1: 0.0, l2: 0.0 }), "L1L2() defaults to no penalty");
        assert!(named("l1_l2").unwrap_err().contains("write { l1 = 0.01, l2 = 0.01 }"));
    }
}
