//! The cluster's guarantees, as multi-process tests of the real binaries on 127.0.0.1. Every
//! child is killed when its guard drops, also when a test fails; every wait is bounded.

mod common;
use common::*;
use std::path::Path;

const SHARDS: &str = "shards = 4";

fn job(dir: &Path) -> String {
    write_job(dir, SHARDS).to_str().unwrap().to_string()
}

/// Whether the worker named `name` returned shard results (the epoch's cluster line lists
/// the round trip of every worker that did).
fn computed(out: &str, name: &str) -> bool {
    out.lines().any(|l| l.contains("shard round trip") && l.contains(&format!("{name} (worker")))
}

/// Guarantees 1 and 7: the same weights in process and with 1, 2 or 3 workers (3 does not
/// divide the 4 shards), with L2, activity L1, dropout and MaxNorm on; with tensors in shared
/// memory (local workers' default) and on the gRPC stream.
#[test]
fn same_weights_with_any_number_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let want = local_run(dir.path(), &job, "3");
    for (n, shared) in [("1", true), ("2", true), ("3", true), ("2", false)] {
        let rd = dir.path().join(format!("w{n}{shared}"));
        let mut args = vec!["--spawn-workers", n];
        if !shared {
            args.push("--no-shared-memory");
        }
        let mut c = coordinator_proc(&job, &rd, "3", &args);
        let (ok, out) = c.finish(60);
        assert!(ok, "{out}");
        assert_eq!(out.contains("go through shared memory"), shared, "{out}");
        for i in 0..n.parse().unwrap() {
            assert!(computed(&out, &format!("local-{i}")), "local-{i} computed no shard with {n} workers: {out}");
        }
        assert!(finals(&rd) == want, "{n} worker(s) changed the weights (shared memory: {shared})");
    }
}

/// The chain: two and three workers that add their shards to the running sum in turn give
/// the in-process weights, every step over the chain (3 workers: groups of 2, 1 and 1 shards;
/// with 8 shards, 4 each).
#[test]
fn the_chain_gives_the_same_weights_with_two_and_three_workers() {
    for (n, shards) in [("2", "4"), ("3", "4"), ("2", "8")] {
        let dir = tempfile::tempdir().unwrap();
        let job = write_job(dir.path(), &format!("shards = {shards}")).to_str().unwrap().to_string();
        let want = local_run(dir.path(), &job, "3");
        let rd = dir.path().join("chain");
        let args = ["--spawn-workers", n, "--no-shared-memory", "--verify", "0", "--topology", "chain"];
        let mut c = coordinator_proc(&job, &rd, "3", &args);
        let (ok, out) = c.finish(60);
        assert!(ok, "{out}");
        let chained: Vec<&str> = out.lines().filter(|l| l.contains("shard round trip")).collect();
        assert_eq!(chained.len(), 3, "{out}");
        for line in chained {
            let (on, of, fell) = chain_steps(line).unwrap_or_else(|| panic!("no chain steps: {line}"));
            assert!(on == of && on > 0 && fell == 0, "{line}");
            assert!(line.contains(&format!("the star, {on} on lanes")), "chunks on lanes: {line}");
            for i in 0..n.parse().unwrap() {
                assert!(line.contains(&format!("local-{i} (worker")), "local-{i} computed no shard: {line}");
            }
        }
        assert!(finals(&rd) == want, "the chain of {n} with {shards} shards changed the weights");
    }
}

/// From a cluster line: (steps over the chain, steps, chain steps that fell back to the star).
fn chain_steps(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.split("topology chain on ").nth(1)?;
    let words: Vec<&str> = rest.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).take(3).collect();
    match words[..] {
        [on, of, fell] => Some((on.parse().ok()?, of.parse().ok()?, fell.parse().ok()?)),
        _ => None,
    }
}

/// The in-process run of `job` for `epochs` (its weights), and a coordinator for the same that
/// listens on loopback for `min_workers` workers off shared memory (`--verify verify`, then
/// `extra`): its run directory, process and URL.
fn off_shared_memory(
    dir: &std::path::Path,
    job: &str,
    epochs: &str,
    min_workers: &str,
    verify: &str,
    extra: &[&str],
) -> (Vec<u8>, std::path::PathBuf, Proc, String) {
    let want = local_run(dir, job, epochs);
    let rd = dir.join("run");
    let args = ["--listen", "127.0.0.1:0", "--min-workers", min_workers, "--no-shared-memory", "--verify", verify];
    let c = coordinator_proc(job, &rd, epochs, &[&args[..], extra].concat());
    let url = listening_url(&c);
    (want, rd, c, url)
}

