"""MNIST loading: a local directory, the environment variable, and real downloads from a local
HTTP server on 127.0.0.1 (including corrupted content and no server at all)."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import pickle
import shlex
import shutil
import socket
import threading

import numpy as np
import pytest

from pcjax import datasets


@pytest.fixture(scope="module")
def local_mnist(mnist_dir):
    return datasets.load_mnist(mnist_dir, download=False)


def test_local_directory_and_label_counts(local_mnist):
    data = local_mnist
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    assert (
        data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() < data.x_train.max() <= 1.0
    )
    assert np.bincount(data.y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert np.bincount(data.y_train)[0] == 5923


def test_environment_variable_and_missing_files(mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(mnist_dir / "mnist"))
    assert datasets.default_data_dir() == mnist_dir / "mnist"
    with pytest.raises(datasets.DatasetUnavailableError, match="download=False"):
        datasets.load_mnist(tmp_path, download=False)


class _Server:
    """A static HTTP server on 127.0.0.1 serving one directory, in a background thread."""

    def __init__(self, directory):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_local_server_is_verified_and_cached(mnist_dir, local_mnist, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(mnist_dir / "mnist", served)
    cache = tmp_path / "cache"
    with _Server(served) as server:
        data = datasets.load_mnist(cache, mirrors=["http://127.0.0.1:9/", server.url], timeout=5)
    np.testing.assert_array_equal(data.y_test, local_mnist.y_test)
    np.testing.assert_array_equal(data.x_train[:100], local_mnist.x_train[:100])
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f + ".gz" for f in datasets.MNIST_SHA256
    )
    # Cached now: loading again needs no server.
    again = datasets.load_mnist(cache, mirrors=[], download=True)
    np.testing.assert_array_equal(again.y_train, local_mnist.y_train)


def test_corrupted_download_is_rejected_and_not_written(mnist_dir, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(mnist_dir / "mnist", served)
    labels = served / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(raw)))
    cache = tmp_path / "cache"
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
    ]:
        cache.mkdir(exist_ok=True)
        shutil.copy(mnist_dir / "mnist" / name, cache / name)
    with (
        _Server(served) as server,
        pytest.raises(datasets.DatasetUnavailableError, match="wrong content"),
    ):
        datasets.load_mnist(cache, mirrors=[server.url], timeout=5)
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


def test_offline_error_says_what_to_do(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(datasets.DatasetUnavailableError, match="PCJAX_DATA_DIR"):
        datasets.load_mnist(tmp_path, mirrors=[f"http://127.0.0.1:{port}/"], timeout=2)


def test_bundled_digits():
    data = datasets.load_digits()
    assert data.x_train.shape[1:] == (8, 8) and len(data.x_train) + len(data.x_test) == 1797
    assert set(np.unique(data.y_test)) == set(range(10))


def _write_cifar(folder, rng, n=6, protocol=pickle.DEFAULT_PROTOCOL):
    """The six batches of the official layout (dicts with bytes keys), n random images each."""
    folder.mkdir(parents=True)
    batches = {}
    for name in [*datasets.CIFAR10_TRAIN_BATCHES, "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": b"" if name == "test_batch" else name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = (data, labels)
    return batches


def test_cifar10_local_copy_is_read_as_nhwc(tmp_path, monkeypatch):
    batches = _write_cifar(tmp_path / datasets.CIFAR10_FOLDER, np.random.default_rng(0))
    data = datasets.load_cifar10(tmp_path)
    assert data.x_train.shape == (30, 32, 32, 3) and data.x_test.shape == (6, 32, 32, 3)
    raw, labels = batches["test_batch"]
    # Channel-major rows: pixel (row 2, col 5) of channel 1 of test image 3.
    assert data.x_test[3, 2, 5, 1] == pytest.approx(raw[3, 1024 + 2 * 32 + 5] / 255.0, rel=1e-6)
    assert list(data.y_test) == labels
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / datasets.CIFAR10_FOLDER))
    assert datasets.load_cifar10().x_train.shape == (30, 32, 32, 3)


def test_cifar10_missing_or_malformed(tmp_path):
    with pytest.raises(datasets.DatasetUnavailableError, match=r"cifar-10-python\.tar\.gz"):
        datasets.load_cifar10(tmp_path)
    folder = tmp_path / "c" / datasets.CIFAR10_FOLDER
    _write_cifar(folder, np.random.default_rng(0))
    (folder / "data_batch_3").unlink()
    with pytest.raises(datasets.DatasetUnavailableError, match="data_batch_3"):
        datasets.load_cifar10(tmp_path / "c")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(n, 3072\)"):
        datasets.load_cifar10(tmp_path / "c")


def test_synthetic_images_are_learnable_and_seeded():
    a = datasets.synthetic_images((8, 8, 3), n_train=400, n_test=100, seed=1)
    b = datasets.synthetic_images((8, 8, 3), n_train=400, n_test=100, seed=1)
    assert a.x_train.shape == (400, 8, 8, 3) and a.x_train.dtype == np.float32
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0

    def nearest_class_mean_accuracy(data):
        flat = data.x_train.reshape(len(data.x_train), -1)
        means = np.stack([flat[data.y_train == c].mean(0) for c in range(10)])
        test = data.x_test.reshape(len(data.x_test), 1, -1)
        return np.mean(((test - means) ** 2).sum(-1).argmin(1) == data.y_test)

    # Without shifts the class templates are far apart; the shifts make them overlap.
    unshifted = datasets.synthetic_images((8, 8, 3), n_train=400, n_test=100, max_shift=0)
    assert nearest_class_mean_accuracy(unshifted) > 0.8
    assert nearest_class_mean_accuracy(a) < nearest_class_mean_accuracy(unshifted) - 0.3


@pytest.mark.parametrize("protocol", [2, 3, 4, 5, "numpy 1"])
def test_cifar10_pickles_of_every_protocol_load(tmp_path, protocol):
    """Well-formed batches load under every pickle protocol; "numpy 1" names the array
    reconstructor by its NumPy 1 module (numpy.core), as the official (Python 2) files do."""
    folder = tmp_path / datasets.CIFAR10_FOLDER
    batches = _write_cifar(
        folder, np.random.default_rng(1), n=3, protocol=2 if protocol == "numpy 1" else protocol
    )
    if protocol == "numpy 1":
        for name in batches:
            raw = (folder / name).read_bytes()
            assert b"numpy._core.multiarray\n_reconstruct" in raw
            (folder / name).write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))
    data = datasets.load_cifar10(tmp_path)
    raw, labels = batches["data_batch_2"]
    expected = raw.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1) / np.float32(255)
    np.testing.assert_array_equal(data.x_train[3:6], expected)
    assert data.y_train[3:6].tolist() == labels and data.y_train.dtype == np.int32


def _mark(path):
    """The malicious payload's stand-in: leaves a file behind if it ever runs."""
    with open(path, "w") as f:
        f.write("ran")


