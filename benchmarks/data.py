"""The benchmarks' data: MNIST, CIFAR-10 and offline stand-ins, all through `pcjax.datasets`.

- MNIST comes from a directory: the `--data-dir` argument, else `$PCJAX_DATA`, else pcjax's
  own default (`$PCJAX_DATA_DIR`, else `~/.cache/pcjax`). Nothing is downloaded unless asked
  (`download=True`); without the files the MNIST tasks fall back to
  `pcjax.datasets.synthetic_images((28, 28))`, so shapes (and timings) stay those of MNIST, and
  the data set's `name` says so.
- CIFAR-10 comes from `--cifar-dir` (the `cifar-10-batches-py` folder of the python version,
  or its parent); without it, `synthetic_images((32, 32, 3))`.
- Small synthetic tasks for the architecture experiment: the adding problem, the majority
  token, and scikit-learn's 8 x 8 digits (`pcjax.datasets.load_digits`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pcjax import datasets

DATA_ENV = "PCJAX_DATA"
Dataset = datasets.Dataset


def data_dir(path: str | os.PathLike | None = None) -> str | None:
    """The MNIST directory: `path`, else `$PCJAX_DATA`, else None (pcjax's default)."""
    if path is not None:
        return str(path)
    return os.environ.get(DATA_ENV) or None


def mnist(
    path: str | os.PathLike | None = None,
    *,
    fallback: bool = True,
    download: bool = False,
    n_train: int = 12_000,
    n_test: int = 2_000,
) -> Dataset:
    """MNIST from `data_dir(path)`; if it is not there (and `download` is off or fails), a
    synthetic 28 x 28 set of `n_train` / `n_test` images, or the error if not `fallback`."""
    try:
        return datasets.load_mnist(data_dir(path), download=download)
    except datasets.DatasetUnavailableError as error:
        if not fallback:
            raise
        print(f"  MNIST unavailable ({error}); using synthetic 28 x 28 images.", flush=True)
        return datasets.synthetic_images((28, 28), n_train=n_train, n_test=n_test)


def cifar10(path: str | os.PathLike | None = None, *, n_train: int = 10_000) -> Dataset:
    """CIFAR-10 from `path`, else a synthetic stand-in of its shape."""
    if path is not None:
        return datasets.load_cifar10(path)
    return datasets.synthetic_images((32, 32, 3), n_train=n_train, n_test=2_000)


def load(
    kind: str,
    *,
    data_dir: str | None = None,
    cifar_dir: str | None = None,
    train_subset: int | None = None,
    channel_axis: bool = True,
) -> Dataset:
    """The data of a task kind ("mnist" or "cifar10"), the training set cut to `train_subset`
    images, grey images given a channel axis (for the CNNs) when `channel_axis`."""
    if kind == "mnist":
        data = mnist(data_dir)
    elif kind == "cifar10":
        data = cifar10(cifar_dir)
    else:
        raise ValueError(f"unknown data kind {kind!r} (known: 'mnist', 'cifar10')")
    if train_subset is not None:
        data = data._replace(
            x_train=data.x_train[:train_subset], y_train=data.y_train[:train_subset]
        )
    if channel_axis and data.x_train.ndim == 3:
        data = data._replace(x_train=data.x_train[..., None], x_test=data.x_test[..., None])
    return data


def onehot(labels: np.ndarray, classes: int = 10, dtype=np.float32) -> np.ndarray:
    return np.eye(classes, dtype=dtype)[labels]


def flat(x: np.ndarray) -> np.ndarray:
    """One row per sample."""
    return x.reshape(len(x), -1)


def save_npz(path: str | os.PathLike, data: Dataset, *, flatten: bool) -> Path:
    """The peer contract's `data.npz`: x_train, y_train (int classes), x_test, y_test."""
    shape = flat if flatten else (lambda x: x)
    np.savez(
        path,
        x_train=shape(data.x_train),
        y_train=data.y_train,
        x_test=shape(data.x_test),
        y_test=data.y_test,
    )
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Small synthetic tasks (no download)


def adding_problem(rng: np.random.Generator, n: int, length: int = 10):
    """Sequences of (value, mark) pairs with two marked values; the target is their sum."""
    values = rng.uniform(0, 1, (n, length)).astype(np.float32)
    marks = np.zeros((n, length), np.float32)
    for row in marks:
        row[rng.choice(length, 2, replace=False)] = 1.0
    x = np.stack([values, marks], axis=-1)
    return x, (values * marks).sum(1, keepdims=True)


def majority(rng: np.random.Generator, n: int, length: int = 8, vocab: int = 6):
    """One-hot token sequences; the target is the most frequent token (ties broken randomly)."""
    tokens = rng.integers(0, vocab, (n, length))
    counts = np.stack([(tokens == v).sum(1) for v in range(vocab)], 1)
    counts = counts + rng.uniform(0, 0.1, (n, vocab))
    return onehot(tokens, vocab), onehot(counts.argmax(1), vocab)


def digits() -> Dataset:
    """scikit-learn's 8 x 8 digits (bundled, no download)."""
    return datasets.load_digits()
