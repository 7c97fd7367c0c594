"""The cluster across emulated hosts (network namespaces and tbf-capped links, testbed/netns.sh).

    sudo python3 bench/multihost.py [--workers 1,2,4] [--rates 1gbit,10gbit] [--jobs wide,heavy] [--steps 12]

A coordinator host and N worker hosts, each link capped at the rate, train one epoch of each job
(`shards` = 4, so the result is the same for every N), beside the in-process run of the same job
on this machine. For each: the step time (epoch time / steps), the bytes per step on the
coordinator's link (from its cluster line), and the link-bound lower bound of the star topology
(every step the coordinator sends P parameters to and receives P gradients from each worker:
2 N P x 4 bytes at the link rate). Jobs: `wide` (784-512-512-10, batch 256, 2.7 MB of parameters)
and `heavy` (784-2048-2048-10, batch 64, 23 MB: communication dominates). The data are synthetic
(`--steps` batches), so that a run at 1 Gbit/s takes seconds, not an hour.

Only the star exists today (issue 10 adds the chain); the table is the baseline it must beat.
"""
import argparse
import json
import os
import random
import re
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
NETNS = os.path.join(ROOT, "testbed", "netns.sh")
TOKEN = "multihost-bench-token-0123456789"

JOBS = {
    "wide": ([512, 512], 256),
    "heavy": ([2048, 2048], 64),
}


def job_file(d, name, steps):
    hidden, batch = JOBS[name]
    rows = steps * batch
    rng = random.Random(7)
    with open(os.path.join(d, "train.csv"), "w") as f:
        f.write(",".join(f"p{i}" for i in range(784)) + ",label\n")
        for r in range(rows):
            f.write(",".join(str(rng.randrange(256)) for _ in range(784)) + f",{r % 10}\n")
    layers = "".join(f'  {{ type = "Dense", units = {u}, activation = "relu" }},\n' for u in hidden)
    text = f"""seed = 1
[data]
format = "csv"
train = "train.csv"
label_column = -1
rescale = 0.00392156862745098
[model]
input_shape = [784]
layers = [
{layers}  {{ type = "Dense", units = 10, activation = "softmax" }},
]
[compile]
optimizer = {{ Adam = {{ learning_rate = 0.001 }} }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
[fit]
batch_size = {batch}
epochs = 1
shards = 4
"""
    path = os.path.join(d, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    params = 0
    width = 784
    for u in hidden + [10]:
        params += width * u + u
        width = u
    return path, params


def epoch_seconds(out):
    events = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    secs = [e["seconds"] for e in events if e.get("event") == "epoch_end"]
    cluster = [e["message"] for e in events if e.get("event") == "note" and e["message"].startswith("cluster:")]
    return secs[0], (cluster[-1] if cluster else "")


def in_process(job, d, name):
    out = subprocess.run([os.path.join(BIN, "coordinator"), "train", "--config", job, "--run-dir",
                          os.path.join(d, f"local-{name}"), "--local", "--log-format", "json"],
                         capture_output=True, text=True, check=True).stdout
    return epoch_seconds(out)[0]


def cluster(job, d, n, rate, tag):
    bed = f"mh{os.getpid()}{tag}"
    subprocess.run([NETNS, "up", bed, str(n + 1), rate], check=True)
    env = dict(os.environ, DTRAIN_TOKEN=TOKEN)
    workers = []
    try:
        listen = "10.250.0.1:50051"
        coord = subprocess.Popen([NETNS, "exec", bed, "0", os.path.join(BIN, "coordinator"), "train", "--config", job,
                                  "--run-dir", os.path.join(d, f"run-{tag}"), "--listen", listen,
                                  "--min-workers", str(n), "--log-format", "json", "--verify", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        for i in range(1, n + 1):
            workers.append(subprocess.Popen([NETNS, "exec", bed, str(i), os.path.join(BIN, "worker"), "--coordinator",
                                             f"http://{listen}", "--retry-for", "60", "--name", f"host-{i}"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        out, _ = coord.communicate(timeout=1800)
        if coord.returncode != 0:
            raise SystemExit(f"coordinator failed on {tag}")
        return epoch_seconds(out)
    finally:
        for w in workers:
            w.kill()
            w.wait()
        subprocess.run([NETNS, "down", bed], check=False)


def rate_bytes(rate):
    m = re.fullmatch(r"(\d+)([kmg])bit", rate)
    return int(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--rates", default="1gbit,10gbit")
    ap.add_argument("--jobs", default="wide,heavy")
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.jobs.split(","):
            job, params = job_file(d, name, a.steps)
            local = in_process(job, d, name) / a.steps
            for rate in a.rates.split(","):
                for n in map(int, a.workers.split(",")):
                    secs, line = cluster(job, d, n, rate, f"{name[0]}{n}{rate}")
                    step = secs / a.steps
                    kb = re.search(r"per step (\d+) KB sent, (\d+) KB received", line)
                    link = (int(kb.group(1)) + int(kb.group(2))) * 1024 if kb else float("nan")
                    bound = 2 * n * params * 4 / rate_bytes(rate)
                    row = {"job": name, "params": params, "rate": rate, "workers": n, "step_ms": step * 1e3,
                           "in_process_step_ms": local * 1e3, "coordinator_link_mb_per_step": link / 1e6,
                           "star_bound_ms": bound * 1e3}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print("| job | link | workers | step | / star bound | coordinator link per step | in process |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} ({r['params'] * 4 / 1e6:.1f} MB) | {r['rate']} | {r['workers']} | {r['step_ms']:.0f} ms "
              f"| {r['step_ms'] / r['star_bound_ms']:.2f}x of {r['star_bound_ms']:.0f} ms "
              f"| {r['coordinator_link_mb_per_step']:.1f} MB | {r['in_process_step_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
