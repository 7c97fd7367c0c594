"""TensorBoard's own reader on a dtrain run's event files (run by .ci/run in its venv).

    python3 tests/tensorboard/check_events.py path/to/coordinator

Trains a small job with the TensorBoard callback (batch values every 5 steps, weight histograms
every epoch), then reads `logs/train` and `logs/validation` with TensorBoard's EventAccumulator
and checks that they hold Keras's tags at Keras's steps with the values of dtrain's history.csv;
then trains it with a worker and checks the cluster's own scalars (cluster/step_ms, ...).
Exits non-zero, naming what is wrong, otherwise.
"""
import csv
import os
import subprocess
import sys
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def fail(what):
    sys.exit(f"tensorboard check: {what}")


def main():
    coordinator = sys.argv[1]
    job = open(os.path.join(ROOT, "tests", "fuzz_corpus", "job", "job.toml")).read()
    job = job.replace("epochs = 1", "epochs = 3").replace("shards = 2", "shards = 1")
    job += '\n[[callbacks]]\nTensorBoard = { log_dir = "logs", update_freq = 5, histogram_freq = 1 }\n'
    with tempfile.TemporaryDirectory() as d:
        for name in ("train.csv",):
            src = os.path.join(ROOT, "tests", "fuzz_corpus", "csv", name)
            with open(src) as f, open(os.path.join(d, name), "w") as g:
                rows = f.read().splitlines()
                g.write("\n".join([rows[0]] + rows[1:] * 10) + "\n")  # 30 rows: 24 train (12 steps), 6 validation
        job = job.replace("batch_size = 2", "batch_size = 2\nvalidation_split = 0.2")
        with open(os.path.join(d, "job.toml"), "w") as f:
            f.write(job)
        run = os.path.join(d, "run")
        p = subprocess.run([coordinator, "train", "--config", os.path.join(d, "job.toml"), "--run-dir", run, "-q"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            fail(f"training failed: {p.stderr}")
        history = list(csv.DictReader(open(os.path.join(run, "history.csv"))))
        train = EventAccumulator(os.path.join(run, "logs", "train"), size_guidance={"histograms": 0}).Reload()
        val = EventAccumulator(os.path.join(run, "logs", "validation")).Reload()
        tags = train.Tags()
        for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate", "batch_loss", "batch_accuracy"):
            if tag not in tags["scalars"]:
                fail(f"train run lacks {tag}: {tags}")
        for tag in ("epoch_loss", "epoch_accuracy"):
            if tag not in val.Tags()["scalars"]:
                fail(f"validation run lacks {tag}: {val.Tags()}")
        for key, acc, tag in (("loss", train, "epoch_loss"), ("accuracy", train, "epoch_accuracy"),
                              ("val_loss", val, "epoch_loss"), ("val_accuracy", val, "epoch_accuracy")):
            got = [(e.step, e.value) for e in acc.Scalars(tag)]
            want = [(int(h["epoch"]), float(h[key])) for h in history]
            if [s for s, _ in got] != [s for s, _ in want]:
                fail(f"{tag}: steps {got} are not the epochs {want}")
            for (s, g), (_, w) in zip(got, want):
                if abs(g - w) > 1e-6 * max(1.0, abs(w)):
                    fail(f"{tag} at epoch {s}: {g} in TensorBoard, {w} in history.csv")
        batch_steps = [e.step for e in train.Scalars("batch_loss")]
        if batch_steps != list(range(5, 37, 5)):
            fail(f"batch_loss at steps {batch_steps}, not every 5 optimizer steps")
        hist = tags["histograms"]
        if not hist or any(len(train.Histograms(t)) != 3 for t in hist):
            fail(f"expected one histogram per weight per epoch: {hist}")
        # With workers, the cluster's own curves go beside Keras's, one value per epoch.
        crun = os.path.join(d, "cluster-run")
        p = subprocess.run([coordinator, "train", "--config", os.path.join(d, "job.toml"), "--run-dir", crun,
                            "--spawn-workers", "1", "-q"], capture_output=True, text=True)
        if p.returncode != 0:
            fail(f"training with a worker failed: {p.stderr}")
        ctrain = EventAccumulator(os.path.join(crun, "logs", "train")).Reload()
        for tag in ("cluster/step_ms", "cluster/workers_alive", "cluster/sent_bytes_per_step"):
            present = tag in ctrain.Tags()["scalars"]
            if not present or [e.step for e in ctrain.Scalars(tag)] != [0, 1, 2]:
                fail(f"{tag} is not in the cluster run at epochs 0, 1, 2: {ctrain.Tags()['scalars']}")
        if [e.value for e in ctrain.Scalars("cluster/workers_alive")] != [1.0, 1.0, 1.0]:
            fail("cluster/workers_alive is not 1 at every epoch")
        print(f"tensorboard check: {len(tags['scalars'])} train scalar tags, {len(hist)} histograms, "
              f"{len(history)} epochs match history.csv; cluster scalars present")


if __name__ == "__main__":
    main()
