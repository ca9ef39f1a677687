"""How backprop-like is `pcjax.preset("fast")`? Cosine between its learning signal and backprop.

The preset is ePC with one error step of size 1 from the feedforward pass, then dF/dtheta at the
resulting states. For a tanh MLP `in -> width -> width -> out` (LeCun-normal weights, linear
output, unit precisions, one batch) this prints, per layer, the cosine between the preset's
parameter gradient and the backprop gradient of the output loss 1/2 ||y - f(x)||^2, at several
widths (medians over 5 seeds), and the same for
`pcjax.preconditioned(pcjax.fixed_predictions(fn))` with depth steps of size 1 (exact backprop)
for reference.

    python benchmarks/fast_preset_alignment.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pcjax as pc

IN, OUT, BATCH = 20, 10, 64


def mlp(params, x):
    h = x
    for i, w in enumerate(params):
        h = pc.node(f"h{i}", h @ w)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def make(width: int, seed: int = 0):
    sizes = [IN, width, width, OUT]
    keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
    params = [
        jax.random.normal(k, (a, b)) / np.sqrt(a) for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]
    x = jax.random.normal(keys[-2], (BATCH, IN))
    y = jax.random.normal(keys[-1], (BATCH, OUT))
    return params, x, y


def cosine(a, b) -> float:
    a, b = jnp.ravel(a), jnp.ravel(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def preset_grads(params, x, y):
    model, rule = pc.preset("fast", mlp)
    init = pc.forward_init(mlp, params, x)
    observed = {"h2": y}
    states = {k: v for k, v in init.items() if k not in observed}
    relaxed, _ = pc.infer(model, params, states, x, observed, solver=rule.solver)
    return pc.param_grads(mlp, params, relaxed, x, observed)


def fpa_grads(params, x, y):
    model = pc.preconditioned(pc.fixed_predictions(mlp))
    init = pc.forward_init(mlp, params, x)
    observed = {"h2": y}
    states = {k: v for k, v in init.items() if k not in observed}
    solver = pc.GradientDescent(2, step_size=1.0)
    relaxed, _ = pc.infer(model, params, states, x, observed, solver=solver)
    return pc.param_grads(model, params, relaxed, x, observed)


def backprop_grads(params, x, y):
    def loss(params):
        h = x
        for i, w in enumerate(params):
            h = h @ w
            if i < len(params) - 1:
                h = jnp.tanh(h)
        return 0.5 * jnp.sum((y - h) ** 2)

    return jax.grad(loss)(params)


def alignment(width: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-layer cosines with backprop: (preset "fast", preconditioned FPA)."""
    params, x, y = make(width, seed)
    reference = backprop_grads(params, x, y)
    fast = preset_grads(params, x, y)
    fpa = fpa_grads(params, x, y)
    return (
        [cosine(g, r) for g, r in zip(fast, reference)],
        [cosine(g, r) for g, r in zip(fpa, reference)],
    )


if __name__ == "__main__":
    for width in (4, 64, 256):
        runs = np.array([alignment(width, seed) for seed in range(5)])  # (seed, method, layer)
        fast, fpa = np.median(runs, axis=0)
        print(
            f"width {width:4d}, median of 5 seeds: preset 'fast' cosine per layer (input, hidden, "
            f"output) {' / '.join(f'{c:+.2f}' for c in fast)};  preconditioned FPA "
            f"{' / '.join(f'{c:+.3f}' for c in fpa)}"
        )
