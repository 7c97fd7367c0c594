"""dtrain from a notebook: `dtrain.fit(model, x, y, ...)` where you would call `model.fit(x, y, ...)`.

The compiled Keras model is saved as a .keras file, the arrays as .npy files (uint8 stays uint8),
and a dtrain job names them; the `coordinator` binary trains (in this process's machine, with
local workers, or with a cluster you run), streaming its progress bar here; the trained weights
are loaded back into the same model object, and a History like Keras's is returned.

The binaries are found in $DTRAIN_BIN (a directory), on the PATH, or in the repository's
target/release when this package is used from a checkout (build them with
`cargo build --release --bins`).
"""
import codecs
import csv
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

__all__ = ["fit", "evaluate", "predict", "History", "DtrainError"]


class DtrainError(RuntimeError):
    """dtrain refused the job or failed; the message is its one-line error."""


class History:
    """What `model.fit` returns: `.history` maps each metric to its per-epoch values, `.epoch`
    lists the epochs (from 0), `.run_dir` is dtrain's run directory (history.csv, weights,
    final.keras, curves.png), kept when `run_dir` was given."""

    def __init__(self, history, epoch, run_dir):
        self.history = history
        self.epoch = epoch
        self.run_dir = run_dir


def _binary(name):
    here = os.environ.get("DTRAIN_BIN")
    if here:
        return os.path.join(here, name)
    found = shutil.which(name)
    if found:
        return found
    checkout = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release", name)
    if os.path.exists(checkout):
        return os.path.abspath(checkout)
    raise DtrainError(f"cannot find the {name} binary: set DTRAIN_BIN, put it on the PATH, or build it "
                      f"(cargo build --release --bins)")


def _npy(directory, name, array):
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = array.astype(np.float32) if array.dtype.kind == "f" else array.astype(np.int64)
    path = os.path.join(directory, name + ".npy")
    np.save(path, np.ascontiguousarray(array))
    return path


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def _callback(cb, checkpoints):
    """A Keras callback as a dtrain [[callbacks]] table (None: nothing to write)."""
    import keras
    cbs = keras.callbacks
    name = type(cb).__name__
    if isinstance(cb, cbs.EarlyStopping):
        args = {"monitor": cb.monitor, "min_delta": abs(float(cb.min_delta)), "patience": int(cb.patience),
                "restore_best_weights": bool(cb.restore_best_weights), "start_from_epoch": int(cb.start_from_epoch)}
        if cb.baseline is not None:
            args["baseline"] = float(cb.baseline)
        return {"EarlyStopping": args}
    if isinstance(cb, cbs.ModelCheckpoint):
        if getattr(cb, "save_freq", "epoch") != "epoch":
            raise DtrainError(f"ModelCheckpoint(save_freq={cb.save_freq!r}) is not supported by dtrain.fit")
        ext = ".weights.h5" if cb.filepath.endswith(".weights.h5") else ".keras"
        inside = f"checkpoint{len(checkpoints)}{ext}"
        checkpoints.append((inside, cb.filepath))
        return {"ModelCheckpoint": {"filepath": inside, "monitor": cb.monitor,
                                    "save_best_only": bool(cb.save_best_only)}}
    if isinstance(cb, cbs.ReduceLROnPlateau):
        return {"ReduceLROnPlateau": {"monitor": cb.monitor, "factor": float(cb.factor), "patience": int(cb.patience),
                                      "min_delta": float(cb.min_delta), "cooldown": int(cb.cooldown),
                                      "min_lr": float(cb.min_lr)}}
    if isinstance(cb, cbs.TerminateOnNaN):
        return None  # always on
    raise DtrainError(f"callback {name} is not supported by dtrain.fit "
                      f"(EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, TerminateOnNaN)")


def _error(text):
    """The one-line error a dtrain binary ended with, from its output."""
    last = [line for line in text.splitlines() if line.startswith("error:")]
    return last[-1][len("error: "):] if last else text.strip() or "dtrain failed"


def _run(args, verbose):
    """Runs a dtrain binary and returns its output. With `verbose` the output is shown as it
    comes, standard error included, through one pipe so that the progress bar (on stderr,
    redrawn with carriage returns) and the epoch lines (on stdout) stay in order."""
    if not verbose:
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DtrainError(_error(proc.stderr))
        return proc.stdout
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    while True:
        chunk = proc.stdout.read1(65536)
        if not chunk:
            break
        text = decoder.decode(chunk)
        out.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    out.append(decoder.decode(b"", final=True))
    text = "".join(out)
    if proc.wait() != 0:
        raise DtrainError(_error(text))
    return text


