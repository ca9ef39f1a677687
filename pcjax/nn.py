"""Model builders made of equinox layers that tag their PC nodes: [pcjax.nn][].

Every model is a *per-sample* equinox module built from `eqx.nn` layers (`Linear`, `Conv2d`,
`LayerNorm`, `MultiheadAttention`, `LSTMCell`, `GRUCell`) whose `__call__` tags its
intermediate values with [pcjax.node][], exactly as you would tag your own equinox model. Hand it
to pcjax as `fn=pcjax.nn.call, params=model`: `call(model, x)` is `jax.vmap(model)(x)` over the
leading batch axis of `x`, so every node's state is batched with the batch axis first. Nodes
inside a `lax.scan` (recurrent models over time, `scan_layers=True` stacks over depth) are
stacked along a leading axis of the scan length, before the batch axis: `(T, batch, ...)`.
The node names are listed by `pcjax.forward_init(pcjax.nn.call, model, x)`.

Every builder takes `output_energy` (e.g. [pcjax.cross_entropy][] for a classifier whose output
node holds logits); the default is the Gaussian energy. Dense layers are plain `eqx.nn.Linear`
layers whose outputs are tagged directly (`pcjax.node(name, linear(h))`), which the natural
gradient's dense-layer detection finds under `jax.vmap` and `lax.scan`.

Every builder takes `dtype=` for its parameters, as equinox's layers do (default: JAX's default
float, float32 unless x64 is on); the parameters are drawn in that dtype.

Builders (per-sample input shapes in brackets):

- `MLP` (`(in,)`): dense layers, a node per layer output.
- `VGG` (`(H, W, C)` images, channels last): 3x3 convolutions + ReLU (+ 2x2 max pooling),
  then dense layers; convolution nodes are `(batch, H, W, C)`.
- `ResNet` (`(in,)`): residual MLP blocks (a node with two parents; optional muPC branch
  scaling); `scan_layers=True` stacks the blocks and applies them with `lax.scan`.
- `ResidualMLP` (`(in,)`): muPC's residual network, one dense layer per branch, in the full
  muPC parameterisation (or the standard one), blocks in a `lax.scan`.
- `LSTM`, `GRU` (`(time, features)`): `eqx.nn.LSTMCell` / `eqx.nn.GRUCell` run over time with
  `lax.scan` (nodes stacked over time), or unrolled in Python with `scan=False` (a node per time
  step).
- `TransformerBlock`, `Transformer` (`(sequence, d_model)`): pre-norm blocks of
  `eqx.nn.MultiheadAttention` and an MLP with `eqx.nn.LayerNorm`; `Transformer` stacks `depth`
  blocks (unrolled, or `scan_layers=True`).

`Linear` is `eqx.nn.Linear` with pcjax's initialisation (normal weights of variance
`1 / fan_in`, zero biases); `Conv2d` is a channels-last per-sample convolution (XLA's fast layout
on the CPU, see its docstring); `max_pool` and
`layer_norm` are functions that work on one sample or a batch alike.

**Example:** the nodes of a small classifier.

```pycon
>>> import jax, jax.numpy as jnp, pcjax as pc
>>> model = pc.nn.MLP([3, 8, 2], key=jax.random.key(0), output_energy=pc.cross_entropy)
>>> states = pc.forward_init(pc.nn.call, model, jnp.ones((5, 3)))  # a batch of 5
>>> {name: state.shape for name, state in states.items()}
{'h0': (5, 8), 'h1': (5, 2)}

```
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ._tagging import node

Array = jax.Array

__all__ = [
    "GRU",
    "LSTM",
    "MLP",
    "VGG",
    "Conv2d",
    "Linear",
    "ResNet",
    "ResidualMLP",
    "Transformer",
    "TransformerBlock",
    "call",
    "layer_norm",
    "max_pool",
]


def call(model: Callable[[Any], Array], x: Any) -> Array:
    """`jax.vmap(model)(x)`: the per-sample `model` on every sample of `x` (batch axis first).

    The `fn` to pass to pcjax together with `params=model`, e.g.
    `step = pcjax.make_train_step(pcjax.nn.call, rule, optimizer)`, then
    `model, opt_state, info = step(model, opt_state, x, {"out": y})`.

    **Arguments:**

    - `model`: a per-sample model (a [pcjax.nn][] builder, or any function of one sample).
    - `x`: the batch, batch axis first (a pytree: every leaf is mapped over its first axis).

    **Returns:** the model's outputs, batch first.

    **Raises:** what `jax.vmap` raises for leaves whose batch sizes differ.

    **Example:**

    ```pycon
    >>> model = pc.nn.MLP([3, 8, 2], key=jax.random.key(0))
    >>> pc.nn.call(model, jnp.ones((5, 3))).shape
    (5, 2)
    >>> sorted(pc.forward_init(pc.nn.call, model, jnp.ones((5, 3))))
    ['h0', 'h1']

    ```
    """
    return jax.vmap(model)(x)


def _check_nodes(nodes: str, allowed: tuple[str, ...] = ("layer", "op")) -> str:
    if nodes not in allowed:
        raise ValueError(f"pcjax.nn: `nodes` must be one of {allowed}, got {nodes!r}.")
    return nodes


def _check_sample(name: str, x: Array, ndim: int, layout: str) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(
            f"pcjax.nn.{name}: a per-sample model: expects one sample of shape {layout}, got "
            f"shape {jnp.shape(x)}. Call it on a batch with pcjax.nn.call(model, x) "
            "(= jax.vmap(model)(x))."
        )


def _float_dtype(dtype: Any) -> Any:
    """`dtype`, or JAX's default float (float64 with x64 on) as equinox's layers choose it."""
    return jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _normal(key: Array, shape: tuple[int, ...], fan_in: int, dtype: Any, scale: float = 1.0):
    """Normal weights of standard deviation `scale / sqrt(fan_in)` (one compilation per shape)."""
    return jax.random.normal(key, shape, dtype) * (scale / math.sqrt(fan_in))


# --------------------------------------------------------------------------------------------
# Layers and functions


class Linear(eqx.nn.Linear):
    """`eqx.nn.Linear` (`weight @ x + bias`, weight of shape `(out, in)`, one sample of shape
    `(in,)`) initialised with normal weights of standard deviation `scale / sqrt(in)` and a
    zero bias.

    **Arguments:**

    - `in_features`, `out_features`: the input and output sizes.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `scale`: the weights' standard deviation times `sqrt(in_features)`; default 1.
    - `use_bias`: whether to add a (zero-initialised) bias; default True.
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** nothing of its own (equinox's `nn.Linear` errors).

    **Example:**

    ```pycon
    >>> layer = pc.nn.Linear(3, 2, key=jax.random.key(0))
    >>> layer.weight.shape, layer(jnp.ones(3)).shape, float(jnp.abs(layer.bias).max())
    ((2, 3), (2,), 0.0)

    ```
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        key: Array,
        scale: float = 1.0,
        use_bias: bool = True,
        dtype: Any = None,
    ):
        # The fields of eqx.nn.Linear, set directly: its own (uniform) initialisation would only
        # be overwritten, and every eager random draw costs a compilation on first use.
        dtype = _float_dtype(dtype)
        self.weight = _normal(key, (out_features, in_features), in_features, dtype, scale)
        self.bias = jnp.zeros(out_features, dtype) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias


