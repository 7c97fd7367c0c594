"""The OpenBLAS kernels side by side in one invocation, in process.

    python3 bench/compare_kernels.py [--jobs fashion_mnist,fashion_mnist_wide] [--epochs 2] [--rounds 3]

Each job runs with `fit.kernel = "haswell"` and `"skylakex"` (if this CPU runs it), alternating
within each round; prints the median epoch time (training + validation) of each and the median of
the per-round ratios with their range.
"""
import argparse
import json
import os
import statistics
import subprocess

from compare_cluster import ROOT, example_job, run

KERNELS = ["haswell", "skylakex"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="fashion_mnist,fashion_mnist_wide")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    rows = []
    for job in a.jobs.split(","):
        files = {k: example_job(job, epochs=a.epochs, kernel=f'"{k}"') for k in KERNELS}
        times = {k: [] for k in KERNELS}
        ratios = []
        for _ in range(a.rounds):
            med = {}
            for k in KERNELS:
                secs, _ = run(files[k], ["--local"])
                times[k] += secs
                med[k] = statistics.median(secs)
            ratios.append(med["haswell"] / med["skylakex"])
        for f in files.values():
            os.unlink(f)
        h, s = statistics.median(times["haswell"]), statistics.median(times["skylakex"])
        rows.append((job, h, s, ratios))
        print(json.dumps({"job": job, "haswell_epoch_s": h, "skylakex_epoch_s": s, "per_round_speedup": ratios}))
    print()
    print("| job | haswell epoch | skylakex epoch | speed-up (per round: median, range) |")
    print("|---|---|---|---|")
    for job, h, s, r in rows:
        print(f"| {job} | {h:.2f} s | {s:.2f} s | {h / s:.2f}x ({statistics.median(r):.2f}, {min(r):.2f}-{max(r):.2f}) |")


if __name__ == "__main__":
    main()
