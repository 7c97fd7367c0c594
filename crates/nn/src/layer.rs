//! Layer specifications: what a job file describes, before parameters exist.

use crate::{Activation, Constraint, Initializer, Regularizer};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// A Dense layer with Keras's arguments.
pub struct DenseSpec {
    /// Output width.
    pub units: usize,
    /// Applied to the output.
    pub activation: Activation,
    /// Whether it has a bias.
    pub use_bias: bool,
    /// How the kernel starts.
    pub kernel_initializer: Initializer,
    /// How the bias starts.
    pub bias_initializer: Initializer,
    /// Penalty on the kernel.
    pub kernel_regularizer: Option<Regularizer>,
    /// Penalty on the bias.
    pub bias_regularizer: Option<Regularizer>,
    /// Penalty on the layer's output.
    pub activity_regularizer: Option<Regularizer>,
    /// Applied to the kernel after every update.
    pub kernel_constraint: Option<Constraint>,
    /// Applied to the bias after every update.
    pub bias_constraint: Option<Constraint>,
}

impl DenseSpec {
    /// A Dense layer with Keras's defaults.
    pub fn new(units: usize) -> Self {
        DenseSpec {
            units,
            activation: Activation::Linear,
            use_bias: true,
            kernel_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
            kernel_regularizer: None,
            bias_regularizer: None,
            activity_regularizer: None,
            kernel_constraint: None,
            bias_constraint: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// One layer of a Sequential model.
pub enum LayerSpec {
    /// Reshapes each sample to a vector.
    Flatten,
    /// A fully connected layer.
    Dense(DenseSpec),
    /// Inverted dropout; `seed` keys the masks (the job seed when absent).
    Dropout {
        /// Fraction of units dropped in training.
        rate: f32,
        /// The layer's own seed for its masks (else the job's).
        seed: Option<u64>,
    },
    /// An activation on its own.
    Activation(Activation),
}

impl LayerSpec {
    /// Keras's class name, also the stem of the layer's default name.
    pub fn class_name(&self) -> &'static str {
        match self {
            LayerSpec::Flatten => "Flatten",
            LayerSpec::Dense(_) => "Dense",
            LayerSpec::Dropout { .. } => "Dropout",
            LayerSpec::Activation(_) => "Activation",
        }
    }

    fn stem(&self) -> &'static str {
        match self {
            LayerSpec::Flatten => "flatten",
            LayerSpec::Dense(_) => "dense",
            LayerSpec::Dropout { .. } => "dropout",
            LayerSpec::Activation(_) => "activation",
        }
    }
}

/// Keras's automatic names in a fresh session: `dense`, `dense_1`, `dropout`, ...
pub fn default_names(layers: &[LayerSpec]) -> Vec<String> {
    let mut seen: Vec<(&str, usize)> = Vec::new();
    layers
        .iter()
        .map(|l| {
            let stem = l.stem();
            match seen.iter_mut().find(|(s, _)| *s == stem) {
                Some((_, n)) => {
                    *n += 1;
                    format!("{stem}_{n}")
                }
                None => {
                    seen.push((stem, 0));
                    stem.to_string()
                }
            }
        })
        .collect()
}