class Conv2d(eqx.Module):
    """A 'SAME'-padded 2-D convolution with bias on one channels-last `(H, W, C)` sample
    (kernel `(k, k, in, out)`), initialised with normal weights of variance `1 / (in * k * k)`.

    Channels last, unlike `eqx.nn.Conv2d` (channels first): under `jax.vmap` it becomes one
    NHWC convolution, which XLA runs 3.2x faster than the NCHW one on the CPU (a CNN PC
    training step, channels 16-32-64, batch 64: 103 ms vs 329 ms).

    **Arguments:**

    - `in_channels`, `out_channels`: the channels of the input and output.
    - `kernel`: the kernel size `k`; default 3.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `stride`: the stride; default 1.
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` when called on an array that is not one `(H, W, C)` sample.

    **Example:**

    ```pycon
    >>> conv = pc.nn.Conv2d(3, 4, key=jax.random.key(0))
    >>> conv(jnp.ones((8, 8, 3))).shape
    (8, 8, 4)

    ```
    """

    weight: Array
    bias: Array
    stride: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        *,
        key: Array,
        stride: int = 1,
        dtype: Any = None,
    ):
        dtype = _float_dtype(dtype)
        shape = (kernel, kernel, in_channels, out_channels)
        self.weight = _normal(key, shape, in_channels * kernel * kernel, dtype)
        self.bias = jnp.zeros(out_channels, dtype)
        self.stride = stride

    def __call__(self, x: Array) -> Array:
        _check_sample("Conv2d", x, 3, "(height, width, channels)")
        y = lax.conv_general_dilated(
            x[None],
            self.weight,
            (self.stride, self.stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y[0] + self.bias


def max_pool(x: Array, size: int = 2) -> Array:
    """Non-overlapping `size x size` max pooling of channels-last images, one `(H, W, C)` or a
    batch `(N, H, W, C)`; edges that do not fill a window are dropped.

    Written as a reshape and a max over the window axes: its gradient is a cheap mask instead
    of the select-and-scatter that `lax.reduce_window` differentiates to, and PC inference
    differentiates through every pooling layer at every step.

    **Arguments:**

    - `x`: one `(H, W, C)` image or a batch `(N, H, W, C)`.
    - `size`: the window size; default 2.

    **Returns:** the pooled images, `(H // size, W // size, C)` (batch first for a batch).

    **Raises:** nothing of its own.

    **Example:**

    ```pycon
    >>> image = jnp.arange(16.0).reshape(4, 4, 1)
    >>> pc.nn.max_pool(image)[..., 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)

    ```
    """
    *lead, height, width, channels = x.shape
    h, w = height // size, width // size
    windows = x[..., : h * size, : w * size, :].reshape(*lead, h, size, w, size, channels)
    return jnp.max(windows, axis=(-4, -2))


def layer_norm(x: Array, eps: float = 1e-5) -> Array:
    """Normalise the last axis to zero mean and unit variance (no affine part).

    **Arguments:**

    - `x`: any array; its last axis is normalised.
    - `eps`: added to the variance; default 1e-5.

    **Returns:** an array of the shape of `x`.

    **Raises:** nothing of its own.

    **Example:**

    ```pycon
    >>> pc.nn.layer_norm(jnp.array([1.0, 2.0, 3.0])).round(3)
    Array([-1.225,  0.   ,  1.225], dtype=float32)

    ```
    """
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps)


def _stack(make: Callable[[Array], eqx.Module], keys: Array) -> eqx.Module:
    """`make(key)` for every key, array leaves stacked along a new leading axis: a layer stack
    for `lax.scan`, with the same parameters as the unrolled `[make(k) for k in keys]`."""
    layers = [make(k) for k in keys]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)


