"""Datasets from local files only: MNIST IDX (gzipped or not), and scikit-learn's digits."""

import gzip
import os
from pathlib import Path

import numpy as np

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def default_mnist_dir():
    """../shared/data/mnist beside the checkout, or $MNIST_DIR."""
    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def read_idx(path):
    """An IDX file (gzipped or not) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {body.size} values")
    return body.reshape(shape)


def _find(root, name):
    root = Path(root)
    for candidate in (root / name, root / (name + ".gz"), root / "MNIST" / "raw" / name, root / "MNIST" / "raw" / (name + ".gz")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"MNIST file {name}[.gz] not found under {root} (nor {root}/MNIST/raw); nothing is downloaded")


def load_mnist(root=None, split="train"):
    """(images float32 [N, 1, 28, 28] in [0, 1], labels int64 [N])."""
    root = default_mnist_dir() if root is None else root
    images = read_idx(_find(root, MNIST_FILES[(split, "images")]))
    labels = read_idx(_find(root, MNIST_FILES[(split, "labels")]))
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)
