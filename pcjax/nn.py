"""Model builders whose forward passes tag their PC nodes: `pcjax.nn`.

Each model is an equinox module working on *batched* inputs (the batch is the leading axis) and
tagging its intermediate values with `pcjax.node`, so it can be handed to every pcjax function as
`fn=pcjax.nn.call, params=model`. Dense layers use `pcjax.dense`, so the Kronecker and diagonal
natural-gradient modes see them. Node granularity is a constructor option where it makes sense
(`nodes="layer"` or `"op"`); the node names are listed by `pcjax.forward_init(pcjax.nn.call,
model, x)`. Tag your own equinox models the same way: call `pcjax.node` inside `__call__`.

Every builder takes `output_energy` (e.g. `pcjax.cross_entropy` for a classifier whose output
node holds logits); the default is the Gaussian energy.

Builders: `MLP`, `VGG` (convolution, max pooling, dense), `ResNet` (skip connections: a node
with two parents; optional muPC branch scaling), `LSTM` (unrolled over time, nodes per time step
and, with `nodes="op"`, per gate) and `TransformerBlock` (self-attention and MLP with layer norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._tagging import dense, node

Array = jax.Array


def call(model: Callable[[Any], Array], x: Any) -> Array:
    """`model(x)`: the `fn` to pass to pcjax together with `params=model`."""
    return model(x)


def _check_nodes(nodes: str, allowed: tuple[str, ...] = ("layer", "op")) -> str:
    if nodes not in allowed:
        raise ValueError(f"pcjax.nn: `nodes` must be one of {allowed}, got {nodes!r}.")
    return nodes


class Linear(eqx.Module):
    """A dense layer `x @ weight + bias` on the last axis (weight of shape `(in, out)`)."""

    weight: Array
    bias: Array

    def __init__(self, in_features: int, out_features: int, *, key: Array, scale: float = 1.0):
        self.weight = (
            scale * jax.random.normal(key, (in_features, out_features)) / math.sqrt(in_features)
        )
        self.bias = jnp.zeros(out_features)

    def __call__(self, x: Array) -> Array:
        return dense(x, self.weight, self.bias)


class Conv2d(eqx.Module):
    """A 'SAME'-padded 2-D convolution on NHWC inputs (kernel HWIO), with bias."""

    weight: Array
    bias: Array
    stride: int = eqx.field(static=True)

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int = 3, *, key: Array, stride: int = 1
    ):
        fan_in = in_channels * kernel * kernel
        self.weight = jax.random.normal(key, (kernel, kernel, in_channels, out_channels)) / (
            math.sqrt(fan_in)
        )
        self.bias = jnp.zeros(out_channels)
        self.stride = stride

    def __call__(self, x: Array) -> Array:
        if x.ndim != 4:
            raise ValueError(f"pcjax.nn.Conv2d: expects NHWC inputs, got shape {x.shape}.")
        y = jax.lax.conv_general_dilated(
            x,
            self.weight,
            (self.stride, self.stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias


def max_pool(x: Array, size: int = 2) -> Array:
    """Non-overlapping `size x size` max pooling of NHWC inputs (edges that do not fill a
    window are dropped).

    Written as a reshape and a max over the window axes: its gradient is a cheap mask instead
    of the select-and-scatter that `lax.reduce_window` differentiates to, and PC inference
    differentiates through every pooling layer at every step.
    """
    batch, height, width, channels = x.shape
    h, w = height // size, width // size
    windows = x[:, : h * size, : w * size].reshape(batch, h, size, w, size, channels)
    return jnp.max(windows, axis=(2, 4))


def layer_norm(x: Array, eps: float = 1e-5) -> Array:
    """Normalise the last axis to zero mean and unit variance (no affine part)."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class MLP(eqx.Module):
    """Dense layers with an activation between them; node `{prefix}{i}` per layer output
    (pre-activation), the last one being the output node."""

    layers: list[Linear]
    activation: Callable[[Array], Array] = eqx.field(static=True)
    prefix: str = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        key: Array,
        activation=jax.nn.gelu,
        prefix: str = "h",
        output_energy: Callable | None = None,
    ):
        if len(sizes) < 2:
            raise ValueError(f"pcjax.nn.MLP: `sizes` needs at least 2 entries, got {sizes}.")
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]
        self.activation = activation
        self.prefix = prefix
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            energy = self.output_energy if i == last else None
            h = node(f"{self.prefix}{i}", layer(h), energy=energy)
            if i < last:
                h = self.activation(h)
        return h