/// Three chain members a, b, c on a listening coordinator (`--verify verify`), off shared
/// memory; `b` advertises `b_peer` as its peer address if given, and runs with `b_env`.
fn three_in_a_chain(
    b_peer: Option<&str>,
    verify: &str,
    b_env: Option<(&str, &str)>,
) -> (tempfile::TempDir, Vec<u8>, std::path::PathBuf, Proc, [Proc; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let extra = ["--topology", "chain", "--step-timeout", "120"];
    let (want, rd, c, url) = off_shared_memory(dir.path(), &job, "40", "3", verify, &extra);
    let peer = ["--peer-listen", "127.0.0.1:0"];
    let a = worker(&url, &[&["--name", "a"], &peer[..]].concat());
    c.wait_for("(a) joined", 30);
    let advertise: Vec<&str> = b_peer.map(|addr| vec!["--peer-advertise", addr]).unwrap_or_default();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.args(["--coordinator", &url, "--retry-for", "30", "--name", "b"]).args(&advertise).args(peer);
    cmd.env("DTRAIN_TOKEN", TOKEN);
    if let Some((k, v)) = b_env {
        cmd.env(k, v);
    }
    let b = Proc::start(cmd);
    c.wait_for("(b) joined", 30);
    let cw = worker(&url, &[&["--name", "c"], &peer[..]].concat());
    (dir, want, rd, c, [a, b, cw])
}

/// A chain member killed while the chain waits on it: the step is computed over the star
/// (same bits), and the next steps go over a chain of the two left.
#[test]
fn a_chain_member_killed_mid_step_falls_back_to_the_star_with_the_same_bits() {
    let (_dir, want, rd, c, [_a, b, _c]) = three_in_a_chain(None, "0", None);
    let formed = c.wait_for("topology chain: ", 30);
    assert!(formed.contains("a (worker 1) -> b (worker 2) -> c (worker 3)"), "{formed}");
    c.wait_for("\"epoch\":2,", 60);
    // Stopped, `b` holds up the chain: its successor waits for the running sum, the
    // coordinator for the last chunk. Killed then (before the learned chain deadline of at
    // least 1 s), it leaves mid-step; the step goes over the star.
    b.signal(libc::SIGSTOP);
    std::thread::sleep(std::time::Duration::from_millis(300));
    b.signal(libc::SIGKILL);
    let seen = c.wait_for_each(&["the chain broke", "(b) left"], 30);
    assert!(!seen[0].contains("did not arrive"), "the kill broke the chain, not the deadline: {}", seen[0]);
    let reformed = c.wait_for("topology chain: a (worker 1) -> c (worker 3)", 30);
    assert!(!reformed.is_empty());
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    let fell: u64 = out.lines().filter_map(chain_steps).map(|(_, _, fell)| fell).sum();
    assert!(fell >= 1, "the step with the kill fell back to the star: {out}");
    assert!(finals(&rd) == want, "a member killed mid-step changed the weights");
}

/// A chain member that adds a wrong value to the running sum it passes on (from step 20), with
/// verification on: an audit (the coordinator recomputes the whole step) finds the sum wrong and
/// the members' digests name the liar, which is evicted; training goes back to before its first
/// unchecked step and replays without it, so the weights are the in-process run's.
#[test]
fn a_chain_member_that_lies_is_caught_by_an_audit_and_its_damage_undone() {
    let lie = Some(("DTRAIN_FAULT_INJECTION", "chain-sum-from-step:20"));
    let (_dir, want, rd, c, _workers) = three_in_a_chain(None, "0.05", lie);
    let formed = c.wait_for("topology chain: ", 30);
    assert!(formed.contains("a (worker 1) -> b (worker 2) -> c (worker 3)"), "{formed}");
    let caught = c.wait_for("differs from the coordinator's recomputation", 60);
    assert!(caught.contains("b (worker 2)"), "the liar is named: {caught}");
    let step: u64 = caught.split(" of step ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap();
    assert!((20..20 + 2 * 16).contains(&step), "caught within its first windows, at step {step}");
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l.contains("shard round trip") && !l.contains("rolled back 0 time")), "{out}");
    assert!(finals(&rd) == want, "the liar's damage was not undone");
}

