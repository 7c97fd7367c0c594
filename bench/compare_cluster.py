"""dtrain over gRPC workers against dtrain in process, same job and shards, in one invocation.

    python3 bench/compare_cluster.py [--jobs fashion_mnist,fashion_mnist_wide] [--workers 2] [--epochs 2] [--rounds 2]

Each job runs with `shards = --workers` in process (`--local`), with `--spawn-workers N` (local
workers: tensors in shared memory, messages over gRPC on loopback) and with `--spawn-workers N
--no-shared-memory` (tensors on the gRPC stream over loopback, as for remote workers),
alternating; prints the median epoch time (training + validation), the ratio of the medians,
the range of the ratios within each round (this machine's speed drifts from minute to minute,
so a round's three runs are the fairest comparison), and the cluster's last report (per-step
breakdown, bytes, round trips).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "coordinator")


def example_job(name, **fit):
    """A temporary copy of examples/NAME.toml whose [fit] has these settings (e.g. epochs=2,
    shards=2, kernel='"haswell"'), replacing the file's own; returns its path."""
    text = open(os.path.join(ROOT, "examples", name + ".toml")).read()
    for key in fit:
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)
    settings = "".join(f"{k} = {v}\n" for k, v in fit.items())
    text = text.replace("[fit]\n", "[fit]\n" + settings, 1)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    return f.name


def run(cfg, extra):
    with tempfile.TemporaryDirectory() as d:
        p = subprocess.Popen([BIN, "train", "--config", cfg, "--run-dir", os.path.join(d, "r"), "--log-format", "json"]
                             + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(err)
        events = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        secs = [e["seconds"] for e in events if e["event"] == "epoch_end"]
        cluster = [e["message"] for e in events if e["event"] == "note" and e["message"].startswith("cluster:")]
        return secs, cluster[-1] if cluster else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="fashion_mnist,fashion_mnist_wide")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    rows = []
    for job in a.jobs.split(","):
        cfg = example_job(job, epochs=a.epochs, shards=a.workers)
        local, shm, tcp, notes, rounds = [], [], [], {}, []
        spawn = ["--spawn-workers", str(a.workers)]
        for _ in range(a.rounds):
            lr = run(cfg, ["--local"])[0]
            sr, notes["shm"] = run(cfg, spawn)
            tr, notes["tcp"] = run(cfg, spawn + ["--no-shared-memory"])
            local, shm, tcp = local + lr, shm + sr, tcp + tr
            lm = statistics.median(lr)
            rounds.append((lm / statistics.median(sr), lm / statistics.median(tr)))
        os.unlink(cfg)
        l, m, t = statistics.median(local), statistics.median(shm), statistics.median(tcp)
        rows.append((job, l, m, t, notes, rounds))
        print(json.dumps({"job": job, "local_epoch_s": l, "shared_memory_epoch_s": m, "grpc_epoch_s": t,
                          "shared_memory_ratio": l / m, "grpc_ratio": l / t, "per_round_ratios": rounds,
                          "reports": notes}))
    print()
    print(f"| job (shards = {a.workers}) | in process | {a.workers} workers, shared memory | ratio (per round) "
          f"| {a.workers} workers, tensors over gRPC | ratio (per round) |")
    print("|---|---|---|---|---|---|")
    span = lambda v: f"median {statistics.median(v):.2f}, {min(v):.2f}-{max(v):.2f}"
    for job, l, m, t, _, rounds in rows:
        s, g = [r[0] for r in rounds], [r[1] for r in rounds]
        print(f"| {job} | {l:.2f} s | {m:.2f} s | {l / m:.2f}x ({span(s)}) | {t:.2f} s | {l / t:.2f}x ({span(g)}) |")
    for job, *_, notes, _ in rows:
        for k, n in notes.items():
            print(f"{job} ({k}): {n}")


if __name__ == "__main__":
    main()
