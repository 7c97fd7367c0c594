//! Keras's `evaluate()` and `predict()` as Keras 3.15 on TensorFlow 2.21 computes them on an
//! x86-64 CPU, to the bit. (For these models Keras's `jit_compile="auto"` resolves to false on
//! TensorFlow: its test and predict steps run TensorFlow's own CPU kernels, not XLA.)
//!
//! Every rounding step below was read off TensorFlow by probing its kernels with sums of ones
//! that hold a +2^40 and a -2^40 (the ones added before both big values meet are lost, so the
//! result tells where the two meet in the order of additions, as in FPRev), and checked on
//! random inputs and on Keras's own evaluate (the generator and its results are in
//! `crates/fit/tests/fixtures/tensorflow/`):
//!
//! - A product (oneDNN's): the inner dimension K in blocks: 384 while more than 768 remain,
//!   then what remains halved (the first half rounded up); each block one chain of FMAs from
//!   zero, the blocks' results added in order. Then the bias is added.
//! - A sum (`reduce_sum`, Eigen's): packets of 8 in four accumulators, folded in order; the
//!   whole packets left over go to the first; the values left over one by one from zero; then
//!   that plus the packet's lanes ((0+4)+(2+6)) + ((1+5)+(3+7)). Above 8192 values, the two
//!   halves (split on a packet boundary) are summed alone first. Above about 258,000 values
//!   TensorFlow splits the sum across its threads (Eigen's cost model), as here.
//! - exp: Eigen's `pexp` without FMA (TensorFlow's build) on the whole packets of 8 of each
//!   row, glibc's `expf` on the rest of the row; log: glibc's `logf`.
//! - Sparse crossentropy per sample: `log(sum exp(l - max)) - (l_label - max)`.
//! - A batch's loss: the crossentropy sum / B, each activity penalty / B (layer order), each
//!   weight penalty (variable order), added as one sum in that order.
//! - Softmax (oneDNN's, for the outputs and the accuracy): see `softmax`.
//!
//! What is not among those kernels (another activation, another loss) is refused by
//! `tensorflow_exact` and `tensorflow_exact_outputs`, naming it. Found on a 2-CPU machine with
//! AVX-512; oneDNN picks its kernels by CPU, so another CPU may round differently.

use super::{Op, Sequential};
use crate::loss::LossKind;
use crate::{Activation, NnError, Regularizer};
use ndarray::ArrayView2;
use std::ops::Range;

/// Eigen's packet of floats in TensorFlow's x86-64 build (AVX).
const PACKET: usize = 8;
/// Eigen sums more values than `PACKET * LEAF` as two halves.
const LEAF: usize = 1024;
/// oneDNN's block of the inner dimension of a product.
const K_BLOCK: usize = 384;

/// One batch of Keras's evaluate as TensorFlow computes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TfBatch {
    /// The test step's total loss: crossentropy plus every penalty, as one float.
    pub loss: f32,
    /// Samples whose prediction (first argmax) is their class.
    pub correct: u32,
}

impl Sequential {
    /// Whether `tensorflow_outputs` computes this model's outputs as TensorFlow does: hidden
    /// layers with linear or relu activations (and Dropout), a last Dense layer with softmax
    /// or linear activation. Otherwise the error names the layer.
    pub fn tensorflow_exact_outputs(&self) -> Result<(), NnError> {
        let refuse = |what: String| {
            Err(NnError::Model(format!("{what}: TensorFlow's kernels are reproduced bit for bit only for linear or relu layers and a last Dense layer with softmax or linear activation")))
        };
        let last = self.ops.len() - 1;
        for (i, op) in self.ops.iter().enumerate() {
            let name = &self.layers[self.layer_of_op(i)].name;
            match op {
                Op::Dense { activation: Activation::Softmax | Activation::Linear, .. } if i == last => {}
                Op::Dense { activation: Activation::Linear | Activation::Relu, .. } | Op::Dropout { .. }
                    if i != last => {}
                Op::Activation(Activation::Linear | Activation::Relu) if i != last => {}
                Op::Dense { activation: a, .. } | Op::Activation(a) => {
                    return refuse(format!("layer {name}: activation {}", a.name()))
                }
                Op::Dropout { .. } => return refuse(format!("layer {name}: the last layer is Dropout")),
            }
        }
        Ok(())
    }

