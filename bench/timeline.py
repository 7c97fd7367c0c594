"""Where a step's time goes: the moments the coordinator and the workers marked (DTRAIN_TIMELINE=DIR,
see crates/cluster/src/timeline.rs), each step lined up on the coordinator's "step begins".

    python3 bench/timeline.py DIR [--skip 5] [--chrome trace.json]

Prints, for each process and moment, the median (p10, p90) time after the step began, in ms, in
the order they happen; the last row is when the next step began. The clocks must be one host's
(processes on one machine, or emulated hosts in network namespaces). `--chrome` also writes the
steps as a Chrome trace (chrome://tracing, Perfetto): one row per process, a mark per moment.
"""
import argparse
import collections
import glob
import json
import os
import statistics


def load(d):
    marks = []
    for path in sorted(glob.glob(os.path.join(d, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    marks.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a killed process
    return marks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out (connections, warm-up)")
    ap.add_argument("--chrome", default="")
    a = ap.parse_args()
    marks = load(a.dir)
    begins = {m["step"]: m["ts_us"] for m in marks if m["who"] == "coordinator" and m["what"] == "step begins"}
    steps = sorted(begins)[a.skip:-1]
    if not steps:
        raise SystemExit(f"{a.dir}: no steps marked by the coordinator")
    offsets = collections.defaultdict(list)
    for m in marks:
        if m["step"] in steps:
            offsets[(m["who"], m["what"])].append((m["ts_us"] - begins[m["step"]]) / 1e3)
    for s in steps:
        if s + 1 in begins:
            offsets[("coordinator", "next step begins")].append((begins[s + 1] - begins[s]) / 1e3)
    rows = sorted(offsets.items(), key=lambda kv: statistics.median(kv[1]))
    print(f"{len(steps)} steps; ms after the coordinator's step began: median (p10-p90)")
    for (who, what), v in rows:
        v.sort()
        print(f"{who:>14} {what:<22} {statistics.median(v):8.2f}  ({v[len(v) // 10]:.2f}-{v[len(v) * 9 // 10]:.2f})")
    if a.chrome:
        pids = {who: i for i, who in enumerate(sorted({m["who"] for m in marks}))}
        events = [{"name": m["what"], "ph": "i", "s": "t", "ts": m["ts_us"], "pid": pids[m["who"]], "tid": 0,
                   "args": {"step": m["step"]}} for m in marks]
        events += [{"name": "process_name", "ph": "M", "pid": p, "args": {"name": who}} for who, p in pids.items()]
        with open(a.chrome, "w") as f:
            json.dump({"traceEvents": events}, f)
        print(f"chrome trace: {a.chrome}")


if __name__ == "__main__":
    main()