def _scan_layers(apply: Callable[[Any, eqx.Module], Any], carry: Any, stacked: eqx.Module):
    """`lax.scan` of `apply(carry, layer)` over the leading axis of a stacked layer module."""
    params, static = eqx.partition(stacked, eqx.is_array)

    def body(carry, layer_params):
        return apply(carry, eqx.combine(layer_params, static)), None

    return lax.scan(body, carry, params)[0]


# --------------------------------------------------------------------------------------------
# MLP and VGG


class MLP(eqx.Module):
    """Dense layers with an activation between them; node `{prefix}{i}` per layer output
    (pre-activation), the last one being the output node. One sample: `(sizes[0],)`.

    **Arguments:**

    - `sizes`: the layer sizes, input first, output last (at least 2 entries).
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `activation`: applied between layers; default `jax.nn.gelu`.
    - `prefix`: the node names' prefix; default `"h"`.
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` for fewer than 2 sizes; when called, for an input that is not one
    `(sizes[0],)` sample.

    **Example** ([setup][examples-setup]): a classifier trained with
    [pcjax.make_train_step][] on [pcjax.nn.call][].

    ```pycon
    >>> model = pc.nn.MLP([3, 8, 2], key=jax.random.key(0), output_energy=pc.cross_entropy)
    >>> rule = pc.Equilibrium(pc.GradientDescent(4))
    >>> step = pc.make_train_step(pc.nn.call, rule, optax.sgd(0.1))
    >>> opt_state = optax.sgd(0.1).init(eqx.filter(model, eqx.is_inexact_array))
    >>> model, opt_state, info = step(model, opt_state, x, {"h1": y})
    >>> bool(info.diverged)
    False

    ```
    """

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
        dtype: Any = None,
    ):
        if len(sizes) < 2:
            raise ValueError(f"pcjax.nn.MLP: `sizes` needs at least 2 entries, got {sizes}.")
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            Linear(a, b, key=k, dtype=dtype) for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        ]
        self.activation = activation
        self.prefix = prefix
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        _check_sample("MLP", x, 1, "(in_features,)")
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

    One sample is an `(H, W, C)` image (channels last); the convolution nodes `conv{i}` have
    states of shape `(batch, H, W, C)`. Nodes: `conv{i}` per convolution output, `fc{j}` per
    dense output (the last is the output). `channels` lists the convolution widths;
    `pool_after` the block indices followed by pooling (default: every block).

    **Arguments:**

    - `in_channels`: the images' channels.
    - `channels`: the convolution widths, one per block.
    - `hidden`: the widths of the dense layers between the convolutions and the output.
    - `out_features`: the output size.
    - `image_size`: the images' height and width (square images).
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `pool_after`: the indices of the blocks followed by 2x2 max pooling; default None (every
      block).
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** when called, `ValueError` for an input that is not one `(H, W, C)` image.

    **Example:**

    ```pycon
    >>> model = pc.nn.VGG(1, [2], [4], 3, image_size=4, key=jax.random.key(0))
    >>> states = pc.forward_init(pc.nn.call, model, jnp.ones((2, 4, 4, 1)))
    >>> {name: state.shape for name, state in states.items()}
    {'conv0': (2, 4, 4, 2), 'fc0': (2, 4), 'fc1': (2, 3)}

    ```
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
        dtype: Any = None,
    ):
        pool_after = tuple(range(len(channels))) if pool_after is None else tuple(pool_after)
        keys = jax.random.split(key, len(channels) + len(hidden) + 1)
        widths = [in_channels, *channels]
        self.convs = [
            Conv2d(a, b, key=k, dtype=dtype) for a, b, k in zip(widths[:-1], widths[1:], keys)
        ]
        side = image_size // (2 ** len(pool_after))
        sizes = [side * side * widths[-1], *hidden, out_features]
        self.dense_layers = [
            Linear(a, b, key=k, dtype=dtype)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys[len(channels) :])
        ]
        self.pool_after = pool_after
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        _check_sample("VGG", x, 3, "(height, width, channels)")
        h = x
        for i, conv in enumerate(self.convs):
            h = jax.nn.relu(node(f"conv{i}", conv(h)))
            if i in self.pool_after:
                h = max_pool(h)
        h = h.reshape(-1)
        last = len(self.dense_layers) - 1
        for j, layer in enumerate(self.dense_layers):
            h = node(f"fc{j}", layer(h), energy=self.output_energy if j == last else None)
            if j < last:
                h = jax.nn.relu(h)
        return h


# --------------------------------------------------------------------------------------------
# ResNet


