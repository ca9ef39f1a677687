"""PC next to backprop on small tasks for the LSTM, ResNet and Transformer builders.

    python benchmarks/run.py architectures [--epochs 20] [--plot curves.png]

Tasks (synthetic or bundled, so no download is needed; `data.py`):
- LSTM (hidden 32): the adding problem (length-10 sequences with two marked values; regress
  their sum), test MSE;
- ResNet (4 residual blocks, width 64): the UCI 8x8 digits (scikit-learn), cross-entropy output,
  test accuracy;
- Transformer block (d 6, 2 heads): majority token of a length-8 sequence over a vocabulary of
  6, cross-entropy output, test accuracy.

Every model is trained by standard PC (`pc.make_train_step(nn.call,
pc.Equilibrium(pc.GradientDescent(T, step_size=a)), adam)`) and by backprop with the same
optimizer (Adam) and batches; the test loss after every epoch and the final test metric of
both are recorded (and plotted with `--plot`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import data as bdata
import equinox as eqx
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import nn

OUTPUT = "out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--state-step-size", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="save the test-loss curves to this PNG (needs matplotlib)")


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / "architectures.json"


def problems(seed: int) -> dict[str, tuple[eqx.Module, tuple, str]]:
    """name -> (model, (x_train, y_train, x_test, y_test), metric)."""
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    x, y = bdata.adding_problem(rng, 6000)
    digits = bdata.digits()
    xt, yt = bdata.majority(rng, 6000)
    return {
        "LSTM (hidden 32), adding problem, length 10: test MSE": (
            nn.LSTM(2, 32, 1, key=key),
            (x[:5000], y[:5000], x[5000:], y[5000:]),
            "mse",
        ),
        "ResNet (width 64, 4 blocks), UCI digits: test accuracy": (
            nn.ResNet(64, 64, 4, 10, key=key, output_energy=pc.cross_entropy),
            (
                bdata.flat(digits.x_train),
                bdata.onehot(digits.y_train),
                bdata.flat(digits.x_test),
                bdata.onehot(digits.y_test),
            ),
            "accuracy",
        ),
        "Transformer block (d 6, 2 heads), majority token: test accuracy": (
            nn.TransformerBlock(6, 2, 32, 6, key=key, output_energy=pc.cross_entropy),
            (xt[:5000], yt[:5000], xt[5000:], yt[5000:]),
            "accuracy",
        ),
    }


def loss_fn(model, x, y, metric):
    out = nn.call(model, x)
    if metric == "mse":
        return 0.5 * jnp.mean(jnp.sum((y - out) ** 2, -1))
    return optax.softmax_cross_entropy(out, y).mean()


def evaluate(model, x, y, metric) -> float:
    out = nn.call(model, x)
    if metric == "mse":
        return float(jnp.mean(jnp.sum((y - out) ** 2, -1)))
    return float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(y, -1)))


def train(model, data, metric, method, args) -> tuple[list[float], float]:
    x_train, y_train, x_test, y_test = data
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    if method == "PC":
        rule = pc.Equilibrium(
            pc.GradientDescent(args.inference_steps, step_size=args.state_step_size)
        )
        pc_step = pc.make_train_step(nn.call, rule, optimizer)
        step = eqx.filter_jit(lambda m, s, x, y: pc_step(m, s, x, {OUTPUT: y})[:2])
    else:

        @eqx.filter_jit
        def step(model, opt_state, x, y):
            grads = eqx.filter_grad(loss_fn)(model, x, y, metric)
            updates, opt_state = optimizer.update(grads, opt_state, model)
            return eqx.apply_updates(model, updates), opt_state

    test_loss = eqx.filter_jit(loss_fn)
    rng = np.random.default_rng(0)
    curve = []
    for _ in range(args.epochs):
        order = rng.permutation(len(x_train))
        for i in range(0, len(x_train) - args.batch + 1, args.batch):
            index = order[i : i + args.batch]
            model, opt_state = step(model, opt_state, x_train[index], y_train[index])
        curve.append(float(test_loss(model, x_test, y_test, metric)))
    return curve, evaluate(model, x_test, y_test, metric)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    results = {}
    for name, (model, data, metric) in problems(args.seed).items():
        harness.log(name)
        results[name] = {"metric": metric}
        for method in ("backprop", "PC"):
            start = time.perf_counter()
            curve, final = train(model, data, metric, method, args)
            seconds = time.perf_counter() - start
            results[name][method] = {
                "final": final,
                "test_loss_by_epoch": curve,
                "seconds": seconds,
            }
            shown = " ".join(f"{c:.3f}" for c in curve[:: max(1, len(curve) // 10)])
            harness.log(f"  {method:8s} final {final:.4f}   test loss by epoch: {shown}")
    if args.plot:
        plot(results, args.plot)
    config = {
        k: getattr(args, k)
        for k in ("epochs", "batch", "lr", "inference_steps", "state_step_size", "seed")
    }
    config["optimizer"] = "adam"
    return config, {"tasks": results}


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5))
    for ax, (name, result) in zip(np.atleast_1d(axes), results.items()):
        for method in ("backprop", "PC"):
            ax.plot(result[method]["test_loss_by_epoch"], label=method)
        ax.set_title(name.split(",")[0])
        ax.set_xlabel("epoch")
        ax.set_ylabel("test loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