/// A chain of one member (off shared memory; a second worker without a peer port stands by)
/// that adds a wrong value to the sum of its shards (from step 20), with verification on: an
/// audit finds the sum wrong and names it, it is evicted, and training goes back and replays
/// over the star with the other worker, so the weights are the in-process run's.
#[test]
fn a_lone_chain_member_that_lies_is_caught_by_an_audit() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let extra = ["--topology", "auto", "--step-timeout", "120"];
    let (want, rd, c, url) = off_shared_memory(dir.path(), &job, "40", "2", "0.05", &extra);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.args(["--coordinator", &url, "--retry-for", "30", "--name", "b", "--peer-listen", "127.0.0.1:0"]);
    cmd.env("DTRAIN_TOKEN", TOKEN).env("DTRAIN_FAULT_INJECTION", "chain-sum-from-step:20");
    let _b = Proc::start(cmd);
    let _h = worker(&url, &["--name", "h"]);
    let formed = c.wait_for("topology chain: ", 30);
    assert!(formed.contains("topology chain: b (worker") && !formed.contains("->"), "b alone: {formed}");
    let caught = c.wait_for("differs from the coordinator's recomputation", 60);
    assert!(caught.contains("b (worker"), "the liar is named: {caught}");
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(out.contains("topology star: no worker can take part in a chain"), "{out}");
    assert!(out.lines().any(|l| l.contains("shard round trip") && !l.contains("rolled back 0 time")), "{out}");
    assert!(finals(&rd) == want, "the liar's damage was not undone");
}

/// A worker its predecessor cannot reach (it advertises a port nobody listens on): the link
/// is reported broken, the step goes over the star, and the chain is rebuilt without it, with
/// one log line saying why; the weights are unchanged.
#[test]
fn a_worker_peers_cannot_reach_leaves_the_chain() {
    let (_dir, want, rd, mut c, _workers) = three_in_a_chain(Some("127.0.0.1:1"), "0", None);
    let why = c.wait_for("cannot take part in chains", 60);
    assert!(why.contains("b (worker 2)") && why.contains("a (worker 1) reports"), "{why}");
    c.wait_for("topology chain: a (worker 1) -> c (worker 3)", 30);
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(!out.contains("cannot take part in chains"), "said once, not again: {out}");
    let fell: u64 = out.lines().filter_map(chain_steps).map(|(_, _, fell)| fell).sum();
    assert_eq!(fell, 1, "one step fell back, then the chain went on without b: {out}");
    assert!(finals(&rd) == want, "an unreachable member changed the weights");
}

/// `DTRAIN_TIMELINE`: the coordinator and both (spawned) chain members each write their own
/// file, with a mark for every step's moments: the coordinator's beginnings and sums, each
/// member's work, parameters, computed shards and sums.
#[test]
fn a_timeline_marks_every_step_in_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let tl = dir.path().join("timeline");
    let rd = dir.path().join("run");
    let args = ["--spawn-workers", "2", "--no-shared-memory", "--verify", "0", "--topology", "chain"];
    let mut cmd = train(job.as_ref(), &rd);
    cmd.args(["--epochs", "2", "--log-format", "json"]).args(args).env("DTRAIN_TIMELINE", &tl);
    let mut c = Proc::start(cmd);
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");
    let files: Vec<(String, String)> = std::fs::read_dir(&tl)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    assert_eq!(files.len(), 3, "one file per process: {files:?}");
    let count = |text: &str, what: &str| text.lines().filter(|l| l.contains(&format!("\"what\":\"{what}\""))).count();
    let steps = 24; // 2 epochs of 12 steps
    for (name, text) in &files {
        assert!(text.lines().all(|l| l.starts_with("{\"ts_us\":") && l.ends_with('}')), "{name}: {text}");
        if name.starts_with("coordinator-") {
            for what in ["step begins", "work sent", "parameters sent", "sum in", "step ends"] {
                assert_eq!(count(text, what), steps, "{name}: {what}");
            }
        } else {
            assert!(name.starts_with("worker-"), "{name}");
            for what in ["chain work in", "parameters in", "shards computed", "first sum out", "sum out"] {
                assert_eq!(count(text, what), steps, "{name}: {what}");
            }
        }
    }
}

