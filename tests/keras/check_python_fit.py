"""The Python entry point: `dtrain.fit` where a notebook calls `model.fit`.

    DTRAIN_BIN=target/release python tests/keras/check_python_fit.py   (pip install ./python first)

A small compiled Keras model (Flatten, Dense with L2, Dropout, Dense softmax; Adam) trains for two
epochs on 2,000 Fashion-MNIST images with validation data and EarlyStopping through dtrain.fit:
the returned History holds the run's history.csv, the model object ends up with the run's final
weights bit for bit, dtrain.evaluate and dtrain.predict agree with Keras's own evaluate and predict
on those weights (to 1e-5: JAX and OpenBLAS sum products in different orders), and an unsupported
callback is refused by name; ModelCheckpoint's file opens in Keras. numerics="tensorflow" is within
1e-6 of Keras's evaluate (bit for bit when Keras runs on TensorFlow: 0.7556014657020569 both, by
hand), and an unknown numerics is refused by name.
"""
import contextlib
import csv
import io
import json
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402
import numpy as np  # noqa: E402

import dtrain  # noqa: E402
from fashion_mnist import idx  # noqa: E402


def safetensors(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return {k: np.frombuffer(raw[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]], dtype="<f4")
            .reshape(t["shape"]) for k, t in header.items() if k != "__metadata__"}


def main():
    x = idx("train-images")[:2000].astype("float32") / 255.0
    y = idx("train-labels")[:2000].astype("int64")
    xv = idx("t10k-images")[:500].astype("float32") / 255.0
    yv = idx("t10k-labels")[:500].astype("int64")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", kernel_regularizer=keras.regularizers.L2(0.001)),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    with tempfile.TemporaryDirectory() as d:
        run = os.path.join(d, "run")
        history = dtrain.fit(model, x, y, batch_size=64, epochs=2, validation_data=(xv, yv),
                             callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=1),
                                        keras.callbacks.ModelCheckpoint(os.path.join(d, "best.keras"),
                                                                        save_best_only=True)],
                             run_dir=run, verbose=0)
        rows = list(csv.DictReader(open(os.path.join(run, "history.csv"))))
        assert history.epoch == [int(r["epoch"]) for r in rows] == [0, 1], history.epoch
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert history.history[metric] == [float(r[metric]) for r in rows], metric
        final = safetensors(os.path.join(run, "final.safetensors"))
        for w in model.weights:
            name = "/".join(w.path.split("/")[-2:])
            assert np.array_equal(keras.ops.convert_to_numpy(w), final[name]), f"{name} not loaded back"
        # The optimizer continues where dtrain stopped: 2 epochs of 32 steps, Adam's moments as written.
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 64, model.optimizer.iterations
        written = keras.saving.load_model(os.path.join(run, "final.keras"))
        for a, b in zip(model.optimizer.variables, written.optimizer.variables):
            assert np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)), a.path
        best = keras.saving.load_model(os.path.join(d, "best.keras"))
        assert len(best.weights) == len(model.weights), "ModelCheckpoint's .keras file"
        print(f"python check: dtrain.fit trained 2 epochs (val_loss {history.history['val_loss']}), "
              f"the model holds the run's final weights bit for bit, its optimizer the run's last state")

    ours = dtrain.evaluate(model, xv, yv)
    theirs = model.evaluate(xv, yv, verbose=0, return_dict=True)
    assert abs(ours["loss"] - theirs["loss"]) <= 1e-5 * max(1.0, abs(theirs["loss"])), (ours, theirs)
    p = dtrain.predict(model, xv[:100])
    q = np.asarray(model.predict(xv[:100], verbose=0))
    assert p.shape == q.shape and float(np.abs(p - q).max()) <= 1e-5
    exact = "bit for bit" if np.float32(ours["loss"]) == np.float32(theirs["loss"]) else "not bit for bit"
    print(f"python check: dtrain.evaluate loss {ours['loss']!r} (Keras {theirs['loss']!r}, {exact} in float32), "
          f"dtrain.predict within {float(np.abs(p - q).max()):.1e} of Keras's")
    # With a coordinator other machines' workers join (here one local worker dials it).
    import socket
    import subprocess
    import threading
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        token = os.path.join(d, "token")
        open(token, "w").write("python-check-token-0123456789")
        env = dict(os.environ, DTRAIN_TOKEN_FILE=token)
        worker = [os.path.join(os.environ["DTRAIN_BIN"], "worker"), "--coordinator", f"http://127.0.0.1:{port}",
                  "--retry-for", "60"]
        joined = threading.Thread(target=lambda: subprocess.run(worker, env=env, capture_output=True, timeout=120))
        joined.start()
        h = dtrain.fit(model, x, y, batch_size=64, epochs=1, coordinator=f"127.0.0.1:{port}", token_file=token,
                       verbose=0)
        joined.join(timeout=30)
        assert len(h.epoch) == 1
    print("python check: with coordinator=, a worker that dials it trains the model")
    # verbose=1 shows Keras's kind of bar, redrawn with carriage returns (no terminal escapes).
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        dtrain.fit(model, x, y, batch_size=64, epochs=1, verbose=1)
    text = shown.getvalue()
    assert "Epoch 1/1" in text and "\r1/32 " in text and " ETA " in text and "\x1b" not in text, text[:500]
    assert text.count("\r") >= 2, text[:500]
    print(f"python check: verbose=1 streams the progress bar ({text.count(chr(13))} redraws) and the epoch line")
    try:
        dtrain.fit(model, x, y, callbacks=[keras.callbacks.LambdaCallback()], verbose=0)
        raise AssertionError("LambdaCallback was accepted")
    except dtrain.DtrainError as e:
        assert "LambdaCallback" in str(e), e
    print("python check: an unsupported callback is refused by name")
    try:
        dtrain.evaluate(model, x, y, numerics="xla")
        raise AssertionError("numerics='xla' was accepted")
    except dtrain.DtrainError as e:
        assert "'xla'" in str(e), e
    # TensorFlow's rounding is asked for by name on any backend; the loss stays within float
    # rounding of Keras's (equal bit for bit only where Keras itself runs on TensorFlow).
    theirs = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    tf_loss = dtrain.evaluate(model, x, y, numerics="tensorflow")["loss"]
    assert abs(tf_loss - theirs) <= 1e-6 * max(1.0, abs(theirs)), (tf_loss, theirs)
    print(f"python check: numerics='tensorflow' gives {tf_loss!r} (Keras on {keras.backend.backend()}: {theirs!r}); "
          "an unknown numerics is refused by name")


if __name__ == "__main__":
    main()