class _Payload:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("via", ["os.system", "test function"])
def test_cifar10_refuses_pickles_that_call_functions(tmp_path, via):
    """A data_batch_1 whose pickle calls a function (hidden in an otherwise well-formed batch) is
    refused, naming the file and the global, and the function never runs."""
    folder = tmp_path / datasets.CIFAR10_FOLDER
    _write_cifar(folder, np.random.default_rng(2), n=3)
    marker = tmp_path / "payload-ran"
    if via == "os.system":
        function, argument = os.system, f"touch {shlex.quote(str(marker))}"
    else:
        function, argument = _mark, str(marker)
    batch = pickle.loads((folder / "data_batch_1").read_bytes())
    batch[b"filenames"].append(_Payload(function, argument))
    crafted = pickle.dumps(batch)
    (folder / "data_batch_1").write_bytes(crafted)
    with pytest.raises(ValueError, match=r"refused") as info:
        datasets.load_cifar10(tmp_path)
    assert not marker.exists()
    message = str(info.value)
    assert str(folder / "data_batch_1") in message
    assert f"{function.__module__}.{function.__name__}" in message
    assert isinstance(info.value, datasets.UnsafePickleError)
    # Control: the crafted file is a working exploit for a plain unpickler.
    pickle.loads(crafted)
    assert marker.exists()


def test_cifar10_unreadable_pickle_names_the_file(tmp_path):
    """A truncated batch is a ValueError that names the file, not a bare UnpicklingError."""
    folder = tmp_path / datasets.CIFAR10_FOLDER
    _write_cifar(folder, np.random.default_rng(3), n=3)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"test_batch.*not a readable pickle"):
        datasets.load_cifar10(tmp_path)