class ResidualBlock(eqx.Module):
    """`h + scale * second(relu(first(relu(h))))`, tagging the branch's hidden layer and the
    block output (whose prediction has two parents: the skip path and the branch)."""

    first: Linear
    second: Linear

    def __init__(self, width: int, *, key: Array, dtype: Any = None):
        k1, k2 = jax.random.split(key)
        self.first = Linear(width, width, key=k1, dtype=dtype)
        self.second = Linear(width, width, key=k2, dtype=dtype)

    def __call__(self, h: Array, scale: float, hidden_name: str, out_name: str) -> Array:
        hidden = node(hidden_name, self.first(jax.nn.relu(h)))
        return node(out_name, h + scale * self.second(jax.nn.relu(hidden)))


class ResNet(eqx.Module):
    """A residual MLP: `h <- h + s * branch(h)` with a two-layer branch per block.

    Nodes: `stem`, then per block `block{b}_hidden` (inside the branch) and `block{b}` (the
    block output: two parents, the skip path and the branch), and `out`. With
    `scan_layers=True` the blocks' parameters are stacked along a leading depth axis (the same
    values as the unrolled model built from the same key) and applied with `lax.scan`; the
    nodes are then `block_hidden` and `block`, stacked: `(depth, batch, width)`. Compilation
    time then does not grow with the depth.

    With `mupc=True` the branch is scaled by $s = 1/\\sqrt{N L}$ (width N, depth L), muPC's
    branch multiplier (Innocenti et al. 2025, "muPC: scaling predictive coding to 100+ layer
    networks"), on this block's fan-in-scaled two-layer branches; otherwise `branch_scale`
    (default 1). The branches then start small (each adds O(1/sqrt(N L)) to the stream). The
    full muPC parameterisation (unit-variance weights, input and output multipliers, one-layer
    branches) is `ResidualMLP`.

    **Arguments:**

    - `in_features`, `width`, `out_features`: the input size, the residual stream's width and
      the output size.
    - `depth`: the number of residual blocks, at least 1.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `mupc`: scale the branches by muPC's $1/\\sqrt{N L}$; default False.
    - `branch_scale`: the branch multiplier $s$ without `mupc`; default 1.
    - `scan_layers`: stack the blocks and run them in a `lax.scan`; default False.
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` for a `depth` below 1; when called, for an input that is not one
    `(in_features,)` sample.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> model = pc.nn.ResNet(3, 4, 2, 2, key=jax.random.key(0), scan_layers=True)
    >>> states = pc.forward_init(pc.nn.call, model, x)
    >>> {name: state.shape for name, state in states.items()}
    {'stem': (2, 4), 'block_hidden': (2, 2, 4), 'block': (2, 2, 4), 'out': (2, 2)}

    ```
    """

    stem: Linear
    blocks: list[ResidualBlock] | ResidualBlock
    head: Linear
    branch_scale: float = eqx.field(static=True)
    scan_layers: bool = eqx.field(static=True)
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
        scan_layers: bool = False,
        output_energy: Callable | None = None,
        dtype: Any = None,
    ):
        if depth < 1:
            raise ValueError(f"pcjax.nn.ResNet: `depth` must be at least 1, got {depth}.")
        k_stem, k_blocks, k_head = jax.random.split(key, 3)
        self.stem = Linear(in_features, width, key=k_stem, dtype=dtype)
        block_keys = jax.random.split(k_blocks, depth)
        make = lambda k: ResidualBlock(width, key=k, dtype=dtype)  # noqa: E731
        self.blocks = _stack(make, block_keys) if scan_layers else [make(k) for k in block_keys]
        self.head = Linear(width, out_features, key=k_head, dtype=dtype)
        self.branch_scale = 1.0 / math.sqrt(width * depth) if mupc else branch_scale
        self.scan_layers = scan_layers
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        _check_sample("ResNet", x, 1, "(in_features,)")
        h = node("stem", self.stem(x))
        scale = self.branch_scale
        if self.scan_layers:
            h = _scan_layers(lambda h, b: b(h, scale, "block_hidden", "block"), h, self.blocks)
        else:
            for b, block in enumerate(self.blocks):
                h = block(h, scale, f"block{b}_hidden", f"block{b}")
        return node("out", self.head(jax.nn.relu(h)), energy=self.output_energy)


PARAMETERISATIONS = ("mupc", "standard")


