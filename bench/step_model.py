"""A discrete-event model of one cluster step, calibrated on the emulated-host runs, projecting
step time and scaling efficiency past what two cores can emulate.

    python3 bench/step_model.py

The model: every link is full duplex at rate R with an efficiency E (the fraction of R that a
stream of tensors reaches, fitted on bench/multihost.py's star runs) and a per-message latency L.
A step of batch B over N workers (one shard each, so each shard has B/N rows and takes C(B/N)
to compute: the in-process step time per row, fitted on the same runs) is:

- star (today): the coordinator sends the parameters (P bytes) to each worker in turn on its
  link; each worker computes and sends its gradient back, and the gradients queue on the
  coordinator's incoming link. Step = the last gradient's arrival.
- chain (issue "Scale across machines"): parameters and gradients move in K chunks down and up
  a chain of workers ordered by shard; a chunk goes to the next hop as soon as it is in, so all
  links stream at once. Step = P/(E R) for the parameters + compute + P/(E R) for the gradient
  sum + (N + K) hops of (chunk/(E R) + L).
- tree (what would come next): the same chunks over a fixed binary tree of shard indices,
  2 log2(N) hops instead of N.

The lower bounds are the link terms alone: star 2 N P / R on the coordinator's link, chain and
tree about 2 P / R on every link. Numbers are model output, not measurements, except the
calibration rows, which print the model beside what bench/multihost.py measured.
"""
import math

# bench/multihost.py --steps 10 on the 2-core VM, 2026-11-30: (job, P bytes, batch, link bits/s,
# workers, measured step seconds, in-process step seconds). Shards = 4 in those runs: each
# worker sent its shards' gradients separately, so the star there moved (N + 4) P.
MEASURED = [
    ("heavy", 23.3e6, 64, 1e9, 1, 1.166, 0.102),
    ("heavy", 23.3e6, 64, 1e9, 2, 1.298, 0.102),
    ("heavy", 23.3e6, 64, 1e9, 4, 1.595, 0.102),
    ("wide", 2.68e6, 256, 1e9, 1, 0.126, 0.0125),
    ("wide", 2.68e6, 256, 1e9, 2, 0.129, 0.0125),
    ("wide", 2.68e6, 256, 1e9, 4, 0.157, 0.0125),
]
SHARDS_MEASURED = 4
LATENCY = 50e-6  # per message and hop (a datacenter link and a gRPC frame)
CHUNK = 512 * 1024  # bytes per chunk on the chain


def star(p, rate, n, shards, shard_compute, eff=1.0):
    """The star as the event sequence above: `shards` shards over `n` workers (contiguous, equal
    groups), each taking `shard_compute` seconds, one gradient message per shard."""
    r = rate / 8 * eff
    hop = p / r + LATENCY
    ready = []
    for i in range(n):
        start = (i + 1) * hop  # the coordinator's outgoing link, one worker after another
        ready += [start + (j + 1) * shard_compute for j in range(shards // n)]
    link = 0.0
    for t in sorted(ready):  # gradients queue on the coordinator's incoming link
        link = max(link, t) + hop
    return link


def chain(p, rate, n, compute, eff=1.0, hops=None):
    r = rate / 8 * eff
    k = max(1, math.ceil(p / CHUNK))
    hops = n if hops is None else hops
    per_hop = min(CHUNK, p) / r + LATENCY
    return 2 * p / r + compute + (hops + k) * per_hop


def calibration_step(p, rate, n, local, eff):
    # In those runs 4 shards ran on a 2-core machine shared by n workers and the coordinator:
    # a shard took the in-process per-shard time, slowed by the sharing when n > 2.
    shard = local * 2 / SHARDS_MEASURED * max(1.0, n / 2)
    return star(p, rate, n, SHARDS_MEASURED, shard, eff)


def fit_efficiency():
    """The link efficiency that best explains the measured star steps (least squares of logs)."""
    def err(e):
        return sum((math.log(calibration_step(p, rate, n, local, e)) - math.log(step)) ** 2
                   for _, p, _, rate, n, step, local in MEASURED)
    return min((x / 100 for x in range(40, 101)), key=err)


def main():
    eff = fit_efficiency()
    print(f"fitted link efficiency: {eff:.2f} of the line rate\n")
    print("| calibration run | measured step | model |")
    print("|---|---|---|")
    for job, p, _, rate, n, step, local in MEASURED:
        model = calibration_step(p, rate, n, local, eff)
        print(f"| {job}, {rate / 1e9:.0f} Gbit/s, {n} worker(s) | {step * 1e3:.0f} ms | {model * 1e3:.0f} ms |")
    print()
    # Projection: the 23 MB model, 64 rows per worker (weak scaling), one shard per worker on
    # its own core; compute per row from the in-process run.
    p = 23.3e6
    shard = 0.102 * 2 / 4  # seconds per 16-row shard on one core, as measured
    compute = shard * 4  # 64 rows
    print("| workers | link | star step | chain step | tree step | star / chain / tree efficiency |")
    print("|---|---|---|---|---|---|")
    for rate in (10e9, 100e9):
        for n in (16, 64, 256):
            s = star(p, rate, n, n, compute, eff)
            c = chain(p, rate, n, compute, eff=eff)
            t = chain(p, rate, n, compute, eff=eff, hops=2 * math.ceil(math.log2(n)))
            # Efficiency: a worker's compute over the step (1.0 = communication fully hidden).
            print(f"| {n} | {rate / 1e9:.0f} Gbit/s | {s * 1e3:.0f} ms | {c * 1e3:.0f} ms | {t * 1e3:.0f} ms "
                  f"| {compute / s:.2f} / {compute / c:.2f} / {compute / t:.2f} |")


if __name__ == "__main__":
    main()
