//! The training step against its own matrix products and both against the machine's measured
//! sgemm peak, side by side in one run:
//!
//!     cargo bench -p dtrain-fit --bench step [-- ROUNDS]
//!
//! For each job, every round times, one after the other:
//! * `peak`: 512x512x512 sgemm on each of the job's threads at once (one BLAS thread each), the
//!   machine's large-matrix rate with that many cores busy;
//! * `products`: exactly the products one step makes (forward, weight gradients, input
//!   gradients), each shard's on its own thread, same shapes;
//! * `step`: the whole step (gather, dropout, activations, loss, backward, shard sum,
//!   penalties, optimizer, constraints).
//!
//! It prints the medians over the rounds and the per-round ratios' medians: `step / products`
//! is what the step costs beyond its products, `products / at peak` how far the products' shapes
//! keep BLAS from its large-matrix rate, and `step / at peak` both together. The machines are
//! shared and noisy, so only the ratios measured side by side mean much.

use dtrain_data::{Dataset, Features, Labels};
use dtrain_fit::config::JobConfig;
use dtrain_fit::step::Stepper;
use dtrain_fit::{Job, LocalEngine};
use dtrain_optim::Optimizer;
use ndarray::linalg::general_mat_mul;
use ndarray::Array2;
use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Duration;

#[path = "../../nn/benches/support/timing.rs"]
mod timing;
use timing::{median, per_call};

fn job(file: &str, shards: usize) -> Job {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(file);
    let mut config = JobConfig::load(&path).expect("the example job loads");
    config.fit.shards = shards;
    Job::build(config, PathBuf::new()).expect("the example job builds")
}

fn synthetic(n: usize) -> Dataset {
    let x: Vec<u8> = (0..n * 784).map(|i| ((i * 2_654_435_761usize) >> 7) as u8).collect();
    let y: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    Dataset::new(Features::U8(x), vec![28, 28], Labels::Classes(y)).expect("a valid dataset").with_rescale(1.0 / 255.0)
}

/// (rows, inputs, units) of each Dense layer.
fn dense_shapes(job: &Job, rows: usize) -> Vec<(usize, usize, usize)> {
    job.model.variables().iter().filter(|v| v.shape.len() == 2).map(|v| (rows, v.shape[0], v.shape[1])).collect()
}

/// FLOP of one shard's matrix products: forward, weight gradient, and input gradient except
/// for the first layer.
fn shard_flops(shapes: &[(usize, usize, usize)]) -> f64 {
    shapes.iter().enumerate().map(|(i, &(r, k, n))| 2.0 * (r * k * n) as f64 * if i == 0 { 2.0 } else { 3.0 }).sum()
}

/// A layer's input, kernel, output, kernel gradient and input gradient.
type LayerMats = (Array2<f32>, Array2<f32>, Array2<f32>, Array2<f32>, Array2<f32>);

/// One step's matrix products for one shard, on buffers of the right shapes.
struct Products {
    mats: Vec<LayerMats>,
}

impl Products {
    fn new(shapes: &[(usize, usize, usize)]) -> Self {
        let mats = shapes
            .iter()
            .map(|&(r, k, n)| {
                let m =
                    |rows, cols| Array2::from_shape_fn((rows, cols), |(i, j)| ((i * 31 + j * 17) % 13) as f32 * 0.01);
                (m(r, k), m(k, n), Array2::zeros((r, n)), Array2::zeros((k, n)), Array2::zeros((r, k)))
            })
            .collect();
        Products { mats }
    }

    fn run(&mut self) {
        dtrain_nn::flush_denormals();
        for (i, (x, w, z, gw, gx)) in self.mats.iter_mut().enumerate() {
            general_mat_mul(1.0, &*x, &*w, 0.0, z); // forward
            dtrain_nn::product::weight_gradient(x.view(), z.view(), gw.view_mut()); // weight gradient
            if i > 0 {
                general_mat_mul(1.0, &*z, &w.t(), 0.0, gx); // input gradient
            }
        }
    }
}

