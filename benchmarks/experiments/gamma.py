"""Standard PC approaches backprop as the output precision gamma -> 0, on every pcjax.nn builder.

    python benchmarks/run.py gamma [--steps 20000]

For each architecture (float64), inference runs to equilibrium
(`pc.GradientDescent(steps, step_size=0.05, tol=1e-10)`) with output precision gamma, and the
relative error between the PC parameter gradients divided by gamma and the backprop gradients
of the squared error is reported for gamma = 1, 0.1, 0.01, 0.001. Not a timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import equinox as eqx
import harness
import jax
import jax.numpy as jnp

import pcjax as pc
from pcjax import nn

GAMMAS = (1.0, 0.1, 0.01, 0.001)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20_000, help="most inference steps")
    parser.add_argument("--tol", type=float, default=1e-10, help="state-gradient tolerance")


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / "gamma.json"


def relative_error(a, b) -> float:
    num = sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return float(jnp.sqrt(num / sum(jnp.sum(v**2) for v in jax.tree.leaves(b))))


def builders(key: jax.Array) -> dict[str, tuple[Any, tuple[int, ...], str]]:
    return {
        "MLP 6-8-8-3": (nn.MLP([6, 8, 8, 3], key=key, activation=jnp.tanh), (5, 6), "h2"),
        "VGG conv 4,6 + dense 8": (
            nn.VGG(2, [4, 6], [8], 3, image_size=8, key=key),
            (3, 8, 8, 2),
            "fc1",
        ),
        "ResNet width 8, depth 3": (nn.ResNet(6, 8, 3, 3, key=key), (5, 6), "out"),
        "LSTM 3-6, 5 steps": (nn.LSTM(3, 6, 3, key=key), (4, 5, 3), "out"),
        "Transformer block d=8": (nn.TransformerBlock(8, 2, 16, 3, key=key), (3, 5, 8), "out"),
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    with jax.enable_x64(True):
        return _run(args)


def _run(args):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    solver = pc.GradientDescent(args.steps, step_size=0.05, tol=args.tol)
    errors: dict[str, list[float]] = {}
    steps: dict[str, list[int]] = {}
    for name, (model, shape, output) in builders(k1).items():
        x = jax.random.normal(k2, shape)
        y = jax.random.normal(k3, (shape[0], 3))
        latent = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != output}
        loss = lambda m, x=x, y=y: 0.5 * jnp.sum((y - nn.call(m, x)) ** 2)  # noqa: E731
        reference = eqx.filter_grad(loss)(model)
        errors[name], steps[name] = [], []

        @eqx.filter_jit
        def relaxed_grads(model, latent, x, y, gamma, output=output):
            precision = {output: gamma}
            states, info = pc.infer(
                nn.call, model, latent, x, {output: y}, solver=solver, precision=precision
            )
            grads = pc.param_grads(nn.call, model, states, x, {output: y}, precision=precision)
            return jax.tree.map(lambda g: g / gamma, grads), info.steps

        for gamma in GAMMAS:
            scaled, count = relaxed_grads(model, latent, x, y, jnp.asarray(gamma))
            errors[name].append(relative_error(scaled, reference))
            steps[name].append(int(count))
        harness.log(f"{name:26s} " + " ".join(f"{e:<13.4g}" for e in errors[name]))
    config = {
        "gammas": list(GAMMAS),
        "max_steps": args.steps,
        "tol": args.tol,
        "step_size": 0.05,
        "dtype": "float64",
    }
    return config, {"relative_errors": errors, "inference_steps": steps}
