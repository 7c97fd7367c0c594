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
    /// `epochs`: the job's own when `None`.
    fn start(epochs: Option<&str>) -> Cluster {
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
        cmd.env("DTRAIN_TOKEN", TOKEN);
        let c = Proc::start(cmd);
        c.wait_for(&format!("listening on {listen}"), 30);
        let url = format!("http://{listen}");
        let workers = (1..=2)
            .map(|i| {
                let mut w = bed.command(i, env!("CARGO_BIN_EXE_worker"));
                w.args(["--coordinator", &url, "--retry-for", "30", "--name", &format!("host-{i}")]);
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
    let (out, same) = Cluster::start(None).finish();
    let line = out.lines().find(|l| l.contains("cluster: 2 worker(s) alive")).unwrap_or_default();
    assert!(line.contains("(0 on shared memory)"), "both workers computed over the links: {out}");
    assert!(line.contains("host-1 (worker") && line.contains("host-2 (worker"), "{line}");
    assert!(same, "the weights over emulated hosts equal the in-process run's");
}

/// A worker host cut off mid-run (its link down, no FIN or RST reaches anyone): the coordinator
/// notices within seconds from the unanswered keepalive pings (not after the 30 s step
/// deadline), its shards go to the other worker, and once the link is back the worker joins
/// again; the weights equal an in-process run's.
#[test]
fn a_partitioned_worker_is_noticed_within_seconds_and_rejoins() {
    let cluster = Cluster::start(Some("1500"));
    cluster.c.wait_for("\"epoch\":2,", 60);
    let cut = Instant::now();
    cluster.bed.link(2, false);
    let left = cluster.c.wait_for("(host-2) left", 30);
    let noticed = cut.elapsed();
    assert!(noticed < Duration::from_secs(5), "noticed after {noticed:?}: {left}");
    std::thread::sleep(Duration::from_secs(1));
    cluster.bed.link(2, true);
    cluster.c.wait_for("(host-2) joined", 30);
    let (out, same) = cluster.finish();
    assert!(out.contains("Done: 1500 epoch(s)") || out.contains("\"event\":\"train_end\""), "{out}");
    assert!(same, "a partition changed the weights");
}
