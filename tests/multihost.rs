//! The cluster across emulated hosts (network namespaces, `testbed/netns.sh`): what workers on
//! other machines do, over real links with their own addresses, bounded in time, and cleaned
//! up on failure.

mod common;
use common::*;

/// A coordinator host and two worker hosts: tensors travel over the links (no shared memory,
/// the workers are not on the coordinator's host), and the weights equal an in-process run's.
#[test]
fn three_hosts_train_to_the_in_process_weights() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "shards = 4");
    let local = dir.path().join("local");
    let o = run(&["train", "--config", job.to_str().unwrap(), "--run-dir", local.to_str().unwrap(), "-q", "--local"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bed = Testbed::up(3, Some("1gbit"));
    let listen = format!("{}:50051", Testbed::addr(0));
    let mut cmd = bed.command(0, env!("CARGO_BIN_EXE_coordinator"));
    cmd.args(["train", "--config", job.to_str().unwrap(), "--run-dir", dir.path().join("run").to_str().unwrap()]);
    cmd.args(["--listen", &listen, "--min-workers", "2"]).env("DTRAIN_TOKEN", TOKEN);
    let c = Proc::start(cmd);
    c.wait_for(&format!("listening on {listen}"), 30);
    let url = format!("http://{listen}");
    let workers: Vec<Proc> = (1..=2)
        .map(|i| {
            let mut w = bed.command(i, env!("CARGO_BIN_EXE_worker"));
            w.args(["--coordinator", &url, "--retry-for", "30", "--name", &format!("host-{i}")])
                .env("DTRAIN_TOKEN", TOKEN);
            Proc::start(w)
        })
        .collect();
    let mut c = c;
    let (ok, out) = c.finish(120);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with("cluster:")).unwrap_or_default().to_string();
    assert!(line.contains("2 worker(s) alive (0 on shared memory)"), "both workers computed over the links: {out}");
    for i in 1..=2 {
        assert!(out.contains(&format!("(host-{i}) joined")) || line.contains(&format!("host-{i} (worker")), "{out}");
    }
    drop(workers);
    assert!(
        std::fs::read(dir.path().join("run/final.safetensors")).unwrap()
            == std::fs::read(local.join("final.safetensors")).unwrap(),
        "the weights over emulated hosts equal the in-process run's"
    );
}
