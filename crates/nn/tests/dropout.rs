//! Dropout checked against its definition: at rate r each unit is kept with probability 1 - r
//! and a kept value is scaled by exactly 1 / (1 - r); masks are keyed by (seed, layer, step,
//! position in the global batch), so they differ between steps and layers and do not depend
//! on how the batch is split into shards; and a forward pass with dropout equals a reference
//! computed independently (in f64) from the same mask.

use dtrain_nn::rng::{dropout_uniforms, Stream};
use dtrain_nn::*;
use ndarray::Array2;

fn mse() -> Loss {
    Loss { kind: LossKind::MeanSquaredError, from_logits: false }
}

fn train(seed: u64, step: u64, first_position: u32, global_batch: u32) -> Mode {
    Mode::Train { seed, step, first_position, global_batch }
}

/// The output of a Dropout layer at `rate` (followed by an identity Dense layer, since a
/// model needs one: multiplying by 1 and adding zeros changes no bit).
fn dropped(rate: f32, x: &Array2<f32>, mode: Mode) -> Array2<f32> {
    let d = x.ncols();
    let identity = LayerSpec::Dense(DenseSpec { use_bias: false, ..DenseSpec::new(d) });
    let m = Sequential::new(&[d], &[LayerSpec::Dropout { rate, seed: None }, identity], mse()).unwrap();
    let p: Vec<f32> = (0..d * d).map(|i| if i / d == i % d { 1.0 } else { 0.0 }).collect();
    let mut ws = Workspace::default();
    m.forward(&p, x.view(), mode, &mut ws);
    m.output(&ws).to_owned()
}

#[test]
fn the_kept_fraction_is_one_minus_the_rate_within_statistical_bounds() {
    let (rows, width) = (200, 1000); // 200,000 positions
    let x = Array2::from_elem((rows, width), 1.0f32);
    for rate in [0.1f32, 0.3, 0.5, 0.8] {
        let out = dropped(rate, &x, train(42, 3, 0, rows as u32));
        let n = out.len() as f64;
        let kept = out.iter().filter(|&&v| v != 0.0).count() as f64 / n;
        let (p, sigma) = (1.0 - f64::from(rate), (f64::from(rate) * (1.0 - f64::from(rate)) / n).sqrt());
        // Five standard deviations: a correct mask fails this about once in 1.7 million runs.
        assert!((kept - p).abs() < 5.0 * sigma, "rate {rate}: kept {kept}, expected {p} ± {}", 5.0 * sigma);
    }
}

#[test]
fn kept_values_are_scaled_by_exactly_one_over_one_minus_the_rate() {
    let mut rng = Stream::new(7, 0);
    let x = Array2::from_shape_fn((50, 64), |_| rng.normal());
    for rate in [0.2f32, 0.5, 0.75] {
        let out = dropped(rate, &x, train(1, 9, 0, 50));
        let scale = 1.0 / (1.0 - rate);
        let mut kept = 0;
        for (o, v) in out.iter().zip(x.iter()) {
            if *o != 0.0 {
                assert_eq!(o.to_bits(), (v * scale).to_bits(), "rate {rate}: {v} became {o}");
                kept += 1;
            }
        }
        assert!(kept > 0 && kept < out.len(), "rate {rate}: some values are kept and some dropped");
    }
    // Rate 0 keeps everything unchanged; inference mode never drops.
    assert_eq!(dropped(0.0, &x, train(1, 9, 0, 50)), x);
    assert_eq!(dropped(0.9, &x, Mode::Infer), x);
}

#[test]
fn masks_differ_between_steps_and_layers_and_seeds() {
    let x = Array2::from_elem((20, 500), 1.0f32);
    let rate = 0.5;
    let at = |seed, step| dropped(rate, &x, train(seed, step, 0, 20)).mapv(|v| v != 0.0);
    let differ =
        |a: &Array2<bool>, b: &Array2<bool>| a.iter().zip(b).filter(|(p, q)| p != q).count() as f64 / a.len() as f64;
    // Independent masks at rate 0.5 disagree on about half of the positions.
    let base = at(5, 10);
    for (what, other) in [("step", at(5, 11)), ("seed", at(6, 10))] {
        let d = differ(&base, &other);
        assert!((0.45..0.55).contains(&d), "another {what} changes {d} of the mask");
    }
    assert_eq!(at(5, 10), base, "the same key gives the same mask");
    // Layers: the draws of layer 0 and layer 1 for the same sample and step are independent.
    let (mut u0, mut u1) = (vec![0.0; 4000], vec![0.0; 4000]);
    dropout_uniforms(5, 0, 10, 3, &mut u0);
    dropout_uniforms(5, 1, 10, 3, &mut u1);
    let disagree = u0.iter().zip(&u1).filter(|(a, b)| (**a >= 0.5) != (**b >= 0.5)).count() as f64 / 4000.0;
    assert!((0.45..0.55).contains(&disagree), "layers 0 and 1 disagree on {disagree} of the units");
    // The uniforms are uniform on [0, 1): mean 1/2, variance 1/12.
    let mean = u0.iter().map(|&u| f64::from(u)).sum::<f64>() / 4000.0;
    let var = u0.iter().map(|&u| (f64::from(u) - mean).powi(2)).sum::<f64>() / 4000.0;
    assert!(u0.iter().all(|u| (0.0..1.0).contains(u)));
    assert!((mean - 0.5).abs() < 0.02 && (var - 1.0 / 12.0).abs() < 0.005, "mean {mean}, variance {var}");
}

