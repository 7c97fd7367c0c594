"""What verification by recomputation costs, side by side in one invocation.

    python3 bench/verify_cost.py [--job fashion_mnist] [--workers 2] [--epochs 2] [--rounds 3]

Runs the job (with `shards = --workers`) on `--spawn-workers N` local workers with `--verify 0`
(off), `--verify 0.05` and `--verify all`, alternating within each round (this machine's speed
drifts, so a round's runs are the fairest comparison), and prints the median epoch time of each,
the cost against `--verify 0` (median of the per-round ratios, and their range) and the
verification counts of the last cluster line.
"""
import argparse
import json
import os
import re
import statistics
import subprocess

from compare_cluster import ROOT, example_job, run

SETTINGS = ["0", "0.05", "all"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", default="fashion_mnist")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    cfg = example_job(a.job, epochs=a.epochs, shards=a.workers)
    times = {s: [] for s in SETTINGS}
    ratios = {s: [] for s in SETTINGS[1:]}
    notes = {}
    for _ in range(a.rounds):
        medians = {}
        for s in SETTINGS:
            secs, notes[s] = run(cfg, ["--spawn-workers", str(a.workers), "--verify", s])
            times[s] += secs
            medians[s] = statistics.median(secs)
        for s in SETTINGS[1:]:
            ratios[s].append(medians[s] / medians["0"])
    os.unlink(cfg)
    print(json.dumps({"job": a.job, "epoch_s": {s: statistics.median(v) for s, v in times.items()},
                      "cost_per_round": ratios, "reports": notes}))
    print()
    print(f"| {a.job}, {a.workers} workers | epoch (median) | / --verify 0 (per round: median, range) | verification in the last epoch |")
    print("|---|---|---|---|")
    for s in SETTINGS:
        counts = re.search(r"verified (\d+) shard\(s\), refereed (\d+)", notes[s])
        counted = f"{counts.group(1)} shards checked, {counts.group(2)} refereed" if counts else ""
        r = ratios.get(s)
        cost = f"{statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f})" if r else "1"
        print(f"| `--verify {s}` | {statistics.median(times[s]):.3f} s | {cost} | {counted} |")


if __name__ == "__main__":
    main()