/// One row of the table: medians of (peak seconds per 512^3 product on each thread, products
/// seconds, step seconds) and of the per-round ratios.
struct Row {
    name: String,
    peak_gflops: f64,
    products: f64,
    at_peak: f64,
    step: f64,
    step_over_products: f64,
    products_over_peak: f64,
    step_over_peak: f64,
}

fn bench_job(name: &str, file: &str, shards: usize, rounds: usize) -> Row {
    dtrain_nn::set_blas_threads(1);
    let job = job(file, shards);
    let batch = job.fit.batch_size;
    let data = synthetic(batch * 50);
    let shapes = dense_shapes(&job, batch / shards);
    let flops = shard_flops(&shapes) * shards as f64;
    let threads = shards.min(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");

    let n = 512;
    let mut squares: Vec<(Array2<f32>, Array2<f32>, Array2<f32>)> =
        (0..threads).map(|_| (Array2::ones((n, n)), Array2::ones((n, n)), Array2::zeros((n, n)))).collect();
    let square_flops = 2.0 * (n * n * n) as f64 * threads as f64;
    let mut products: Vec<Products> = (0..shards).map(|_| Products::new(&shapes)).collect();

    let mut engine = LocalEngine::new(&job.model, &data, job.seed, threads).expect("an engine");
    let mut stepper = Stepper::new(&job.model, shards);
    let mut params = job.model.init_params(1);
    let mut opt = Optimizer::new(job.optimizer.clone(), params.len());
    let idx: Vec<u32> = (0..data.len() as u32).collect();
    let mut step = 0u64;

    let budget = Duration::from_millis(300);
    let (mut peak, mut prod, mut full) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        peak.push(per_call(budget, || {
            pool.install(|| squares.par_iter_mut().for_each(|(a, b, c)| general_mat_mul(1.0, &*a, &*b, 0.0, c)))
        }));
        prod.push(per_call(budget, || {
            if threads == 1 {
                products.iter_mut().for_each(Products::run)
            } else {
                pool.install(|| products.par_iter_mut().for_each(Products::run))
            }
        }));
        full.push(per_call(budget, || {
            let start = (step as usize * batch) % (data.len() - batch);
            stepper
                .step(&job.model, &mut engine, &mut params, &mut opt, step, &idx[start..start + batch])
                .expect("the step runs");
            step += 1;
        }));
    }
    let at_peak: Vec<f64> = peak.iter().map(|p| flops / (square_flops / p)).collect();
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    Row {
        name: format!("{name} ({shards} shard(s), {threads} thread(s))"),
        peak_gflops: square_flops / median(peak.clone()) / 1e9,
        products: median(prod.clone()),
        at_peak: median(at_peak.clone()),
        step: median(full.clone()),
        step_over_products: ratio(&full, &prod),
        products_over_peak: ratio(&prod, &at_peak),
        step_over_peak: ratio(&full, &at_peak),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a number is the rounds.
    let rounds = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(7);
    let rows = [
        bench_job("seed, batch 30", "fashion_mnist.toml", 1, rounds),
        bench_job("wide, batch 256", "fashion_mnist_wide.toml", 2, rounds),
    ];
    let us = |s: f64| format!("{:.1} µs", s * 1e6);
    println!("{rounds} rounds, medians; kernel: {}", dtrain_nn::kernel::running());
    println!();
    println!("| job | sgemm peak | products | products at peak | step | step / products | products / at peak | step / at peak |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} GFLOP/s | {} | {} | {} | {:.2}x | {:.2}x | **{:.2}x** |",
            r.name,
            r.peak_gflops,
            us(r.products),
            us(r.at_peak),
            us(r.step),
            r.step_over_products,
            r.products_over_peak,
            r.step_over_peak
        );
    }
}
