"""Datasets from local files only: MNIST IDX (gzipped or not), and scikit-learn's digits."""

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..errors import DatasetError, RequestError, RunConfigError

PathLike = Union[str, "os.PathLike[str]"]
Arrays = Tuple[np.ndarray, np.ndarray]

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


SHARED_MNIST = Path("..") / "shared" / "data" / "mnist"


def default_mnist_dir() -> Path:
    """$MNIST_DIR, else ../shared/data/mnist relative to the current directory (a checkout's root).

    Never relative to the installed package: a checkout and an installed copy look in the same place.
    """
    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"])
    return Path(os.path.abspath(SHARED_MNIST))


def _mnist_source(root):
    """Why an MNIST folder was chosen, for error messages."""
    if root is not None:
        return "given by --data-dir"
    if os.environ.get("MNIST_DIR"):
        return "from $MNIST_DIR (no --data-dir given)"
    return (f"the default, ../shared/data/mnist relative to the working directory {os.getcwd()} "
            "(no --data-dir given, MNIST_DIR unset)")


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape}, file holds {body.size} values")
    return body.reshape(shape)


def _find(root, name, source=""):
    root = Path(root)
    for candidate in (root / name, root / (name + ".gz"), root / "MNIST" / "raw" / name, root / "MNIST" / "raw" / (name + ".gz")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {name}[.gz] not found in {root} (nor in its MNIST/raw){', ' + source if source else ''}; "
        "point at the IDX files with --data-dir DIR or MNIST_DIR=DIR (nothing is downloaded)"
    )


def load_mnist(root: Optional[PathLike] = None, split: str = "train") -> Arrays:
    """(images float32 [N, 1, 28, 28] in [0, 1], labels int64 [N]).

    ``root``: the folder of the IDX files; None: $MNIST_DIR, else ../shared/data/mnist
    relative to the current directory (``default_mnist_dir``).
    """
    folder = default_mnist_dir() if root is None else Path(root)
    source = _mnist_source(root)
    images = read_idx(_find(folder, MNIST_FILES[(split, "images")], source))
    labels = read_idx(_find(folder, MNIST_FILES[(split, "labels")], source))
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


CIFAR100_FILES = ("train", "test", "meta")


def load_cifar100(root: PathLike, split: str = "train") -> Arrays:
    """CIFAR-100 from the standard `cifar-100-python` pickles under ``root`` (never downloaded).

    Read through torchvision's CIFAR100(download=False); only its md5 check is relaxed
    to "the files exist" so that small files in the same format load too.
    """
    from torchvision.datasets import CIFAR100

    folder = Path(root) / "cifar-100-python"
    missing = [name for name in CIFAR100_FILES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-100 files {missing} not found in {folder}; put the extracted 'cifar-100-python' "
            f"folder (train, test, meta) under --data-dir {root}; nothing is downloaded"
        )

    class LocalCIFAR100(CIFAR100):
        def _check_integrity(self):
            return all((folder / name).exists() for name in CIFAR100_FILES)

        def _load_meta(self):  # torchvision's also checks the official md5
            import pickle

            with open(folder / "meta", "rb") as handle:
                self.classes = pickle.load(handle, encoding="latin1")["fine_label_names"]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    dataset = LocalCIFAR100(str(root), train=(split == "train"), download=False)
    images = np.asarray(dataset.data, np.float32).transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray(images), np.asarray(dataset.targets, np.int64)


def load_digits_split(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> Arrays:
    """scikit-learn's bundled handwritten digits (8x8, 1,797 images): the embedded default.

    A fixed stratified split: 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return (train_x, train_y) if split == "train" else (test_x, test_y)


DATASETS = ("digits", "mnist", "cifar100")


class DataSplit:
    """A training set (as used: keys index it) and a test set, as float32 / int64 numpy arrays.

    ``source_indices`` maps each training key to its index in the dataset's full
    training set, so a run can say exactly which samples it trained on. ``poison``: the
    poison applied to it, if any (unlearn.runs.poison; its keys index this split).
    """

    def __init__(self, name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, source_indices: Optional[np.ndarray] = None, poison: Any = None):
        self.name = name
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = test_x, test_y
        self.num_classes = num_classes
        self.in_channels = train_x.shape[1]
        self.source_indices = np.arange(len(train_y)) if source_indices is None else source_indices
        self.poison = poison

    def __len__(self) -> int:
        return len(self.train_y)

    def subset(self, keep_mask: np.ndarray) -> "DataSplit":
        """The split restricted to training samples where keep_mask is true (keys renumbered)."""
        keep = np.nonzero(keep_mask)[0]
        poison = self.poison
        if poison is not None:  # its keys renumbered; poisoned samples left out are no longer in it
            kept = poison.keys[np.isin(poison.keys, keep)]
            poison = dataclasses.replace(poison, keys=np.searchsorted(keep, kept).astype(np.int64))
        return DataSplit(self.name, self.train_x[keep], self.train_y[keep], self.test_x, self.test_y,
                         self.num_classes, self.source_indices[keep], poison=poison)


def load_dataset(name: str, data_dir: Optional[PathLike] = None) -> DataSplit:
    """The full DataSplit of 'digits', 'mnist' or 'cifar100' from local files."""
    if name == "digits":
        train, test = load_digits_split("train"), load_digits_split("test")
        classes = 10
    elif name == "mnist":
        train, test = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
        classes = 10
    elif name == "cifar100":
        if data_dir is None:
            raise FileNotFoundError("cifar100 needs --data-dir DIR holding cifar-100-python/")
        train, test = load_cifar100(data_dir, "train"), load_cifar100(data_dir, "test")
        classes = 100
    else:
        raise RunConfigError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return DataSplit(name, train[0], train[1], test[0], test[1], classes)


def keep_first(split: DataSplit, cls: int, count: int) -> DataSplit:
    """The seed's protocol: every sample of other classes, only the first ``count`` of ``cls``."""
    is_class = split.train_y == cls
    if not is_class.any():
        raise RunConfigError(f"class {cls} has no training samples in {split.name}")
    rank = np.cumsum(is_class) - 1
    return split.subset(~is_class | (rank < count))


def exclude(split: DataSplit, samples: Any = None, cls: Optional[int] = None) -> DataSplit:
    """The split without the given training keys, or without a class: the gold standard's data."""
    keep = np.ones(len(split), np.bool_)
    if samples is not None:
        samples = np.asarray(samples, np.int64)
        bad = samples[(samples < 0) | (samples >= len(split))]
        if bad.size:
            raise RequestError(f"sample indices out of range [0, {len(split)}): {bad[:10].tolist()}")
        keep[samples] = False
    if cls is not None:
        keep &= split.train_y != cls
    return split.subset(keep)


def read_sample_file(path: PathLike) -> np.ndarray:
    """Training-set indices from a text file (one per line) or a .npy file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file of sample indices")
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
            reason = "not a .npy file, or one of Python objects" if "pickled" in reason else reason
            raise RequestError(f"{path}: not a .npy array of integer indices ({reason})") from None
    else:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise RequestError(f"{path}: not a text file of indices (one per line) nor a .npy file") from None
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        try:
            values = np.array([int(line) for line in lines], np.int64)
        except ValueError as error:
            raise RequestError(f"{path}: every line must be one integer index ({error})") from None
    values = np.asarray(values)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise RequestError(f"{path}: expected a 1-D list of integer indices, got {values.dtype} {values.shape}")
    if np.unique(values).size != values.size:
        raise RequestError(f"{path}: repeated indices")
    return values.astype(np.int64)
