"""Shared fixtures: small tagged networks and data.

Tests run in JAX's default float32, the path users run. Exactness tests that need float64 carry
the `x64` marker (`@pytest.mark.x64`), which runs them inside `jax.enable_x64(True)`; tests that
use a float64 fixture (`problem64`) get the marker automatically.

**Compile cost.** The suite is bound by XLA compilation. A compilation cache is shared by both
pytest-xdist workers and the notebooks' kernels for the run (a fresh temporary directory,
removed at the end): many tests compile the same program (same network, same solver) under
another Python function, and a cache hit returns the same executable, so no number changes.
Measured on the whole suite (2 cores, `time python -m pytest`, user CPU): 1023 s -> 841 s.
XLA's cheaper pipeline (`jax_disable_most_optimizations`) would save more (1023 s -> 750 s)
but changes float32 rounding, and five tests whose assertions sit near the rounding of the
optimised program (exact step counts where a sample crosses `tol`, Backtracking's
accept/reject decisions) then fail; the suite tests the optimised programs users run.

`PCJAX_TEST_NO_COMPILE_CACHE=1` runs it without the cache."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcjax as pc

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def mlp(params, x):
    """A tanh MLP whose pre-activations are the PC nodes h0, h1, ..."""
    h = x
    for i, (w, b) in enumerate(params):
        h = pc.node(f"h{i}", h @ w + b)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def init_mlp(key, sizes, dtype=jnp.float32):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (
            (jax.random.normal(k, (a, b)) / jnp.sqrt(a)).astype(dtype),
            (0.1 * jax.random.normal(jax.random.fold_in(k, 1), (b,))).astype(dtype),
        )
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def trees_equal(a, b) -> bool:
    """Same structure of leaves, same dtypes, same bits."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.asarray(u).dtype == np.asarray(v).dtype and np.array_equal(u, v)
        for u, v in zip(leaves_a, leaves_b)
    )


def rel_error(a, b):
    """Relative error ||a - b|| / ||b|| over all leaves of two pytrees."""
    diff = sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    norm = sum(jnp.sum(v**2) for v in jax.tree.leaves(b))
    return float(jnp.sqrt(diff / norm))


FLOAT64_FIXTURES = ("problem64",)


CACHE_VARIABLE = "PCJAX_TEST_COMPILE_CACHE"  # the run's cache directory, set by the controller


def pytest_configure(config):
    config.addinivalue_line("markers", "x64: run the test with float64 on (jax.enable_x64)")
    is_worker = hasattr(config, "workerinput")
    if not is_worker and os.environ.get("PCJAX_TEST_NO_COMPILE_CACHE") != "1":
        config._pcjax_compile_cache = tempfile.mkdtemp(prefix="pcjax-test-compile-cache-")
        os.environ[CACHE_VARIABLE] = config._pcjax_compile_cache  # inherited by the workers
    if os.environ.get(CACHE_VARIABLE):
        for name, value in (
            ("JAX_COMPILATION_CACHE_DIR", os.environ[CACHE_VARIABLE]),
            ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
            ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1"),
        ):
            os.environ[name] = value  # for the notebooks' kernels
        jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@contextlib.contextmanager
