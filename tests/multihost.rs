//! The cluster across emulated hosts (network namespaces, `testbed/netns.sh`): what workers on
//! other machines do, over real links with their own addresses, bounded in time, and cleaned
//! up on failure.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// A coordinator on host 0 and workers named host-1, host-2 on hosts 1 and 2, links capped at
/// 1 Gbit/s, beside an in-process run of the same job as the reference.
struct Cluster {
    dir: tempfile::TempDir,
    bed: Testbed,
    c: Proc,
    _workers: Vec<Proc>,
}

impl Cluster {
    /// `epochs`: the job's own when `None`; `chain`: the workers take part in chains (peer
    /// ports on their hosts' addresses) and the coordinator uses them (`--topology chain`).
    fn start(epochs: Option<&str>, chain: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let job = write_job(dir.path(), "shards = 4");
        let epochs: Vec<&str> = epochs.map(|e| vec!["--epochs", e]).unwrap_or_default();
        let local = dir.path().join("local");
        let mut reference = vec!["train", "--config", job.to_str().unwrap(), "--run-dir", local.to_str().unwrap()];
        reference.extend(["-q", "--local"].iter().chain(&epochs));
        let o = run(&reference);
        assert!(o.status.success(), "{}", stderr(&o));
        let bed = Testbed::up(3, Some("1gbit"));
        let listen = format!("{}:50051", Testbed::addr(0));
        let mut cmd = bed.command(0, env!("CARGO_BIN_EXE_coordinator"));
        cmd.args(["train", "--config", job.to_str().unwrap(), "--run-dir", dir.path().join("run").to_str().unwrap()]);
        cmd.args(["--listen", &listen, "--min-workers", "2", "--log-format", "json"]).args(&epochs);
        if chain {
            // Verification stays on (the default): chain steps are audited across hosts too.
            cmd.args(["--topology", "chain"]);
        }
        cmd.env("DTRAIN_TOKEN", TOKEN);
        let c = Proc::start(cmd);
        c.wait_for(&format!("listening on {listen}"), 30);
        let url = format!("http://{listen}");
        let workers = (1..=2)
            .map(|i| {
                let mut w = bed.command(i, env!("CARGO_BIN_EXE_worker"));
                w.args(["--coordinator", &url, "--retry-for", "30", "--name", &format!("host-{i}")]);
                if chain {
                    w.args(["--peer-listen", &format!("{}:50052", Testbed::addr(i))]);
                }
                w.env("DTRAIN_TOKEN", TOKEN);
                Proc::start(w)
            })
            .collect();
        Cluster { dir, bed, c, _workers: workers }
    }

    /// Waits for the coordinator to succeed; its output, and whether its weights are the
    /// in-process run's.
    fn finish(mut self) -> (String, bool) {
        let (ok, out) = self.c.finish(120);
        assert!(ok, "{out}");
        let read = |run: &str| std::fs::read(self.dir.path().join(run).join("final.safetensors")).unwrap();
        (out, read("run") == read("local"))
    }
}

/// Tensors travel over the links (no shared memory: the workers are not on the coordinator's
/// host), and the weights equal an in-process run's.
#[test]
fn three_hosts_train_to_the_in_process_weights() {
    let (out, same) = Cluster::start(None, false).finish();
    let line = out.lines().find(|l| l.contains("cluster: 2 worker(s) alive")).unwrap_or_default();
    assert!(line.contains("(0 on shared memory)"), "both workers computed over the links: {out}");
    assert!(line.contains("host-1 (worker") && line.contains("host-2 (worker"), "{line}");
    assert!(same, "the weights over emulated hosts equal the in-process run's");
}

/// The chain across hosts: the parameters go from the coordinator to host-1, on to host-2, the
/// running sum from host-1 to host-2 and back to the coordinator, every step; the weights equal
/// an in-process run's.
#[test]
fn three_hosts_on_the_chain_train_to_the_in_process_weights() {
    let (out, same) = Cluster::start(None, true).finish();
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("cluster: 2 worker(s) alive")).collect();
    assert!(!lines.is_empty(), "{out}");
    for line in lines {
        assert!(line.contains("host-1 (worker") && line.contains("host-2 (worker"), "{line}");
        let steps = line.split("topology chain on ").nth(1).unwrap_or_default();
        let (on, rest) = steps.split_once(" of ").unwrap_or_default();
        assert!(
            !on.is_empty() && rest.starts_with(&format!("{on} step(s), 0 fell back")),
            "every step chained: {line}"
        );
        assert!(rest.contains(&format!("the star, {on} on lanes")), "every step's chunks took lanes: {line}");
    }
    assert!(same, "the weights over the chain equal the in-process run's");
}