/// A first member whose peer port the coordinator cannot dial (it advertises a port nobody
/// listens on; it has no predecessor, so only the coordinator would dial it): its parameters
/// take its stream, said once, while the sum still comes back on the last member's lane; every
/// step goes over the chain and the weights are the in-process run's.
#[test]
fn the_parameters_take_the_stream_to_a_first_member_the_coordinator_cannot_dial() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let (want, rd, mut c, url) = off_shared_memory(dir.path(), &job, "3", "2", "0", &["--topology", "chain"]);
    let peer = ["--peer-listen", "127.0.0.1:0"];
    let _a = worker(&url, &[&["--name", "a", "--peer-advertise", "127.0.0.1:1"], &peer[..]].concat());
    c.wait_for("(a) joined", 30);
    let _b = worker(&url, &[&["--name", "b"], &peer[..]].concat());
    let why = c.wait_for("no lane to a (worker 1)'s peer port", 30);
    assert!(why.contains("its chunks take its stream"), "{why}");
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");
    assert!(!out.contains("no lane to"), "said once, not again: {out}");
    for line in out.lines().filter(|l| l.contains("shard round trip")) {
        let (on, of, fell) = chain_steps(line).unwrap_or_else(|| panic!("no chain steps: {line}"));
        assert!(on == of && on > 0 && fell == 0, "{line}");
        assert!(line.contains("the star, 0 on lanes"), "the parameters took the stream: {line}");
    }
    assert!(finals(&rd) == want, "parameters on the stream changed the weights");
}

/// A run with workers `a` and `b` on a listening coordinator, past its second epoch; also the
/// in-process run's final weights to compare with, the run directory and the workers' URL.
struct TwoWorkers {
    _dir: tempfile::TempDir,
    want: Vec<u8>,
    rd: std::path::PathBuf,
    url: String,
    c: Proc,
    a: Proc,
    b: Proc,
}

fn two_workers(epochs: &str, extra: &[&str]) -> TwoWorkers {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let want = local_run(dir.path(), &job, epochs);
    let rd = dir.path().join("run");
    let mut args = vec!["--listen", "127.0.0.1:0", "--min-workers", "2"];
    args.extend(extra);
    let c = coordinator_proc(&job, &rd, epochs, &args);
    let url = listening_url(&c);
    let a = worker(&url, &["--name", "a"]);
    let b = worker(&url, &["--name", "b"]);
    c.wait_for("\"epoch\":2,", 60);
    TwoWorkers { _dir: dir, want, rd, url, c, a, b }
}

/// Guarantees 2 and 4: a worker killed with SIGKILL while its shards are out, and another
/// joining mid-run and taking a share of the work.
#[test]
fn worker_killed_and_worker_joining_mid_run() {
    let TwoWorkers { _dir, want, rd, url, c, a, b: _b } = two_workers("100", &["--step-timeout", "120"]);
    // Stopped, `a` cannot answer: within a second the coordinator has sent it a step's shards
    // and waits for them (the deadline is far away). Killed then, its shards are outstanding.
    a.signal(libc::SIGSTOP);
    std::thread::sleep(std::time::Duration::from_secs(1));
    a.signal(libc::SIGKILL);
    let moved = c.wait_for("go to others", 30);
    assert!(moved.contains("of a (worker"), "{moved}");
    let _late = worker(&url, &["--name", "late"]);
    c.wait_for("(late) joined", 30);
    c.wait_for("late (worker", 60); // a cluster line with the late worker's round trips
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(finals(&rd) == want, "losing and gaining workers changed the weights");
}

/// Guarantee 3: a worker stopped with SIGSTOP misses the step deadline, its shards go to the
/// other worker, and the weights do not change.
#[test]
fn hung_worker_is_detected_within_the_deadline() {
    let TwoWorkers { _dir, want, rd, c, a: _a, b, .. } = two_workers("60", &["--step-timeout", "0.5"]);
    b.signal(libc::SIGSTOP);
    let missed = c.wait_for("missed the", 30);
    assert!(missed.contains("b (worker"), "{missed}");
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(finals(&rd) == want, "a hung worker changed the weights");
}

/// A frozen worker (SIGSTOP) with the default 30 s step deadline: its connection stops
/// answering keepalive pings, so the coordinator gives its shards to the other worker within
/// seconds, not after the deadline; the weights are unchanged.
#[test]
fn a_frozen_worker_is_noticed_within_seconds() {
    let TwoWorkers { _dir, want, rd, c, a: _a, b, .. } = two_workers("60", &[]);
    let frozen = std::time::Instant::now();
    b.signal(libc::SIGSTOP);
    let gone = c.wait_for("go to others", 30);
    let noticed = frozen.elapsed();
    assert!(gone.contains("b (worker"), "{gone}");
    assert!(noticed < std::time::Duration::from_secs(5), "noticed after {noticed:?}");
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(finals(&rd) == want, "a frozen worker changed the weights");
}

