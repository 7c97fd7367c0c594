//! Which library computes a matrix product. OpenBLAS computes almost all of them; the weight
//! gradient of a shard of 16 to 64 rows goes to matrixmultiply (pure Rust), which is 10-30%
//! faster on that short inner dimension than OpenBLAS's kernels here (measured for the seed
//! job's 784x30x64 and wider layers; README, "Small products"). The choice is a pure function
//! of the shapes, both libraries compute a product with one thread in a fixed order, and
//! matrixmultiply's FMA kernels (AVX2 and AVX-512) do not depend on the run's OpenBLAS kernel,
//! so every process computing a shard gets the same bits. Over so few rows each value is one
//! FMA chain in both libraries: the seed job's weights came out bit-identical to OpenBLAS's.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// A library that computes matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gemm {
    /// OpenBLAS, with the run's kernel (`fit.kernel`).
    OpenBlas,
    /// The matrixmultiply crate.
    MatrixMultiply,
}

/// The library for a layer's weight gradient `inputᵀ · g`, whose inner dimension is the
/// shard's row count: matrixmultiply for 16 to 64 rows and at least 32 units, where it was
/// faster at every measured shape; OpenBLAS elsewhere (tiny outputs, very short or long
/// inner dimensions).
pub fn for_weight_gradient(rows: usize, units: usize) -> Gemm {
    if (16..=64).contains(&rows) && units >= 32 {
        Gemm::MatrixMultiply
    } else {
        Gemm::OpenBlas
    }
}

/// `out = inputᵀ · g`: a layer's weight gradient over a shard (`input` rows x inputs, `g`
/// rows x units, `out` inputs x units).
pub fn weight_gradient(input: ArrayView2<f32>, g: ArrayView2<f32>, mut out: ArrayViewMut2<f32>) {
    let (rows, inputs) = input.dim();
    let units = g.ncols();
    assert_eq!(g.nrows(), rows, "one gradient row per input row");
    assert_eq!(out.dim(), (inputs, units), "the kernel's shape");
    match for_weight_gradient(rows, units) {
        Gemm::OpenBlas => general_mat_mul(1.0, &input.t(), &g, 0.0, &mut out),
        Gemm::MatrixMultiply => {
            let a = input.t();
            let (sa, sg, so) = (a.strides(), g.strides(), out.strides());
            let (sa, sg, so) = ([sa[0], sa[1]], [sg[0], sg[1]], [so[0], so[1]]);
            // SAFETY: the pointers and strides are those of views of these dimensions
            // (checked above), so every element matrixmultiply reads or writes lies in them;
            // `out` is a unique borrow, and beta = 0 means it is only written.
            unsafe {
                matrixmultiply::sgemm(
                    inputs,
                    rows,
                    units,
                    1.0,
                    a.as_ptr(),
                    sa[0],
                    sa[1],
                    g.as_ptr(),
                    sg[0],
                    sg[1],
                    0.0,
                    out.as_mut_ptr(),
                    so[0],
                    so[1],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn the_short_inner_dimension_goes_to_matrixmultiply() {
        assert_eq!(for_weight_gradient(30, 64), Gemm::MatrixMultiply); // the seed job
        assert_eq!(for_weight_gradient(15, 512), Gemm::OpenBlas);
        assert_eq!(for_weight_gradient(64, 512), Gemm::MatrixMultiply);
        assert_eq!(for_weight_gradient(128, 512), Gemm::OpenBlas); // the wide job's shards
        assert_eq!(for_weight_gradient(30, 10), Gemm::OpenBlas); // a 10-class output layer
    }

    #[test]
    fn both_libraries_compute_the_weight_gradient_and_repeat_their_bits() {
        for (rows, inputs, units) in [(30, 784, 64), (30, 64, 10), (17, 5, 33), (100, 7, 40)] {
            let input = Array2::from_shape_fn((rows, inputs), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
            let g = Array2::from_shape_fn((rows, units), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.01 - 0.06);
            let mut want = Array2::<f32>::zeros((inputs, units));
            for i in 0..inputs {
                for u in 0..units {
                    want[[i, u]] =
                        (0..rows).map(|r| f64::from(input[[r, i]]) * f64::from(g[[r, u]])).sum::<f64>() as f32;
                }
            }
            let mut got = Array2::from_elem((inputs, units), f32::NAN);
            weight_gradient(input.view(), g.view(), got.view_mut());
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{rows}x{inputs}x{units}: off by {worst}");
            let mut again = Array2::zeros((inputs, units));
            weight_gradient(input.view(), g.view(), again.view_mut());
            assert!(got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "repeatable bits");
        }
    }
}
