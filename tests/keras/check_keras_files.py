"""Keras opens the .keras files dtrain writes: a run's final.keras and `coordinator export`'s.

    python tests/keras/check_keras_files.py target/release/coordinator   (keras 3, jax[cpu])

Trains the seed job (examples/fashion_mnist.toml) for one epoch, then loads final.keras with
keras.saving.load_model and predicts the 10,000 test images: every probability must be within 1e-5 of
`coordinator predict`'s (Keras on JAX and dtrain on OpenBLAS sum the products of a matrix
multiplication in different orders; 8.9e-7 measured) and every predicted class the same unless
its two top probabilities are that close. The weights Keras
loaded must equal final.safetensors bit for bit, the model comes compiled as the job compiles it
(its evaluate() within 1e-5 of `coordinator evaluate`), and `coordinator export` of those weights
must load with the same weights. A ModelCheckpoint whose filepath ends in .keras or .weights.h5
writes that format, which load_model and load_weights open with the weights of best.safetensors.
final.keras also holds the optimizer's state, which load_model restores without a warning: the
iteration count, the learning rate and Adam's moments of the run's last resume checkpoint.
"""
import json
import os
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402
import numpy as np  # noqa: E402

import fashion_mnist  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(ROOT, "examples", "fashion_mnist.toml")


def safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(t["shape"])
    return out


def check_optimizer_state(model, run):
    """The optimizer Keras restored from final.keras holds the run's last state: its iteration count,
    learning rate, and Adam's moments per variable, bit for bit as the resume checkpoint has them."""
    state = json.load(open(os.path.join(run, "state.json")))
    slots = safetensors(os.path.join(run, state["tensors"]))
    opt = model.optimizer
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == state["iterations"], "iterations"
    variables = opt.variables
    assert float(keras.ops.convert_to_numpy(variables[1])) == np.float32(0.001), "learning_rate"
    offset = 0
    slot_vars = iter(variables[2:])
    for w in model.trainable_weights:
        size = int(np.prod(w.shape))
        for slot in ("m", "v"):
            got = keras.ops.convert_to_numpy(next(slot_vars))
            assert np.array_equal(got.reshape(-1), slots[f"optimizer/{slot}"][offset:offset + size]), (w.path, slot)
        offset += size
    assert next(slot_vars, None) is None and offset == slots["optimizer/m"].size
    print(f"keras check: final.keras restores the optimizer: {len(variables)} variables, iteration "
          f"{state['iterations']}, Adam's moments bit for bit")


def main():
    coordinator = sys.argv[1]
    images = fashion_mnist.path("t10k-images")
    with tempfile.TemporaryDirectory() as d:
        run = os.path.join(d, "run")
        # The seed job, with its checkpoint also written as .keras and as .weights.h5.
        job = os.path.join(d, "job.toml")
        text = open(JOB).read()
        checkpoint = 'ModelCheckpoint = { filepath = "best.safetensors", monitor = "val_loss", save_best_only = true }'
        assert checkpoint in text
        for name in ("best.keras", "best.weights.h5"):
            text += "\n[[callbacks]]\n" + checkpoint.replace("best.safetensors", name) + "\n"
        open(job, "w").write(text)
        subprocess.run([coordinator, "train", "--config", job, "--run-dir", run, "--epochs", "1", "-q"], check=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.saving.load_model(os.path.join(run, "final.keras"))
        skipped = [str(w.message) for w in caught if "optimizer" in str(w.message)]
        assert not skipped, skipped
        check_optimizer_state(model, run)
        want = safetensors(os.path.join(run, "final.safetensors"))
        for w in model.weights:
            name = "/".join(w.path.split("/")[-2:])
            assert np.array_equal(keras.ops.convert_to_numpy(w), want[name]), f"{name} differs"
        x = fashion_mnist.idx("t10k-images").astype("float32") * np.float32(0.00392156862745098)
        keras_out = np.asarray(model.predict(x, batch_size=1000, verbose=0))
        out = subprocess.run([coordinator, "predict", "--config", JOB, "--weights",
                              os.path.join(run, "final.safetensors"), "--input", images, "--json"],
                             check=True, capture_output=True, text=True).stdout
        ours = np.array([r["output"] for r in json.loads(out)["predictions"]], dtype=np.float32)
        assert ours.shape == keras_out.shape, (ours.shape, keras_out.shape)
        same = ours.argmax(1) == keras_out.argmax(1)
        same_class = int(same.sum())
        rows = np.arange(len(x))
        tie = np.abs(ours[rows, ours.argmax(1)] - ours[rows, keras_out.argmax(1)]) <= 1e-5
        diff = float(np.abs(ours - keras_out).max())
        bits = int((ours.view(np.uint32) == keras_out.view(np.uint32)).sum())
        print(f"keras check: final.keras loads with the run's weights bit for bit; predictions on {len(x)} "
              f"images: {same_class} same classes, max |difference| {diff:.2e}, {bits} of {ours.size} outputs "
              f"bit-identical")
        assert diff <= 1e-5 and bool(np.all(same | tie)), "Keras's outputs differ from dtrain's"
        # Compiled as the job compiles it: Keras's evaluate on the test set against dtrain's.
        y = fashion_mnist.idx("t10k-labels").astype("int64")
        theirs = model.evaluate(x, y, batch_size=1000, verbose=0, return_dict=True)
        ours = json.loads(subprocess.run([coordinator, "evaluate", "--config", JOB, "--weights",
                                          os.path.join(run, "final.safetensors"), "--json"],
                                         check=True, capture_output=True, text=True).stdout)
        print(f"keras check: final.keras comes compiled; Keras's evaluate loss {theirs['loss']:.9f}, "
              f"dtrain's {ours['loss']:.9f}")
        assert abs(theirs["loss"] - ours["loss"]) <= 1e-5
        best = safetensors(os.path.join(run, "best.safetensors"))
        ckpt = keras.saving.load_model(os.path.join(run, "best.keras"))
        rebuilt = keras.saving.load_model(os.path.join(run, "final.keras"))
        rebuilt.load_weights(os.path.join(run, "best.weights.h5"))
        for m in (ckpt, rebuilt):
            for w in m.weights:
                name = "/".join(w.path.split("/")[-2:])
                assert np.array_equal(keras.ops.convert_to_numpy(w), best[name]), f"checkpoint {name} differs"
        print("keras check: ModelCheckpoint's best.keras and best.weights.h5 hold best.safetensors' weights")
        exported = os.path.join(d, "exported.keras")
        subprocess.run([coordinator, "export", "--config", JOB, "--weights", os.path.join(run, "final.safetensors"),
                        "--to", exported], check=True, capture_output=True)
        again = keras.saving.load_model(exported)
        for a, b in zip(again.weights, model.weights):
            assert np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        print("keras check: coordinator export writes a .keras file Keras opens with the same weights")


if __name__ == "__main__":
    main()