    /// Whether `tensorflow_batch` computes this model's evaluate as TensorFlow does: outputs
    /// as `tensorflow_exact_outputs` covers, and sparse categorical crossentropy read from the
    /// logits (a softmax output, or a linear one with `from_logits`).
    pub fn tensorflow_exact(&self) -> Result<(), NnError> {
        self.tensorflow_exact_outputs()?;
        let refuse = |what: String| {
            Err(NnError::Model(format!("{what}: TensorFlow's evaluate is reproduced bit for bit only for sparse_categorical_crossentropy on a softmax output (or on a linear one with from_logits)")))
        };
        if self.loss.kind != LossKind::SparseCategoricalCrossentropy {
            return refuse(format!("loss {}", self.loss.kind.name()));
        }
        let softmax = self.last_activation() == Some(Activation::Softmax);
        if softmax == self.loss.from_logits {
            return refuse(format!(
                "a {} output with from_logits={}",
                if softmax { "softmax" } else { "linear" },
                self.loss.from_logits
            ));
        }
        Ok(())
    }

    /// The layer (index into `layers()`) that op `op` computes (Flatten has no op).
    fn layer_of_op(&self, op: usize) -> usize {
        self.layers.iter().enumerate().filter(|(_, l)| l.class_name != "Flatten").nth(op).map_or(0, |(i, _)| i)
    }

    /// The last Dense layer's pre-activation (rows of the output width) with TensorFlow's
    /// rounding; each hidden Dense layer's output goes to `activity` with its activity
    /// regularizer, if it has one.
    fn tf_logits(&self, params: &[f32], x: ArrayView2<f32>, mut activity: impl FnMut(Regularizer, &[f32])) -> Vec<f32> {
        assert_eq!(params.len(), self.num_params, "parameter buffer has the model's size");
        assert_eq!(x.ncols(), self.input_width(), "input rows have the model's input width");
        crate::flush_denormals();
        let rows = x.nrows();
        let mut cur = x.as_standard_layout().into_owned().into_raw_vec_and_offset().0;
        let mut width = self.input_width();
        let last = self.ops.len() - 1;
        for (i, op) in self.ops.iter().enumerate() {
            match op {
                Op::Dense { kernel, bias, activation, activity: reg } => {
                    let n = self.widths[i];
                    let mut z = vec![0.0; rows * n];
                    product(&cur, width, &params[self.vars[*kernel].range()], n, &mut z);
                    if let Some(b) = bias {
                        let b = &params[self.vars[*b].range()];
                        z.chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(z, b)| *z += b));
                    }
                    if i == last {
                        return z;
                    }
                    if *activation == Activation::Relu {
                        relu(&mut z);
                    }
                    if let Some(r) = reg {
                        activity(*r, &z);
                    }
                    cur = z;
                    width = n;
                }
                Op::Activation(Activation::Relu) => relu(&mut cur),
                Op::Activation(_) | Op::Dropout { .. } => {}
            }
        }
        unreachable!("tensorflow_exact_outputs: the last op is Dense")
    }

    /// The model's outputs for rows `x` as Keras's `predict` on TensorFlow computes them, bit
    /// for bit (the model must pass `tensorflow_exact_outputs`).
    pub fn tensorflow_outputs(&self, params: &[f32], x: ArrayView2<f32>) -> Vec<f32> {
        let logits = self.tf_logits(params, x, |_, _| {});
        self.tf_softmax(&logits).unwrap_or(logits)
    }

    /// The weight penalties of a test step, in variable order, as TensorFlow computes them:
    /// the same for every batch of an evaluation, so computed once for `tensorflow_batch`.
    pub fn tensorflow_weight_penalties(&self, params: &[f32], threads: usize) -> Vec<f32> {
        self.vars.iter().filter_map(|v| v.regularizer.map(|r| penalty(r, &params[v.range()], threads))).collect()
    }

    /// One batch of Keras's `evaluate` (its test step's loss and the batch's correct
    /// predictions) with TensorFlow's kernels' rounding; `threads` is TensorFlow's intra-op
    /// thread count (the Keras machine's CPUs), which decides how very long sums are split;
    /// `weight_penalties` are `tensorflow_weight_penalties` of `params`.
    /// The model must pass `tensorflow_exact`, and `classes` hold one class per row.
    pub fn tensorflow_batch(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        classes: &[u32],
        threads: usize,
        weight_penalties: &[f32],
    ) -> TfBatch {
        assert_eq!(x.nrows(), classes.len(), "one class per row");
        let batch = x.nrows() as f32;
        let mut terms = vec![0.0]; // the crossentropy's place, filled below
        let logits = self.tf_logits(params, x, |r, out| terms.push(penalty(r, out, threads) / batch));
        let width = self.output_width();
        let softmax = self.tf_softmax(&logits);
        let outputs = softmax.as_deref().unwrap_or(&logits);
        if let Some(Op::Dense { activity: Some(r), .. }) = self.ops.last() {
            terms.push(penalty(*r, outputs, threads) / batch);
        }
        terms.extend_from_slice(weight_penalties);
        let per_sample: Vec<f32> =
            logits.chunks(width).zip(classes).map(|(row, &c)| sparse_crossentropy(row, c as usize)).collect();
        terms[0] = sum(&per_sample, threads) / batch;
        let loss = if terms.len() == 1 { terms[0] } else { sum(&terms, threads) };
        let correct = outputs.chunks(width).zip(classes).filter(|(row, &c)| first_argmax(row) == c as usize).count();
        TfBatch { loss, correct: correct as u32 }
    }

    /// TensorFlow's softmax (oneDNN's) of the last layer's pre-activation, when that layer's
    /// activation is softmax; `None` for a linear last layer, whose outputs are the values.
    fn tf_softmax(&self, logits: &[f32]) -> Option<Vec<f32>> {
        (self.last_activation() == Some(Activation::Softmax)).then(|| softmax(logits, self.output_width()))
    }
}

