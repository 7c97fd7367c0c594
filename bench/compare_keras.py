"""dtrain against Keras/TensorFlow on the same machine, in one invocation, rounds interleaved.

    python3 bench/compare_keras.py [--jobs fashion_mnist,fashion_mnist_wide] [--epochs 3] [--rounds 2]
                                   [--shards S --dtrain-args="--spawn-workers 2"]

Builds dtrain (release), creates target/bench-venv with tensorflow-cpu 2.21 / keras 3.15.1 if missing,
then alternates dtrain and Keras runs of each job. Reports median epoch time (training + validation),
samples/s, time from process start to the first training step, peak RSS, and the ratios. The machines
are shared and noisy, so only the ratios measured side by side mean anything.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "bench-venv")
PY = os.path.join(VENV, "bin", "python")
BIN = os.path.join(ROOT, "target", "release", "coordinator")
SAMPLES = 60000


def setup():
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    if not os.path.exists(PY):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([PY, "-m", "pip", "install", "-q", "tensorflow-cpu==2.21.0", "keras==3.15.1"], check=True)


def run(cmd, env=None):
    """Runs cmd; returns (JSON events, seconds from spawn to first step, peak RSS in MB)."""
    start = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    events, first = [], None
    for line in p.stdout:
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        events.append(e)
        if e["event"] in ("train_begin", "first_step") and first is None:
            first = (e.get("time") or time.time()) - start
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{p.stderr.read()}")
    return events, first, usage.ru_maxrss / 1024


def dtrain(job, epochs, shards=None, extra=()):
    """The example job; with `shards`, its `fit.shards` set to that (e.g. one per worker)."""
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(ROOT, "examples", job + ".toml")
        if shards:
            text = re.sub(r"(?m)^shards = \d+\n", "", open(cfg).read())
            cfg = os.path.join(d, job + ".toml")
            open(cfg, "w").write(re.sub(r"(?m)^epochs = \d+", f"epochs = {epochs}\nshards = {shards}", text))
        return run([BIN, "train", "--config", cfg, "--epochs", str(epochs), "--run-dir", os.path.join(d, "r"),
                    "--log-format", "json", *extra])


def keras(job, epochs):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bench"))
    return run([PY, os.path.join(ROOT, "bench", "keras_run.py"), job, str(epochs)], env)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="fashion_mnist,fashion_mnist_wide")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shards", type=int, help="set fit.shards in dtrain's job (e.g. one per worker)")
    ap.add_argument("--dtrain-args", default="", help='extra coordinator flags, e.g. "--spawn-workers 2"')
    a = ap.parse_args()
    setup()
    extra = shlex.split(a.dtrain_args)
    rows = []
    for job in a.jobs.split(","):
        res = {"dtrain": [], "keras": []}
        for _ in range(a.rounds):
            res["dtrain"].append(dtrain(job, a.epochs, a.shards, extra))
            res["keras"].append(keras(job, a.epochs))
        summary = {}
        for name, runs in res.items():
            secs = [e["seconds"] for ev, _, _ in runs for e in ev if e["event"] == "epoch_end"]
            accs = [e["val_accuracy"] for ev, _, _ in runs for e in ev if e["event"] == "epoch_end"]
            summary[name] = {
                "epoch_s": statistics.median(secs),
                "first_step_s": statistics.median(r[1] for r in runs),
                "rss_mb": max(r[2] for r in runs),
                "last_val_acc": accs[-1],
            }
        d, k = summary["dtrain"], summary["keras"]
        rows.append((job, d, k))
        print(json.dumps({"job": job, "dtrain": d, "keras": k, "speedup": k["epoch_s"] / d["epoch_s"]}), flush=True)
    print()
    print("| job | dtrain epoch | Keras epoch | speedup | dtrain samples/s | dtrain start->step | Keras start->step "
          "| dtrain peak RSS | Keras peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job, d, k in rows:
        print(f"| {job} | {d['epoch_s']:.2f} s | {k['epoch_s']:.2f} s | {k['epoch_s'] / d['epoch_s']:.1f}x "
              f"| {SAMPLES / d['epoch_s']:,.0f} | {d['first_step_s']:.2f} s | {k['first_step_s']:.2f} s "
              f"| {d['rss_mb']:.0f} MB | {k['rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
