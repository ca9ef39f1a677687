"""The suite's peer network without a PC library: what `peer_pcx.py` and `peer_fabricpc.py` share.

Both peer scripts run in their own virtual environment (their own jax) and import this module
from the script's folder; it needs only jax, numpy and optax. It holds the network of the peer
contract (documented in `peer_fabricpc.py`) as a list of layers, the plain-JAX forward pass
and backprop step that each peer's PC step is timed against, the weight and data files of the
contract, and the interleaved timing loop.
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}


class LayerSpec(NamedTuple):
    kind: str  # "conv" or "dense"
    fan_in: int  # input channels (conv) or features (dense)
    fan_out: int
    act_parent: bool  # apply the activation to the parent node's state
    pool_parent: bool  # then 2x2 max pooling
    flatten_parent: bool  # then flatten (first dense layer after convolutions)
    out_shape: tuple  # one sample's node shape


def fail(message: str) -> None:
    """Exit non-zero with the reason as the last stderr line (the peer contract)."""
    sys.exit(f"{Path(sys.argv[0]).stem}: {message}")


def network(config: dict, sample_shape: tuple) -> list[LayerSpec]:
    """The layers of the task's network, for one sample of shape `sample_shape`."""
    task = config.get("task", "mlp")
    classes = config.get("classes", 10)
    hidden = list(config.get("hidden", []))
    if task == "mlp":
        sizes = [math.prod(sample_shape), *hidden, classes]
        return [
            LayerSpec("dense", a, b, i > 0, False, False, (b,))
            for i, (a, b) in enumerate(itertools.pairwise(sizes))
        ]
    if task != "cnn":
        fail(f"unknown task {task!r} (known: 'mlp', 'cnn')")
    if len(sample_shape) != 3:
        fail(f"the CNN needs (H, W, C) samples, got {sample_shape}")
    channels = list(config["channels"])
    pool_after = set(config.get("pool_after", range(len(channels))))
    height, width, cin = sample_shape
    layers = []
    for i, cout in enumerate(channels):
        pool = i > 0 and (i - 1) in pool_after
        height, width = (height // 2, width // 2) if pool else (height, width)
        layers.append(LayerSpec("conv", cin, cout, i > 0, pool, False, (height, width, cout)))
        cin = cout
    pool = len(channels) - 1 in pool_after
    height, width = (height // 2, width // 2) if pool else (height, width)
    sizes = [height * width * cin, *hidden, classes]
    for j, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(LayerSpec("dense", a, b, True, pool and j == 0, j == 0, (b,)))
    return layers


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max pooling of a channels-last batch (as pcjax.nn.max_pool: reshape and max)."""
    n, height, width, c = x.shape
    h, w = height // 2, width // 2
    return jnp.max(x[:, : 2 * h, : 2 * w].reshape(n, h, 2, w, 2, c), axis=(2, 4))


def parent_input(spec: LayerSpec, parent: jax.Array, activation) -> jax.Array:
    """What layer `spec` reads from its parent node's batched state."""
    h = activation(parent) if spec.act_parent else parent
    h = max_pool(h) if spec.pool_parent else h
    return h.reshape(h.shape[0], -1) if spec.flatten_parent else h


def conv(h: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def plain_forward(layers, activation, params, x):
    """The network as plain JAX (the backprop baseline)."""
    h = x
    for spec, (w, b) in zip(layers, params):
        h = parent_input(spec, h, activation)
        h = conv(h, w) + b if spec.kind == "conv" else h @ w + b
    return h


def weight_shape(spec: LayerSpec) -> tuple:
    return (3, 3, spec.fan_in, spec.fan_out) if spec.kind == "conv" else (spec.fan_in, spec.fan_out)


def random_weights(layers, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Normal weights of variance 1 / fan-in and zero biases (pcjax.nn's initialisation)."""
    rng = np.random.default_rng(seed)
    params = []
    for spec in layers:
        shape = weight_shape(spec)
        fan_in = math.prod(shape[:-1])
        w = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
        params.append((w, np.zeros(spec.fan_out, np.float32)))
    return params


def load_weights(path: str, layers) -> list[tuple[np.ndarray, np.ndarray]]:
    """`w{i}`, `b{i}` of `weights.npz`, checked against the network's shapes."""
    data = np.load(path)
    expected = {f"w{i}" for i in range(len(layers))} | {f"b{i}" for i in range(len(layers))}
    if set(data.files) != expected:
        fail(f"{path} holds {sorted(data.files)}; expected {sorted(expected)}")
    params = []
    for i, spec in enumerate(layers):
        w, b = data[f"w{i}"].astype(np.float32), data[f"b{i}"].astype(np.float32)
        if w.shape != weight_shape(spec) or b.shape != (spec.fan_out,):
            fail(
                f"layer {i} ({spec.kind}): w{i} {w.shape}, b{i} {b.shape}; expected "
                f"{weight_shape(spec)} and ({spec.fan_out},) (dense weights are (in, out))"
            )
        params.append((w, b))
    return params


def load_data(path: str, config: dict):
    data = np.load(path)
    x_train, x_test = data["x_train"].astype(np.float32), data["x_test"].astype(np.float32)
    if config.get("task", "mlp") == "mlp":
        return (
            x_train.reshape(len(x_train), -1),
            data["y_train"],
            x_test.reshape(len(x_test), -1),
            data["y_test"],
        )
    if x_train.ndim == 3:  # grey images
        x_train, x_test = x_train[..., None], x_test[..., None]
    elif x_train.ndim == 2:
        if "image_shape" not in config:
            fail("the CNN task got flat images and no `image_shape` in the config")
        shape = tuple(config["image_shape"])
        x_train = x_train.reshape(len(x_train), *shape)
        x_test = x_test.reshape(len(x_test), *shape)
    return x_train, data["y_train"], x_test, data["y_test"]


def backprop_step(layers, activation, optimizer):
    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            return 0.5 * jnp.sum((y - plain_forward(layers, activation, p, x)) ** 2) / x.shape[0]

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def timed(calls: dict, repeats: int) -> dict:
    """Median seconds of each `name -> call()` (each returning what to block on), interleaved."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