class VGG(eqx.Module):
    """A VGG-style CNN: blocks of 3x3 convolution + ReLU (+ 2x2 max pooling), then dense layers.

    Nodes: `conv{i}` per convolution output, `fc{j}` per dense output (the last is the output).
    `channels` lists the convolution widths; `pool_after` the block indices followed by pooling.
    """

    convs: list[Conv2d]
    dense_layers: list[Linear]
    pool_after: tuple[int, ...] = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        out_features: int,
        image_size: int,
        *,
        key: Array,
        pool_after: Sequence[int] | None = None,
        output_energy: Callable | None = None,
    ):
        pool_after = tuple(range(len(channels))) if pool_after is None else tuple(pool_after)
        keys = jax.random.split(key, len(channels) + len(hidden) + 1)
        widths = [in_channels, *channels]
        self.convs = [Conv2d(a, b, key=k) for a, b, k in zip(widths[:-1], widths[1:], keys)]
        side = image_size // (2 ** len(pool_after))
        sizes = [side * side * widths[-1], *hidden, out_features]
        self.dense_layers = [
            Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys[len(channels) :])
        ]
        self.pool_after = pool_after
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        h = x
        for i, conv in enumerate(self.convs):
            h = jax.nn.relu(node(f"conv{i}", conv(h)))
            if i in self.pool_after:
                h = max_pool(h)
        h = h.reshape(h.shape[0], -1)
        last = len(self.dense_layers) - 1
        for j, layer in enumerate(self.dense_layers):
            h = node(f"fc{j}", layer(h), energy=self.output_energy if j == last else None)
            if j < last:
                h = jax.nn.relu(h)
        return h


class ResNet(eqx.Module):
    """A residual MLP: `h <- h + s * branch(h)` with a two-layer branch per block.

    Nodes: `stem`, `block{b}_hidden` (inside the branch), `block{b}` (the block output, whose
    prediction has two parents: the skip path and the branch) and `out`. With `mupc=True` the
    branch is scaled by $s = 1/\\sqrt{N L}$ (width N, depth L), the muPC parameterisation for
    deep residual PC networks (Innocenti et al. 2025, "muPC: scaling predictive coding to 100+
    layer networks"); otherwise `branch_scale` (default 1).
    """

    stem: Linear
    branches: list[tuple[Linear, Linear]]
    head: Linear
    branch_scale: float = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        *,
        key: Array,
        mupc: bool = False,
        branch_scale: float = 1.0,
        output_energy: Callable | None = None,
    ):
        keys = jax.random.split(key, 2 * depth + 2)
        self.stem = Linear(in_features, width, key=keys[0])
        self.branches = [
            (Linear(width, width, key=keys[1 + 2 * b]), Linear(width, width, key=keys[2 + 2 * b]))
            for b in range(depth)
        ]
        self.head = Linear(width, out_features, key=keys[-1])
        self.branch_scale = 1.0 / math.sqrt(width * depth) if mupc else branch_scale
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        h = node("stem", self.stem(x))
        for b, (first, second) in enumerate(self.branches):
            hidden = node(f"block{b}_hidden", first(jax.nn.relu(h)))
            h = node(f"block{b}", h + self.branch_scale * second(jax.nn.relu(hidden)))
        return node("out", self.head(jax.nn.relu(h)), energy=self.output_energy)


