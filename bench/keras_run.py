"""Trains one benchmark job with Keras; prints one JSON line per epoch (like dtrain's --log-format json).
Usage: keras_run.py JOB EPOCHS"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402

from keras_models import data, model  # noqa: E402

name, epochs = sys.argv[1], int(sys.argv[2])
keras.utils.set_random_seed(42)
x, y, xt, yt = data()
m, batch = model(name)


class Timer(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if not hasattr(self, "first"):
            self.first = time.time()
            print(json.dumps({"event": "first_step", "time": self.first}), flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        out = {"event": "epoch_end", "epoch": epoch + 1, "seconds": time.perf_counter() - self.t0}
        out.update({k: float(v) for k, v in logs.items()})
        print(json.dumps(out), flush=True)


m.fit(x, y, batch_size=batch, epochs=epochs, validation_data=(xt, yt), verbose=0, callbacks=[Timer()])