class ResidualMLP(eqx.Module):
    r"""muPC's residual MLP (Innocenti et al. 2025, "muPC: scaling predictive coding to 100+
    layer networks"), one dense layer per residual branch, no biases:

    $$h_0 = a\, W_{\text{in}} x, \qquad h_{l} = h_{l-1} + b\, W_l\, \mathrm{relu}(h_{l-1})
    \;(l = 1..L), \qquad \text{out} = c\, W_{\text{out}}\, \mathrm{relu}(h_L).$$

    `parameterisation="mupc"`: weights $\mathcal N(0, 1)$ and multipliers $a = 1/\sqrt{D}$
    (input size D), $b = 1/\sqrt{N L}$ (width N, L blocks), $c = 1/N$, so that the residual
    stream stays O(1) at any depth and the learning rate transfers across width and depth.
    `"standard"`: weights $\mathcal N(0, 1/\text{fan-in})$, multipliers 1 (the residual stream
    then grows geometrically with depth).

    Nodes: `stem` ($h_0$), `block` (the $h_l$, stacked by the `lax.scan` over the blocks:
    `(L, batch, width)`; each block output predicted from the block before it) and `out`.
    One sample: `(in_features,)`.

    **Arguments:**

    - `in_features`, `width`, `out_features`: the input size $D$, the width $N$ and the output
      size.
    - `depth`: the number of blocks $L$, at least 1.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `parameterisation`: `"mupc"` (default) or `"standard"`.
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` for a `depth` below 1 or an unknown `parameterisation`; when called,
    for an input that is not one `(in_features,)` sample.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> model = pc.nn.ResidualMLP(3, 4, 2, 2, key=jax.random.key(0))
    >>> states = pc.forward_init(pc.nn.call, model, x)
    >>> {name: state.shape for name, state in states.items()}
    {'stem': (2, 4), 'block': (2, 2, 4), 'out': (2, 2)}

    ```
    """

    stem: Array
    blocks: Array
    head: Array
    multipliers: tuple[float, float, float] = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        *,
        key: Array,
        parameterisation: str = "mupc",
        output_energy: Callable | None = None,
        dtype: Any = None,
    ):
        if depth < 1:
            raise ValueError(f"pcjax.nn.ResidualMLP: `depth` must be at least 1, got {depth}.")
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(
                f"pcjax.nn.ResidualMLP: `parameterisation` must be one of {PARAMETERISATIONS}, "
                f"got {parameterisation!r}."
            )
        dtype = _float_dtype(dtype)
        mupc = parameterisation == "mupc"
        k_stem, k_blocks, k_head = jax.random.split(key, 3)
        # muPC: unit-variance weights (fan-in 1); standard: variance 1 / fan-in.
        self.stem = _normal(k_stem, (width, in_features), 1 if mupc else in_features, dtype)
        self.blocks = _normal(k_blocks, (depth, width, width), 1 if mupc else width, dtype)
        self.head = _normal(k_head, (out_features, width), 1 if mupc else width, dtype)
        self.multipliers = (
            (1 / math.sqrt(in_features), 1 / math.sqrt(width * depth), 1 / width)
            if mupc
            else (1.0, 1.0, 1.0)
        )
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        _check_sample("ResidualMLP", x, 1, "(in_features,)")
        a, b, c = self.multipliers
        h = node("stem", a * (self.stem @ x))

        def block(h: Array, weight: Array) -> tuple[Array, None]:
            return node("block", h + b * (weight @ jax.nn.relu(h))), None

        h, _ = lax.scan(block, h, self.blocks)
        return node("out", c * (self.head @ jax.nn.relu(h)), energy=self.output_energy)


# --------------------------------------------------------------------------------------------
# Recurrent networks


def _run_over_time(step: Callable, carry: Any, xs: Array, scan: bool) -> Any:
    """`step(carry, x_t, suffix) -> carry` over the time axis of `xs`: in a `lax.scan` (node
    names without suffix, states stacked over time), or unrolled (suffix `t`)."""
    if scan:
        return lax.scan(lambda c, x_t: (step(c, x_t, ""), None), carry, xs)[0]
    for t in range(xs.shape[0]):
        carry = step(carry, xs[t], str(t))
    return carry


def _recurrent_cell(cell: Any, gates: int, key: Array) -> Any:
    """An `eqx.nn.LSTMCell` / `GRUCell` with normal weights of variance `1 / fan_in` (its
    `gates` blocks stacked) and a zero bias."""
    hidden, inputs = cell.hidden_size, cell.input_size
    dtype = cell.weight_ih.dtype
    ki, kh = jax.random.split(key)
    return eqx.tree_at(
        lambda c: (c.weight_ih, c.weight_hh, c.bias),
        cell,
        (
            _normal(ki, (gates * hidden, inputs), inputs, dtype),
            _normal(kh, (gates * hidden, hidden), hidden, dtype),
            jnp.zeros(gates * hidden, dtype),
        ),
    )


