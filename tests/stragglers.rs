//! Stragglers, alone in their own test binary: the test measures time, and cargo runs test
//! binaries one after another (tests within one binary run at once and would skew it).

mod common;
use common::*;
use std::path::Path;

/// A job whose shards take tens of milliseconds (a 1.06M-parameter MLP on the tests' CSV,
/// 64 rows per shard, 6 shards): long enough that a straggler stands out from scheduling noise.
fn heavy_job(dir: &Path) -> String {
    let adam = "{ Adam = { learning_rate = 0.001 } }";
    write_mlp_job(dir, "heavy.toml", 3840, 1024, 0.2, adam, "batch_size = 384\nepochs = 10\nshards = 6")
}

/// Seconds of each epoch after the first (the first learns the workers' pace), and the
/// cluster lines.
fn epoch_times(out: &str) -> (f64, Vec<String>) {
    let mut secs = vec![];
    let mut lines = vec![];
    for l in out.lines() {
        if let Some(rest) = l.split("\"seconds\":").nth(1).filter(|_| l.contains("\"epoch_end\"")) {
            let n: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            secs.push(n.parse::<f64>().unwrap());
        }
        if l.contains("shard round trip") {
            lines.push(l.to_string());
        }
    }
    (secs.iter().skip(1).sum(), lines)
}

/// A worker stopped and continued every 50 ms (half speed, in bursts) until dropped.
struct HalfSpeed {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    duty: Option<std::thread::JoinHandle<()>>,
}

