//! A Sequential model: parameters in one flat buffer, forward and backward on one shard.

use crate::layer::{default_names, LayerSpec};
use crate::loss::{is_correct, Loss, Target};
use crate::rng::{dropout_uniforms, Stream};
use crate::{Activation, Constraint, Initializer, NnError, PenaltySums, Regularizer};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use std::ops::Range;

mod tensorflow;
pub use tensorflow::TfBatch;

/// One trainable variable: a named slice of the flat parameter buffer (Keras layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Variable {
    /// `<layer name>/kernel` or `<layer name>/bias`.
    pub name: String,
    /// Keras's shape of it (`[inputs, units]` for a kernel).
    pub shape: Vec<usize>,
    /// Where it starts in the flat parameter buffer.
    pub offset: usize,
    /// Its weight penalty, if any.
    pub regularizer: Option<Regularizer>,
    /// Its constraint, if any.
    pub constraint: Option<Constraint>,
    initializer: Initializer,
    fans: (usize, usize),
}

impl Variable {
    /// Its number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its values' range in the flat parameter buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// What the layer computes at run time (Flatten is only a change of shape).
#[derive(Clone, Debug)]
enum Op {
    Dense { kernel: usize, bias: Option<usize>, activation: Activation, activity: Option<Regularizer> },
    Dropout { rate: f32, seed: Option<u64>, layer: u32 },
    Activation(Activation),
}

/// A row of the model summary.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    /// Keras's layer name (`dense`, `dense_1`, ...).
    pub name: String,
    /// Keras's class name (`Dense`, `Dropout`, ...).
    pub class_name: &'static str,
    /// Output shape without the batch dimension.
    pub output_shape: Vec<usize>,
    /// Its parameter count.
    pub params: usize,
}

#[derive(Clone, Debug)]
/// A Keras Sequential model: its layers as ops over one flat parameter buffer, and its loss.
pub struct Sequential {
    input_shape: Vec<usize>,
    layers: Vec<LayerInfo>,
    vars: Vec<Variable>,
    ops: Vec<Op>,
    /// Width of each op's output.
    widths: Vec<usize>,
    loss: Loss,
    num_params: usize,
    /// Ops before the first one with parameters need no backward pass.
    first_param_op: usize,
}

/// How a forward pass runs.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Dropout on, its masks keyed by (seed, layer, step, position in the global batch); the
    /// shard's rows start at `first_position` of a global batch of `global_batch` samples.
    Train {
        /// The job's seed (a Dropout layer's own seed takes precedence).
        seed: u64,
        /// The optimizer step.
        step: u64,
        /// The shard's first row's position in the global batch.
        first_position: u32,
        /// The global batch's size.
        global_batch: u32,
    },
    /// Dropout off.
    Infer,
}

/// Targets of the rows of a shard.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class indices.
    Classes(&'a [u32]),
    /// Rows of target values.
    Values(ArrayView2<'a, f32>),
}

impl Targets<'_> {
    /// Row `i`'s target.
    pub fn row(&self, i: usize) -> Target<'_> {
        match self {
            Targets::Classes(c) => Target::Class(c[i]),
            Targets::Values(v) => Target::Values(v.row(i).to_slice().expect("target rows are contiguous")),
        }
    }
}

/// Sums over the rows of one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardStats {
    /// Sum of the per-sample losses.
    pub loss_sum: f64,
    /// Sum of the activity penalties, not yet divided by the batch size.
    pub activity: f64,
    /// Samples whose prediction was right (accuracy's numerator).
    pub correct: u64,
    /// Samples.
    pub rows: u64,
}

impl ShardStats {
    /// Adds another shard's sums.
    pub fn add(&mut self, o: &ShardStats) {
        self.loss_sum += o.loss_sum;
        self.activity += o.activity;
        self.correct += o.correct;
        self.rows += o.rows;
    }
}

/// One shard for `Sequential::gradients_streamed`: its rows, their targets, where they sit in
/// the step (`mode`), its workspace, and the buffer its gradient goes into.
pub struct ShardPass<'x, 't, 'w, 'g> {
    /// The rows.
    pub x: ArrayView2<'x, f32>,
    /// Their targets.
    pub targets: Targets<'t>,
    /// Training (where the rows sit in the global batch) or inference.
    pub mode: Mode,
    /// Its own workspace.
    pub ws: &'w mut Workspace,
    /// The model's size.
    pub grads: &'g mut [f32],
}