/// A coordinator on host 0 with a worker beside it (shared memory, host-0) and chain members
/// host-1 .. host-`members` on hosts of their own, for `epochs`; the in-process run of the same
/// job as the reference.
struct Hybrid {
    _dir: tempfile::TempDir,
    _bed: Testbed,
    c: Proc,
    workers: Vec<Proc>,
    rd: std::path::PathBuf,
    local: std::path::PathBuf,
}

impl Hybrid {
    fn start(epochs: &str, members: usize, extra: &[&str]) -> Hybrid {
        let dir = tempfile::tempdir().unwrap();
        let job = write_job(dir.path(), "shards = 4");
        let job = job.to_str().unwrap();
        let local = dir.path().join("local");
        let o =
            run(&["train", "--config", job, "--run-dir", local.to_str().unwrap(), "-q", "--local", "--epochs", epochs]);
        assert!(o.status.success(), "{}", stderr(&o));
        let bed = Testbed::up(members + 1, Some("1gbit"));
        let mut cmd = bed.command(0, env!("CARGO_BIN_EXE_coordinator"));
        let rd = dir.path().join("run");
        cmd.args(["train", "--config", job, "--run-dir", rd.to_str().unwrap(), "--epochs", epochs]);
        let everyone = (members + 1).to_string();
        cmd.args(["--listen", "0.0.0.0:50051", "--min-workers", &everyone, "--log-format", "json"]);
        cmd.args(["--topology", "chain"]).args(extra);
        cmd.env("DTRAIN_TOKEN", TOKEN);
        let c = Proc::start(cmd);
        c.wait_for("listening on 0.0.0.0:50051", 30);
        let mut workers = vec![];
        for i in 0..=members {
            let url = if i == 0 {
                "http://127.0.0.1:50051".to_string()
            } else {
                format!("http://{}:50051", Testbed::addr(0))
            };
            let mut w = bed.command(i, env!("CARGO_BIN_EXE_worker"));
            w.args(["--coordinator", &url, "--retry-for", "30", "--name", &format!("host-{i}")]);
            if i > 0 {
                w.args(["--peer-listen", &format!("{}:50052", Testbed::addr(i))]);
            }
            w.env("DTRAIN_TOKEN", TOKEN);
            workers.push(Proc::start(w));
        }
        Hybrid { _dir: dir, _bed: bed, c, workers, rd, local }
    }

    /// Host `i`'s worker stopped for 1.5 s once the third epoch began, then continued; as
    /// `finish`.
    fn stopped_mid_run(self, i: usize) -> (String, bool) {
        self.c.wait_for("\"epoch\":3,", 60);
        self.workers[i].signal(libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(1500));
        self.workers[i].signal(libc::SIGCONT);
        self.finish()
    }

    /// Waits for the coordinator to succeed; its output from here, and whether its weights are
    /// the in-process run's.
    fn finish(mut self) -> (String, bool) {
        let (ok, out) = self.c.finish(120);
        assert!(ok, "{out}");
        let read = |d: &std::path::Path| std::fs::read(d.join("final.safetensors")).unwrap();
        let same = read(&self.rd) == read(&self.local);
        drop(self.workers);
        (out, same)
    }
}

/// The log lines saying that `host`'s shards got copies.
fn copies_of<'a>(out: &'a str, host: &str) -> Vec<&'a str> {
    let late = format!(": {host} (worker");
    out.lines().filter(|l| l.contains(&late) && l.contains(") is late; shard")).collect()
}

/// Whether every step of the cluster line went over the chain, none falling back to the star.
fn all_chained(line: &str) -> bool {
    let steps = line.split("topology chain on ").nth(1).unwrap_or_default();
    let (on, rest) = steps.split_once(" of ").unwrap_or_default();
    !on.is_empty() && rest.starts_with(&format!("{on} step(s), 0 fell back"))
}