class LSTM(eqx.Module):
    """An LSTM unrolled over the time axis of `(batch, time, features)` inputs, with a dense
    read-out of the last hidden state.

    Nodes per time step t: `c{t}` (cell) and `h{t}` (hidden); with `nodes="op"` also `gates{t}`
    (the four gate pre-activations); and `out`.
    """

    input_weights: Array
    recurrent_weights: Array
    bias: Array
    head: Linear
    nodes: str = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        *,
        key: Array,
        nodes: str = "layer",
        output_energy: Callable | None = None,
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.input_weights = jax.random.normal(k1, (in_features, 4 * hidden)) / math.sqrt(
            in_features
        )
        self.recurrent_weights = jax.random.normal(k2, (hidden, 4 * hidden)) / math.sqrt(hidden)
        self.bias = jnp.zeros(4 * hidden).at[hidden : 2 * hidden].set(1.0)  # forget gate bias
        self.head = Linear(hidden, out_features, key=k3)
        self.nodes = _check_nodes(nodes)
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        if x.ndim != 3:
            raise ValueError(f"pcjax.nn.LSTM: expects (batch, time, features), got {x.shape}.")
        hidden = self.recurrent_weights.shape[0]
        h = jnp.zeros((x.shape[0], hidden), x.dtype)
        c = jnp.zeros_like(h)
        for t in range(x.shape[1]):
            gates = x[:, t] @ self.input_weights + h @ self.recurrent_weights + self.bias
            if self.nodes == "op":
                gates = node(f"gates{t}", gates)
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = node(f"c{t}", jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g))
            h = node(f"h{t}", jax.nn.sigmoid(o) * jnp.tanh(c))
        return node("out", self.head(h), energy=self.output_energy)


class TransformerBlock(eqx.Module):
    """A pre-norm Transformer block on `(batch, sequence, d_model)` inputs, then a dense
    read-out of the mean over the sequence.

    Nodes with `nodes="layer"`: `attn` (the attention sub-layer's output), `res1`
    (`x + attn`, two parents), `mlp_hidden`, `res2` and `out`. With `nodes="op"` also `q`, `k`,
    `v` and `scores` (the attention logits).
    """

    qkv: Linear
    proj: Linear
    mlp_in: Linear
    mlp_out: Linear
    head: Linear
    heads: int = eqx.field(static=True)
    nodes: str = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        heads: int,
        mlp_hidden: int,
        out_features: int,
        *,
        key: Array,
        nodes: str = "layer",
        output_energy: Callable | None = None,
    ):
        if d_model % heads:
            raise ValueError(
                f"pcjax.nn.TransformerBlock: d_model={d_model} is not divisible by heads={heads}."
            )
        keys = jax.random.split(key, 5)
        self.qkv = Linear(d_model, 3 * d_model, key=keys[0])
        self.proj = Linear(d_model, d_model, key=keys[1])
        self.mlp_in = Linear(d_model, mlp_hidden, key=keys[2])
        self.mlp_out = Linear(mlp_hidden, d_model, key=keys[3])
        self.head = Linear(d_model, out_features, key=keys[4])
        self.heads = heads
        self.nodes = _check_nodes(nodes)
        self.output_energy = output_energy

    def _attention(self, x: Array) -> Array:
        batch, length, d_model = x.shape
        q, k, v = jnp.split(self.qkv(layer_norm(x)), 3, axis=-1)
        if self.nodes == "op":
            q, k, v = node("q", q), node("k", k), node("v", v)

        def split_heads(a):
            return a.reshape(batch, length, self.heads, d_model // self.heads)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d_model // self.heads)
        if self.nodes == "op":
            scores = node("scores", scores)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.proj(mixed.reshape(batch, length, d_model))

    def __call__(self, x: Array) -> Array:
        if x.ndim != 3:
            raise ValueError(
                f"pcjax.nn.TransformerBlock: expects (batch, sequence, d_model), got {x.shape}."
            )
        h = node("res1", x + node("attn", self._attention(x)))
        hidden = node("mlp_hidden", self.mlp_in(layer_norm(h)))
        h = node("res2", h + self.mlp_out(jax.nn.gelu(hidden)))
        return node("out", self.head(jnp.mean(h, axis=1)), energy=self.output_energy)