def fit(model, x, y, batch_size=32, epochs=1, verbose=1, callbacks=None, validation_split=0.0,
        validation_data=None, shuffle=True, initial_epoch=0, seed=0, shards=None, workers=0, coordinator=None,
        min_workers=1, token_file=None, run_dir=None, numerics=None):
    """Trains `model` (a compiled Keras Sequential) like `model.fit`, with dtrain; the trained
    weights end up in `model`. Returns a History. `workers`: local worker processes (0 and no
    `coordinator`: in this process's machine, in one process); `coordinator`: the address this
    machine's coordinator listens on for workers on other machines (e.g. "0.0.0.0:50051"; they
    run `worker --coordinator http://this-host:50051` with the job token from `token_file`), and
    training waits for `min_workers` of them; `shards`: the job's fit.shards (the result depends on
    it, not on the workers); `seed`: dtrain's seed for the epoch order and dropout masks (the
    initial weights are the model's); `numerics`: whose rounding val_loss has, as for `evaluate`
    (the job's fit.validation_numerics)."""
    if getattr(model, "compiled", False) is False:
        raise DtrainError("compile the model first (dtrain takes the optimizer, loss and metrics from it)")
    keep = run_dir is not None
    work = tempfile.mkdtemp(prefix="dtrain-")
    try:
        model_file = os.path.join(work, "model.keras")
        model.save(model_file)
        data = {"format": "npy", "x": _npy(work, "x", x), "y": _npy(work, "y", y)}
        if validation_data is not None:
            if len(validation_data) != 2:
                raise DtrainError("validation_data must be (x_val, y_val)")
            data["test_x"] = _npy(work, "x_val", validation_data[0])
            data["test_y"] = _npy(work, "y_val", validation_data[1])
            data["validation"] = "test"
        checkpoints = []
        tables = [t for t in (_callback(cb, checkpoints) for cb in callbacks or []) if t]
        fit_args = {"batch_size": int(batch_size), "epochs": int(epochs), "shuffle": bool(shuffle),
                    "validation_split": float(validation_split), "initial_epoch": int(initial_epoch)}
        if shards:
            fit_args["shards"] = int(shards)
        fit_args["validation_numerics"] = _numerics(numerics)
        lines = [f"seed = {int(seed)}", "[data]"] + [f"{k} = {_toml(v)}" for k, v in data.items()]
        lines += ["[model]", f"keras = {_toml(model_file)}", "[fit]"] + [f"{k} = {_toml(v)}" for k, v in fit_args.items()]
        for t in tables:
            lines += ["[[callbacks]]", " = ".join([next(iter(t)), _toml(next(iter(t.values())))])]
        job = os.path.join(work, "job.toml")
        with open(job, "w") as f:
            f.write("\n".join(lines) + "\n")
        run = os.path.abspath(run_dir) if keep else os.path.join(work, "run")
        args = [_binary("coordinator"), "train", "--config", job, "--run-dir", run]
        if workers:
            args += ["--spawn-workers", str(int(workers))]
        if coordinator:
            if not token_file:
                raise DtrainError("coordinator= needs token_file= (the job token workers present)")
            args += ["--listen", str(coordinator), "--min-workers", str(int(min_workers)), "--token-file", token_file]
        if not verbose:
            args += ["-q"]
        elif verbose == 1:
            # Keras's verbose=1: the bar, redrawn batch by batch; 2: a line per epoch.
            args += ["--progress-bar"]
        _run(args, verbose)
        import keras
        trained = keras.saving.load_model(os.path.join(run, "final.keras"), compile=False)
        model.set_weights(trained.get_weights())
        _load_optimizer_state(model, os.path.join(run, "final.keras"))
        for inside, wanted in checkpoints:
            # dtrain writes the checkpoint in the run directory, in the format its name asks for.
            if os.path.exists(os.path.join(run, inside)):
                shutil.copyfile(os.path.join(run, inside), wanted)
        return _history(os.path.join(run, "history.csv"), run if keep else None)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _load_optimizer_state(model, path):
    """The optimizer state dtrain ended with (in `path`, a .keras file) into `model.optimizer`, so a
    later `model.fit` or `dtrain.fit` continues from it, as after Keras's own fit."""
    import io
    import zipfile

    import h5py
    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
        if "optimizer/vars" not in f:
            return
        group = f["optimizer/vars"]
        store = {name: group[name][()] for name in group}
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.optimizer.load_own_variables(store)


