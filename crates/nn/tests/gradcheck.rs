//! Finite-difference checks of every analytic gradient: activations, losses, regularizers
//! (kernel, bias, activity), dropout and the Activation layer, through the whole model.
//! Tolerance: |analytic - numeric| <= 3e-4 + 3e-3 |numeric| (central differences of the f32
//! loss, h = 1e-3; every case passes at a third of that); each case also shows that the check
//! rejects a wrong sign and a missing factor on every variable with a gradient worth checking.

use dtrain_nn::rng::Stream;
use dtrain_nn::*;
use ndarray::Array2;

/// (absolute, relative) tolerance of a gradient against its central difference.
const TOLERANCE: (f64, f64) = (3e-4, 3e-3);

fn dense(units: usize, activation: Activation) -> DenseSpec {
    DenseSpec { activation, ..DenseSpec::new(units) }
}

/// Total loss of the step as Keras defines it: mean loss + activity / B + weight penalties.
fn total_loss(m: &Sequential, p: &[f32], x: &Array2<f32>, t: Targets, mode: Mode) -> f64 {
    let mut ws = Workspace::default();
    let mut g = vec![0.0; p.len()];
    let b = x.nrows() as f64;
    let s = m.gradient(p, x.view(), t, mode, &mut ws, &mut g);
    s.loss_sum / b + s.activity / b + m.weight_penalty(p)
}

fn check(specs: Vec<LayerSpec>, loss: Loss, targets_dense: bool) {
    let (n, d) = (5, 6);
    let m = Sequential::new(&[d], &specs, loss).unwrap();
    let mut rng = Stream::new(11, 0);
    let x = Array2::from_shape_fn((n, d), |_| rng.normal());
    let k = m.output_width();
    let classes: Vec<u32> = (0..n as u32).map(|i| i % k as u32).collect();
    let dense_t = Array2::from_shape_fn((n, k), |_| rng.uniform());
    let t = if targets_dense { Targets::Values(dense_t.view()) } else { Targets::Classes(&classes) };
    let mut p = m.init_params(5);
    // Non-zero biases so that every bias gradient is exercised.
    for v in m.variables() {
        if v.name.ends_with("bias") {
            p[v.range()].iter_mut().for_each(|b| *b = 0.1 * rng.normal());
        }
    }
    let mode = Mode::Train { seed: 3, step: 7, first_position: 0, global_batch: n as u32 };
    let mut ws = Workspace::default();
    let mut g = vec![0.0; p.len()];
    m.gradient(&p, x.view(), t, mode, &mut ws, &mut g);
    m.weight_penalty_and_grad(&p, &mut g);
    let h = 1e-3f32;
    let num: Vec<f64> = (0..p.len())
        .map(|i| {
            let mut q = p.clone();
            q[i] = p[i] + h;
            let up = total_loss(&m, &q, &x, t, mode);
            q[i] = p[i] - h;
            let down = total_loss(&m, &q, &x, t, mode);
            (up - down) / (2.0 * f64::from(h))
        })
        .collect();
    if let Some(i) = disagreement(&g, &num) {
        panic!("{specs:?} {loss:?}: param {i}: analytic {} vs numeric {}", g[i], num[i]);
    }
    // The check can fail: on every variable whose gradient is worth checking, a wrong sign or a
    // missing factor (0.7, as a forgotten 1/(1 - rate) or a halved penalty would give) is caught.
    let mut sensitive = 0;
    for v in m.variables() {
        if num[v.range()].iter().all(|n| n.abs() < 0.005) {
            continue; // too small to tell from numeric noise; other cases exercise it
        }
        for (what, factor) in [("sign", -1.0), ("factor 0.7", 0.7)] {
            let mut wrong = g.clone();
            wrong[v.range()].iter_mut().for_each(|w| *w *= factor);
            assert!(disagreement(&wrong, &num).is_some(), "{specs:?} {loss:?}: a wrong {what} on {} passes", v.name);
        }
        sensitive += 1;
    }
    assert!(sensitive > 0, "{specs:?} {loss:?}: no variable's gradient was large enough to check");
}

/// The first parameter whose analytic gradient is off its central difference by more than
/// TOLERANCE (see the file's header).
fn disagreement(analytic: &[f32], numeric: &[f64]) -> Option<usize> {
    let (abs, rel) = TOLERANCE;
    analytic.iter().zip(numeric).position(|(&a, &n)| (f64::from(a) - n).abs() > abs + rel * n.abs())
}