/// The sealed memory files process `pid` holds open (what its descriptors point to).
fn memory_files(pid: u32) -> Vec<String> {
    let fds =
        std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().filter_map(|e| std::fs::read_link(e.ok()?.path()).ok());
    fds.map(|t| t.to_string_lossy().into_owned()).filter(|t| t.contains("memfd:dtrain-")).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Guarantee 5: the coordinator killed with SIGKILL mid-run and restarted with --resume ends
/// with the same weights; workers reconnect on their own; history has each epoch once.
#[test]
fn coordinator_killed_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let want = local_run(dir.path(), &job, "30");
    let rd = dir.path().join("run");
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{addr}");
    let c = coordinator_proc(&job, &rd, "30", &["--listen", &addr, "--min-workers", "2"]);
    let _a = worker(&url, &["--name", "a"]);
    let _b = worker(&url, &["--name", "b"]);
    c.wait_for("\"epoch\":3,", 60);
    // The parameters are shared in a memory file, not a named file a killed coordinator would
    // leave in /dev/shm: the kernel frees it with the last process that maps it.
    let held = memory_files(c.child.id());
    assert!(held.iter().any(|t| t.contains("memfd:dtrain-params")), "{held:?}");
    assert!(!std::fs::read_dir("/dev/shm")
        .unwrap()
        .any(|e| { e.unwrap().file_name().to_string_lossy().starts_with(&format!("dtrain-{}-", c.child.id())) }));
    c.signal(libc::SIGKILL);
    drop(c);
    let mut cmd = coordinator();
    cmd.args(["train", "--run-dir", rd.to_str().unwrap(), "--resume", "--listen", &addr, "--min-workers", "2", "-q"]);
    let mut c = Proc::start(cmd);
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(finals(&rd) == want, "resuming the coordinator changed the weights");
    let history = std::fs::read_to_string(rd.join("history.csv")).unwrap();
    let epochs: Vec<&str> = history.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(epochs, (0..30).map(|e| e.to_string()).collect::<Vec<_>>());
}

/// Guarantee 6 (token): a worker with the wrong token is refused with a clear message and
/// training goes on with the right one.
#[test]
fn wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "the-right-token-of-this-test\n").unwrap();
    let rd = dir.path().join("run");
    let c = coordinator_proc(&job, &rd, "3", &["--listen", "127.0.0.1:0", "--token-file", token.to_str().unwrap()]);
    let url = listening_url(&c);
    let mut bad = worker_with(&url, &[], Some("a-wrong-token-of-this-test"));
    let (ok, out) = bad.finish(30);
    assert!(!ok);
    assert!(out.contains("rejected by the coordinator: missing or wrong job token"), "{out}");
    let _good = worker(&url, &["--token-file", token.to_str().unwrap()]);
    let mut c = c;
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");
}

/// `--spawn-workers` without a token: the coordinator makes one for the run and gives it to its
/// own workers, so another local process cannot join (nor read the job and its rows); an empty
/// token is refused outright.
#[test]
fn spawned_workers_get_a_run_token_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let rd = dir.path().join("run");
    let mut cmd = train(job.as_ref(), &rd);
    cmd.args(["--epochs", "30", "--spawn-workers", "1"]).env_remove("DTRAIN_TOKEN");
    let c = Proc::start(cmd);
    let url = listening_url(&c);
    let mut stranger = worker_with(&url, &["--name", "stranger"], None);
    let (ok, out) = stranger.finish(30);
    assert!(!ok && out.contains("missing or wrong job token"), "{out}");
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    assert!(computed(&out, "local-0"), "the spawned worker computed: {out}");
    assert!(!out.contains("(stranger) joined"), "{out}");

    for (token, says) in [
        (" ", "the job token is empty"),
        ("short-token", "the job token has 11 bytes; use at least 16"),
        (dtrain_cluster::auth::PLACEHOLDER, "the manifests' placeholder"),
    ] {
        let mut cmd = train(job.as_ref(), &dir.path().join("r2"));
        cmd.args(["--listen", "127.0.0.1:0"]).env("DTRAIN_TOKEN", token);
        let (ok, out) = Proc::start(cmd).finish(30);
        assert!(!ok && out.contains(says), "{out}");
    }
}

/// A worker dialing something that accepts connections but never answers gives up after
/// --retry-for (each attempt bounded), instead of waiting forever.
#[test]
fn a_worker_gives_up_on_a_peer_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // accepts (backlog), never reads
    let url = format!("http://{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.args(["--coordinator", &url, "--retry-for", "2"]);
    let (ok, out) = Proc::start(cmd).finish(60);
    assert!(!ok && out.contains("cannot reach the coordinator"), "{out}");
    // Each attempt ends at the join deadline, or sooner when the unanswered keepalive pings do.
    let reasons = ["no answer within", "no connection within", "http2 error"];
    assert!(reasons.iter().any(|r| out.contains(r)), "{out}");
    assert!(started.elapsed() < std::time::Duration::from_secs(40), "gave up in {:?}", started.elapsed());
    drop(silent);
}

