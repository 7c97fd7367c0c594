"""The benchmark jobs as Keras models: the same layers, optimizer and data as examples/*.toml."""
import gzip
import os

import numpy as np

DATA = "/usr/share/datasets/fashion-mnist"


def idx(name):
    with gzip.open(os.path.join(DATA, name + ".gz")) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def data():
    x = idx("train-images-idx3-ubyte") / 255.0
    y = idx("train-labels-idx1-ubyte")
    xt = idx("t10k-images-idx3-ubyte") / 255.0
    yt = idx("t10k-labels-idx1-ubyte")
    return x.astype(np.float32), y, xt.astype(np.float32), yt


def model(name):
    import keras
    from keras import layers as L, regularizers as R, constraints as C

    if name in ("fashion_mnist", "fashion_mnist_relu_cosine"):
        act = "relu" if name.endswith("cosine") else None
        m = keras.Sequential([
            keras.Input((28, 28)), L.Flatten(),
            L.Dense(64, activation=act, kernel_regularizer=R.L2(0.01), activity_regularizer=R.L1(0.01),
                    kernel_constraint=C.MaxNorm(2.0)),
            L.Dropout(0.5), L.Dense(10, activation="softmax")])
        lr = 0.001
        if act:
            lr = keras.optimizers.schedules.CosineDecayRestarts(0.01, 1000)
        m.compile(optimizer=keras.optimizers.Adam(lr, beta_1=0.89), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        return m, 30
    if name == "fashion_mnist_wide":
        m = keras.Sequential([
            keras.Input((28, 28)), L.Flatten(),
            L.Dense(512, activation="relu", kernel_regularizer=R.L2(1e-4)), L.Dropout(0.2),
            L.Dense(512, activation="relu", kernel_regularizer=R.L2(1e-4)), L.Dropout(0.2),
            L.Dense(10, activation="softmax")])
        m.compile(optimizer=keras.optimizers.Adam(0.001), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return m, 256
    raise SystemExit(f"no Keras model for {name}")