/// The cluster lines from the epoch in which the chain first had host-0, the worker on the
/// coordinator's shared memory, in its tail (it stands by until it has attached to the
/// memory, which a fast first epoch may not wait for).
fn with_the_tail(out: &str) -> Vec<&str> {
    let lines: Vec<&str> = out.lines().collect();
    let formed = lines.iter().position(|l| l.contains("topology chain: ") && l.contains("then off it host-0 (worker"));
    let Some(formed) = formed else { panic!("host-0 never joined the chain's tail: {out}") };
    lines[formed..].iter().copied().filter(|l| l.contains("shard round trip")).collect()
}

/// A worker on the coordinator's host (shared memory) beside two chain members on other hosts:
/// it computes the last shards, whose gradients the coordinator adds to the chain's sum in shard
/// order; every step goes over the chain and the weights equal an in-process run's.
#[test]
fn a_worker_on_the_coordinators_host_adds_its_shards_to_the_chains_sum() {
    let (out, same) = Hybrid::start("10", 2, &[]).finish();
    let all: Vec<&str> = out.lines().filter(|l| l.contains("shard round trip")).collect();
    assert!(all.iter().all(|l| all_chained(l)), "every step chained: {all:?}");
    let lines = with_the_tail(&out);
    assert!(!lines.is_empty(), "{out}");
    for line in lines {
        assert!(line.contains("cluster: 3 worker(s) alive (1 on shared memory)"), "{line}");
        assert!(
            ["host-0", "host-1", "host-2"].iter().all(|h| line.contains(&format!("{h} (worker"))),
            "all computed: {line}"
        );
    }
    assert!(same, "a local worker beside the chain changed the weights");
}

/// One worker host beside the coordinator's host, where a worker uses shared memory: the remote
/// worker is a chain of one (its shards' sum crosses the link, not each shard's gradient), the
/// local one its tail; every step goes over that chain and the weights equal an in-process run's.
#[test]
fn one_remote_worker_is_a_chain_of_one_ahead_of_the_coordinators_worker() {
    let (out, same) = Hybrid::start("10", 1, &[]).finish();
    let all: Vec<&str> = out.lines().filter(|l| l.contains("shard round trip")).collect();
    // Every step, but for any after a sum late enough for copies to stand in for it (then
    // host-1 stands by until its result is in, see `copies_stand_in_for_a_late_chain_of_one`).
    let chained = |l: &&str| l.contains("topology chain on ") && l.contains(" step(s), 0 fell back");
    assert!(all.iter().all(chained), "every step chained: {all:?}");
    assert!(out.contains("topology chain: host-1 (worker"), "host-1 alone on the chain: {out}");
    let lines = with_the_tail(&out);
    assert!(!lines.is_empty(), "{out}");
    for line in lines {
        assert!(line.contains("cluster: 2 worker(s) alive (1 on shared memory)"), "{line}");
        assert!(["host-0", "host-1"].iter().all(|h| line.contains(&format!("{h} (worker"))), "both computed: {line}");
    }
    assert!(same, "a chain of one changed the weights");
}

/// The worker beside the coordinator (the chain's tail) stopped for 1.5 s mid-run: its late
/// shards get copies on chain members whose own shards are in (at the parameters they received
/// on the chain), so no step waits for it, let alone falls back to the star (after 1 s at
/// least); it gets no more shards until its late result is in, so it is not dropped for a full
/// queue; the weights equal an in-process run's.
#[test]
fn a_late_tail_shard_gets_a_copy_on_a_chain_member() {
    let (out, same) = Hybrid::start("300", 2, &[]).stopped_mid_run(0);
    let copies = copies_of(&out, "host-0");
    assert!(!copies.is_empty(), "host-0's shards got copies: {out}");
    assert!(
        copies.iter().all(|l| l.contains("gets a copy on host-1") || l.contains("gets a copy on host-2")),
        "{copies:?}"
    );
    // Once a copy stood in for it, host-0 gets no shard until its late result is in: one copy
    // for the stop (and the odd one for a late scheduling in 3600 steps), not one (and a wait)
    // for each of the hundreds of steps of its 1.5 s.
    assert!(copies.len() <= 20, "host-0 stood by while it owed a result: {} copies: {copies:?}", copies.len());
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("shard round trip")).collect();
    assert!(lines.iter().all(|l| all_chained(l)), "no step fell back: {lines:?}");
    assert!(!out.contains(" left: ") && !out.contains(") joined"), "host-0 stayed: {out}");
    assert!(same, "copies of the tail's shards changed the weights");
}

