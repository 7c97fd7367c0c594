"""The cluster across emulated hosts (network namespaces and tbf-capped links, testbed/netns.sh).

    sudo python3 bench/multihost.py [--workers 1,2,4,6] [--rates 1gbit,10gbit,uncapped] [--jobs wide,heavy]
                                    [--topologies star,chain] [--steps 12] [--plot bench/multihost.png]
                                    [--timeline DIR] [--tls] [--beside]

A coordinator host and N worker hosts, each link capped at the rate, train two epochs of each job
(`shards` = 12, so the result is the same for every N), beside the in-process run of the same job
on this machine, over the star and over the chain in the same invocation. For each: the step
time (the second epoch's time in steps / steps: the steady state, without the first step's
connections nor the epoch's end, which saves the state; `first_epoch_step_ms` is the first epoch's whole
time / steps, for the record), the bytes per step on the coordinator's link and on the busiest worker
host's link (the larger direction, read from the interfaces' counters), and the link-bound lower
bound (links full duplex at R, P parameters of 4 bytes): a worker computes only once it has all
the parameters. Star: the coordinator's link receives the K = 12 shards' gradients one after
another, the first no earlier than one parameter vector after the start, and sends N parameter
vectors, the last worker's K / N gradients coming back after its own: max(1 + K, N + K / N) P / R.
Chain: every link carries the parameters down, then (after the computing) the running sum back:
2 P / R, whatever N. Jobs: `wide` (784-512-512-10, batch 256, 2.7 MB of parameters)
and `heavy` (784-2048-2048-10, batch 64, 23 MB: communication dominates). The data are synthetic
(`--steps` batches), so that a run at 1 Gbit/s takes seconds, not an hour. `--verify` is 0 by
default (no shard checked, no chain step audited); `--verify 0.02` measures what checks cost.
`--timeline DIR` has every process of each run mark its steps' moments in DIR/<run> (see
bench/timeline.py, which shows where a step's time goes). `--tls` runs every cluster under mutual TLS
(certificates made with `openssl` for the run: the coordinator's, two workers' carrying
`dtrain-worker`); the in-process run is the same. `--beside` also runs a worker on the coordinator's
host (on its shared memory, the chain's tail), as when the coordinator runs on one of the worker
machines; `--workers` then counts the other hosts. One worker host makes a chain of one: its shards'
sum crosses the link where the star sends each shard's gradient. CPU per step: how long all the
machine's cores were busy (/proc/stat: every process of the run, and the kernel's TCP work for it)
from the first epoch's end to the second's, per step, beside the in-process run's; where the emulated
hosts share the machine's cores, a step cannot take less than that divided by the cores.
"""
import argparse
import json
import os
import random
import re
import subprocess
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
NETNS = os.path.join(ROOT, "testbed", "netns.sh")
TOKEN = "multihost-bench-token-0123456789"

SHARDS = 12
EPOCHS = 2

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
epochs = {EPOCHS}
shards = {SHARDS}
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
    """(the last epoch's seconds in steps, the first epoch's whole seconds, the last cluster line)."""
    events = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    ends = [e for e in events if e.get("event") == "epoch_end"]
    if len(ends) != EPOCHS:
        raise SystemExit(f"expected {EPOCHS} epochs, the run logged {len(ends)}")
    cluster = [e["message"] for e in events if e.get("event") == "note" and e["message"].startswith("cluster:")]
    return ends[-1]["step_seconds"], ends[0]["seconds"], (cluster[-1] if cluster else "")


