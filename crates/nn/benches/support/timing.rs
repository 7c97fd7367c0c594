//! Timing helpers the benchmarks share (included by path from other crates' benches).

use std::time::{Duration, Instant};

/// Seconds per call of `f`, over about `budget` of calls after one warm-up call.
pub fn per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < budget {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(calls.max(1))
}

/// The median (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
