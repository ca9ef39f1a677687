"""Standard PC approaches backprop as the output precision gamma -> 0, on every pcjax.nn builder.

For each architecture (float64), inference runs to equilibrium (`tol`) with output precision
gamma, and the relative error between the PC parameter gradients divided by gamma and the
backprop gradients of the squared error is printed for gamma = 1, 0.1, 0.01, 0.001.

    python benchmarks/gamma_limit.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

import pcjax as pc
from pcjax import nn

jax.config.update("jax_enable_x64", True)
GAMMAS = (1.0, 0.1, 0.01, 0.001)


def relative_error(a, b):
    num = sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return float(jnp.sqrt(num / sum(jnp.sum(v**2) for v in jax.tree.leaves(b))))


def main():
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    models = {
        "MLP 6-8-8-3": (nn.MLP([6, 8, 8, 3], key=k1, activation=jnp.tanh), (5, 6), "h2"),
        "VGG conv 4,6 + 8": (nn.VGG(2, [4, 6], [8], 3, image_size=8, key=k1), (3, 8, 8, 2), "fc1"),
        "ResNet width 8 depth 3": (nn.ResNet(6, 8, 3, 3, key=k1), (5, 6), "out"),
        "LSTM 3-6, 5 steps": (nn.LSTM(3, 6, 3, key=k1), (4, 5, 3), "out"),
        "Transformer block d=8": (nn.TransformerBlock(8, 2, 16, 3, key=k1), (3, 5, 8), "out"),
    }
    print(f"{'architecture':26s} " + " ".join(f"gamma={g:<7g}" for g in GAMMAS))
    for name, (model, shape, output) in models.items():
        x = jax.random.normal(k2, shape)
        y = jax.random.normal(k3, (shape[0], 3))
        latent = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != output}
        loss = lambda m, x=x, y=y: 0.5 * jnp.sum((y - nn.call(m, x)) ** 2)  # noqa: E731
        reference = eqx.filter_grad(loss)(model)
        errors = []
        for gamma in GAMMAS:
            states, _ = pc.infer(
                nn.call,
                model,
                latent,
                x,
                {output: y},
                steps=20000,
                step_size=0.05,
                tol=1e-10,
                precision={output: gamma},
            )
            grads = pc.param_grads(
                nn.call, model, states, x, {output: y}, precision={output: gamma}
            )
            errors.append(relative_error(jax.tree.map(lambda g, s=gamma: g / s, grads), reference))
        print(f"{name:26s} " + " ".join(f"{e:<13.4g}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