/// One shard's backward pass under way: its rows, its forward pass's buffers, the part of its
/// gradient not yet final, a dropout mask not yet applied to the gradient (the op below applies
/// it, a Dense in the same pass as its own element-wise work), and its loss scale.
struct Backward<'x, 'w, 'g> {
    x: ndarray::CowArray<'x, f32, ndarray::Ix2>,
    ws: &'w mut Workspace,
    grads: &'g mut [f32],
    pending_mask: Option<usize>,
    scale: f32,
}

/// Reusable buffers for one shard's passes; they are resized only when the row count changes.
#[derive(Debug, Default)]
pub struct Workspace {
    /// Dense: pre-activation; Dropout: the scaled keep mask.
    z: Vec<Array2<f32>>,
    out: Vec<Array2<f32>>,
    grad: Vec<Array2<f32>>,
    /// Whether the last forward pass applied op i's dropout mask (so backward must too).
    masked: Vec<bool>,
    /// One block of scratch, for the activity penalty's gradient through a logits-path output.
    scratch: Vec<f32>,
}

fn ensure(buf: &mut Array2<f32>, rows: usize, cols: usize) {
    if buf.dim() != (rows, cols) {
        *buf = Array2::zeros((rows, cols));
    }
}

/// A workspace buffer's values.
fn flat(a: &Array2<f32>) -> &[f32] {
    a.as_slice().expect("workspace buffers are contiguous")
}

/// A workspace buffer's values, to write.
fn flat_mut(a: &mut Array2<f32>) -> &mut [f32] {
    a.as_slice_mut().expect("workspace buffers are contiguous")
}

/// Values per block of whole rows of `width` that element-wise passes work through at once:
/// about 8 KiB per buffer, so the three or four buffers a pass touches stay in L1.
fn block_len(width: usize) -> usize {
    const BLOCK: usize = 2048;
    (BLOCK / width.max(1)).max(1) * width.max(1)
}

/// `g *= mask`, if there is one.
fn apply_mask(g: &mut Array2<f32>, mask: Option<&Array2<f32>>) {
    if let Some(m) = mask {
        crate::simd::mul_into(flat_mut(g), flat(m));
    }
}

/// What a Dense layer's backward pass reads and writes.
struct DenseBlocks<'a> {
    z: &'a Array2<f32>,
    out: &'a Array2<f32>,
    /// The scaled keep mask of a dropout right above, not yet applied to `g`.
    mask: Option<&'a Array2<f32>>,
    /// `dL/d(out)` in (or `dL/dz` already, on the logits path); `dL/dz` out.
    g: &'a mut Array2<f32>,
}

/// A Dense layer's element-wise backward work in one pass, a block of rows at a time: the
/// dropout mask above it, the activity penalty's gradient, the activation's derivative, and
/// the bias gradient (`gb`, zeroed by the caller, summed in row order). Each value goes
/// through the operations of separate passes in the same order, so the bits are the same.
fn dense_backward(
    buffers: DenseBlocks,
    activation: Activation,
    activity: Option<(Regularizer, f32)>,
    g_is_dz: bool,
    mut gb: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
) {
    let width = buffers.g.ncols();
    let block = block_len(width);
    let (z, out) = (flat(buffers.z).chunks(block), flat(buffers.out).chunks(block));
    let mut masks = buffers.mask.map(|m| flat(m).chunks(block));
    for ((g, z), out) in flat_mut(buffers.g).chunks_mut(block).zip(z).zip(out) {
        if let Some(m) = masks.as_mut().and_then(Iterator::next) {
            crate::simd::mul_into(g, m);
        }
        match activity {
            // dL/dz arrives from the loss; the penalty's term goes through the activation.
            Some((reg, scale)) if g_is_dz => {
                scratch.clear();
                scratch.resize(g.len(), 0.0);
                reg.add_grad(out, scale, scratch);
                activation.backward(z, out, scratch, width);
                crate::simd::add_into(g, scratch);
            }
            Some((reg, scale)) => reg.add_grad(out, scale, g),
            None => {}
        }
        if !g_is_dz {
            activation.backward(z, out, g, width);
        }
        if let Some(gb) = gb.as_deref_mut() {
            crate::simd::add_rows_to(gb, g);
        }
    }
}

