"""dtrain against PyTorch on the same machine, in one invocation, rounds interleaved.

    python3 bench/compare_torch.py [--jobs fashion_mnist,fashion_mnist_wide] [--epochs 3] [--rounds 2]

Builds dtrain (release) and creates target/torch-venv with torch and numpy from the package index if
missing (the default Linux wheel is the CUDA build, which runs on the CPU). Each round runs, per job:

  * dtrain in process (the job file as it is, `fit.kernel = "auto"`);
  * PyTorch in one process with 1 and with 2 threads (`torch.set_num_threads`); the better one is
    PyTorch's number;
  * dtrain with `--spawn-workers 2` (two local worker processes, `fit.shards = 2`);
  * PyTorch DDP over gloo with 2 processes of 1 thread each, each taking half of every global batch.

The models, penalties, constraints, optimizer and batch are the same (bench/torch_run.py). An epoch is
training, validation and saving the best weights, on both sides; the first epoch of every run is
warm-up and left out, the rest ("steady epochs") give the median. Ratios compare runs of the same round.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys

import compare_keras
from compare_keras import ROOT, SAMPLES, run

VENV = os.path.join(ROOT, "target", "torch-venv")
PY = os.path.join(VENV, "bin", "python")


def setup():
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    if not os.path.exists(PY):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([PY, "-m", "pip", "install", "-q", "torch", "numpy"], check=True)


def steady(events):
    """Seconds of each epoch after the first."""
    return [e["seconds"] for e in events if e["event"] == "epoch_end" and e["epoch"] > 1]


def dtrain(job, epochs, workers=0):
    extra = ["--spawn-workers", str(workers)] if workers else []
    events, _, _ = compare_keras.dtrain(job, epochs, shards=workers or None, extra=extra)
    return steady(events)


def torch(job, epochs, threads):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bench"))
    events, _, _ = run([PY, os.path.join(ROOT, "bench", "torch_run.py"), job, str(epochs), str(threads)], env)
    return steady(events)


def torch_ddp(job, epochs, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bench"), OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "bench", "torch_run.py")
    others = [subprocess.Popen([PY, script, job, str(epochs), "1", str(r), str(world), str(port)],
                               stdout=subprocess.DEVNULL, env=env) for r in range(1, world)]
    try:
        events, _, _ = run([PY, script, job, str(epochs), "1", "0", str(world), str(port)], env)
    finally:
        for p in others:
            if p.wait(timeout=600) != 0:
                raise SystemExit(f"DDP rank failed with {p.returncode}")
    return steady(events)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="fashion_mnist,fashion_mnist_wide")
    ap.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.epochs < 2:
        raise SystemExit("--epochs must be at least 2: the first epoch is warm-up")
    setup()
    runs = {
        "dtrain": lambda job: dtrain(job, a.epochs),
        "torch_1t": lambda job: torch(job, a.epochs, 1),
        "torch_2t": lambda job: torch(job, a.epochs, 2),
        "dtrain_2w": lambda job: dtrain(job, a.epochs, workers=2),
        "ddp_2p": lambda job: torch_ddp(job, a.epochs),
    }
    rows = []
    for job in a.jobs.split(","):
        per_round = []
        for r in range(a.rounds):
            m = {name: statistics.median(f(job)) for name, f in runs.items()}
            m["torch"] = min(m["torch_1t"], m["torch_2t"])
            per_round.append(m)
            print(json.dumps({"job": job, "round": r + 1, "epoch_s": m}), flush=True)
        med = {k: statistics.median(m[k] for m in per_round) for k in per_round[0]}
        ratio = [m["torch"] / m["dtrain"] for m in per_round]
        ratio_2 = [m["ddp_2p"] / m["dtrain_2w"] for m in per_round]
        rows.append((job, med, ratio, ratio_2))
    print()
    print("| job | dtrain | PyTorch 1 thread | PyTorch 2 threads | dtrain / best PyTorch (per round) "
          "| dtrain 2 workers | DDP 2 processes | dtrain 2 workers / DDP |")
    print("|---|---|---|---|---|---|---|---|")

    def sps(s):
        return f"{SAMPLES / s / 1000:.1f}k"

    def rng(r):
        return f"**{statistics.median(r):.2f}x** ({min(r):.2f}-{max(r):.2f})"
    for job, m, ratio, ratio_2 in rows:
        print(f"| {job} | {sps(m['dtrain'])} | {sps(m['torch_1t'])} | {sps(m['torch_2t'])} | {rng(ratio)} "
              f"| {sps(m['dtrain_2w'])} | {sps(m['ddp_2p'])} | {rng(ratio_2)} |")
    print("\nsamples/s over steady epochs (training, validation and the best-weights save)")


if __name__ == "__main__":
    main()
