//! The training step against its own matrix products, side by side in one run:
//!
//!     cargo bench -p dtrain-fit --bench step
//!
//! For each job: `gemm_only` runs exactly the products one step makes (forward, weight
//! gradients, input gradients; one BLAS thread, same shapes), `step` runs the whole step
//! (gather, dropout, activations, loss, backward, shard sum, penalties, optimizer, constraints).
//! Throughput is in FLOP of matrix work, so `step` / `gemm_only` GFLOP/s is the fraction of the
//! BLAS rate the step achieves; their time difference is the per-step overhead outside
//! matrix multiplication. `sgemm_peak` is a large square product for the machine's BLAS rate.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dtrain_data::{Dataset, Features, Labels};
use dtrain_fit::config::JobConfig;
use dtrain_fit::step::Stepper;
use dtrain_fit::{Job, LocalEngine};
use dtrain_optim::Optimizer;
use ndarray::linalg::general_mat_mul;
use ndarray::Array2;
use rayon::prelude::*;
use std::path::PathBuf;

fn job(file: &str, shards: usize) -> Job {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(file);
    let mut config = JobConfig::load(&path).unwrap();
    config.fit.shards = shards;
    Job::build(config, PathBuf::new()).unwrap()
}

fn synthetic(n: usize) -> Dataset {
    let x: Vec<u8> = (0..n * 784).map(|i| ((i * 2_654_435_761usize) >> 7) as u8).collect();
    let y: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    Dataset::new(Features::U8(x), vec![28, 28], Labels::Classes(y)).unwrap().with_rescale(1.0 / 255.0)
}

/// (rows, inputs, units) of each Dense layer.
fn dense_shapes(job: &Job, rows: usize) -> Vec<(usize, usize, usize)> {
    job.model.variables().iter().filter(|v| v.shape.len() == 2).map(|v| (rows, v.shape[0], v.shape[1])).collect()
}

/// FLOP of one step's matrix products: forward, weight gradient, and input gradient except
/// for the first layer.
fn step_flops(shapes: &[(usize, usize, usize)]) -> u64 {
    shapes.iter().enumerate().map(|(i, &(r, k, n))| 2 * (r * k * n) as u64 * if i == 0 { 2 } else { 3 }).sum()
}

fn bench_job(c: &mut Criterion, name: &str, file: &str, shards: usize) {
    dtrain_nn::set_blas_threads(1);
    let job = job(file, shards);
    let batch = job.fit.batch_size;
    let data = synthetic(batch * 50);
    let per_shard = batch / shards;
    let shapes = dense_shapes(&job, per_shard);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(step_flops(&shapes) * shards as u64));

    // The same products, each shard's on its own thread as in `step` (one BLAS thread each).
    let threads = shards.min(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let mut per_shard: Vec<Products> = (0..shards).map(|_| Products::new(&shapes)).collect();
    g.bench_function(BenchmarkId::new("gemm_only", format!("{shards} shard(s), {threads} thread(s)")), |b| {
        b.iter(|| pool.install(|| per_shard.par_iter_mut().for_each(Products::run)))
    });

    let mut engine = LocalEngine::new(&job.model, &data, job.seed, threads).unwrap();
    let mut stepper = Stepper::new(&job.model, shards);
    let mut params = job.model.init_params(1);
    let mut opt = Optimizer::new(job.optimizer.clone(), params.len());
    let idx: Vec<u32> = (0..data.len() as u32).collect();
    let mut step = 0u64;
    g.bench_function(BenchmarkId::new("step", format!("{shards} shard(s), {threads} thread(s)")), |b| {
        b.iter(|| {
            let start = (step as usize * batch) % (data.len() - batch);
            stepper.step(&job.model, &mut engine, &mut params, &mut opt, step, &idx[start..start + batch]).unwrap();
            step += 1;
        })
    });
    g.finish();
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
                (
                    Array2::ones((r, k)),
                    Array2::ones((k, n)),
                    Array2::zeros((r, n)),
                    Array2::zeros((k, n)),
                    Array2::zeros((r, k)),
                )
            })
            .collect();
        Products { mats }
    }

    fn run(&mut self) {
        dtrain_nn::flush_denormals();
        for (i, (x, w, z, gw, gx)) in self.mats.iter_mut().enumerate() {
            general_mat_mul(1.0, &*x, &*w, 0.0, z); // forward
            general_mat_mul(1.0, &x.t(), &*z, 0.0, gw); // weight gradient
            if i > 0 {
                general_mat_mul(1.0, &*z, &w.t(), 0.0, gx); // input gradient
            }
        }
    }
}

fn sgemm_peak(c: &mut Criterion) {
    dtrain_nn::set_blas_threads(1);
    let n = 512;
    let (a, b) = (Array2::<f32>::ones((n, n)), Array2::<f32>::ones((n, n)));
    let mut out = Array2::<f32>::zeros((n, n));
    let mut g = c.benchmark_group("sgemm_peak");
    g.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    g.bench_function("512x512x512, 1 thread", |bch| bch.iter(|| general_mat_mul(1.0, &a, &b, 0.0, &mut out)));
    g.finish();
}

fn benches(c: &mut Criterion) {
    sgemm_peak(c);
    bench_job(c, "seed_batch30", "fashion_mnist.toml", 1);
    bench_job(c, "wide_batch256", "fashion_mnist_wide.toml", 2);
}

criterion_group! { name = step; config = Criterion::default().sample_size(30); targets = benches }
criterion_main!(step);
