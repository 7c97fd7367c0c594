"""Fashion-MNIST from Debian's dataset-fashion-mnist package, as numpy arrays, for the Keras checks."""
import gzip
import os

import numpy as np

DATA = "/usr/share/datasets/fashion-mnist"


def path(prefix):
    """The IDX file whose name starts with `prefix` (e.g. "t10k-images"), gzipped or not."""
    return next(os.path.join(DATA, f) for f in sorted(os.listdir(DATA)) if f.startswith(prefix))


def idx(prefix):
    """The array in the IDX file `path(prefix)`."""
    path_ = path(prefix)
    raw = (gzip.open if path_.endswith(".gz") else open)(path_, "rb").read()
    dims = int(raw[3])
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
