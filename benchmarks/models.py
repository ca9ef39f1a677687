"""The benchmarks' networks and the hand-written PC steps pcjax is measured against.

Networks:

- `network(...)`: the suite's MLP (`pcjax.nn.MLP`, GELU, pre-activation nodes `h{i}`) or
  VGG-style CNN (`pcjax.nn.VGG`: 3x3 convolutions + ReLU + 2x2 max pooling, dense layers;
  nodes `conv{i}`, `fc{j}`); the last node is the Gaussian (squared-error) output.
- `tanh_mlp`: a functional tanh MLP on a list of `(w, b)` (nodes `h{i}`, pre-activations).

References (the baselines of requirement 8: a pcjax step within 1.05x of them, same run):

- `tanh_mlp_reference_step`: the PC step of `tanh_mlp` written out with no autodiff at all:
  errors, then the transposed products, in `lax.scan`; analytic local weight gradients.
- `layered_reference_step`: the PC step of any layered network (`layer_functions` writes those
  of `pcjax.nn.MLP` / `pcjax.nn.VGG` from their raw arrays, on whole batches, no `jax.vmap`):
  feedforward initialisation, T steps of state gradient descent in `lax.scan`, each node's error
  pulled back through its child's layer with one `jax.vjp` per layer; then the local parameter
  gradients at the relaxed states (divided by the batch size) and an optimizer update.

Both take `unroll` as `lax.scan` does; the benchmarks pass pcjax's default
(`pcjax._solvers.scan_unroll(T, None)`: fully unrolled up to 16 steps) unless a comparison of
loop forms asks otherwise.

Also here: the backprop step of the same networks, pcjax's side of the peer energy check
(`relaxed_energy`) and the export of a network's weights in the peer contract's layout
(`peer_weights`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import nn
from pcjax._solvers import scan_unroll

# ---------------------------------------------------------------------------------------------
# The suite's networks


def network(
    image_shape: Sequence[int],
    channels: Sequence[int],
    hidden: Sequence[int],
    key: jax.Array,
    classes: int = 10,
) -> eqx.Module:
    """`nn.MLP([prod(image_shape), *hidden, classes])` when `channels` is empty, else
    `nn.VGG(C, channels, hidden, classes, H)` for `(H, W, C)` images."""
    if not channels:
        return nn.MLP([int(np.prod(image_shape)), *hidden, classes], key=key)
    return nn.VGG(image_shape[-1], channels, hidden, classes, image_shape[0], key=key)


def output_node(model: eqx.Module) -> str:
    if isinstance(model, nn.MLP):
        return f"{model.prefix}{len(model.layers) - 1}"
    if isinstance(model, nn.VGG):
        return f"fc{len(model.dense_layers) - 1}"
    raise TypeError(f"no output node known for {type(model).__name__}")


def inputs_for(model: eqx.Module, x: np.ndarray) -> np.ndarray:
    """The MLP reads flat rows; the CNN channels-last images."""
    return x.reshape(len(x), -1) if isinstance(model, nn.MLP) else x


def trainable(model: Any) -> Any:
    return eqx.filter(model, eqx.is_inexact_array)


def backprop_step(optimizer: optax.GradientTransformation, fn: Callable = nn.call) -> Callable:
    """`(model, opt_state, x, y) -> (model, opt_state)`: squared error over the batch mean."""

    def step(model, opt_state, x, y):
        grads = jax.grad(lambda m: 0.5 * jnp.sum((y - fn(m, x)) ** 2) / x.shape[0])(model)
        updates, opt_state = optimizer.update(trainable(grads), opt_state, trainable(model))
        return eqx.apply_updates(model, updates), opt_state

    return step


# ---------------------------------------------------------------------------------------------
# The functional tanh MLP and its analytic reference


def tanh_mlp(params: Sequence[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
    """`h_i = node(a_{i-1} @ w_i + b_i)`, `a_i = tanh(h_i)`, `a_{-1} = x`."""
    h = x
    for i, (w, b) in enumerate(params):
        h = pc.node(f"h{i}", h @ w + b)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def init_tanh_mlp(
    sizes: Sequence[int], rng: np.random.Generator
) -> list[tuple[jax.Array, jax.Array]]:
    """Normal weights of variance 1 / fan-in, zero biases (numpy's generator: no compilation)."""
    return [
        (
            jnp.asarray(rng.standard_normal((a, b), np.float32) / np.float32(np.sqrt(a))),
            jnp.zeros(b),
        )
        for a, b in itertools.pairwise(sizes)
    ]


def tanh_mlp_reference_step(
    optimizer: optax.GradientTransformation,
    steps: int,
    state_step: float,
    params: Any,
    opt_state: Any,
    x: jax.Array,
    y: jax.Array,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """The PC training step of `tanh_mlp`, by hand: no tagging, no autodiff."""
    weights = [w for w, _ in params]
    biases = [b for _, b in params]
    depth = len(params)

    def errors(latents):
        inputs = [x] + [jnp.tanh(h) for h in latents]
        mus = [a @ w + b for a, w, b in zip(inputs, weights, biases)]
        return inputs, [h - mu for h, mu in zip([*latents, y], mus)]

    latents = []
    h = x
    for w, b in zip(weights[:-1], biases[:-1]):
        latents.append(h @ w + b)
        h = jnp.tanh(latents[-1])

    def body(latents, _):
        inputs, e = errors(latents)
        grads = [
            e[i] - (1 - inputs[i + 1] ** 2) * (e[i + 1] @ weights[i + 1].T)
            for i in range(depth - 1)
        ]
        return [h - state_step * g for h, g in zip(latents, grads)], None

    latents, _ = jax.lax.scan(body, latents, length=steps, unroll=unroll)
    inputs, e = errors(latents)
    batch = x.shape[0]
    grads = [(-(a.T @ err) / batch, -jnp.sum(err, 0) / batch) for a, err in zip(inputs, e)]
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


# ---------------------------------------------------------------------------------------------
# The layered reference (nn.MLP, nn.VGG)


def layered_reference_step(
    optimizer: optax.GradientTransformation,
    steps: int,
    state_step: float,
    fs: Sequence[Callable],
    layers: Sequence[Any],
    rebuild: Callable[[Any, list], Any],
    model: Any,
    opt_state: Any,
    x: jax.Array,
    y: jax.Array,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """One PC step; node i's prediction is `fs[i](layers[i], parent state)` (the input for
    i = 0), the last node is clamped to `y`; `rebuild(model, per_layer_grads)` puts the layer
    gradients into the model."""
    states = []
    h = x
    for f, layer in zip(fs[:-1], layers[:-1]):
        h = f(layer, h)
        states.append(h)

    def errors_and_pullbacks(states):
        parents = [x, *states]
        mus, pullbacks = zip(
            *[
                jax.vjp(lambda s, f=f, layer=layer: f(layer, s), p)
                for f, layer, p in zip(fs, layers, parents)
            ]
        )
        return [t - m for t, m in zip([*states, y], mus)], pullbacks

    def body(states, _):
        errors, pullbacks = errors_and_pullbacks(states)
        grads = [errors[i] - pullbacks[i + 1](errors[i + 1])[0] for i in range(len(states))]
        return [s - state_step * g for s, g in zip(states, grads)], None

    states, _ = jax.lax.scan(body, states, length=steps, unroll=unroll)
    grads = []
    for f, layer, parent, target in zip(fs, layers, [x, *states], [*states, y]):
        mu, pullback = jax.vjp(lambda lay, f=f, p=parent: f(lay, p), layer)
        grads.append(jax.tree.map(lambda g: g / x.shape[0], pullback(mu - target)[0]))
    grad_model = trainable(rebuild(model, grads))
    updates, opt_state = optimizer.update(grad_model, opt_state, trainable(model))
    return eqx.apply_updates(model, updates), opt_state


def dense(layer: nn.Linear, h: jax.Array) -> jax.Array:
    """An `eqx.nn.Linear` on a `(batch, in)` batch, from its raw arrays."""
    return h @ layer.weight.T + layer.bias


def conv(layer: nn.Conv2d, h: jax.Array) -> jax.Array:
    """A `pcjax.nn.Conv2d` on an NHWC batch, from its raw arrays (HWIO kernel, 'SAME')."""
    y = jax.lax.conv_general_dilated(
        h, layer.weight, (layer.stride,) * 2, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + layer.bias


def layer_functions(model: eqx.Module):
    """`(fs, layers, rebuild)` of a `pcjax.nn.MLP` or `pcjax.nn.VGG`, for the reference step."""
    if isinstance(model, nn.MLP):
        fs = [dense]
        fs += [lambda layer, h: dense(layer, model.activation(h))] * (len(model.layers) - 1)
        return fs, list(model.layers), lambda m, g: eqx.tree_at(lambda m: m.layers, m, g)
    if not isinstance(model, nn.VGG):
        raise TypeError(f"no reference for {type(model).__name__} (nn.MLP and nn.VGG only)")

    def conv_layer(i):
        def f(layer, parent):
            if i == 0:
                return conv(layer, parent)
            h = jax.nn.relu(parent)
            return conv(layer, nn.max_pool(h) if i - 1 in model.pool_after else h)

        return f

    def first_dense(layer, parent):
        h = jax.nn.relu(parent)
        h = nn.max_pool(h) if len(model.convs) - 1 in model.pool_after else h
        return dense(layer, h.reshape(h.shape[0], -1))

    fs = [conv_layer(i) for i in range(len(model.convs))] + [first_dense]
    fs += [lambda layer, h: dense(layer, jax.nn.relu(h))] * (len(model.dense_layers) - 1)
    n_conv = len(model.convs)

    def rebuild(m, grads):
        return eqx.tree_at(lambda m: (m.convs, m.dense_layers), m, (grads[:n_conv], grads[n_conv:]))

    return fs, list(model.convs) + list(model.dense_layers), rebuild


def reference_step(
    optimizer: optax.GradientTransformation,
    steps: int,
    state_step: float,
    unroll: int | bool | None = None,
) -> Callable:
    """`(model, opt_state, x, y) -> (model, opt_state)`: the layered reference of an
    `nn.MLP` / `nn.VGG`; `unroll=None` is pcjax's default loop form."""
    unroll = scan_unroll(steps, unroll)

    def step(model, opt_state, x, y):
        fs, layers, rebuild = layer_functions(model)
        return layered_reference_step(
            optimizer, steps, state_step, fs, layers, rebuild, model, opt_state, x, y, unroll
        )

    return step


# ---------------------------------------------------------------------------------------------
# The peer energy check, pcjax's side


def peer_weights(model: eqx.Module) -> dict[str, np.ndarray]:
    """`w0, b0, w1, b1, ...` in the peer contract's layout (`benchmarks/peer_fabricpc.py`):
    layers in network order (convolutions, then dense layers), dense `w` as `(in, out)` (the
    transpose of `nn.Linear.weight`), convolution `w` HWIO as `nn.Conv2d.weight`; float32."""
    if isinstance(model, nn.MLP):
        layers = [(layer.weight.T, layer.bias) for layer in model.layers]
    elif isinstance(model, nn.VGG):
        layers = [(c.weight, c.bias) for c in model.convs]
        layers += [(d.weight.T, d.bias) for d in model.dense_layers]
    else:
        raise TypeError(f"no peer layout for {type(model).__name__}")
    out = {}
    for i, (w, b) in enumerate(layers):
        out[f"w{i}"] = np.asarray(w, np.float32)
        out[f"b{i}"] = np.asarray(b, np.float32)
    return out


def relaxed_energy(
    model: eqx.Module, x: jax.Array, y: jax.Array, steps: int, state_step: float
) -> dict[str, Any]:
    """pcjax's energy of the peer check: feedforward initialisation, the output node clamped to
    `y`, `steps` state steps of SGD with `state_step`, then
    F = sum over nodes and samples of 1/2 ||x_i - mu_i||^2 at the final states (and at the
    feedforward pass). Also per node, in network order."""
    output = output_node(model)
    solver = pc.GradientDescent(steps, step_size=state_step)

    @eqx.filter_jit
    def energies(model, x, y):
        observed = {output: y}
        start = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != output}
        states, _ = pc.infer(nn.call, model, start, x, observed, solver=solver)
        errors = pc.prediction_errors(nn.call, model, states, x, observed)
        return (
            pc.energy(nn.call, model, states, x, observed),
            pc.energy(nn.call, model, start, x, observed),
            {k: 0.5 * jnp.sum(e**2) for k, e in errors.items()},
        )

    relaxed, feedforward, per_node = energies(model, jnp.asarray(x), jnp.asarray(y))
    return {
        "relaxed_energy": float(relaxed),
        "feedforward_energy": float(feedforward),
        "relaxed_energy_nodes": {k: float(v) for k, v in per_node.items()},
    }