class LSTM(eqx.Module):
    """An `eqx.nn.LSTMCell` run over the time axis of one `(time, features)` sample, with a
    dense read-out of the last hidden state.

    With `scan=True` (default) the cell runs in a `lax.scan` and the nodes are `c` (cell) and
    `h` (hidden), with `nodes="op"` also `gates` (the four gate pre-activations, in the cell's
    order i, f, g, o), stacked over time: `(time, batch, hidden)`; the step-t prediction comes
    from the states of step t - 1. `scan=False` unrolls time in Python with nodes `c{t}`, `h{t}`
    (and `gates{t}`) per step. Then `out`. The cell's equations are written out from its
    weights (the same function as calling the cell) so that `h` is predicted from the state of
    `c`, and the gates can be nodes.

    **Arguments:**

    - `in_features`, `hidden`, `out_features`: the input features per time step, the hidden
      size and the output size.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `nodes`: `"layer"` (default: `c`, `h`) or `"op"` (also `gates`).
    - `scan`: run over time in a `lax.scan` (default True) or unrolled in Python.
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` for an unknown `nodes`; when called, for an input that is not one
    `(time, in_features)` sample.

    **Example:**

    ```pycon
    >>> model = pc.nn.LSTM(2, 3, 2, key=jax.random.key(0))
    >>> states = pc.forward_init(pc.nn.call, model, jnp.ones((4, 5, 2)))  # batch 4, time 5
    >>> {name: state.shape for name, state in states.items()}
    {'c': (5, 4, 3), 'h': (5, 4, 3), 'out': (4, 2)}

    ```
    """

    cell: eqx.nn.LSTMCell
    head: Linear
    nodes: str = eqx.field(static=True)
    scan: bool = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        *,
        key: Array,
        nodes: str = "layer",
        scan: bool = True,
        output_energy: Callable | None = None,
        dtype: Any = None,
    ):
        self.nodes = _check_nodes(nodes)
        k1, k2, k3 = jax.random.split(key, 3)
        dtype = _float_dtype(dtype)
        cell = _recurrent_cell(eqx.nn.LSTMCell(in_features, hidden, key=k1, dtype=dtype), 4, k2)
        forget_gate = cell.bias.at[hidden : 2 * hidden].set(1.0)
        self.cell = eqx.tree_at(lambda c: c.bias, cell, forget_gate)
        self.head = Linear(hidden, out_features, key=k3, dtype=dtype)
        self.scan = scan
        self.output_energy = output_energy

    def _step(self, carry: tuple[Array, Array], x: Array, suffix: str):
        h, c = carry
        cell = self.cell
        gates = cell.weight_ih @ x + cell.weight_hh @ h + cell.bias
        if self.nodes == "op":
            gates = node(f"gates{suffix}", gates)
        i, f, g, o = jnp.split(gates, 4)
        c = node(f"c{suffix}", jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g))
        h = node(f"h{suffix}", jax.nn.sigmoid(o) * jnp.tanh(c))
        return h, c

    def __call__(self, xs: Array) -> Array:
        _check_sample("LSTM", xs, 2, "(time, features)")
        dtype = jnp.result_type(xs.dtype, self.cell.weight_hh.dtype)
        zeros = jnp.zeros(self.cell.hidden_size, dtype)
        h, _ = _run_over_time(self._step, (zeros, zeros), xs, self.scan)
        return node("out", self.head(h), energy=self.output_energy)


class GRU(eqx.Module):
    """An `eqx.nn.GRUCell` run over the time axis of one `(time, features)` sample, with a dense
    read-out of the last hidden state.

    With `scan=True` (default) the cell runs in a `lax.scan` and its output is the node `h`,
    stacked over time: `(time, batch, hidden)`; `scan=False` unrolls time with nodes `h{t}`.
    With `nodes="op"` the cell is written out from its weights with two more nodes per step:
    `gates` (the reset and update gate pre-activations, `2 * hidden`) and `candidate` (the
    candidate state). Then `out`.

    **Arguments:**

    - `in_features`, `hidden`, `out_features`: the input features per time step, the hidden
      size and the output size.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `nodes`: `"layer"` (default: `h`) or `"op"` (also `gates`, `candidate`).
    - `scan`: run over time in a `lax.scan` (default True) or unrolled in Python.
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` for an unknown `nodes`; when called, for an input that is not one
    `(time, in_features)` sample.

    **Example:**

    ```pycon
    >>> model = pc.nn.GRU(2, 3, 2, key=jax.random.key(0))
    >>> states = pc.forward_init(pc.nn.call, model, jnp.ones((4, 2, 2)))  # batch 4, time 2
    >>> {name: state.shape for name, state in states.items()}  # h: stacked over time
    {'h': (2, 4, 3), 'out': (4, 2)}

    ```
    """

    cell: eqx.nn.GRUCell
    head: Linear
    nodes: str = eqx.field(static=True)
    scan: bool = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        *,
        key: Array,
        nodes: str = "layer",
        scan: bool = True,
        output_energy: Callable | None = None,
        dtype: Any = None,
    ):
        self.nodes = _check_nodes(nodes)
        k1, k2, k3 = jax.random.split(key, 3)
        dtype = _float_dtype(dtype)
        cell = _recurrent_cell(eqx.nn.GRUCell(in_features, hidden, key=k1, dtype=dtype), 3, k2)
        self.cell = eqx.tree_at(lambda c: c.bias_n, cell, jnp.zeros_like(cell.bias_n))
        self.head = Linear(hidden, out_features, key=k3, dtype=dtype)
        self.scan = scan
        self.output_energy = output_energy

    def _step(self, h: Array, x: Array, suffix: str) -> Array:
        if self.nodes == "layer":
            return node(f"h{suffix}", self.cell(x, h))
        cell, size = self.cell, self.cell.hidden_size
        from_input = cell.weight_ih @ x + cell.bias
        from_hidden = cell.weight_hh @ h
        gates = node(f"gates{suffix}", from_input[: 2 * size] + from_hidden[: 2 * size])
        reset, update = jnp.split(jax.nn.sigmoid(gates), 2)
        candidate = node(
            f"candidate{suffix}",
            jnp.tanh(from_input[2 * size :] + reset * (from_hidden[2 * size :] + cell.bias_n)),
        )
        return node(f"h{suffix}", candidate + update * (h - candidate))

    def __call__(self, xs: Array) -> Array:
        _check_sample("GRU", xs, 2, "(time, features)")
        dtype = jnp.result_type(xs.dtype, self.cell.weight_hh.dtype)
        h = _run_over_time(self._step, jnp.zeros(self.cell.hidden_size, dtype), xs, self.scan)
        return node("out", self.head(h), energy=self.output_energy)