fn sparse() -> Loss {
    Loss { kind: LossKind::SparseCategoricalCrossentropy, from_logits: false }
}

#[test]
fn every_activation() {
    for act in [
        Activation::Linear,
        Activation::Relu,
        Activation::LeakyRelu { negative_slope: 0.2 },
        Activation::Elu { alpha: 1.0 },
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Softmax,
        Activation::Softplus,
        Activation::Gelu { approximate: false },
        Activation::Gelu { approximate: true },
        Activation::Silu,
    ] {
        check(vec![LayerSpec::Dense(dense(4, act)), LayerSpec::Dense(dense(3, Activation::Softmax))], sparse(), false);
    }
}

#[test]
fn every_loss_on_every_output_path() {
    use LossKind::*;
    let cases = [
        (SparseCategoricalCrossentropy, Activation::Softmax, false),
        (SparseCategoricalCrossentropy, Activation::Sigmoid, false),
        (CategoricalCrossentropy, Activation::Softmax, true),
        (CategoricalCrossentropy, Activation::Sigmoid, true),
        (BinaryCrossentropy, Activation::Sigmoid, true),
        (BinaryCrossentropy, Activation::Softmax, true),
        (MeanSquaredError, Activation::Linear, true),
        (MeanAbsoluteError, Activation::Tanh, true),
        (Huber { delta: 0.5 }, Activation::Linear, true),
    ];
    for (kind, out, dense_t) in cases {
        let specs = vec![LayerSpec::Dense(dense(4, Activation::Tanh)), LayerSpec::Dense(dense(3, out))];
        check(specs, Loss { kind, from_logits: false }, dense_t);
    }
    let logits = vec![LayerSpec::Dense(dense(4, Activation::Tanh)), LayerSpec::Dense(dense(3, Activation::Linear))];
    check(logits.clone(), Loss { kind: SparseCategoricalCrossentropy, from_logits: true }, false);
    check(logits, Loss { kind: BinaryCrossentropy, from_logits: true }, true);
}

#[test]
fn regularizers_dropout_and_activation_layer() {
    let reg = Regularizer { l1: 0.01, l2: 0.02 };
    let first = DenseSpec {
        kernel_regularizer: Some(reg),
        bias_regularizer: Some(Regularizer { l1: 0.0, l2: 0.05 }),
        activity_regularizer: Some(Regularizer { l1: 0.01, l2: 0.0 }),
        ..dense(4, Activation::Tanh)
    };
    // Activity regularizer on the softmax output too: its gradient flows through the softmax.
    let last =
        DenseSpec { activity_regularizer: Some(Regularizer { l1: 0.0, l2: 0.1 }), ..dense(3, Activation::Softmax) };
    check(
        vec![
            LayerSpec::Flatten,
            LayerSpec::Dense(first),
            LayerSpec::Dropout { rate: 0.4, seed: None },
            LayerSpec::Dense(dense(4, Activation::Linear)),
            LayerSpec::Activation(Activation::Sigmoid),
            LayerSpec::Dense(last),
        ],
        sparse(),
        false,
    );
    // Softmax as its own Activation layer still takes the logits shortcut.
    check(
        vec![LayerSpec::Dense(dense(3, Activation::Linear)), LayerSpec::Activation(Activation::Softmax)],
        sparse(),
        false,
    );
}

#[test]
fn seed_model_has_keras_param_count_and_names() {
    let hidden = DenseSpec { activation: Activation::Linear, ..DenseSpec::new(64) };
    let m = Sequential::new(
        &[28, 28],
        &[
            LayerSpec::Flatten,
            LayerSpec::Dense(hidden),
            LayerSpec::Dropout { rate: 0.5, seed: None },
            LayerSpec::Dense(dense(10, Activation::Softmax)),
        ],
        sparse(),
    )
    .unwrap();
    assert_eq!(m.num_params(), 50_890);
    let names: Vec<_> = m.variables().iter().map(|v| (v.name.as_str(), v.shape.clone())).collect();
    assert_eq!(
        names,
        [
            ("dense/kernel", vec![784, 64]),
            ("dense/bias", vec![64]),
            ("dense_1/kernel", vec![64, 10]),
            ("dense_1/bias", vec![10])
        ]
    );
    assert!(m.summary().contains("Total params: 50,890 (198.79 KB)"), "{}", m.summary());
}