def _history(path, run_dir):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    metrics = [k for k in (rows[0].keys() if rows else []) if k != "epoch"]
    history = {m: [float(r[m]) for r in rows] for m in metrics}
    return History(history, [int(r["epoch"]) for r in rows], run_dir)


def _safetensors(model, path):
    """The model's weights as dtrain reads them: safetensors, each Dense layer's `<name>/kernel`
    and `<name>/bias`, names counted per class as Keras and dtrain both count them."""
    import json
    import keras
    header, blobs, offset, dense = {}, [], 0, 0
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Dense):
            if layer.weights:
                raise DtrainError(f"layer {layer.name} ({type(layer).__name__}) is not supported by dtrain")
            continue
        name = "dense" if dense == 0 else f"dense_{dense}"
        dense += 1
        for suffix, w in zip(("kernel", "bias"), layer.weights):
            a = np.ascontiguousarray(keras.ops.convert_to_numpy(w), dtype="<f4")
            header[f"{name}/{suffix}"] = {"dtype": "F32", "shape": list(a.shape),
                                          "data_offsets": [offset, offset + a.nbytes]}
            blobs.append(a.tobytes())
            offset += a.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _job(work, model, x, y):
    """A job in `work` on the model (as a .keras file) and the arrays; its path."""
    model_file = os.path.join(work, "model.keras")
    model.save(model_file)
    x_file = _npy(work, "x", x)
    y_file = _npy(work, "y", y)
    job = os.path.join(work, "job.toml")
    with open(job, "w") as f:
        f.write(f'[data]\nformat = "npy"\nx = {_toml(x_file)}\ny = {_toml(y_file)}\n'
                f'[model]\nkeras = {_toml(model_file)}\n')
    weights = os.path.join(work, "weights.safetensors")
    _safetensors(model, weights)
    return job, weights, x_file


def _numerics(numerics):
    """The numerics asked for; by default "auto" (TensorFlow's kernels where dtrain reproduces
    them for the model) when Keras runs on TensorFlow, else dtrain's."""
    if numerics is None:
        import keras
        numerics = "auto" if keras.backend.backend() == "tensorflow" else "dtrain"
    if numerics not in ("dtrain", "tensorflow", "auto"):
        raise DtrainError(f"numerics={numerics!r}: use 'dtrain', 'tensorflow' or 'auto'")
    return numerics


def predict(model, x, numerics=None):
    """`model.predict(x)` computed by dtrain (`coordinator predict`), as a float32 array.

    `numerics` as for `evaluate`: "tensorflow" (or "auto", the default on Keras's TensorFlow
    backend, for a covered model) gives the outputs Keras's predict gives there, bit for bit."""
    import json
    numerics = _numerics(numerics)
    work = tempfile.mkdtemp(prefix="dtrain-")
    try:
        job, weights, x_file = _job(work, model, x, np.zeros(len(x), dtype=np.int64))
        out = _run([_binary("coordinator"), "predict", "--config", job, "--weights", weights, "--input", x_file,
                    "--json", "--numerics", numerics], False)
        return np.array([r["output"] for r in json.loads(out)["predictions"]], dtype=np.float32)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def evaluate(model, x, y, numerics=None):
    """`model.evaluate(x, y)` computed by dtrain (`coordinator evaluate`): a dict of the loss
    (with every regularization term, as Keras reports it) and the compiled metrics.

    `numerics="tensorflow"` reproduces TensorFlow's CPU kernels' rounding, so the loss is the
    one Keras's evaluate reports on the TensorFlow backend, bit for bit (for sparse
    crossentropy on a softmax after linear or relu layers; other models are refused by name);
    `"dtrain"` uses dtrain's own kernels; `"auto"` TensorFlow's where the model is covered, else
    dtrain's. The default is "auto" when Keras's backend is TensorFlow, else "dtrain"."""
    import json
    numerics = _numerics(numerics)
    work = tempfile.mkdtemp(prefix="dtrain-")
    try:
        job, weights, _ = _job(work, model, x, y)
        out = _run([_binary("coordinator"), "evaluate", "--config", job, "--weights", weights, "--json",
                    "--numerics", numerics], False)
        return json.loads(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
