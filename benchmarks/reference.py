"""A PC training step written by hand for layered networks: the baseline pcjax must match.

Node i's prediction is `fs[i](layers[i], parent state)` (the input for i = 0); the last node is
the output, clamped to the target. The step: feedforward initialisation, T steps of state
gradient descent in `lax.scan`, each node's error pulled back through its child's layer with
one `jax.vjp` per layer, then the local parameter gradients at the relaxed states (divided by
the batch size) and an optimizer update. No tagging and no energy function: the textbook loop.

`layer_functions` writes the layers of a `pcjax.nn.MLP` / `pcjax.nn.VGG` on whole batches from
their raw arrays (no `jax.vmap`): a dense layer is `h @ weight.T + bias` (`eqx.nn.Linear`'s
weight is `(out, in)`), a convolution `lax.conv_general_dilated` on NHWC batches with the HWIO
kernel of `pcjax.nn.Conv2d`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax

from pcjax import nn


def layered_reference_step(
    optimizer,
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
    """One PC step; `rebuild(model, per_layer_grads)` puts the layer gradients into the model.

    `unroll` is passed to `lax.scan` (1: a rolled loop; True: fully unrolled)."""
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
    grad_model = eqx.filter(rebuild(model, grads), eqx.is_inexact_array)
    params = eqx.filter(model, eqx.is_array)
    updates, opt_state = optimizer.update(grad_model, opt_state, params)
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