#[test]
fn shard_gradients_sum_to_the_batch_gradient() {
    let specs = vec![
        LayerSpec::Dense(DenseSpec {
            activity_regularizer: Some(Regularizer { l1: 0.01, l2: 0.0 }),
            ..dense(8, Activation::Relu)
        }),
        LayerSpec::Dropout { rate: 0.5, seed: None },
        LayerSpec::Dense(dense(3, Activation::Softmax)),
    ];
    let m = Sequential::new(&[6], &specs, sparse()).unwrap();
    let mut rng = Stream::new(1, 1);
    let x = Array2::from_shape_fn((10, 6), |_| rng.normal());
    let y: Vec<u32> = (0..10).map(|i| i % 3).collect();
    let p = m.init_params(2);
    let mut ws = Workspace::default();
    let mut whole = vec![0.0; p.len()];
    let mode = |first| Mode::Train { seed: 9, step: 4, first_position: first, global_batch: 10 };
    m.gradient(&p, x.view(), Targets::Classes(&y), mode(0), &mut ws, &mut whole);
    let mut sum = vec![0.0f32; p.len()];
    for (lo, hi) in [(0, 4), (4, 7), (7, 10)] {
        let mut g = vec![0.0; p.len()];
        let xs = x.slice(ndarray::s![lo..hi, ..]);
        m.gradient(&p, xs, Targets::Classes(&y[lo..hi]), mode(lo as u32), &mut ws, &mut g);
        sum.iter_mut().zip(&g).for_each(|(s, v)| *s += v);
    }
    for (a, b) in whole.iter().zip(&sum) {
        assert!((a - b).abs() <= 1e-6 + 1e-5 * a.abs(), "{a} vs {b}");
    }
}

/// The streaming tests' model: an activity penalty, dropout, a Dense without bias; three Dense
/// layers, so three parts (6*8+8, 8*5 and 5*3+3 values).
fn streamed_model() -> Sequential {
    let specs = vec![
        LayerSpec::Flatten,
        LayerSpec::Dense(DenseSpec {
            activity_regularizer: Some(Regularizer { l1: 0.01, l2: 0.0 }),
            ..dense(8, Activation::Relu)
        }),
        LayerSpec::Dropout { rate: 0.5, seed: None },
        LayerSpec::Dense(DenseSpec { use_bias: false, ..dense(5, Activation::Tanh) }),
        LayerSpec::Dense(dense(3, Activation::Softmax)),
    ];
    Sequential::new(&[2, 3], &specs, sparse()).unwrap()
}