#[test]
fn a_samples_mask_is_the_same_however_the_batch_is_sharded() {
    let mut rng = Stream::new(3, 0);
    let (rows, width) = (30, 40);
    let x = Array2::from_shape_fn((rows, width), |_| rng.normal());
    let whole = dropped(0.4, &x, train(8, 2, 0, rows as u32));
    for split in [1, 7, 15, 29] {
        let top = dropped(0.4, &x.slice(ndarray::s![..split, ..]).to_owned(), train(8, 2, 0, rows as u32));
        let bottom =
            dropped(0.4, &x.slice(ndarray::s![split.., ..]).to_owned(), train(8, 2, split as u32, rows as u32));
        let joined = ndarray::concatenate![ndarray::Axis(0), top, bottom];
        assert_eq!(joined, whole, "split at {split}");
    }
}

#[test]
fn the_forward_pass_with_dropout_equals_an_independent_reference() {
    // Dense(relu) -> Dropout(0.3) -> Dense(softmax), as the seed model; layer index 1 is the
    // dropout's (its masks are keyed by its place in the model).
    let (rows, d, h, k) = (6, 5, 16, 3);
    let specs = [
        LayerSpec::Dense(DenseSpec { activation: Activation::Relu, ..DenseSpec::new(h) }),
        LayerSpec::Dropout { rate: 0.3, seed: None },
        LayerSpec::Dense(DenseSpec { activation: Activation::Softmax, ..DenseSpec::new(k) }),
    ];
    let m = Sequential::new(&[d], &specs, mse()).unwrap();
    let mut p = m.init_params(4);
    let mut rng = Stream::new(9, 0);
    p.iter_mut().for_each(|v| *v += 0.05 * rng.normal()); // non-zero biases too
    let x = Array2::from_shape_fn((rows, d), |_| rng.normal());
    let (seed, step, first) = (17, 5, 12);
    let mut ws = Workspace::default();
    m.forward(&p, x.view(), train(seed, step, first, 64), &mut ws);
    let got = m.output(&ws).to_owned();

    // The reference, in f64: its own matrix products, its own mask from the same draws.
    let var = |name: &str| &p[m.variables().iter().find(|v| v.name.ends_with(name)).unwrap().range()];
    let (w1, b1, w2, b2) = (var("dense/kernel"), var("dense/bias"), var("dense_1/kernel"), var("dense_1/bias"));
    let mut dropped_units = 0;
    for r in 0..rows {
        let mut u = vec![0.0; h];
        dropout_uniforms(seed, 1, step, first + r as u32, &mut u);
        let hidden: Vec<f64> = (0..h)
            .map(|j| {
                let z: f64 =
                    (0..d).map(|i| f64::from(x[[r, i]]) * f64::from(w1[i * h + j])).sum::<f64>() + f64::from(b1[j]);
                let keep = u[j] >= 0.3;
                dropped_units += usize::from(!keep);
                if keep {
                    z.max(0.0) / 0.7
                } else {
                    0.0
                }
            })
            .collect();
        let logits: Vec<f64> = (0..k)
            .map(|c| (0..h).map(|j| hidden[j] * f64::from(w2[j * k + c])).sum::<f64>() + f64::from(b2[c]))
            .collect();
        let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
        let sum: f64 = e.iter().sum();
        for c in 0..k {
            let want = e[c] / sum;
            let diff = (f64::from(got[[r, c]]) - want).abs();
            assert!(diff < 1e-6, "row {r} class {c}: dtrain {} vs reference {want}", got[[r, c]]);
        }
    }
    assert!(dropped_units > 0, "the mask dropped some units, so the comparison tests it");
}