# --------------------------------------------------------------------------------------------
# Transformers


class _NoDropout(eqx.Module):
    """Stands in for `eqx.nn.MultiheadAttention`'s dropout (p = 0), whose Python-float field
    would be a parameter leaf that pcjax refuses (jit would train it)."""

    def __call__(self, x: Array, *, key: Array | None = None, inference: bool | None = None):
        del key, inference
        return x


def _attention_layer(
    d_model: int, heads: int, key: Array, dtype: Any = None
) -> eqx.nn.MultiheadAttention:
    """`eqx.nn.MultiheadAttention` with biased projections initialised like `Linear`."""
    keys = jax.random.split(key, 5)
    attention = eqx.nn.MultiheadAttention(
        heads,
        d_model,
        use_query_bias=True,
        use_key_bias=True,
        use_value_bias=True,
        use_output_bias=True,
        key=keys[0],
        dtype=_float_dtype(dtype),
    )
    projections = tuple(Linear(d_model, d_model, key=k, dtype=dtype) for k in keys[1:])
    return eqx.tree_at(
        lambda a: (a.query_proj, a.key_proj, a.value_proj, a.output_proj, a.dropout),
        attention,
        (*projections, _NoDropout()),
    )


class TransformerLayer(eqx.Module):
    """One pre-norm Transformer block on a `(sequence, d_model)` sample: self-attention
    (`eqx.nn.MultiheadAttention`) and a GELU MLP, each after an `eqx.nn.LayerNorm`, each with a
    residual connection.

    Nodes (`prefix` + name): `attn` (the attention sub-layer's output), `res1` (`x + attn`, two
    parents), `mlp_hidden`, `res2`; with `ops=True` also `q`, `k`, `v` (the projections,
    `(sequence, d_model)`) and `scores` (the attention logits, `(heads, sequence, sequence)`),
    the attention then written out from the layer's projections (the same function).
    """

    attention: eqx.nn.MultiheadAttention
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm
    mlp_in: Linear
    mlp_out: Linear

    def __init__(self, d_model: int, heads: int, mlp_hidden: int, *, key: Array, dtype: Any = None):
        k1, k2, k3 = jax.random.split(key, 3)
        self.attention = _attention_layer(d_model, heads, k1, dtype)
        self.norm1 = eqx.nn.LayerNorm(d_model, dtype=_float_dtype(dtype))
        self.norm2 = eqx.nn.LayerNorm(d_model, dtype=_float_dtype(dtype))
        self.mlp_in = Linear(d_model, mlp_hidden, key=k2, dtype=dtype)
        self.mlp_out = Linear(mlp_hidden, d_model, key=k3, dtype=dtype)

    def _attention_ops(self, x: Array, prefix: str) -> Array:
        """`self.attention(x, x, x)` written out, with q, k, v and the scores as nodes."""
        attention = self.attention
        length, heads = x.shape[0], attention.num_heads

        def project(name, layer):
            return node(prefix + name, jax.vmap(layer)(x)).reshape(length, heads, -1)

        q = project("q", attention.query_proj)
        k = project("k", attention.key_proj)
        v = project("v", attention.value_proj)
        scores = jnp.einsum("shd,Shd->hsS", q / math.sqrt(q.shape[-1]), k)
        scores = node(prefix + "scores", scores)
        dtype = jnp.result_type(scores.dtype, jnp.float32)
        weights = jax.nn.softmax(scores.astype(dtype), axis=-1).astype(scores.dtype)
        mixed = jnp.einsum("hsS,Shd->shd", weights, v).reshape(length, -1)
        return jax.vmap(attention.output_proj)(mixed)

    def __call__(self, x: Array, prefix: str = "", ops: bool = False) -> Array:
        normed = jax.vmap(self.norm1)(x)
        if ops:
            attended = self._attention_ops(normed, prefix)
        else:
            attended = self.attention(normed, normed, normed)
        h = node(prefix + "res1", x + node(prefix + "attn", attended))
        hidden = node(prefix + "mlp_hidden", jax.vmap(self.mlp_in)(jax.vmap(self.norm2)(h)))
        return node(prefix + "res2", h + jax.vmap(self.mlp_out)(jax.nn.gelu(hidden)))


def _check_heads(name: str, d_model: int, heads: int) -> None:
    if d_model % heads:
        raise ValueError(f"pcjax.nn.{name}: d_model={d_model} is not divisible by heads={heads}.")