/// `gradient_streamed` hands over the gradient from the end down, layer by layer, each part
/// already final when handed over (a copy taken then equals the finished gradient, bit for
/// bit), the parts joining into the whole; and it is `gradient`'s gradient.
#[test]
fn a_streamed_gradient_hands_over_final_parts_from_the_last_layer_down() {
    let m = streamed_model();
    let mut rng = Stream::new(3, 1);
    let x = Array2::from_shape_fn((7, 6), |_| rng.normal());
    let y: Vec<u32> = (0..7).map(|i| i % 3).collect();
    let p = m.init_params(4);
    let mode = Mode::Train { seed: 9, step: 2, first_position: 0, global_batch: 7 };
    let mut plain = vec![0.0; p.len()];
    m.gradient(&p, x.view(), Targets::Classes(&y), mode, &mut Workspace::default(), &mut plain);
    let mut streamed = vec![f32::NAN; p.len()];
    let mut handed: Vec<(usize, Vec<f32>)> = vec![];
    let mut ready = |from: usize, part: &[f32]| handed.push((from, part.to_vec()));
    m.gradient_streamed(&p, x.view(), Targets::Classes(&y), mode, &mut Workspace::default(), &mut streamed, &mut ready);
    let starts: Vec<usize> = handed.iter().map(|(from, _)| *from).collect();
    // One part per Dense layer, at its kernel: 6*8+8 and 8*5 values below the last layer's.
    assert_eq!(starts, [48 + 8 + 40, 48 + 8, 0]);
    let mut end = p.len();
    for (from, part) in &handed {
        assert_eq!(from + part.len(), end, "each part joins the one handed over before");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(part), bits(&streamed[*from..end]), "final when handed over");
        end = *from;
    }
    assert_eq!(end, 0);
    assert_eq!(
        streamed.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

/// Three shards' gradients streamed layer by layer (`gradients_streamed`): each part is handed
/// over for all three at once, from the last layer down, each final then, and each shard's
/// gradient is the one `gradient` computes for it alone, bit for bit (dropout masks keyed by
/// each shard's first position).
#[test]
fn shards_streamed_layer_by_layer_give_each_shards_own_bits() {
    let m = streamed_model();
    let mut rng = Stream::new(5, 1);
    let x = Array2::from_shape_fn((10, 6), |_| rng.normal());
    let y: Vec<u32> = (0..10).map(|i| i % 3).collect();
    let p = m.init_params(4);
    let rows = [0..4, 4..7, 7..10];
    let mode =
        |r: &std::ops::Range<usize>| Mode::Train { seed: 9, step: 2, first_position: r.start as u32, global_batch: 10 };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let alone: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| {
            let mut g = vec![0.0; p.len()];
            let xs = x.slice(ndarray::s![r.clone(), ..]);
            m.gradient(&p, xs, Targets::Classes(&y[r.clone()]), mode(r), &mut Workspace::default(), &mut g);
            g
        })
        .collect();
    let mut grads = vec![vec![f32::NAN; p.len()]; 3];
    let mut workspaces = [Workspace::default(), Workspace::default(), Workspace::default()];
    let passes = rows
        .iter()
        .zip(workspaces.iter_mut())
        .zip(grads.iter_mut())
        .map(|((r, ws), g)| ShardPass {
            x: x.slice(ndarray::s![r.clone(), ..]),
            targets: Targets::Classes(&y[r.clone()]),
            mode: mode(r),
            ws,
            grads: g,
        })
        .collect();
    let mut handed: Vec<(usize, Vec<Vec<f32>>)> = vec![];
    let mut ready = |from: usize, parts: Vec<&[f32]>| handed.push((from, parts.iter().map(|p| p.to_vec()).collect()));
    m.gradients_streamed(&p, passes, &mut ready);
    let starts: Vec<usize> = handed.iter().map(|(from, _)| *from).collect();
    assert_eq!(starts, [48 + 8 + 40, 48 + 8, 0], "one part per Dense layer, for all shards at once");
    let mut end = p.len();
    for (from, parts) in &handed {
        assert_eq!(parts.len(), 3);
        for (part, whole) in parts.iter().zip(&grads) {
            assert_eq!(from + part.len(), end, "each part joins the one handed over before");
            assert_eq!(bits(part), bits(&whole[*from..end]), "final when handed over");
        }
        end = *from;
    }
    for (streamed, alone) in grads.iter().zip(&alone) {
        assert_eq!(bits(streamed), bits(alone), "each shard's own bits");
    }
}

/// The penalty computed ahead (`weight_penalty_terms`, then `add_weight_penalty_terms`) gives
/// the same bits as `weight_penalty_and_grad`, for L1, L2 and both, on kernels and biases,
/// with exact zeros among the weights (where the L1 derivative is 0). Tolerance: none.
#[test]
fn penalty_terms_added_later_match_the_fused_pass_bit_for_bit() {
    let reg = |l1, l2| Some(Regularizer { l1, l2 });
    let loss = Loss { kind: LossKind::SparseCategoricalCrossentropy, from_logits: false };
    let specs = vec![
        LayerSpec::Dense(DenseSpec { kernel_regularizer: reg(0.01, 0.0), ..dense(7, Activation::Relu) }),
        LayerSpec::Dense(DenseSpec {
            kernel_regularizer: reg(0.003, 0.02),
            bias_regularizer: reg(0.0, 0.5),
            ..dense(5, Activation::Tanh)
        }),
        LayerSpec::Dense(dense(3, Activation::Softmax)),
    ];
    let m = Sequential::new(&[6], &specs, loss).unwrap();
    let mut rng = Stream::new(5, 1);
    let mut p = m.init_params(9);
    p.iter_mut().step_by(5).for_each(|w| *w = 0.0);
    let g0: Vec<f32> = (0..p.len()).map(|_| rng.normal()).collect();
    let mut fused = g0.clone();
    let pen = m.weight_penalty_and_grad(&p, &mut fused);
    let mut terms = vec![f32::NAN; p.len()];
    let ahead = m.weight_penalty_terms(&p, &mut terms);
    let mut later = g0.clone();
    m.add_weight_penalty_terms(&terms, &mut later);
    assert_eq!(pen.to_bits(), ahead.to_bits());
    assert!(fused.iter().zip(&later).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_ne!(fused, g0, "the penalty must change the gradient");
}
