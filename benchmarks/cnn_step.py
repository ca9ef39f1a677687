"""Time of a jitted PC training step of a VGG-style CNN against a hand-written reference.

The CNN is `pcjax.nn.VGG(3, channels, [128], 10, image_size=32)`: 3x3 convolutions + ReLU +
2x2 max pooling, a dense hidden layer, a Gaussian output node. The reference writes the same PC
step by hand in pure JAX: feedforward initialisation, T steps in `lax.scan` where each node's
error is pulled back through its child's layer with one `jax.vjp` per layer, the local parameter
gradients at the relaxed states, and an Adam update. Both are checked to agree (one SGD step).

    python benchmarks/cnn_step.py [--batch 128] [--steps 8] [--channels 32,64,128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import equinox as eqx
import jax
import numpy as np
import optax

import pcjax as pc
from pcjax import nn

STATE_STEP = 0.1


def layer_functions(model: nn.VGG):
    """The prediction of each node as a function of (parameters, parent state)."""

    def conv(i):
        def f(layer, parent):
            h = parent if i == 0 else nn.max_pool(jax.nn.relu(parent))
            return layer(h)

        return f

    def first_dense(layer, parent):
        h = nn.max_pool(jax.nn.relu(parent))
        return layer(h.reshape(h.shape[0], -1))

    def dense(layer, parent):
        return layer(jax.nn.relu(parent))

    fs = [conv(i) for i in range(len(model.convs))] + [first_dense]
    fs += [dense] * (len(model.dense_layers) - 1)
    return fs, list(model.convs) + list(model.dense_layers)


def reference_step(optimizer, steps, model, opt_state, x, y):
    fs, layers = layer_functions(model)
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
        targets = [*states, y]
        return [t - m for t, m in zip(targets, mus)], pullbacks

    def body(states, _):
        errors, pullbacks = errors_and_pullbacks(states)
        grads = [errors[i] - pullbacks[i + 1](errors[i + 1])[0] for i in range(len(states))]
        return [s - STATE_STEP * g for s, g in zip(states, grads)], None

    states, _ = jax.lax.scan(body, states, length=steps)
    parents = [x, *states]
    targets = [*states, y]
    grads = []
    for f, layer, parent, target in zip(fs, layers, parents, targets):
        mu, pullback = jax.vjp(lambda lay, f=f, p=parent: f(lay, p), layer)
        grads.append(jax.tree.map(lambda g: g / x.shape[0], pullback(-(target - mu))[0]))
    n_conv = len(model.convs)
    grad_model = eqx.tree_at(
        lambda m: (m.convs, m.dense_layers), model, (grads[:n_conv], grads[n_conv:])
    )
    grad_model = eqx.filter(grad_model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grad_model, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--channels", default="32,64,128")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")]
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    model = nn.VGG(3, channels, [128], 10, image_size=32, key=k1)
    x = jax.random.normal(k2, (args.batch, 32, 32, 3))
    y = jax.nn.one_hot(jax.random.randint(k3, (args.batch,), 0, 10), 10)
    output = f"fc{len(model.dense_layers) - 1}"

    def steps_for(optimizer):
        def pcjax_step(m, s, x, y):
            return pc.train_step(
                nn.call,
                m,
                s,
                x,
                {output: y},
                optimizer=optimizer,
                steps=args.steps,
                step_size=STATE_STEP,
            )[:2]

        return eqx.filter_jit(pcjax_step), eqx.filter_jit(
            functools.partial(reference_step, optimizer, args.steps)
        )

    sgd = optax.sgd(1.0)
    mine, theirs = (
        step(model, sgd.init(eqx.filter(model, eqx.is_inexact_array)), x, y)[0]
        for step in steps_for(sgd)
    )
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

    optimizer = optax.adam(1e-3)
    steps = steps_for(optimizer)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    carries = [step(model, opt_state, x, y) for step in steps]
    jax.block_until_ready(carries)
    times = [[], []]
    for _ in range(args.repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            carries[i] = step(*carries[i], x, y)
            jax.block_until_ready(carries[i])
            times[i].append(time.perf_counter() - start)
    pcjax_time, reference_time = (statistics.median(t) for t in times)
    print(
        f"device: {jax.devices()[0].device_kind}; VGG channels {channels}, batch {args.batch}, "
        f"T={args.steps}"
    )
    print(
        f"reference {1e3 * reference_time:.1f} ms, pcjax {1e3 * pcjax_time:.1f} ms, "
        f"ratio {pcjax_time / reference_time:.3f}"
    )


if __name__ == "__main__":
    main()