class TransformerBlock(eqx.Module):
    """One pre-norm Transformer block (attention and MLP sub-layers, each after an
    `eqx.nn.LayerNorm`, with residual connections) on a `(sequence, d_model)` sample,
    then a dense read-out of the mean over the sequence.

    Nodes with `nodes="layer"`: `attn` (the attention sub-layer's output), `res1`
    (`x + attn`, two parents), `mlp_hidden`, `res2` and `out`. With `nodes="op"` also `q`, `k`,
    `v` (`(batch, sequence, d_model)`) and `scores` (the attention logits,
    `(batch, heads, sequence, sequence)`).

    **Arguments:**

    - `d_model`: the features per position (divisible by `heads`).
    - `heads`: the attention heads.
    - `mlp_hidden`: the MLP's hidden width.
    - `out_features`: the read-out's output size.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `nodes`: `"layer"` (default) or `"op"`.
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` for a `d_model` not divisible by `heads` or an unknown `nodes`;
    when called, for an input that is not one `(sequence, d_model)` sample.

    **Example:**

    ```pycon
    >>> model = pc.nn.TransformerBlock(4, 2, 8, 3, key=jax.random.key(0))
    >>> states = pc.forward_init(pc.nn.call, model, jnp.ones((2, 5, 4)))  # batch 2, length 5
    >>> {name: state.shape for name, state in states.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'attn': (2, 5, 4), 'res1': (2, 5, 4), 'mlp_hidden': (2, 5, 8),
     'res2': (2, 5, 4), 'out': (2, 3)}

    ```
    """

    layer: TransformerLayer
    head: Linear
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
        dtype: Any = None,
    ):
        _check_heads("TransformerBlock", d_model, heads)
        self.nodes = _check_nodes(nodes)
        k1, k2 = jax.random.split(key)
        self.layer = TransformerLayer(d_model, heads, mlp_hidden, key=k1, dtype=dtype)
        self.head = Linear(d_model, out_features, key=k2, dtype=dtype)
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        _check_sample("TransformerBlock", x, 2, "(sequence, d_model)")
        h = self.layer(x, "", self.nodes == "op")
        return node("out", self.head(jnp.mean(h, axis=0)), energy=self.output_energy)


class Transformer(eqx.Module):
    """`depth` pre-norm Transformer blocks (as in [pcjax.nn.TransformerBlock][]) on a
    `(sequence, d_model)` sample, then a dense read-out of the mean over the sequence.

    Nodes, unrolled (default): `block{i}_attn`, `block{i}_res1`, `block{i}_mlp_hidden`,
    `block{i}_res2` per block (with `nodes="op"` also `block{i}_q`, `_k`, `_v`, `_scores`), and
    `out`. With `scan_layers=True` the blocks' parameters are stacked along a leading depth
    axis (the same values as the unrolled model built from the same key) and applied with
    `lax.scan`: nodes `block_attn`, `block_res1`, ... stacked, `(depth, batch, sequence,
    d_model)`.

    **Arguments:**

    - `d_model`, `heads`, `mlp_hidden`, `out_features`: as for [pcjax.nn.TransformerBlock][].
    - `depth`: the number of blocks, at least 1.
    - `key`: keyword, required: the `jax.random` key of the initialisation.
    - `nodes`: `"layer"` (default) or `"op"`.
    - `scan_layers`: stack the blocks and run them in a `lax.scan`; default False.
    - `output_energy`: the output node's energy, e.g. [pcjax.cross_entropy][]; default None
      (Gaussian).
    - `dtype`: the parameters' floating-point dtype; default None (JAX's default float).

    **Raises:** `ValueError` for a `depth` below 1, a `d_model` not divisible by `heads` or an
    unknown `nodes`; when called, for an input that is not one `(sequence, d_model)` sample.

    **Example:**

    ```pycon
    >>> model = pc.nn.Transformer(4, 2, 8, 3, depth=1, key=jax.random.key(0))
    >>> states = pc.forward_init(pc.nn.call, model, jnp.ones((2, 5, 4)))  # batch 2, length 5
    >>> sorted(states)
    ['block0_attn', 'block0_mlp_hidden', 'block0_res1', 'block0_res2', 'out']

    ```
    """

    layers: list[TransformerLayer] | TransformerLayer
    head: Linear
    nodes: str = eqx.field(static=True)
    scan_layers: bool = eqx.field(static=True)
    output_energy: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        heads: int,
        mlp_hidden: int,
        out_features: int,
        depth: int,
        *,
        key: Array,
        nodes: str = "layer",
        scan_layers: bool = False,
        output_energy: Callable | None = None,
        dtype: Any = None,
    ):
        _check_heads("Transformer", d_model, heads)
        if depth < 1:
            raise ValueError(f"pcjax.nn.Transformer: `depth` must be at least 1, got {depth}.")
        self.nodes = _check_nodes(nodes)
        k1, k2 = jax.random.split(key)
        make = lambda k: TransformerLayer(d_model, heads, mlp_hidden, key=k, dtype=dtype)  # noqa: E731
        keys = jax.random.split(k1, depth)
        self.layers = _stack(make, keys) if scan_layers else [make(k) for k in keys]
        self.head = Linear(d_model, out_features, key=k2, dtype=dtype)
        self.scan_layers = scan_layers
        self.output_energy = output_energy

    def __call__(self, x: Array) -> Array:
        _check_sample("Transformer", x, 2, "(sequence, d_model)")
        ops = self.nodes == "op"
        if self.scan_layers:
            h = _scan_layers(lambda h, layer: layer(h, "block_", ops), x, self.layers)
        else:
            h = x
            for i, layer in enumerate(self.layers):
                h = layer(h, f"block{i}_", ops)
        return node("out", self.head(jnp.mean(h, axis=0)), energy=self.output_energy)
