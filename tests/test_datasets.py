"""MNIST loading: a local directory, the environment variable, and real downloads from a local
HTTP server on 127.0.0.1 (including corrupted content and no server at all)."""

from __future__ import annotations

import functools
import gzip
import http.server
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
