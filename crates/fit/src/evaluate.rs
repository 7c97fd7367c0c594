//! Keras's evaluate and predict: batches with dropout off, batch-size-weighted loss.

use crate::engine::{gather_rows, ShardBuffers};
use crate::logs::Mean;
use dtrain_data::{Dataset, Labels};
use dtrain_nn::{NnError, Sequential};
use ndarray::Array2;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
/// Keras's `evaluate`: loss with every regularization term, and accuracy.
pub struct Evaluation {
    /// Crossentropy (or other loss) + activity penalties / batch + weight penalties.
    pub loss: f32,
    /// Fraction of samples predicted right.
    pub accuracy: f32,
}

/// Whose kernels' rounding an evaluation or a prediction reproduces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// dtrain's own: OpenBLAS's products, the loss summed in f64 (within float rounding of Keras).
    #[default]
    Dtrain,
    /// TensorFlow's CPU kernels, as Keras's evaluate and predict on TensorFlow compute, bit for
    /// bit; a model they are not reproduced for is refused.
    TensorFlow,
    /// TensorFlow's where the model is one they are reproduced for, else dtrain's.
    PreferTensorFlow,
}

impl Numerics {
    /// `dtrain`, `tensorflow` or `auto` (TensorFlow's where covered).
    pub fn parse(s: &str) -> Result<Numerics, String> {
        match s {
            "dtrain" => Ok(Numerics::Dtrain),
            "tensorflow" => Ok(Numerics::TensorFlow),
            "auto" => Ok(Numerics::PreferTensorFlow),
            other => Err(format!("{other:?} is not one of dtrain, tensorflow, auto")),
        }
    }

    /// Whether TensorFlow's kernels compute for `model` (its evaluate, or only its outputs):
    /// `Ok(false)` means dtrain's, with why when TensorFlow's were preferred but do not cover
    /// it; an error when they were required.
    pub fn tensorflow_for(self, model: &Sequential, outputs_only: bool) -> Result<(bool, Option<String>), NnError> {
        let covered = if outputs_only { model.tensorflow_exact_outputs() } else { model.tensorflow_exact() };
        match (self, covered) {
            (Numerics::Dtrain, _) => Ok((false, None)),
            (_, Ok(())) => Ok((true, None)),
            (Numerics::TensorFlow, Err(e)) => Err(e),
            (Numerics::PreferTensorFlow, Err(e)) => Ok((false, Some(e.to_string()))),
        }
    }
}

/// TensorFlow's intra-op thread count on this machine (its CPUs), for `evaluate_as_tensorflow`.
pub fn tensorflow_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Evaluates `data` in batches of `batch_size` as Keras's `evaluate` does; batches run in
/// parallel but are combined in order, so the result does not depend on the thread count.
pub fn evaluate(model: &Sequential, params: &[f32], data: &Dataset, batch_size: usize) -> Evaluation {
    let n = data.len();
    let idx: Vec<u32> = (0..n as u32).collect();
    let penalty = model.weight_penalty(params);
    let per_batch: Vec<(f32, f32, f32)> = idx
        .par_chunks(batch_size)
        .map_init(ShardBuffers::default, |buf, rows| {
            let s = buf.evaluate(model, data, params, rows);
            let b = rows.len() as f64;
            let loss = (s.loss_sum / b + s.activity / b + penalty) as f32;
            (loss, s.correct as f32, rows.len() as f32)
        })
        .collect();
    let (mut loss, mut acc) = (Mean::default(), Mean::default());
    for (l, c, b) in per_batch {
        loss.add(l, b);
        acc.add_sum(c, b);
    }
    Evaluation { loss: loss.result(), accuracy: acc.result() }
}

/// Keras's `evaluate` as Keras on TensorFlow computes it, bit for bit (TensorFlow's CPU
/// kernels' order of rounding, see `dtrain_nn`'s `model::tensorflow`); `threads` is the Keras
/// machine's CPU count (TensorFlow splits sums of over 258,000 values across them). The
/// model must be one it covers (`Sequential::tensorflow_exact`), with class labels.
pub fn evaluate_as_tensorflow(
    model: &Sequential,
    params: &[f32],
    data: &Dataset,
    batch_size: usize,
    threads: usize,
) -> Result<Evaluation, NnError> {
    model.tensorflow_exact()?;
    let Labels::Classes(classes) = &data.labels else {
        return Err(NnError::Model("TensorFlow's evaluate is reproduced for class labels only".into()));
    };
    let idx: Vec<u32> = (0..data.len() as u32).collect();
    let weight_penalties = model.tensorflow_weight_penalties(params, threads);
    let per_batch: Vec<(f32, u32, usize)> = idx
        .par_chunks(batch_size)
        .map_init(Vec::new, |buf, rows| {
            let x = gather_rows(data, rows, buf);
            let c: Vec<u32> = rows.iter().map(|&i| classes[i as usize]).collect();
            let b = model.tensorflow_batch(params, x, &c, threads, &weight_penalties);
            (b.loss, b.correct, rows.len())
        })
        .collect();
    let (mut loss, mut acc) = (Mean::default(), Mean::default());
    for (l, c, b) in per_batch {
        loss.add(l, b as f32);
        acc.add_sum(c as f32, b as f32);
    }
    Ok(Evaluation { loss: loss.result(), accuracy: acc.result() })
}

/// Model outputs for every sample of `data` as Keras's `predict` on TensorFlow computes them,
/// bit for bit (see `evaluate_as_tensorflow`); the model must be one it covers
/// (`Sequential::tensorflow_exact_outputs`).
pub fn predict_as_tensorflow(
    model: &Sequential,
    params: &[f32],
    data: &Dataset,
    batch_size: usize,
) -> Result<Array2<f32>, NnError> {
    model.tensorflow_exact_outputs()?;
    let k = model.output_width();
    let idx: Vec<u32> = (0..data.len() as u32).collect();
    let parts: Vec<Vec<f32>> = idx
        .par_chunks(batch_size)
        .map_init(Vec::new, |buf, rows| model.tensorflow_outputs(params, gather_rows(data, rows, buf)))
        .collect();
    Ok(Array2::from_shape_vec((data.len(), k), parts.concat()).expect("one output row per sample"))
}

/// Model outputs for every sample of `data`, one row each.
pub fn predict(model: &Sequential, params: &[f32], data: &Dataset, batch_size: usize) -> Array2<f32> {
    let k = model.output_width();
    let idx: Vec<u32> = (0..data.len() as u32).collect();
    let parts: Vec<Array2<f32>> = idx
        .par_chunks(batch_size)
        .map_init(ShardBuffers::default, |buf, rows| {
            let mut o = Array2::zeros((rows.len(), k));
            buf.predict(model, data, params, rows, o.view_mut());
            o
        })
        .collect();
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(ndarray::Axis(0), &views).unwrap_or_else(|_| Array2::zeros((0, k)))
}
