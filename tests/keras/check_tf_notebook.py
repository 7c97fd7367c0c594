"""The notebook's round trip: the seed model saved by real Keras on the TensorFlow backend
(crates/fit/tests/fixtures/keras_models/seed_notebook_tf.keras, generator beside it) is trained by
dtrain.fit and comes back as a Keras model whose evaluate() on the Fashion-MNIST test set agrees
with dtrain.evaluate.

    DTRAIN_BIN=target/release KERAS_BACKEND=jax python tests/keras/check_tf_notebook.py [EPOCHS]

Runs on any Keras backend (CI: JAX; by hand also TensorFlow, tensorflow-cpu 2.21). The notebook's
cell as written for Keras, with dtrain.fit where model.fit was: x / 255.0 as float32, batch 30,
validation on the test set, EarlyStopping and a best-weights ModelCheckpoint. Asserted: the weights
changed, the History has the epochs, Keras's evaluate() equals dtrain.evaluate's loss bit for bit
on TensorFlow (dtrain.evaluate then reproduces TensorFlow's kernels' rounding) and within 1e-6 on
another backend, with the same accuracy, and Keras's evaluate at the fit's batch size (30) is
within 1e-6 of the run's last val_loss; on TensorFlow, dtrain.predict's outputs equal Keras's
predict, and the val_loss equals Keras's evaluate at batch 30, bit for bit too (dtrain.fit asks for
TensorFlow's rounding of val_loss there). Printed: whether the losses are equal bit for bit (float32), and how far
the two models' outputs are apart (elsewhere dtrain.predict uses dtrain's kernels).
"""
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import numpy as np  # noqa: E402

import dtrain  # noqa: E402
from fashion_mnist import idx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "crates", "fit", "tests", "fixtures", "keras_models", "seed_notebook_tf.keras")


def close(a, b):
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def bits(a, b):
    return "bit for bit" if np.float32(a) == np.float32(b) else "not bit for bit"


def main():
    backend = keras.backend.backend()
    x_train = idx("train-images").astype("float32") / 255.0
    y_train = idx("train-labels").astype("int64")
    x_test = idx("t10k-images").astype("float32") / 255.0
    y_test = idx("t10k-labels").astype("int64")
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 2

    model = keras.saving.load_model(FIXTURE)
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
    with tempfile.TemporaryDirectory() as d:
        history = dtrain.fit(model, x_train, y_train, batch_size=30, epochs=epochs,
                             validation_data=(x_test, y_test),
                             callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=10),
                                        keras.callbacks.ModelCheckpoint(os.path.join(d, "best.keras"),
                                                                        monitor="val_loss", save_best_only=True)],
                             run_dir=os.path.join(d, "run"), verbose=0)
    assert history.epoch == list(range(epochs)), history.epoch
    changed = [not np.array_equal(b, keras.ops.convert_to_numpy(w)) for b, w in zip(before, model.weights)]
    assert all(changed), "dtrain.fit left the model's weights as they were"

    theirs = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    at_30 = model.evaluate(x_test, y_test, batch_size=30, verbose=0, return_dict=True)
    ours = dtrain.evaluate(model, x_test, y_test)
    val_loss = history.history["val_loss"][-1]
    p = dtrain.predict(model, x_test)
    q = np.asarray(model.predict(x_test, verbose=0))
    print(f"keras-notebook check ({backend}): {epochs} epochs of dtrain.fit on the model Keras saved on TensorFlow; "
          f"evaluate loss {theirs['loss']!r} (Keras) / {ours['loss']!r} (dtrain), {bits(theirs['loss'], ours['loss'])}; "
          f"at batch 30 {at_30['loss']!r} (Keras) / val_loss {val_loss!r} (the run), {bits(at_30['loss'], val_loss)}; "
          f"outputs differ in {int((p != q).sum())} of {p.size} values, by at most {float(np.abs(p - q).max()):.1e}")
    assert close(ours["loss"], theirs["loss"]), (ours, theirs)
    if backend == "tensorflow":
        assert np.float32(ours["loss"]) == np.float32(theirs["loss"]), (ours, theirs)
        assert np.array_equal(p, q), f"predictions differ in {int((p != q).sum())} values"
        assert np.float32(val_loss) == np.float32(at_30["loss"]), (val_loss, at_30)
    assert np.float32(ours["accuracy"]) == np.float32(theirs["accuracy"]), (ours, theirs)
    assert close(val_loss, at_30["loss"]), (val_loss, at_30)


if __name__ == "__main__":
    main()