/// The remote worker of a chain of one (host-1, beside host-0 on the coordinator's shared
/// memory) stopped for 1.5 s mid-run: once its sum is late (3 times the usual wait), its shards
/// get copies on host-0, whose results stand in for its sum, so no step waits for the chain's
/// deadline (at least 1 s) and falls back to the star; host-1 stands by until it answers, then
/// is back on the chain; the weights equal an in-process run's. (No step is audited: an
/// audited step waits for the member's digests.)
#[test]
fn copies_stand_in_for_a_late_chain_of_one() {
    let (out, same) = Hybrid::start("300", 1, &["--verify", "0"]).stopped_mid_run(1);
    let copies = copies_of(&out, "host-1");
    assert!(!copies.is_empty(), "host-1's shards got copies: {out}");
    assert!(copies.iter().all(|l| l.contains("gets a copy on host-0")), "{copies:?}");
    let lines: Vec<&str> = out.lines().collect();
    let stood_in =
        lines.iter().position(|l| l.contains("host-1 (worker") && l.contains("copies of its shards stood in"));
    let Some(stood_in) = stood_in else { panic!("the copies stood in for host-1's sum: {out}") };
    assert!(!out.contains("the chain broke"), "no step waited for the chain's deadline: {out}");
    let back = lines[stood_in..].iter().any(|l| l.contains("topology chain: host-1 (worker"));
    assert!(back, "host-1 is back on the chain once it answered: {out}");
    assert!(!out.contains(" left: ") && !out.contains(") joined"), "host-1 stayed: {out}");
    // Nothing waited for host-1: the epoch of the stop took far less than the stop (the steps
    // after the one the copies stood in for went over the star without host-1).
    let epoch_seconds = |l: &&str| l.split("\"seconds\":").nth(1)?.split(',').next()?.parse::<f64>().ok();
    let slowest = lines.iter().filter(|l| l.contains("\"epoch_end\"")).filter_map(epoch_seconds).fold(0.0, f64::max);
    assert!(slowest < 1.0, "an epoch took {slowest} s: {out}");
    assert!(same, "copies standing in for a chain of one changed the weights");
}

/// A worker host cut off mid-run (its link down, no FIN or RST reaches anyone): the coordinator
/// notices within seconds from the unanswered keepalive pings (not after the 30 s step
/// deadline), its shards go to the other worker, and once the link is back the worker joins
/// again; the weights equal an in-process run's.
#[test]
fn a_partitioned_worker_is_noticed_within_seconds_and_rejoins() {
    partitioned(false);
}

/// The same on the chain: the step under way falls back to the star, and once host-2 is back
/// the chain is rebuilt with it.
#[test]
fn a_partitioned_chain_member_is_noticed_within_seconds_and_rejoins_the_chain() {
    let out = partitioned(true);
    let rebuilt =
        |l: &&str| l.contains("topology chain: ") && l.contains("host-1 (worker") && l.contains("host-2 (worker");
    assert!(out.lines().any(|l| rebuilt(&l)), "{out}");
}

/// Cuts host-2 off after the second epoch, puts it back; the coordinator's output from then.
fn partitioned(chain: bool) -> String {
    let cluster = Cluster::start(Some("1500"), chain);
    cluster.c.wait_for("\"epoch\":2,", 60);
    let cut = Instant::now();
    cluster.bed.link(2, false);
    let needles: &[&str] = if chain { &["(host-2) left", "the chain broke"] } else { &["(host-2) left"] };
    let left = cluster.c.wait_for_each(needles, 30).remove(0);
    let noticed = cut.elapsed();
    assert!(noticed < Duration::from_secs(5), "noticed after {noticed:?}: {left}");
    std::thread::sleep(Duration::from_secs(1));
    cluster.bed.link(2, true);
    cluster.c.wait_for("(host-2) joined", 30);
    let (out, same) = cluster.finish();
    assert!(out.contains("Done: 1500 epoch(s)") || out.contains("\"event\":\"train_end\""), "{out}");
    assert!(same, "a partition changed the weights");
    out
}
