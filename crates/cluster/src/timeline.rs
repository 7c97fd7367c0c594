//! Where a step's time goes, as Horovod's timeline shows it: with `DTRAIN_TIMELINE=DIR`, the
//! coordinator and every worker write the moments of each step (work sent, parameters in,
//! shards computed, sum out, ...) to `DIR/<program>-<pid>.jsonl`, one JSON object a line, with
//! the time on the host's monotonic clock in µs. On one host (or emulated hosts, which share
//! the clock) `bench/timeline.py DIR` lines the processes up step by step.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the directory.
pub const VARIABLE: &str = "DTRAIN_TIMELINE";

/// Marks one process writes at most (about 100 bytes each), so a long run cannot fill a disk.
const MOST: u64 = 1_000_000;

struct Timeline {
    who: String,
    out: Mutex<(std::io::BufWriter<std::fs::File>, u64)>,
}

static TIMELINE: OnceLock<Option<Timeline>> = OnceLock::new();

/// Starts this process's timeline if `DTRAIN_TIMELINE` names a directory; `who` names the
/// process in it (the program and, for a worker, its name). A directory that cannot be written
/// is said once and the run goes on without a timeline.
pub fn start(program: &str, who: &str) {
    TIMELINE.get_or_init(|| {
        let dir = std::env::var_os(VARIABLE)?;
        let path = std::path::Path::new(&dir).join(format!("{program}-{}.jsonl", std::process::id()));
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::File::create(&path)) {
            Ok(f) => {
                // Written into JSON as it is: only characters that need no escaping.
                let who = who.chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).collect();
                Some(Timeline { who, out: Mutex::new((std::io::BufWriter::new(f), 0)) })
            }
            Err(e) => {
                tracing::warn!("{VARIABLE}: cannot write {}: {e}; no timeline", path.display());
                None
            }
        }
    });
}

/// The host's monotonic clock in µs (the same clock in every process of a host).
fn now_micros() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000).saturating_add(ts.tv_nsec as u64 / 1000)
}

/// Marks `what` happening now in `step` (nothing without a timeline).
pub fn mark(what: &'static str, step: u64) {
    let Some(Some(t)) = TIMELINE.get() else { return };
    let ts = now_micros();
    if let Ok(mut out) = t.out.lock() {
        if out.1 < MOST {
            out.1 += 1;
            let _ = writeln!(out.0, r#"{{"ts_us":{ts},"who":"{}","what":"{what}","step":{step}}}"#, t.who);
        }
    }
}

/// Writes out what is buffered (at the end of a run).
pub fn flush() {
    if let Some(Some(t)) = TIMELINE.get() {
        if let Ok(mut out) = t.out.lock() {
            let _ = out.0.flush();
        }
    }
}