/// The blocks of the inner dimension `k` oneDNN's product sums one by one.
fn k_blocks(k: usize) -> Vec<Range<usize>> {
    let mut sizes = vec![];
    let mut left = k;
    if left > K_BLOCK {
        while left > 2 * K_BLOCK {
            sizes.push(K_BLOCK);
            left -= K_BLOCK;
        }
        sizes.push(left.div_ceil(2));
        left /= 2;
    }
    sizes.push(left);
    let mut start = 0;
    sizes
        .into_iter()
        .map(|s| {
            start += s;
            start - s..start
        })
        .collect()
}

/// `out = x w` for `x` of rows of `k` values and `w` of `k` rows of `n`, in oneDNN's order.
fn product(x: &[f32], k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fused(x: &[f32], k: usize, w: &[f32], n: usize, out: &mut [f32]) {
            product_in_order(x, k, w, n, out)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { fused(x, k, w, n, out) };
    }
    product_in_order(x, k, w, n, out)
}

/// The product's body: `mul_add` is one rounding whatever the build; with FMA enabled it is
/// one instruction per lane.
#[inline(always)]
fn product_in_order(x: &[f32], k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let blocks = k_blocks(k);
    let mut acc = vec![0.0f32; n];
    for (xr, o) in x.chunks(k).zip(out.chunks_mut(n)) {
        for (b, block) in blocks.iter().enumerate() {
            acc.fill(0.0);
            for kk in block.clone() {
                let a = xr[kk];
                acc.iter_mut().zip(&w[kk * n..(kk + 1) * n]).for_each(|(s, &wv)| *s = a.mul_add(wv, *s));
            }
            if b == 0 {
                o.copy_from_slice(&acc);
            } else {
                o.iter_mut().zip(&acc).for_each(|(o, a)| *o += a);
            }
        }
    }
}