impl HalfSpeed {
    fn start(worker: &Proc) -> HalfSpeed {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pid = worker.child.id() as libc::pid_t;
        let halt = std::sync::Arc::clone(&stop);
        let duty = std::thread::spawn(move || {
            while !halt.load(std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: kill(2) on our own child's pid, not reaped before the guard drops.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(std::time::Duration::from_millis(50));
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        HalfSpeed { stop, duty: Some(duty) }
    }
}

impl Drop for HalfSpeed {
    /// Stops the duty cycle, the worker left running.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.duty.take().into_iter().for_each(|t| t.join().unwrap());
    }
}

/// Waits for the run to end, the second worker at half speed if `throttle`; checks it ended
/// well with the in-process weights `want`. Returns `epoch_times`.
fn train(mut c: Proc, workers: &[Proc], throttle: bool, rd: &Path, want: &[u8], name: &str) -> (f64, Vec<String>) {
    let duty = throttle.then(|| HalfSpeed::start(&workers[1]));
    let (ok, out) = c.finish(180);
    drop(duty);
    assert!(ok, "{out}");
    assert!(finals(rd) == want, "{name}: the weights differ from the in-process run's");
    epoch_times(&out)
}

/// Three workers, one of them stopped and continued every 50 ms (half speed, in bursts): its
/// late shards get copies on idle workers and its groups shrink, so the epochs take at most
/// 1.3x as long as with three healthy workers, and the weights are the in-process run's.
#[test]
fn a_worker_at_half_speed_costs_little_with_speculation() {
    let dir = tempfile::tempdir().unwrap();
    let job = heavy_job(dir.path());
    let want = local_run(dir.path(), &job, "10");
    let run = |name: &str, throttle: bool| -> (f64, Vec<String>) {
        let rd = dir.path().join(name);
        let c = coordinator_proc(&job, &rd, "10", &["--listen", "127.0.0.1:0", "--min-workers", "3", "--verify", "0"]);
        let url = listening_url(&c);
        let workers: Vec<Proc> = ["a", "b", "c"].iter().map(|n| worker(&url, &["--name", n])).collect();
        train(c, &workers, throttle, &rd, &want, name)
    };
    // Two of each, interleaved: this machine's speed drifts, and a ratio of sums drifts less.
    let (mut healthy, mut throttled, mut lines) = (0.0, 0.0, vec![]);
    for round in 0..2 {
        healthy += run(&format!("healthy{round}"), false).0;
        let (t, l) = run(&format!("throttled{round}"), true);
        throttled += t;
        lines.extend(l);
    }
    let speculated: u64 =
        lines.iter().filter_map(|l| l.split("speculated ").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
    let ratio = throttled / healthy;
    eprintln!("epochs 2-10, twice: healthy {healthy:.2} s, one worker at half speed {throttled:.2} s ({ratio:.2}x)");
    assert!(speculated > 0, "the throttled worker's shards got copies: {lines:?}");
    assert!(ratio <= 1.3, "a worker at half speed cost {ratio:.2}x: {lines:?}");
}

/// The shards each worker computed in a cluster line, by name.
fn shards_of(line: &str, name: &str) -> Option<u64> {
    let rest = line.split(&format!("{name} (worker")).nth(1)?;
    rest.split(" shard(s)").next()?.rsplit(' ').next()?.parse().ok()
}

/// A chain member stopped and continued every 50 ms (half speed, in bursts): measured below
/// 0.6x of the median worker, it is benched (it stands by, each time longer) instead of holding
/// up every step twice, so the epochs take at most 1.3x as long as with a healthy chain, and
/// the weights are still the in-process run's.
#[test]
fn a_chain_member_at_half_speed_is_benched_and_costs_little() {
    let dir = tempfile::tempdir().unwrap();
    let job = heavy_job(dir.path());
    let want = local_run(dir.path(), &job, "10");
    let run = |name: &str, throttle: bool| -> (f64, Vec<String>, String) {
        let rd = dir.path().join(name);
        let args = ["--listen", "127.0.0.1:0", "--min-workers", "3", "--verify", "0", "--no-shared-memory"];
        let mut c = coordinator_proc(&job, &rd, "10", &[&args[..], &["--topology", "chain"]].concat());
        let url = listening_url(&c);
        let peer = ["--peer-listen", "127.0.0.1:0"];
        let mut workers = vec![];
        for n in ["a", "b", "c"] {
            workers.push(worker(&url, &[&["--name", n], &peer[..]].concat()));
            c.wait_for(&format!("({n}) joined"), 30);
        }
        let duty = throttle.then(|| HalfSpeed::start(&workers[1]));
        let (ok, out) = c.finish(180);
        drop(duty);
        assert!(ok, "{out}");
        assert!(finals(&rd) == want, "{name}: the weights differ from the in-process run's");
        let (secs, lines) = epoch_times(&out);
        (secs, lines, out)
    };
    // Two of each, interleaved: this machine's speed drifts, and a ratio of sums drifts less.
    let (mut healthy, mut throttled) = (0.0, 0.0);
    for round in 0..2 {
        healthy += run(&format!("healthy{round}"), false).0;
        let (secs, lines, out) = run(&format!("throttled{round}"), true);
        throttled += secs;
        assert!(out.contains("b (worker 2) computes at"), "b was benched: {out}");
        assert!(
            lines.iter().any(|l| l.contains("benched (too slow): b (worker 2)")),
            "said in the cluster line: {lines:?}"
        );
        // Back after its 16 steps, b takes a lane from a again (a's to c closed its old one):
        // no step of the chain breaks on the closed lane, or waits on a write b left.
        assert!(out.contains("b (worker 2) is back from the bench"), "b came back: {out}");
        assert!(lines.iter().all(|l| l.contains(", 0 fell back")), "no chain step fell back: {lines:?}");
        let total = |n: &str| lines.iter().filter_map(|l| shards_of(l, n)).sum::<u64>();
        let (a, b, c) = (total("a"), total("b"), total("c"));
        assert!(b < a / 2 && b < c / 2, "the member at half speed computed fewer shards ({a}, {b}, {c}): {lines:?}");
        assert!(lines.iter().all(|l| l.contains("topology chain on")), "{lines:?}");
    }
    let ratio = throttled / healthy;
    eprintln!(
        "chain, epochs 2-10, twice: healthy {healthy:.2} s, one member at half speed {throttled:.2} s ({ratio:.2}x)"
    );
    assert!(ratio <= 1.3, "a chain member at half speed cost {ratio:.2}x");
}