def busy_seconds():
    """CPU seconds this machine's cores have been busy (user, system, interrupts, steal: every
    process of a run and the kernel's TCP work for it), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def output_and_cpu(proc, timeout=1800):
    """The coordinator's output, and the CPU seconds all cores spent from its first epoch's end to
    its last's (the second epoch with its end: the same window in every run). Killed after
    `timeout` seconds."""
    lines, marks = [], []
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("{") and '"epoch_end"' in line:
                marks.append(busy_seconds())
        proc.wait()
    finally:
        watchdog.cancel()
    return "".join(lines), (marks[-1] - marks[0] if len(marks) >= 2 else float("nan"))


def in_process(job, d, name):
    """(the last epoch's seconds in steps, the first epoch's whole seconds, CPU seconds of the last
    epoch on all cores)."""
    proc = subprocess.Popen([os.path.join(BIN, "coordinator"), "train", "--config", job, "--run-dir",
                             os.path.join(d, f"local-{name}"), "--local", "--log-format", "json"],
                            stdout=subprocess.PIPE, text=True)
    out, cpu = output_and_cpu(proc)
    if proc.returncode != 0:
        raise SystemExit("the in-process run failed")
    steady, first, _ = epoch_seconds(out)
    return steady, first, cpu


def link_bytes(bed, host):
    """(received, sent) bytes so far on a host's link."""
    out = subprocess.run(["ip", "-j", "-s", "-n", f"{bed}-{host}", "link", "show", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def certificates(d):
    """A CA, the coordinator's certificate (localhost) and two workers' (dtrain-worker), in d."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=dtrain-bench-ca")
    for name, san in [("server", "DNS:localhost"), ("w1", "DNS:dtrain-worker"), ("w2", "DNS:dtrain-worker")]:
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


def cluster(job, d, n, rate, topology, tag, verify="0", timeline="", tls="", beside=False):
    bed = f"mh{os.getpid()}{tag}"
    subprocess.run([NETNS, "up", bed, str(n + 1)] + ([] if rate == "uncapped" else [rate]), check=True)
    env = dict(os.environ, DTRAIN_TOKEN=TOKEN)
    scheme, coordinator_tls, worker_tls = "http", [], lambda i: []
    if tls:
        scheme = "https"
        coordinator_tls = ["--tls-cert", f"{tls}/server.pem", "--tls-key", f"{tls}/server.key",
                           "--tls-client-ca", f"{tls}/ca.pem"]
        worker_tls = lambda i: ["--tls-domain", "localhost", "--tls-ca", f"{tls}/ca.pem",
                                "--tls-cert", f"{tls}/w{i % 2 + 1}.pem", "--tls-key", f"{tls}/w{i % 2 + 1}.key"]
    if timeline:
        env["DTRAIN_TIMELINE"] = os.path.join(timeline, tag)
    workers = []
    try:
        listen = "10.250.0.1:50051"
        coord = subprocess.Popen([NETNS, "exec", bed, "0", os.path.join(BIN, "coordinator"), "train", "--config", job,
                                  "--run-dir", os.path.join(d, f"run-{tag}"),
                                  "--listen", "0.0.0.0:50051" if beside else listen,
                                  "--min-workers", str(n + beside), "--log-format", "json", "--verify", verify,
                                  "--topology", topology] + coordinator_tls,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        for i in range(0 if beside else 1, n + 1):
            # Host 0's worker (--beside) reaches the coordinator on loopback: shared memory.
            peer = ["--peer-listen", f"10.250.0.{i + 1}:50052"] if topology == "chain" and i else []
            url = f"{scheme}://{'127.0.0.1:50051' if i == 0 else listen}"
            workers.append(subprocess.Popen([NETNS, "exec", bed, str(i), os.path.join(BIN, "worker"), "--coordinator",
                                             url, "--retry-for", "60", "--name", f"host-{i}"]
                                            + peer + worker_tls(i),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        out, cpu = output_and_cpu(coord)
        if coord.returncode != 0:
            raise SystemExit(f"coordinator failed on {tag}")
        # Whole run (joins and the job's text included, a few KB): the busiest direction of each link.
        links = [max(link_bytes(bed, h)) for h in range(n + 1)]
        return epoch_seconds(out) + (links, cpu)
    finally:
        for w in workers:
            w.kill()
            w.wait()
        subprocess.run([NETNS, "down", bed], check=False)


def rate_bytes(rate):
    if rate == "uncapped":
        return float("inf")
    m = re.fullmatch(r"(\d+)([kmg])bit", rate)
    return int(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2,4,6")
    ap.add_argument("--topologies", default="star,chain")
    ap.add_argument("--plot", default="")
    ap.add_argument("--verify", default="0", help="the coordinator's --verify (0: no checks, no audits)")
    ap.add_argument("--rates", default="1gbit,10gbit")
    ap.add_argument("--jobs", default="wide,heavy")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--timeline", default="", help="a directory for each run's timeline (bench/timeline.py)")
    ap.add_argument("--tls", action="store_true", help="every cluster under mutual TLS")
    ap.add_argument("--beside", action="store_true",
                    help="a worker on the coordinator's host too (shared memory), as when the coordinator runs on "
                         "a worker machine; --workers counts the other hosts")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.jobs.split(","):
            job, params = job_file(d, name, a.steps)
            tls = ""
            if a.tls:
                tls = os.path.join(d, "tls")
                os.makedirs(tls, exist_ok=True)
                certificates(tls)
            local, _, local_cpu = in_process(job, d, name)
            local, local_cpu = local / a.steps, local_cpu / a.steps
            for rate in a.rates.split(","):
                for n in map(int, a.workers.split(",")):
                    for topology in a.topologies.split(","):
                        tag = f"{name[0]}{n}{rate[:2]}{topology[0]}"
                        secs, first, line, links, cpu = cluster(job, d, n, rate, topology, tag, a.verify, a.timeline, tls,
                                                           a.beside)
                        step = secs / a.steps
                        chained = re.search(r"topology chain on (\d+) of (\d+)", line)
                        if topology == "chain" and not (chained and chained.group(1) == chained.group(2)):
                            raise SystemExit(f"not every step went over the chain: {line}")
                        per_step = [b / (EPOCHS * a.steps) / 1e6 for b in links]
                        vectors = max(1 + SHARDS, n + SHARDS / n) if topology == "star" else 2
                        bound = vectors * params * 4 / rate_bytes(rate)
                        row = {"job": name, "params": params, "rate": rate, "workers": n, "beside": a.beside,
                               "topology": topology,
                               "step_ms": step * 1e3, "first_epoch_step_ms": first / a.steps * 1e3,
                               "in_process_step_ms": local * 1e3,
                               "cpu_ms_per_step": cpu / a.steps * 1e3, "in_process_cpu_ms_per_step": local_cpu * 1e3,
                               "coordinator_link_mb_per_step": per_step[0],
                               "busiest_worker_link_mb_per_step": max(per_step[1:]), "bound_ms": bound * 1e3}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print()
    print("| job | link | workers | topology | step | / link bound | coordinator link | busiest worker link "
          "| in process | CPU per step (in process) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} ({r['params'] * 4 / 1e6:.1f} MB) | {r['rate']} | {r['workers']} | {r['topology']} "
              f"| {r['step_ms']:.0f} ms | {bound_text(r)} "
              f"| {r['coordinator_link_mb_per_step']:.1f} MB | {r['busiest_worker_link_mb_per_step']:.1f} MB "
              f"| {r['in_process_step_ms']:.0f} ms | {r['cpu_ms_per_step']:.0f} ms "
              f"({r['in_process_cpu_ms_per_step']:.0f} ms) |")
    if a.plot:
        plot(rows, a.plot)


def bound_text(r):
    if r["bound_ms"] == 0:
        return f"(uncapped) {r['in_process_step_ms'] / r['step_ms']:.2f}x of in process"
    return f"{r['step_ms'] / r['bound_ms']:.2f}x of {r['bound_ms']:.0f} ms"


def plot(rows, path):
    """Step time against workers, star and chain, with each one's link bound; one panel per job and rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["job"], r["rate"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (job, rate) in zip(axes[0], panels):
        for topology, colour in [("star", "tab:red"), ("chain", "tab:blue")]:
            rs = sorted((r for r in rows if (r["job"], r["rate"], r["topology"]) == (job, rate, topology)),
                        key=lambda r: r["workers"])
            if not rs:
                continue
            ns = [r["workers"] for r in rs]
            ax.plot(ns, [r["step_ms"] for r in rs], "o-", color=colour, label=f"{topology}")
            ax.plot(ns, [r["bound_ms"] for r in rs], "--", color=colour, label=f"{topology} link bound")
        local = [r["in_process_step_ms"] for r in rows if (r["job"], r["rate"]) == (job, rate)]
        ax.axhline(local[0], color="grey", linestyle=":", label="in process")
        ax.set_title(f"{job}, {rate}")
        ax.set_xlabel("worker hosts")
        ax.set_ylabel("ms per step")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