fn relu(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = x.max(0.0));
}

/// `tf.reduce_sum` of `v`: Eigen's full reduction, split across `threads` as its cost model
/// splits it.
pub fn sum(v: &[f32], threads: usize) -> f32 {
    let n = v.len();
    // Eigen's cost model: 4 bytes loaded at 11/64 cycles each and 1/8 of an add per value,
    // 100,000 cycles to start and per thread.
    let wanted = ((n as f64 * 0.8125 - 100_000.0) / 100_000.0 + 0.9) as usize;
    let threads = wanted.clamp(1, threads.max(1));
    if threads == 1 {
        return halves(v, 0, n);
    }
    let block = n / threads;
    let blocks = n / block;
    let mut total = if blocks * block < n { halves(v, blocks * block, n - blocks * block) } else { 0.0 };
    for i in 0..blocks {
        total += halves(v, i * block, block);
    }
    total
}

/// Eigen's `InnerMostDimReducer` with tree reduction, over `v[first..first + n]`.
fn halves(v: &[f32], first: usize, n: usize) -> f32 {
    if n <= PACKET * LEAF {
        return packets(&v[first..first + n]);
    }
    // The split falls on a packet boundary of the whole buffer.
    let split = PACKET * (first + n.div_ceil(2)).div_ceil(PACKET);
    let left = (split - first).min(n);
    let mut total = 0.0 + halves(v, first, left);
    if left < n {
        total += halves(v, split, n - left);
    }
    total
}

/// Eigen's vectorized sum of a leaf: four packet accumulators, then whole packets, then the
/// rest one by one, then the lanes.
fn packets(v: &[f32]) -> f32 {
    let n = v.len();
    let add = |acc: &mut [f32; PACKET], at: usize| acc.iter_mut().zip(&v[at..at + PACKET]).for_each(|(a, x)| *a += x);
    let mut acc = [0.0f32; PACKET];
    let mut start = 0;
    if n >= 4 * PACKET {
        let whole = n / (4 * PACKET) * 4 * PACKET;
        let mut more = [[0.0f32; PACKET]; 3];
        for j in (0..whole).step_by(4 * PACKET) {
            add(&mut acc, j);
            for (u, m) in more.iter_mut().enumerate() {
                add(m, j + (u + 1) * PACKET);
            }
        }
        for m in &more {
            acc.iter_mut().zip(m).for_each(|(a, m)| *a += m);
        }
        start = whole;
    }
    if start + PACKET <= n {
        let whole = n / PACKET * PACKET;
        for j in (start..whole).step_by(PACKET) {
            add(&mut acc, j);
        }
        start = whole;
    }
    let rest = v[start..].iter().fold(0.0f32, |s, x| s + x);
    rest + lanes(acc)
}

