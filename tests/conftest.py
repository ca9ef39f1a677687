"""Shared fixtures: small tagged networks and data. Float64 is on for the exactness tests;
float32 tests build their arrays in float32 explicitly."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcjax as pc

jax.config.update("jax_enable_x64", True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def mlp(params, x):
    """A tanh MLP whose pre-activations are the PC nodes h0, h1, ..."""
    h = x
    for i, (w, b) in enumerate(params):
        h = pc.node(f"h{i}", h @ w + b)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def init_mlp(key, sizes, dtype=jnp.float64):
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


@pytest.fixture(scope="session")
def problem():
    """A 6-5-4-3 tanh MLP in float64 with a batch of 8 inputs and targets."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = init_mlp(k1, [6, 5, 4, 3])
    x = jax.random.normal(k2, (8, 6))
    y = jax.random.normal(k3, (8, 3))
    latent = {k: v for k, v in pc.forward_init(mlp, params, x).items() if k != "h2"}
    return params, x, {"h2": y}, latent


@pytest.fixture(scope="session")
def mnist_dir():
    if not (SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"MNIST files not found under {SHARED_DATA}")
    return SHARED_DATA