def cheap_compiles():
    """Compile without XLA's optimisations inside the block (for compile-bound checks whose
    assertions do not sit near float32 rounding), then drop every program compiled meanwhile
    from this process's caches: eager operations and jitted functions are cached without the
    flag in their key, and later tests would otherwise run those unoptimised programs, which
    round differently (seen: the guarded-fallback example of the precisions how-to printed 2
    skipped steps instead of 0 after the API examples had run in the same worker). The disk
    cache keys by the compile options, so it keeps both kinds apart."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
        jax.clear_caches()


def pytest_unconfigure(config):
    cache = getattr(config, "_pcjax_compile_cache", None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


# Seconds of one worker (idle 2-core machine) of the slowest work units of `--dist loadfile`:
# a test file, or one notebook (each notebook is a unit of its own, see `_work_unit`). The units
# run longest first, so that the two workers end together; the others follow in file order.
SLOW_UNITS = {
    "tests/test_notebooks.py::test_notebook_runs[uncertainty_aware_backprop.ipynb]": 60,
    "tests/test_notebooks_second.py::test_notebook_runs[linear_vs_nonlinear_fisher.ipynb]": 45,
    "tests/test_hostile.py": 85,
    "tests/test_readme.py": 43,
    "tests/test_docs_examples.py": 38,
    "tests/test_dtypes.py": 35,
    "tests/test_notebooks_second.py::test_notebook_runs[precision_as_attention.ipynb]": 32,
    "tests/test_modes.py": 28,
    "tests/test_notebooks_second.py::test_notebook_runs[bring_your_own_model.ipynb]": 25,
    "tests/test_transforms.py": 25,
    "tests/test_epc.py": 24,
    "tests/test_notebooks.py::test_notebook_runs[backprop_equivalence.ipynb]": 24,
    "tests/test_bidirectional.py": 23,
    "tests/test_variants.py": 20,
    "tests/test_notebooks.py::test_notebook_runs[natural_gradients.ipynb]": 18,
    "tests/test_graph_precision.py": 18,
    "tests/test_notebooks.py::test_notebook_runs[precision_dynamics.ipynb]": 16,
    "tests/test_sharding.py": 15,
    "tests/test_docs.py": 15,
    "tests/test_notebooks.py::test_notebook_runs[generative_model.ipynb]": 13,
    "tests/test_notebooks_second.py::test_notebook_runs[quickstart.ipynb]": 11,
    "tests/test_multihost.py": 10,
}


def _work_unit(nodeid: str) -> str:
    """The `--dist loadfile` unit of a test: its file (module fixtures are shared within it),
    except that every notebook is a unit of its own (a notebook runs in its own kernel)."""
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/test_notebooks") and "[" in nodeid:
        return nodeid
    return path


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the notebooks split into units of their own (`_work_unit`)."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class NotebookSplitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return NotebookSplitScheduling(config, log)


def pytest_collection_modifyitems(items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in FLOAT64_FIXTURES):
            item.add_marker(pytest.mark.x64)
    # Longest work units first (a stable sort: a unit's tests stay together and in order).
    first = {}
    for index, item in enumerate(items):
        first.setdefault(_work_unit(item.nodeid), index)
    items.sort(
        key=lambda item: (
            -SLOW_UNITS.get(_work_unit(item.nodeid), 0),
            first[_work_unit(item.nodeid)],
        )
    )


@pytest.fixture(autouse=True)
def _float64_when_marked(request):
    """Run tests marked `x64` with float64 on; every other test in JAX's default float32."""
    if request.node.get_closest_marker("x64") is None:
        yield
    else:
        with jax.enable_x64(True):
            yield


def _make_problem(dtype):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = init_mlp(k1, [6, 5, 4, 3], dtype)
    x = jax.random.normal(k2, (8, 6), dtype)
    y = jax.random.normal(k3, (8, 3), dtype)
    latent = {k: v for k, v in pc.forward_init(mlp, params, x).items() if k != "h2"}
    return params, x, {"h2": y}, latent


@pytest.fixture(scope="session")
def problem():
    """A 6-5-4-3 tanh MLP in float32 with a batch of 8 inputs and targets."""
    return _make_problem(jnp.float32)


@pytest.fixture(scope="session")
def problem64():
    """The same network and data in float64 (tests using it run with float64 on)."""
    with jax.enable_x64(True):
        return _make_problem(jnp.float64)


@pytest.fixture(scope="session")
def mnist_dir():
    if not (SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"MNIST files not found under {SHARED_DATA}")
    return SHARED_DATA


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL_NOTEBOOKS = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
NEEDS_MNIST = {"precision_as_attention.ipynb"}  # the others fall back to the bundled digits
# Compile-bound short forms run with XLA's cheaper compiles (JAX_DISABLE_MOST_OPTIMIZATIONS:
# LLVM without its expensive passes, backend optimisation level 0). Measured CPU time of the
# notebook: linear_vs_nonlinear_fisher 47 -> 38 s, bring_your_own_model 26 -> 25 s; the
# compute-bound natural_gradients and precision_as_attention were 7% slower with it.
CHEAP_COMPILES = {"linear_vs_nonlinear_fisher.ipynb", "bring_your_own_model.ipynb"}


@pytest.fixture
def run_notebook(monkeypatch, request):
    """Executes a notebook of `notebooks/` top to bottom in its short form
    (PCJAX_NOTEBOOK_SMALL=1); fails, naming the cell, if any cell raises."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")

    def run(name: str) -> None:
        if name in NEEDS_MNIST:
            monkeypatch.setenv("PCJAX_DATA_DIR", str(request.getfixturevalue("mnist_dir")))
        else:
            try:
                monkeypatch.setenv("PCJAX_DATA_DIR", str(request.getfixturevalue("mnist_dir")))
            except pytest.skip.Exception:
                monkeypatch.setenv("PCJAX_DATA_DIR", str(NOTEBOOKS / "no-data-here"))
        monkeypatch.setenv("PCJAX_NOTEBOOK_SMALL", "1")
        if name in CHEAP_COMPILES:
            monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        monkeypatch.setenv("MPLBACKEND", "Agg")
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        resources = {"metadata": {"path": NOTEBOOKS}}
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources=resources
        )
        client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
        outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"]

    return run