/// Without a token (or mutual TLS) the coordinator does not listen, not even on loopback,
/// unless told --insecure; and the token is never a flag (the process list shows flags).
#[test]
fn no_token_no_listening() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    for listen in ["0.0.0.0:0", "127.0.0.1:0"] {
        let mut cmd = train(job.as_ref(), &dir.path().join("r"));
        cmd.args(["--listen", listen]).env_remove("DTRAIN_TOKEN");
        let o = cmd.output().unwrap();
        assert!(!o.status.success());
        let says = format!("refusing to listen on {listen} without a job token");
        assert!(stderr(&o).contains(&says), "{}", stderr(&o));
    }
    let o = run(&["train", "--config", &job, "--listen", "127.0.0.1:0", "--token", "0123456789abcdef0123"]);
    assert!(!o.status.success() && stderr(&o).contains("unexpected argument '--token'"), "{}", stderr(&o));
    let mut cmd = train(job.as_ref(), &dir.path().join("r3"));
    cmd.args(["--listen", "127.0.0.1:0", "--insecure", "--epochs", "1"]).env_remove("DTRAIN_TOKEN");
    let c = Proc::start(cmd);
    let _w = worker_with(&listening_url(&c), &[], None);
    let mut c = c;
    let (ok, out) = c.finish(60);
    assert!(ok, "--insecure trains without a token: {out}");
}

