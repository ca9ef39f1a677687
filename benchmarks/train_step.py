"""Time of one jitted pcjax training step against a hand-written pure-JAX reference.

The reference writes the PC training step of a tanh MLP out by hand: feedforward
initialisation, T steps of state gradient descent in `lax.scan` (errors, then the transposed
products), the local weight gradients at the relaxed states and an Adam update. pcjax's step
(`pcjax.train_step` on the tagged MLP) must give the same parameters and take no longer.

    python benchmarks/train_step.py [--repeats 50] [--json out.json]

Prints, per configuration, the median step time of each and their ratio (pcjax / reference),
both measured in this process after compilation.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc

CONFIGS = [
    # (name, layer sizes, batch, inference steps)
    ("MLP 784-128x3-10", [784, 128, 128, 128, 10], 128, 8),
    ("MLP 784-1024x2-10", [784, 1024, 1024, 10], 128, 8),
    ("MLP 784-1024x3-10, T=20", [784, 1024, 1024, 1024, 10], 1024, 20),
]
STATE_STEP = 0.1


def tagged_mlp(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        h = pc.node(f"h{i}", h @ w + b)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def reference_step(optimizer, steps, params, opt_state, x, y):
    """PC training step written out by hand: no tagging, no autodiff."""
    weights = [w for w, _ in params]
    biases = [b for _, b in params]
    depth = len(params)

    def predictions(latents):
        inputs = [x] + [jnp.tanh(h) for h in latents]
        return inputs, [a @ w + b for a, w, b in zip(inputs, weights, biases)]

    def errors(latents):
        inputs, mus = predictions(latents)
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
        return [h - STATE_STEP * g for h, g in zip(latents, grads)], None

    latents, _ = jax.lax.scan(body, latents, length=steps)
    inputs, e = errors(latents)
    batch = x.shape[0]
    grads = [(-(a.T @ err) / batch, -jnp.sum(err, 0) / batch) for a, err in zip(inputs, e)]
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def median_times(steps, params, opt_state, x, y, repeats):
    """Median time of each step function, calls interleaved so that both see the same load."""
    states = [step(params, opt_state, x, y)[:2] for step in steps]  # compile
    jax.block_until_ready(states)
    times = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            states[i] = step(*states[i], x, y)[:2]
            jax.block_until_ready(states[i])
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(name, sizes, batch, steps, repeats):
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) + 1)
    params = [
        (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]
    x = jax.random.normal(keys[-2], (batch, sizes[0]))
    y = jax.nn.one_hot(jax.random.randint(keys[-1], (batch,), 0, sizes[-1]), sizes[-1])
    label = f"h{len(sizes) - 2}"

    def steps_for(optimizer):
        def pcjax_step(p, s, x, y):
            return pc.train_step(
                tagged_mlp,
                p,
                s,
                x,
                {label: y},
                optimizer=optimizer,
                steps=steps,
                step_size=STATE_STEP,
            )

        return jax.jit(pcjax_step), jax.jit(functools.partial(reference_step, optimizer, steps))

    # Same maths: one SGD step of each from the same start gives the same parameters.
    sgd = optax.sgd(1.0)
    pcjax_step, ref_step = steps_for(sgd)
    mine = pcjax_step(params, sgd.init(params), x, y)[0]
    theirs = ref_step(params, sgd.init(params), x, y)[0]
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    optimizer = optax.adam(1e-3)
    pcjax_step, ref_step = steps_for(optimizer)
    opt_state = optimizer.init(params)
    t_ref, t_pc = median_times([ref_step, pcjax_step], params, opt_state, x, y, repeats)
    return {
        "config": name,
        "batch": batch,
        "T": steps,
        "reference_ms": 1e3 * t_ref,
        "pcjax_ms": 1e3 * t_pc,
        "ratio": t_pc / t_ref,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="only the smallest configuration")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    configs = CONFIGS[:1] if args.quick else CONFIGS
    device = jax.devices()[0].device_kind
    print(f"device: {device}; jax {jax.__version__}")
    print(f"{'config':28s} {'batch':>5s} {'T':>3s} {'reference':>11s} {'pcjax':>11s} {'ratio':>6s}")
    rows = []
    for config in configs:
        row = run(*config, args.repeats)
        rows.append(row)
        print(
            f"{row['config']:28s} {row['batch']:5d} {row['T']:3d} {row['reference_ms']:9.2f}ms"
            f" {row['pcjax_ms']:9.2f}ms {row['ratio']:6.3f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