/// The widest sample or layer dtrain builds (16M values): sizes come from files, and an
/// absurd one must be an error, not an abort when the buffers are allocated.
pub const MAX_WIDTH: usize = 1 << 24;

/// The most parameters a model may have (2^31: 8 GiB of f32 for the weights alone).
pub const MAX_PARAMS: usize = 1 << 31;

impl Sequential {
    /// The model for `specs` on samples of `input_shape`, with its variables named as Keras names them.
    pub fn new(input_shape: &[usize], specs: &[LayerSpec], loss: Loss) -> Result<Self, NnError> {
        if input_shape.is_empty() || input_shape.contains(&0) {
            return Err(NnError::Model(format!("input_shape {input_shape:?} must be non-empty with no zero")));
        }
        let width = input_shape.iter().try_fold(1usize, |w, &d| w.checked_mul(d));
        if width.is_none_or(|w| w > MAX_WIDTH) {
            return Err(NnError::Model(format!(
                "input_shape {input_shape:?} has more than {MAX_WIDTH} values per sample"
            )));
        }
        let names = default_names(specs);
        let mut shape = input_shape.to_vec();
        let (mut vars, mut ops, mut widths, mut layers) = (vec![], vec![], vec![], vec![]);
        let mut offset = 0usize;
        let mut first_param_op = None;
        for (idx, (spec, name)) in specs.iter().zip(&names).enumerate() {
            let mut params = 0;
            match spec {
                LayerSpec::Flatten => shape = vec![shape.iter().product()],
                LayerSpec::Dense(d) => {
                    let [inputs] = shape[..] else {
                        return Err(NnError::Model(format!(
                            "layer {idx} ({name}): Dense needs flat input but gets shape {shape:?}; add a Flatten layer before it"
                        )));
                    };
                    if d.units == 0 || d.units > MAX_WIDTH {
                        return Err(NnError::Model(format!(
                            "layer {idx} ({name}): units {} is outside 1..={MAX_WIDTH}",
                            d.units
                        )));
                    }
                    // Both factors are at most 2^24, so the product fits; the sum is checked.
                    let layer_params = inputs * d.units + if d.use_bias { d.units } else { 0 };
                    if offset.checked_add(layer_params).is_none_or(|total| total > MAX_PARAMS) {
                        return Err(NnError::Model(format!(
                            "layer {idx} ({name}): the model would have more than {MAX_PARAMS} parameters"
                        )));
                    }
                    let mut add = |suffix: &str, shape: Vec<usize>, init, reg, con| {
                        vars.push(Variable {
                            name: format!("{name}/{suffix}"),
                            shape,
                            offset,
                            regularizer: reg,
                            constraint: con,
                            initializer: init,
                            fans: (inputs, d.units),
                        });
                        offset += vars.last().map_or(0, Variable::len);
                        vars.len() - 1
                    };
                    let kernel = add(
                        "kernel",
                        vec![inputs, d.units],
                        d.kernel_initializer,
                        d.kernel_regularizer,
                        d.kernel_constraint,
                    );
                    let bias = d
                        .use_bias
                        .then(|| add("bias", vec![d.units], d.bias_initializer, d.bias_regularizer, d.bias_constraint));
                    params = inputs * d.units + if d.use_bias { d.units } else { 0 };
                    first_param_op.get_or_insert(ops.len());
                    ops.push(Op::Dense { kernel, bias, activation: d.activation, activity: d.activity_regularizer });
                    shape = vec![d.units];
                }
                LayerSpec::Dropout { rate, seed } => {
                    if !(0.0..1.0).contains(rate) {
                        return Err(NnError::Model(format!("layer {idx} ({name}): rate {rate} is outside [0, 1)")));
                    }
                    ops.push(Op::Dropout { rate: *rate, seed: *seed, layer: idx as u32 });
                }
                LayerSpec::Activation(a) => ops.push(Op::Activation(*a)),
            }
            if !matches!(spec, LayerSpec::Flatten) {
                if shape.len() != 1 {
                    return Err(NnError::Model(format!(
                        "layer {idx} ({name}): gets shape {shape:?}; add a Flatten layer first"
                    )));
                }
                widths.push(shape[0]);
            }
            layers.push(LayerInfo {
                name: name.clone(),
                class_name: spec.class_name(),
                output_shape: shape.clone(),
                params,
            });
        }
        let Some(first_param_op) = first_param_op else {
            return Err(NnError::Model("the model has no Dense layer, so nothing to train".into()));
        };
        Ok(Sequential {
            input_shape: input_shape.to_vec(),
            layers,
            vars,
            ops,
            widths,
            loss,
            num_params: offset,
            first_param_op,
        })
    }

