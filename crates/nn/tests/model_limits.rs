//! Sizes come from job files and data files: absurd ones are errors that say so, never an abort
//! when buffers are allocated or an overflow in the arithmetic.

use dtrain_nn::*;

fn mse() -> Loss {
    Loss { kind: LossKind::MeanSquaredError, from_logits: false }
}

fn dense(units: usize) -> LayerSpec {
    LayerSpec::Dense(DenseSpec::new(units))
}

#[test]
fn absurd_sizes_are_refused_with_a_message() {
    let err = |shape: &[usize], specs: &[LayerSpec]| Sequential::new(shape, specs, mse()).unwrap_err().to_string();
    // A shape whose product overflows (from an NPY header) is not "input width 1".
    let e = err(&[8, 7, 7_905_747_460_161_236_407], &[LayerSpec::Flatten, dense(1)]);
    assert!(e.contains("more than 16777216 values per sample"), "{e}");
    assert!(err(&[784], &[dense(1_000_000_000)]).contains("units 1000000000 is outside 1..=16777216"));
    assert!(err(&[784], &[dense(1 << 62)]).contains("is outside 1..="));
    // Each layer within bounds, the whole too large: 16M x 200 parameters.
    let e = err(&[1 << 24], &[dense(200)]);
    assert!(e.contains("more than 2147483648 parameters"), "{e}");
    // The largest accepted sizes still build (nothing is allocated until the model runs).
    assert!(Sequential::new(&[1 << 12], &[dense(1 << 12)], mse()).is_ok());
}