/// Eigen's `predux` of an AVX packet: the halves added, then (0+2) + (1+3).
fn lanes(p: [f32; PACKET]) -> f32 {
    let h = [p[0] + p[4], p[1] + p[5], p[2] + p[6], p[3] + p[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Keras's penalty on TensorFlow: `l1 * sum(|x|)` and `l2 * sum(x^2)`, each when its factor
/// is not 0, added from zero.
fn penalty(r: Regularizer, x: &[f32], threads: usize) -> f32 {
    let mut total = 0.0;
    if r.l1 != 0.0 {
        let abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        total += r.l1 * sum(&abs, threads);
    }
    if r.l2 != 0.0 {
        let squares: Vec<f32> = x.iter().map(|v| v * v).collect();
        total += r.l2 * sum(&squares, threads);
    }
    total
}

/// Eigen's `pexp` for floats, one lane, as TensorFlow's x86-64 build computes it (no FMA);
/// results below the smallest normal float are 0 (TensorFlow flushes subnormals).
#[allow(clippy::excessive_precision)] // Eigen's constants as Eigen writes them
fn eigen_exp(x: f32) -> f32 {
    if x < -104.0 {
        return 0.0;
    }
    let c = x.min(88.723);
    let m = (c * std::f32::consts::LOG2_E + 0.5).floor();
    let r = m * -0.693359375 + c;
    let r = m * 2.12194440e-4 + r;
    let r2 = r * r;
    let even = r2 * 1.37449637986719608306884765625e-3 + 4.166965186595916748046875e-2;
    let odd = r2 * 8.36894474923610687255859375e-3 + 0.16666518151760101318359375;
    let even = r2 * even + 0.49999988079071044921875;
    let y = r * odd + even;
    let y = r2 * y + (r + 1.0);
    // 2^m * y: exact in f64; a result below the normal range flushes to 0, above it is inf.
    let scaled = f64::from(y) * 2f64.powi(m as i32);
    let out = if scaled < f64::from(f32::MIN_POSITIVE) { 0.0 } else { scaled as f32 };
    out.max(x)
}

/// `exp` of a row as TensorFlow's reductions over rows evaluate it: Eigen's on whole
/// packets from the row's start, glibc's on the rest.
fn row_exp(row: &[f32], out: &mut Vec<f32>) {
    let whole = row.len() / PACKET * PACKET;
    out.clear();
    out.extend(row[..whole].iter().map(|&v| eigen_exp(v)));
    out.extend(row[whole..].iter().map(|&v| v.exp()));
}

/// TensorFlow's `SparseSoftmaxCrossEntropyWithLogits` of one row.
fn sparse_crossentropy(row: &[f32], class: usize) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let shifted: Vec<f32> = row.iter().map(|&v| v - max).collect();
    let mut exps = Vec::with_capacity(row.len());
    row_exp(&shifted, &mut exps);
    let Some(at) = shifted.get(class) else { return f32::NAN };
    packets(&exps).ln() - at
}

/// TensorFlow's `Softmax` of rows of `width` (oneDNN's, with TensorFlow's oneDNN
/// optimizations on, as by default): per row `exp(l - max)` with oneDNN's `exp`, their sum
/// over lanes of 16 (value `i` to lane `i % 16`, then the lanes folded in halves: 8, 4, 2, 1
/// apart), each value times the sum's inverse.
fn softmax(logits: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(width) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let at = out.len();
        out.extend(row.iter().map(|&v| onednn_exp(v - max)));
        let mut lanes = [0.0f32; 16];
        for (i, &e) in out[at..].iter().enumerate() {
            lanes[i % 16] += e;
        }
        for apart in [8, 4, 2, 1] {
            let before = lanes;
            for (i, l) in lanes.iter_mut().enumerate() {
                *l = before[i] + before[i ^ apart];
            }
        }
        let inverse = 1.0 / lanes[0];
        out[at..].iter_mut().for_each(|v| *v *= inverse);
    }
    out
}

/// oneDNN's `exp` (its JIT eltwise kernel): `2^n * p(r)` with `n = floor(x log2(e) + 1/2)`,
/// `r = x - n ln2` in one rounding, `p` a degree-5 polynomial by FMAs, scaled by `2^(n-1)`
/// then 2; 0 below `ln(FLT_MIN)`.
fn onednn_exp(x: f32) -> f32 {
    let (log2e, ln2) = (f32::from_bits(0x3fb8aa3b), f32::from_bits(0x3f317218));
    let (hi, lo) = (f32::from_bits(0x42b17218), f32::from_bits(0xc2aeac50));
    let p = [0x3f7ffffb, 0x3efffee3, 0x3e2aad40, 0x3d2b9d0d, 0x3c07cfce].map(f32::from_bits);
    let c = x.min(hi).max(lo);
    let n = (c * log2e + 0.5).floor();
    let r = (-n).mul_add(ln2, c);
    let scale = if x < lo { 0.0 } else { f32::from_bits((((n - 1.0) as i32 + 127) as u32) << 23) };
    let y = p.iter().rev().skip(1).chain([&1.0]).fold(p[4], |acc, &coef| acc.mul_add(r, coef));
    y * scale * 2.0
}

/// The first index of the largest value (TensorFlow's `ArgMax`).
fn first_argmax(row: &[f32]) -> usize {
    let (mut best, mut at) = (f32::NEG_INFINITY, 0);
    for (i, &v) in row.iter().enumerate() {
        if v > best {
            best = v;
            at = i;
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What TensorFlow's kernels did with probing inputs (the fixture's generate.py).
    fn probes() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fit/tests/fixtures/tensorflow/probes.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// How many values had been added when `+2^40` at `i` and `-2^40` at `j` (among ones) met
    /// in `f`'s order: the ones added to either before they meet are lost.
    fn meeting(f: impl Fn(&[f32]) -> f32, n: usize, i: usize, j: usize) -> usize {
        let mut v = vec![1.0f32; n];
        v[i] = 2f32.powi(40);
        v[j] = -2f32.powi(40);
        n - f(&v) as usize
    }

    #[test]
    fn the_inner_dimension_is_cut_as_onednn_cuts_it() {
        let blocks = probes()["product_blocks"].as_object().unwrap().clone();
        assert_eq!(blocks.len(), 7);
        for (k, sizes) in blocks {
            let k: usize = k.parse().unwrap();
            let ours: Vec<u64> = k_blocks(k).iter().map(|b| b.len() as u64).collect();
            let theirs: Vec<u64> = sizes.as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
            assert_eq!(ours, theirs, "K = {k}");
        }
    }

    #[test]
    fn a_product_chains_each_block_and_adds_the_blocks() {
        // One row of x against a column of ones: +big and -big meet within a block in order,
        // and across blocks only when the blocks are added.
        let k = 784;
        let at = |i: usize, j: usize| {
            meeting(
                |x| {
                    let mut out = [0.0];
                    product(x, k, &vec![1.0; k], 1, &mut out);
                    out[0]
                },
                k,
                i,
                j,
            )
        };
        assert_eq!([at(0, 10), at(0, 383), at(0, 384), at(384, 583), at(0, 783)], [11, 384, 584, 200, 784]);
    }

    #[test]
    fn a_sum_adds_in_eigens_order() {
        let sums = probes()["sum_meetings"].as_object().unwrap().clone();
        assert_eq!(sums.len(), 11);
        for (key, theirs) in sums {
            let [n, i, j]: [usize; 3] =
                key.split(':').map(|v| v.parse().unwrap()).collect::<Vec<_>>().try_into().unwrap();
            assert_eq!(meeting(|v| sum(v, 1), n, i, j) as u64, theirs.as_u64().unwrap(), "{key}");
        }
    }

    #[test]
    fn exp_is_tensorflows() {
        let exps = probes()["exp"].as_array().unwrap().clone();
        assert_eq!(exps.len(), 64);
        let mut row = vec![];
        for pair in exps {
            let hex = pair[0].as_str().unwrap();
            row.push((parse_hex(hex), pair[1].as_u64().unwrap() as u32));
        }
        let (xs, bits): (Vec<f32>, Vec<u32>) = row.into_iter().unzip();
        let mut ours = vec![];
        row_exp(&xs, &mut ours);
        let ours: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
        assert_eq!(ours, bits);
    }

    /// A float written as Python's `float.hex()` writes it (`-0x1.7ae148p-2`).
    fn parse_hex(s: &str) -> f32 {
        let (sign, s) = s.strip_prefix('-').map_or((1.0, s), |r| (-1.0, r));
        let s = s.strip_prefix("0x").unwrap();
        let (mantissa, exp) = s.split_once('p').unwrap();
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let mut m = f64::from(u32::from_str_radix(int, 16).unwrap());
        for (i, d) in frac.chars().enumerate() {
            m += f64::from(d.to_digit(16).unwrap()) * 16f64.powi(-(i as i32 + 1));
        }
        (sign * m * 2f64.powi(exp.parse().unwrap())) as f32
    }
}