/// SIGTERM: the coordinator saves its state mid-epoch, tells the workers to stop (they exit
/// cleanly), and a resumed run ends with the uninterrupted run's weights.
#[test]
fn sigterm_saves_the_state_and_stops_workers() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let want = local_run(dir.path(), &job, "100");
    let rd = dir.path().join("run");
    let c = coordinator_proc(&job, &rd, "100", &["--listen", "127.0.0.1:0"]);
    let url = listening_url(&c);
    let mut w = worker(&url, &[]);
    c.wait_for("\"epoch\":2,", 60);
    c.signal(libc::SIGTERM);
    let mut c = c;
    let (ok, out) = c.finish(30);
    assert!(!ok, "an interrupted run exits non-zero");
    assert!(out.contains("interrupted at epoch") && out.contains("--resume --run-dir"), "{out}");
    let (ok, out) = w.finish(30);
    assert!(ok && out.contains("stopping"), "the worker should stop cleanly: {out}");
    let o = run(&["train", "--run-dir", rd.to_str().unwrap(), "--resume", "--spawn-workers", "1", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(finals(&rd) == want, "SIGTERM and resume changed the weights");
}

/// SIGTERM while the coordinator waits for workers (at start, and mid-run after its only worker
/// died) ends the wait at once, not after --worker-wait; mid-run the state is saved and a resumed
/// run ends with the uninterrupted run's weights.
#[test]
fn sigterm_ends_a_wait_for_workers() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let started = std::time::Instant::now();
    let c = coordinator_proc(&job, &dir.path().join("r0"), "3", &["--listen", "127.0.0.1:0", "--worker-wait", "300"]);
    c.wait_for("waiting for 1 worker(s)", 30);
    c.signal(libc::SIGTERM);
    let mut c = c;
    let (ok, out) = c.finish(30);
    assert!(!ok && out.contains("interrupted while waiting for workers"), "{out}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "not after --worker-wait");

    let want = local_run(dir.path(), &job, "100");
    let rd = dir.path().join("run");
    let c = coordinator_proc(&job, &rd, "100", &["--listen", "127.0.0.1:0", "--worker-wait", "300"]);
    let url = listening_url(&c);
    let w = worker(&url, &["--name", "only"]);
    c.wait_for("\"epoch\":2,", 60);
    w.signal(libc::SIGKILL);
    c.wait_for("no live worker; waiting up to", 60);
    c.signal(libc::SIGTERM);
    let mut c = c;
    let (ok, out) = c.finish(30);
    assert!(!ok && out.contains("interrupted at epoch") && out.contains("--resume --run-dir"), "{out}");
    let o = run(&["train", "--run-dir", rd.to_str().unwrap(), "--resume", "--spawn-workers", "1", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(finals(&rd) == want, "an interrupted wait and a resume changed the weights");
}

fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The coordinator's Prometheus endpoint: step, loss, learning rate, workers, bytes on the
/// wire and the step-time histogram while training runs; any other path is 404.
#[test]
fn metrics_endpoint_serves_only_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let rd = dir.path().join("run");
    let addr = format!("127.0.0.1:{}", free_port());
    let c = coordinator_proc(&job, &rd, "200", &["--spawn-workers", "1", "--metrics-listen", &addr]);
    c.wait_for("\"epoch\":1,", 60);
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    for needle in [
        "dtrain_step ",
        "dtrain_loss ",
        "dtrain_learning_rate 0.00999999",
        "dtrain_workers_alive 1",
        "dtrain_wire_sent_bytes_total ",
        "dtrain_step_seconds_count ",
    ] {
        assert!(body.contains(needle), "{needle:?} missing from:\n{body}");
    }
    assert_eq!(http_get(&addr, "/").0, "HTTP/1.1 404 Not Found");
    assert_eq!(http_get(&addr, "/metrics/x").0, "HTTP/1.1 404 Not Found");
    // Idle and trickling clients do not hold the endpoint for others.
    use std::io::Write;
    let idle: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GE").unwrap();
    let t = std::time::Instant::now();
    assert_eq!(http_get(&addr, "/metrics").0, "HTTP/1.1 200 OK");
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "answered in {:?} beside idle clients", t.elapsed());
    drop((idle, slow));
}

/// A diverging run (the loss overflows at the second step) stops at the same step with the
/// same message in process and with workers (on the stream and in shared memory): the workers'
/// non-finite results are confirmed by the coordinator's own recomputation, not held against them.
#[test]
fn a_diverging_run_stops_the_same_way_with_or_without_workers() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(job(dir.path())).unwrap();
    let text = text.replace("Adam = { learning_rate = 0.01, beta_1 = 0.89 }", "SGD = { learning_rate = 1e30 }");
    assert!(text.contains("1e30"));
    let job = dir.path().join("diverges.toml");
    std::fs::write(&job, text).unwrap();
    let mut stops = vec![];
    for (n, extra) in [
        ("local", &["--local"][..]),
        ("grpc", &["--spawn-workers", "2", "--no-shared-memory"]),
        ("shm", &["--spawn-workers", "2"]),
    ] {
        let mut cmd = train(&job, &dir.path().join(n));
        cmd.args(["--worker-wait", "20"]).args(extra);
        let (ok, out) = Proc::start(cmd).finish(60);
        assert!(!ok, "{n}: {out}");
        assert!(!out.contains("bad result"), "{n}: {out}");
        // The coordinator's error line; a worker's output may run into it (they share the pipe).
        let stop = out.lines().find_map(|l| l.find("error: ").map(|at| &l[at..]));
        stops.push(stop.unwrap_or_default().to_string());
    }
    assert!(stops[0].contains("loss became NaN at epoch 1, batch 2"), "{stops:?}");
    assert!(stops.iter().all(|s| *s == stops[0]), "{stops:?}");
}

/// More workers than shards: the extra ones stand by for failures, and the coordinator says so
/// (the shard count is the job's, since the result depends on it).
#[test]
fn workers_beyond_the_shard_count_are_said_to_stand_by() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "shards = 1");
    let mut cmd = train(&job, &dir.path().join("r"));
    cmd.args(["--epochs", "1", "--spawn-workers", "2"]);
    let (ok, out) = Proc::start(cmd).finish(60);
    assert!(ok, "{out}");
    assert!(out.contains("fit.shards is 1: at most 1 of the 2 workers compute each step"), "{out}");
}