    /// A sample's shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// A sample's number of features.
    pub fn input_width(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// The last layer's width.
    pub fn output_width(&self) -> usize {
        *self.widths.last().expect("a model has at least one op")
    }

    /// The layers, for the summary.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The trainable variables, in Keras's order (kernel, bias per layer).
    pub fn variables(&self) -> &[Variable] {
        &self.vars
    }

    /// The total number of parameters.
    pub fn num_params(&self) -> usize {
        self.num_params
    }

    /// The loss.
    pub fn loss(&self) -> Loss {
        self.loss
    }

    /// Initial parameters: each variable from its initializer and its own random stream.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut p = vec![0.0; self.num_params];
        for (i, v) in self.vars.iter().enumerate() {
            let mut rng = Stream::new(seed, 0x1_0000 + i as u64);
            v.initializer.fill(&mut p[v.range()], v.fans.0, v.fans.1, &mut rng);
        }
        p
    }

    fn matrix<'a>(&self, params: &'a [f32], var: usize) -> ArrayView2<'a, f32> {
        let v = &self.vars[var];
        ArrayView2::from_shape((v.shape[0], v.shape[1]), &params[v.range()]).expect("kernel shape matches its slice")
    }

    /// Runs the model on `x` (rows of flattened inputs); returns the activity penalties
    /// summed over the rows (not divided by the batch size).
    pub fn forward(&self, params: &[f32], x: ArrayView2<f32>, mode: Mode, ws: &mut Workspace) -> f64 {
        assert_eq!(params.len(), self.num_params, "parameter buffer has the model's size");
        assert_eq!(x.ncols(), self.input_width(), "input rows have the model's input width");
        crate::flush_denormals();
        let x = x.as_standard_layout();
        let n = x.nrows();
        let k = self.ops.len();
        for buf in [&mut ws.z, &mut ws.out, &mut ws.grad] {
            buf.resize_with(k, || Array2::zeros((0, 0)));
        }
        ws.masked.clear();
        ws.masked.resize(k, false);
        let mut activity = 0.0;
        for (i, op) in self.ops.iter().enumerate() {
            let (before, after) = ws.out.split_at_mut(i);
            let input = if i == 0 { x.view() } else { before[i - 1].view() };
            let out = &mut after[0];
            ensure(out, n, self.widths[i]);
            // After the product, each op's element-wise work is one pass over its output, a
            // block of rows at a time while the block is in cache.
            let width = self.widths[i];
            let block = block_len(width);
            match op {
                Op::Dense { kernel, bias, activation, activity: act_reg } => {
                    let z = &mut ws.z[i];
                    ensure(z, n, width);
                    general_mat_mul(1.0, &input, &self.matrix(params, *kernel), 0.0, z);
                    let bias = bias.map(|b| &params[self.vars[b].range()]);
                    let mut sums = PenaltySums::default();
                    for (z, out) in flat_mut(z).chunks_mut(block).zip(flat_mut(out).chunks_mut(block)) {
                        if let Some(b) = bias {
                            crate::simd::add_to_rows(z, b);
                        }
                        activation.forward(z, out, width);
                        if let Some(r) = act_reg {
                            sums.add(*r, out);
                        }
                    }
                    activity += act_reg.map_or(0.0, |r| sums.penalty(r));
                }
                Op::Dropout { rate, seed, layer } => match mode {
                    Mode::Train { seed: job_seed, step, first_position, .. } if *rate > 0.0 => {
                        let mask = &mut ws.z[i];
                        ensure(mask, n, width);
                        let scale = 1.0 / (1.0 - rate);
                        let rows = flat_mut(mask).chunks_mut(width).zip(flat_mut(out).chunks_mut(width));
                        let input = input.to_slice().expect("rows are contiguous").chunks(width);
                        for (r, ((mask, out), input)) in rows.zip(input).enumerate() {
                            dropout_uniforms(seed.unwrap_or(job_seed), *layer, step, first_position + r as u32, mask);
                            for ((m, o), &v) in mask.iter_mut().zip(out).zip(input) {
                                *m = if *m >= *rate { scale } else { 0.0 };
                                *o = v * *m;
                            }
                        }
                        ws.masked[i] = true;
                    }
                    _ => out.assign(&input),
                },
                Op::Activation(f) => {
                    let input = input.to_slice().expect("rows are contiguous");
                    for (out, input) in flat_mut(out).chunks_mut(block).zip(input.chunks(block)) {
                        f.forward(input, out, width);
                    }
                }
            }
        }
        activity
    }

    /// The output of the last forward pass.
    pub fn output<'a>(&self, ws: &'a Workspace) -> ArrayView2<'a, f32> {
        ws.out[self.ops.len() - 1].view()
    }

    /// The activation of the last op, if its output comes straight from one.
    fn last_activation(&self) -> Option<Activation> {
        match self.ops.last()? {
            Op::Dense { activation, .. } => Some(*activation),
            Op::Activation(a) => Some(*a),
            Op::Dropout { .. } => None,
        }
    }

    /// Loss and accuracy of `x` in inference mode (dropout off); no gradient.
    pub fn evaluate(&self, params: &[f32], x: ArrayView2<f32>, targets: Targets, ws: &mut Workspace) -> ShardStats {
        let activity = self.forward(params, x, Mode::Infer, ws);
        self.loss_rows(x, targets, 1.0, ws, activity, false)
    }

    /// Forward and backward of one shard. `grads` (the model's size) receives the gradient of
    /// `(sum of the shard's per-sample losses + its activity penalties) / global batch size`,
    /// so the ordered sum over shards is the step's gradient, less the weight penalties (see
    /// `weight_penalty_and_grad`). In `Mode::Infer` the shard is the whole batch.
    pub fn gradient(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        targets: Targets,
        mode: Mode,
        ws: &mut Workspace,
        grads: &mut [f32],
    ) -> ShardStats {
        self.gradient_streamed(params, x, targets, mode, ws, grads, &mut |_, _| {})
    }

    /// As `gradient`, handing each part of `grads` to `ready` as soon as it is final: the
    /// backward pass finishes the last layers' gradients first, so `ready(from, tail)` gets
    /// `grads[from..to]` for falling `from`, each piece joining the one before (the first
    /// ends at the model's size, the last starts at 0), while the layers below are still being
    /// computed. A chain member sends the running sum of what is final meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub fn gradient_streamed<'g>(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        targets: Targets,
        mode: Mode,
        ws: &mut Workspace,
        grads: &'g mut [f32],
        ready: &mut dyn FnMut(usize, &'g [f32]),
    ) -> ShardStats {
        let pass = ShardPass { x, targets, mode, ws, grads };
        let mut one = |from: usize, mut parts: Vec<&'g [f32]>| ready(from, parts.pop().unwrap_or_default());
        self.gradients_streamed(params, vec![pass], &mut one).pop().unwrap_or_default()
    }

    /// `gradient_streamed` of several shards at once, layer by layer: every shard's forward
    /// pass, then each op's backward for every shard before the op below, so that `ready(from,
    /// parts)` gets each shard's final `grads[from..to]` (in the shards' order) as soon as the
    /// last layers are done for all of them, not once every shard but the last is whole. Each
    /// shard's values are those `gradient` computes alone: the same operations on its own
    /// buffers, only interleaved.
    pub fn gradients_streamed<'g>(
        &self,
        params: &[f32],
        passes: Vec<ShardPass<'_, '_, '_, 'g>>,
        ready: &mut dyn FnMut(usize, Vec<&'g [f32]>),
    ) -> Vec<ShardStats> {
        let mut stats = Vec::with_capacity(passes.len());
        let mut shards: Vec<Backward<'_, '_, 'g>> = Vec::with_capacity(passes.len());
        for ShardPass { x, targets, mode, ws, grads } in passes {
            assert_eq!(grads.len(), self.num_params, "gradient buffer has the model's size");
            let scale = match mode {
                Mode::Train { global_batch, .. } => 1.0 / global_batch.max(1) as f32,
                Mode::Infer => 1.0 / x.nrows().max(1) as f32,
            };
            let x = match x.is_standard_layout() {
                true => ndarray::CowArray::from(x),
                false => ndarray::CowArray::from(x.as_standard_layout().into_owned()),
            };
            let activity = self.forward(params, x.view(), mode, ws);
            stats.push(self.loss_rows(x.view(), targets, scale, ws, activity, true));
            shards.push(Backward { x, ws, grads, pending_mask: None, scale });
        }
        for i in (self.first_param_op..self.ops.len()).rev() {
            let mut from = None;
            let mut parts = Vec::with_capacity(shards.len());
            for b in &mut shards {
                if let Some((at, tail)) = self.backward_op(i, params, b) {
                    from = Some(at);
                    parts.push(tail);
                }
            }
            if let Some(at) = from {
                ready(at, parts);
            }
        }
        let rest: Vec<&'g [f32]> = shards.into_iter().map(|b| &*b.grads).collect();
        if rest.iter().any(|r| !r.is_empty()) {
            ready(0, rest);
        }
        stats
    }

    /// Op `i`'s backward for one shard; a Dense returns its kernel's offset and the part of
    /// the gradient that is final from there on (kernel and bias, and everything above).
    fn backward_op<'g>(&self, i: usize, params: &[f32], b: &mut Backward<'_, '_, 'g>) -> Option<(usize, &'g [f32])> {
        let last = self.ops.len() - 1;
        let g_is_dz = self.logits_mode() && i == last;
        let Backward { x, ws, grads, pending_mask, scale } = b;
        let (gbefore, gafter) = ws.grad.split_at_mut(i);
        let g = &mut gafter[0];
        let input = if i == 0 { x.view() } else { ws.out[i - 1].view() };
        match &self.ops[i] {
            Op::Dense { kernel, bias, activation, activity: act_reg } => {
                let mask = pending_mask.take().map(|m| &ws.z[m]);
                let gb = bias.map(|b| {
                    let gb = &mut grads[self.vars[b].range()];
                    gb.fill(0.0);
                    gb
                });
                dense_backward(
                    DenseBlocks { z: &ws.z[i], out: &ws.out[i], mask, g },
                    *activation,
                    act_reg.map(|r| (r, *scale)),
                    g_is_dz,
                    gb,
                    &mut ws.scratch,
                );
                let kv = &self.vars[*kernel];
                let mut gw = ArrayViewMut2::from_shape((kv.shape[0], kv.shape[1]), &mut grads[kv.range()])
                    .expect("kernel shape matches its slice");
                crate::product::weight_gradient(input, g.view(), gw.view_mut());
                // Variables are laid out in layer order, kernel before bias: everything from
                // this kernel on is final.
                let (below, tail) = std::mem::take(grads).split_at_mut(kv.offset);
                *grads = below;
                if i > self.first_param_op {
                    let gin = &mut gbefore[i - 1];
                    ensure(gin, g.nrows(), input.ncols());
                    general_mat_mul(1.0, &*g, &self.matrix(params, *kernel).t(), 0.0, gin);
                }
                return Some((kv.offset, tail));
            }
            Op::Dropout { .. } => {
                if i > self.first_param_op {
                    apply_mask(g, pending_mask.take().map(|m| &ws.z[m]));
                    *pending_mask = ws.masked[i].then_some(i);
                    std::mem::swap(g, &mut gbefore[i - 1]);
                }
            }
            Op::Activation(f) => {
                apply_mask(g, pending_mask.take().map(|m| &ws.z[m]));
                if !g_is_dz {
                    let (z, out) = (input.to_slice().expect("rows are contiguous"), flat(&ws.out[i]));
                    f.backward(z, out, flat_mut(g), self.widths[i]);
                }
                if i > self.first_param_op {
                    std::mem::swap(g, &mut gbefore[i - 1]);
                }
            }
        }
        None
    }

    fn logits_mode(&self) -> bool {
        self.last_activation().is_some_and(|a| self.loss.reads_logits_of(a))
    }

    /// Per-row losses (into `ws.grad[last]` as `scale * dL/dx` when `with_grad`) and accuracy.
    fn loss_rows(
        &self,
        x: ArrayView2<f32>,
        targets: Targets,
        scale: f32,
        ws: &mut Workspace,
        activity: f64,
        with_grad: bool,
    ) -> ShardStats {
        let last = self.ops.len() - 1;
        let logits = self.logits_mode();
        let n = x.nrows();
        // With the logits shortcut the loss reads the last op's pre-activation.
        let loss_in = match (&self.ops[last], logits) {
            (Op::Dense { .. }, true) => ws.z[last].view(),
            (Op::Activation(_), true) if last == 0 => x.view(),
            (Op::Activation(_), true) => ws.out[last - 1].view(),
            _ => ws.out[last].view(),
        };
        let out = ws.out[last].view();
        let g = &mut ws.grad[last];
        if with_grad {
            ensure(g, n, self.widths[last]);
        }
        let mut stats = ShardStats { activity, rows: n as u64, ..Default::default() };
        for r in 0..n {
            let t = targets.row(r);
            let row = loss_in.row(r);
            let row = row.as_slice().expect("buffers are contiguous");
            let grad = with_grad.then(|| g.row_mut(r).into_slice().expect("buffers are contiguous"));
            stats.loss_sum += f64::from(self.loss.sample(logits, row, t, scale, grad));
            stats.correct += u64::from(is_correct(out.row(r).as_slice().expect("contiguous"), t));
        }
        stats
    }

    /// Sum of the kernel and bias penalties (added once per step, never per shard).
    pub fn weight_penalty(&self, params: &[f32]) -> f64 {
        self.vars.iter().filter_map(|v| v.regularizer.map(|r| r.penalty(&params[v.range()]))).sum()
    }

    /// `weight_penalty(params)`, and `grads += its gradient`, in one pass over the weights.
    /// Variables are processed in parallel; their penalties are summed in variable order.
    pub fn weight_penalty_and_grad(&self, params: &[f32], grads: &mut [f32]) -> f64 {
        self.each_regularized(params, grads, |r, w, g| r.penalty_and_grad(w, g))
    }

    /// The weight penalty, with its derivative stored in `terms` (the model's size; only the
    /// regularized variables' ranges are written). `add_weight_penalty_terms` then adds them
    /// to a gradient with the same bits as `weight_penalty_and_grad`: the penalty can be
    /// computed while shard gradients are still being computed elsewhere.
    pub fn weight_penalty_terms(&self, params: &[f32], terms: &mut [f32]) -> f64 {
        self.each_regularized(params, terms, |r, w, d| r.penalty_and_derivative(w, d))
    }

    /// `grads += terms` over the regularized variables (see `weight_penalty_terms`).
    pub fn add_weight_penalty_terms(&self, terms: &[f32], grads: &mut [f32]) {
        for v in self.vars.iter().filter(|v| v.regularizer.is_some()) {
            crate::simd::add_into(&mut grads[v.range()], &terms[v.range()]);
        }
    }

    /// Sums `f(regularizer, weights, out)` over the regularized variables, each with its own
    /// range of `out`; in parallel for big models.
    fn each_regularized(
        &self,
        params: &[f32],
        out: &mut [f32],
        f: impl Fn(Regularizer, &[f32], &mut [f32]) -> f64 + Sync,
    ) -> f64 {
        use rayon::prelude::*;
        let mut work: Vec<(Regularizer, &[f32], &mut [f32])> = Vec::new();
        let mut rest = out;
        let mut at = 0;
        for v in &self.vars {
            let (g, tail) = std::mem::take(&mut rest)[v.offset - at..].split_at_mut(v.len());
            rest = tail;
            at = v.offset + v.len();
            if let Some(r) = v.regularizer {
                work.push((r, &params[v.range()], g));
            }
        }
        let penalties: Vec<f64> = if self.num_params >= crate::simd::PARALLEL_MIN {
            work.into_par_iter().map(|(r, w, g)| f(r, w, g)).collect()
        } else {
            work.into_iter().map(|(r, w, g)| f(r, w, g)).collect()
        };
        penalties.iter().sum()
    }

    /// Applies every variable's constraint (Keras does this after each optimizer update).
    pub fn apply_constraints(&self, params: &mut [f32]) {
        for v in &self.vars {
            if let Some(c) = v.constraint {
                c.apply(&mut params[v.range()], &v.shape);
            }
        }
    }

    /// Keras's model.summary() table.
    pub fn summary(&self) -> String {
        crate::summary::render(&self.layers, self.num_params)
    }
}
