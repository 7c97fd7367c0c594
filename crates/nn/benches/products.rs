//! Small products, OpenBLAS (the run's kernel) against matrixmultiply, one thread, side by side
//! in interleaved rounds (the measurements behind `dtrain_nn::product`):
//!
//!     cargo bench -p dtrain-nn --bench products [-- ROUNDS]
//!
//! Weight gradients `inputᵀ · g` over shards of 15 to 128 rows, and forward products, at the
//! seed and wide jobs' layer shapes; medians over the rounds, and which library the rule picks.

use ndarray::linalg::general_mat_mul;
use ndarray::Array2;
use std::time::Duration;

#[path = "support/timing.rs"]
mod timing;
use timing::{median, per_call};

fn fill(rows: usize, cols: usize, salt: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        (((i * 2_654_435_761) ^ (j * 40_503) ^ salt) % 1000) as f32 * 1e-3 - 0.5
    })
}

/// `c = aᵀ · b` (or `a · b`) with matrixmultiply, row-major views.
fn matrixmultiply(a: &Array2<f32>, transpose_a: bool, b: &Array2<f32>, c: &mut Array2<f32>) {
    let a = if transpose_a { a.t() } else { a.view() };
    let (m, k) = a.dim();
    let n = b.ncols();
    let (sa, sb) = (a.strides(), b.strides());
    // SAFETY: views of these dimensions (c is m x n, b is k x n), beta = 0.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            sa[0],
            sa[1],
            b.as_ptr(),
            sb[0],
            sb[1],
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

fn main() {
    dtrain_nn::set_blas_threads(1);
    let rounds = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5);
    println!("OpenBLAS kernel: {}; {rounds} rounds, medians", dtrain_nn::kernel::running());
    println!();
    println!(
        "| product | inputs x rows x units | OpenBLAS | matrixmultiply | matrixmultiply / OpenBLAS | rule picks |"
    );
    println!("|---|---|---|---|---|---|");
    for (inputs, units) in [(784, 64), (64, 10), (784, 512), (512, 512), (512, 10)] {
        for rows in [15, 30, 64, 128] {
            for weight_gradient in [true, false] {
                let x = fill(rows, inputs, 1);
                let other = if weight_gradient { fill(rows, units, 2) } else { fill(inputs, units, 2) };
                let mut out =
                    if weight_gradient { Array2::zeros((inputs, units)) } else { Array2::zeros((rows, units)) };
                let (mut blas, mut mm) = (vec![], vec![]);
                for _ in 0..rounds {
                    blas.push(per_call(Duration::from_millis(100), || {
                        if weight_gradient {
                            general_mat_mul(1.0, &x.t(), &other, 0.0, &mut out)
                        } else {
                            general_mat_mul(1.0, &x, &other, 0.0, &mut out)
                        }
                    }));
                    mm.push(per_call(Duration::from_millis(100), || {
                        matrixmultiply(&x, weight_gradient, &other, &mut out)
                    }));
                }
                let (blas, mm) = (median(blas), median(mm));
                let picks = if weight_gradient {
                    format!("{:?}", dtrain_nn::product::for_weight_gradient(rows, units))
                } else {
                    "OpenBlas".into()
                };
                let kind = if weight_gradient { "weight gradient" } else { "forward" };
                println!(
                    "| {kind} | {inputs} x {rows} x {units} | {:.1} µs | {:.1} µs | {:.2} | {picks} |",
                    blas * 1e6,
                    mm * 1e6,
                    mm / blas
                );
            }
        }
    }
}