/// The run's BLAS kernel: the same weights in process and with two workers under each kernel
/// this CPU runs (`haswell`, and `auto`, which is `skylakex` on an AVX-512 CPU), different
/// weights between kernels (the kernel is part of the result), and a worker started with
/// another kernel than the run's restarts itself with the run's before it computes.
#[test]
fn bits_hold_under_each_blas_kernel_and_workers_take_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fashion_mnist.toml")).unwrap();
    let avx512 =
        ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"].iter().all(|f| dtrain_nn::kernel::cpu_has(f));
    let mut results = vec![];
    for setting in ["haswell", "auto"] {
        let text = seed.replace("epochs = 10", &format!("epochs = 1\nshards = 2\nkernel = \"{setting}\""));
        let job = dir.path().join(format!("{setting}.toml"));
        std::fs::write(&job, text).unwrap();
        let local = dir.path().join(format!("{setting}-local"));
        let o = run(&["train", "--config", job.to_str().unwrap(), "--run-dir", local.to_str().unwrap(), "--local"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let recorded = std::fs::read_to_string(local.join("job.toml")).unwrap();
        let chosen = if recorded.contains("kernel = \"skylakex\"") { "SkylakeX" } else { "Haswell" };
        assert!(recorded.contains(&format!("kernel = \"{}\"", chosen.to_lowercase())), "{recorded}");
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(said.contains(&format!("BLAS kernel: {} ({chosen})", chosen.to_lowercase())), "{said}");
        // Two workers; the second starts with the other kernel (if this CPU runs it).
        let other = if chosen == "Haswell" { avx512.then_some("SkylakeX") } else { Some("Haswell") };
        let rd = dir.path().join(format!("{setting}-cluster"));
        let c = coordinator_proc(job.to_str().unwrap(), &rd, "1", &["--listen", "127.0.0.1:0", "--min-workers", "2"]);
        let url = listening_url(&c);
        let _a = worker(&url, &["--name", "a"]);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_worker"));
        cmd.args(["--coordinator", &url, "--retry-for", "30", "--name", "b"]).env("DTRAIN_TOKEN", TOKEN);
        if let Some(o) = other {
            cmd.env("OPENBLAS_CORETYPE", o);
        }
        let mut b = Proc::start(cmd);
        let mut c = c;
        let (ok, out) = c.finish(120);
        assert!(ok, "{out}");
        let (_, said) = b.finish(30);
        if other.is_some() {
            assert!(said.contains("restarting with it"), "{said}");
        }
        assert!(said.contains(&format!("BLAS kernel {chosen}")), "{said}");
        assert!(
            finals(&rd) == std::fs::read(local.join("final.safetensors")).unwrap(),
            "{setting}: workers changed the weights"
        );
        results.push((chosen, finals(&rd)));
    }
    if results[0].0 != results[1].0 {
        assert!(results[0].1 != results[1].1, "two kernels gave the same bits: the kernel was not applied");
    } else {
        eprintln!("this CPU has no AVX-512: auto is haswell, one kernel tested");
    }
}

/// The second member of a chain frozen (SIGSTOP) as training starts: the first cannot reach
/// it and stops taking parameters, so the coordinator's lane to the first, with a 36 MB model's
/// parameters outgrowing its socket buffers, stalls. The parameters wait no longer than every
/// member stays (the frozen one is dropped once its keepalive pings go unanswered, in about
/// 3 s), nor than the chain's learned deadline once there is one; not the step timeout (120 s
/// here), as they did before. The step goes over the star, the chain goes on without the frozen
/// member, and the weights are the in-process run's.
#[test]
fn a_frozen_member_holds_up_the_parameters_only_for_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let sgd = "{ SGD = { learning_rate = 0.01 } }";
    let job = write_mlp_job(dir.path(), "big.toml", 320, 3000, 0.0, sgd, "batch_size = 32\nepochs = 6\nshards = 4");
    let job = job.as_str();
    let extra = ["--topology", "chain", "--step-timeout", "120"];
    let (want, rd, c, url) = off_shared_memory(dir.path(), job, "6", "3", "0", &extra);
    let peer = ["--peer-listen", "127.0.0.1:0"];
    let mut workers = vec![];
    for n in ["a", "b"] {
        workers.push(worker(&url, &[&["--name", n], &peer[..]].concat()));
        c.wait_for(&format!("({n}) joined"), 30);
    }
    // Frozen as the third worker, whose joining starts training, dials in.
    workers.push(worker(&url, &[&["--name", "c"], &peer[..]].concat()));
    workers[1].signal(libc::SIGSTOP);
    let mut c = c;
    let (ok, out) = c.finish(300);
    assert!(ok, "{out}");
    let broke: Vec<&str> = out.lines().filter(|l| l.contains("the chain broke")).collect();
    let on_parameters =
        |l: &&str| l.contains("step 0: the chain broke (a member left while the parameters were on their way)");
    assert!(broke.iter().any(on_parameters), "the first step stalled on the parameters: {broke:?}");
    assert!(out.contains("(b) left"), "{out}");
    assert!(out.contains("topology chain: a (worker 1) -> c (worker 3)"), "{out}");
    for l in out.lines().filter(|l| l.contains("\"epoch_end\"")) {
        let seconds: f64 =
            l.split("\"seconds\":").nth(1).and_then(|r| r.split([',', '}']).next()?.parse().ok()).unwrap();
        assert!(seconds < 30.0, "an epoch stalled on the frozen member ({seconds} s): {l}");
    }
    assert!(finals(&rd) == want, "a frozen member changed the weights");
}
