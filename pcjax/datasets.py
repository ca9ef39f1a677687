"""Data sets: MNIST from its canonical IDX files, CIFAR-10 from a local copy, and small
fallbacks that need no download.

`load_mnist` looks for the four canonical files (`train-images-idx3-ubyte.gz`, ...) in a
directory (the `data_dir` argument, else the `PCJAX_DATA_DIR` environment variable, else
`~/.cache/pcjax`), directly or in a `mnist/` subfolder. Missing files are downloaded from the
mirrors in turn, checked against the SHA-256 of the original (uncompressed) files and written
atomically; with no network a `DatasetUnavailableError` says where to put the files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

DATA_DIR_ENV = "PCJAX_DATA_DIR"

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# SHA-256 of the *uncompressed* original files: re-compressed copies stay valid.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


class DatasetUnavailableError(RuntimeError):
    """The data set is neither on disk nor downloadable.

    A `RuntimeError`: catch it to fall back on another data set.

    **Example:**

    ```pycon
    >>> import tempfile
    >>> from pcjax.datasets import DatasetUnavailableError, load_mnist, synthetic_images
    >>> try:
    ...     data = load_mnist(tempfile.mkdtemp(), download=False)
    ... except DatasetUnavailableError:
    ...     data = synthetic_images((28, 28), n_train=8, n_test=4)
    >>> data.name
    'synthetic (28, 28)'

    ```
    """


class Dataset(NamedTuple):
    """Images as float32 in [0, 1], shape `(n, height, width)` (grey) or `(n, height, width, 3)`
    (colour); labels as int32, shape `(n,)`.

    **Fields:** `x_train`, `y_train`, `x_test`, `y_test` (NumPy arrays as above) and `name`
    (a description of the data set).

    **Example:**

    ```pycon
    >>> from pcjax.datasets import synthetic_images
    >>> data = synthetic_images((8, 8, 3), classes=4, n_train=16, n_test=8)
    >>> data.x_train.shape, data.x_train.dtype, data.y_test.shape, data.y_test.dtype
    ((16, 8, 8, 3), dtype('float32'), (8,), dtype('int32'))

    ```
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir`, else `$PCJAX_DATA_DIR`, else `$XDG_CACHE_HOME/pcjax` (`~/.cache/pcjax`).

    **Arguments:**

    - `data_dir`: a folder given by the caller; default None.

    **Returns:** the folder, a `pathlib.Path` (it need not exist).

    **Raises:** nothing.

    **Example:**

    ```pycon
    >>> from pcjax.datasets import default_data_dir
    >>> default_data_dir("/data/sets")
    PosixPath('/data/sets')

    ```
    """
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pcjax"


def _find(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / "mnist" / filename):
        if candidate.is_file():
            return candidate
    return None


def _download(filename: str, target: Path, mirrors: Sequence[str], timeout: float) -> None:
    """Fetch `filename` from the first mirror that serves the right content; write atomically."""
    expected = MNIST_SHA256[filename.removesuffix(".gz")]
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
            digest = hashlib.sha256(gzip.decompress(payload)).hexdigest()
        except (OSError, EOFError, urllib.error.URLError) as error:
            failures.append(f"{url}: {error}")
            continue
        if digest != expected:
            failures.append(f"{url}: wrong content (SHA-256 {digest}, expected {expected})")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{filename}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    raise DatasetUnavailableError(
        f"MNIST file {filename} is not in {target.parent} and could not be downloaded:\n  "
        + "\n  ".join(failures)
        + f"\nPut the four MNIST .gz files in a directory and pass it as `data_dir` "
        f"(or --data-dir), or set {DATA_DIR_ENV}."
    )


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != expected_dims:
        raise ValueError(f"{path} is not an IDX file of uint8 with {expected_dims} dimension(s).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3]))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * len(shape))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values.")
    return data.reshape(shape)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30.0,
) -> Dataset:
    """MNIST: 60,000 training and 10,000 test images of handwritten digits, 28 x 28.

    **Arguments:**

    - `data_dir`: directory holding the four `.gz` files (or a `mnist/` folder with them);
      default `$PCJAX_DATA_DIR`, else `~/.cache/pcjax`. Downloads are cached there.
    - `download`: fetch missing files from `mirrors`; if False, a missing file is an error.
    - `mirrors`: base URLs tried in turn.
    - `timeout`: seconds per request.

    **Raises:** `DatasetUnavailableError` if a file is missing and cannot be downloaded.

    **Returns:** a [pcjax.datasets.Dataset][]: images `(60000, 28, 28)` and `(10000, 28, 28)`
    float32 in [0, 1], labels int32.

    **Example** (offline: with no files and no download the error says so):

    ```pycon
    >>> import tempfile
    >>> from pcjax.datasets import DatasetUnavailableError, load_mnist
    >>> try:
    ...     load_mnist(tempfile.mkdtemp(), download=False)
    ... except DatasetUnavailableError as error:
    ...     print(type(error).__name__)
    DatasetUnavailableError

    ```
    """
    directory = default_data_dir(data_dir)
    arrays = {}
    for name in MNIST_SHA256:
        filename = name + ".gz"
        path = _find(directory, filename)
        if path is None:
            if not download:
                raise DatasetUnavailableError(
                    f"MNIST file {filename} is not in {directory} (nor {directory / 'mnist'}) "
                    "and download=False."
                )
            path = directory / filename
            _download(filename, path, mirrors, timeout)
        arrays[name] = _read_idx(path, 3 if "images" in name else 1)
    return Dataset(
        x_train=arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0,
        y_train=arrays["train-labels-idx1-ubyte"].astype(np.int32),
        x_test=arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255.0,
        y_test=arrays["t10k-labels-idx1-ubyte"].astype(np.int32),
        name="MNIST",
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The UCI optical-recognition handwritten digits (1,797 images, 8 x 8, 10 classes).

    A small real data set that needs no download: it ships inside scikit-learn (install the
    `demo` extra). Split at random (fixed `seed`) into train and test sets.

    **Arguments:**

    - `test_fraction`: the share of the images in the test set; default 0.2.
    - `seed`: the seed of the split; default 0.

    **Returns:** a [pcjax.datasets.Dataset][]: images `(n, 8, 8)` float32 in [0, 1], labels
    int32.

    **Raises:** [pcjax.datasets.DatasetUnavailableError][] without scikit-learn.

    **Example:**

    ```pycon
    >>> from pcjax.datasets import load_digits
    >>> data = load_digits()
    >>> data.x_train.shape, data.x_test.shape, int(data.y_train.max())
    ((1438, 8, 8), (359, 8, 8), 9)

    ```
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DatasetUnavailableError(
            "the bundled digits data set needs scikit-learn: pip install 'pcjax[demo]'"
        ) from error
    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return Dataset(images[train], labels[train], images[test], labels[test], name="UCI digits")


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class UnsafePickleError(ValueError):
    """A data file's pickle names a global (a function or class) its format does not need.

    A `ValueError`, raised by [pcjax.datasets.load_cifar10][] instead of unpickling a file
    that would run code.

    **Example:**

    ```pycon
    >>> import pathlib, pickle, tempfile
    >>> from pcjax.datasets import UnsafePickleError, load_cifar10
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
    ...              "data_batch_5", "test_batch"):
    ...     _ = (folder / name).write_bytes(pickle.dumps(print))  # names a function
    >>> try:
    ...     load_cifar10(folder)
    ... except UnsafePickleError as error:
    ...     print("refused")
    refused

    ```
    """


def _latin1_encode(text: str, encoding: str) -> bytes:
    """`_codecs.encode`, as Python 3 pickles non-empty `bytes` under protocols 0 to 2; latin-1
    only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """`bytes()`, as Python 3 pickles `b""` under protocols 0 to 2; no arguments."""
    return b""


def _cifar_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled CIFAR-10 batch needs: NumPy's array reconstructors (under the module
    names of NumPy 1 and 2) and the two that Python 3 uses for `bytes` under protocols 0 to 2."""
    reconstruct = np.zeros(0).__reduce__()[0]  # protocols 0 to 4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): _empty_bytes,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[core + ".multiarray", "_reconstruct"] = reconstruct
        allowed[core + ".numeric", "_frombuffer"] = frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, strings, numbers and NumPy arrays, and nothing that names
    another global: a crafted file cannot make it call a function."""

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path
        self.allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.path}: refused to unpickle the global {module}.{name}. A CIFAR-10 batch "
                "holds only a dict of bytes, lists, ints and a NumPy uint8 array; this file is "
                "not one and may be crafted to run code. Replace it with the original from "
                "cifar-10-python.tar.gz."
            )
        return found


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise ValueError(
                f"{path} is not a readable pickle of a CIFAR-10 batch: {error}"
            ) from error
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (no b'data'/b'labels').")
    try:
        data, labels = batch[b"data"], batch[b"labels"]
    except KeyError as error:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no b'data'/b'labels').") from error
    data = np.asarray(data, np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data of shape (n, 3072) and n labels, got {data.shape} and "
            f"{len(labels)} labels."
        )
    # Stored channel-major (n, 3, 32, 32); return NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(labels, np.int32)


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 (50,000 training and 10,000 test colour images, 32 x 32 x 3) from a local copy.

    Reads the "python version" of the data set: the folder `cifar-10-batches-py` (as extracted
    from `cifar-10-python.tar.gz`) inside `data_dir` (default `$PCJAX_DATA_DIR`, else
    `~/.cache/pcjax`), or `data_dir` itself when it holds `data_batch_1` ... `test_batch`.
    Nothing is downloaded. Images are NHWC float32 in [0, 1].

    The batches are pickles; they are read by an unpickler that admits only the globals a batch
    needs (NumPy's array reconstructors), so a crafted file cannot run code.

    **Raises:** `DatasetUnavailableError` if the files are not there; `UnsafePickleError` (a
    `ValueError`) if a file's pickle names any other function or class; `ValueError` if a file
    is not a readable CIFAR-10 batch.

    **Arguments:**

    - `data_dir`: the folder holding `cifar-10-batches-py` (or the batches themselves);
      default None (`$PCJAX_DATA_DIR`, else `~/.cache/pcjax`).

    **Returns:** a [pcjax.datasets.Dataset][]: images `(50000, 32, 32, 3)` and
    `(10000, 32, 32, 3)` float32 in [0, 1], labels int32.

    **Example** (without the files; see [pcjax.datasets.UnsafePickleError][] for a crafted
    file):

    ```pycon
    >>> import tempfile
    >>> from pcjax.datasets import DatasetUnavailableError, load_cifar10
    >>> try:
    ...     load_cifar10(tempfile.mkdtemp())
    ... except DatasetUnavailableError:
    ...     print("not there")
    not there

    ```
    """
    directory = default_data_dir(data_dir)
    folder = next(
        (
            d
            for d in (directory, directory / CIFAR10_FOLDER, directory / "cifar10" / CIFAR10_FOLDER)
            if (d / "test_batch").is_file()
        ),
        None,
    )
    if folder is None:
        raise DatasetUnavailableError(
            f"CIFAR-10 is not in {directory}: extract cifar-10-python.tar.gz there (it holds "
            f"{CIFAR10_FOLDER}/data_batch_1..5 and test_batch)."
        )
    missing = [name for name in CIFAR10_TRAIN_BATCHES if not (folder / name).is_file()]
    if missing:
        raise DatasetUnavailableError(f"CIFAR-10 in {folder} lacks {missing}.")
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    return Dataset(
        x_train=np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0,
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test.astype(np.float32) / 255.0,
        y_test=y_test,
        name="CIFAR-10",
    )


def synthetic_images(
    shape: tuple[int, ...] = (32, 32, 3),
    classes: int = 10,
    n_train: int = 5000,
    n_test: int = 1000,
    noise: float = 0.25,
    max_shift: int = 4,
    seed: int = 0,
) -> Dataset:
    """A learnable stand-in with the shape of an image data set (default CIFAR-10's).

    Each class has a random smooth template (low-frequency cosines per channel). An image is its
    class template shifted circularly by up to `max_shift` pixels in each direction, scaled by a
    random contrast in [0.6, 1.4], plus a random brightness offset and Gaussian pixel noise of
    standard deviation `noise`, clipped to [0, 1]. The shifts make a template-matching
    classifier insufficient. For timing and smoke tests, not for accuracy claims.

    **Arguments:**

    - `shape`: one image's shape, `(height, width)` (grey) or `(height, width, channels)`;
      default `(32, 32, 3)`.
    - `classes`: the number of classes; default 10.
    - `n_train`, `n_test`: the numbers of images; default 5000 and 1000.
    - `noise`: the pixel noise's standard deviation; default 0.25.
    - `max_shift`: the largest shift in pixels; default 4.
    - `seed`: the seed of the templates and the images; default 0.

    **Returns:** a [pcjax.datasets.Dataset][].

    **Raises:** nothing of its own.

    **Example:**

    ```pycon
    >>> from pcjax.datasets import synthetic_images
    >>> data = synthetic_images((8, 8), classes=3, n_train=6, n_test=3)
    >>> data.x_train.shape, float(data.x_train.min()) >= 0.0, float(data.x_train.max()) <= 1.0
    ((6, 8, 8), True, True)

    ```
    """
    rng = np.random.default_rng(seed)
    height, width = shape[0], shape[1]
    rows = np.linspace(0, 2 * np.pi, height, endpoint=False)[:, None]
    cols = np.linspace(0, 2 * np.pi, width, endpoint=False)[None, :]
    channels = int(np.prod(shape[2:]))
    templates = np.zeros((classes, height, width, channels), np.float32)
    for c in range(classes):
        for k in range(channels):
            fy, fx = rng.integers(1, 4, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            templates[c, ..., k] = 0.35 * np.cos(fy * rows + phase) * np.cos(fx * cols)

    def sample(n):
        labels = rng.integers(0, classes, size=n).astype(np.int32)
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        images = np.stack(
            [np.roll(templates[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts)]
        )
        contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
        brightness = 0.5 + rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1))
        images = brightness + contrast * images + noise * rng.standard_normal(images.shape)
        return np.clip(images, 0, 1).astype(np.float32).reshape(n, *shape), labels

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return Dataset(x_train, y_train, x_test, y_test, name=f"synthetic {shape}")
