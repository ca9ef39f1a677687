"""How close standard PC's learning signal comes to backprop's in a 128-block muPC network.

    python benchmarks/run.py deep-align [--width 64] [--depth 128] [--batch 64] [--steps 200]
        [--every 50] [--solvers 128:0.45:0,160:0.9:0.9,...] [--train-solver 160:0.6:0.95]
        [--output-precisions 1,0.01] [--lr 0.01] [--data-dir DIR]

`pcjax.nn.ResidualMLP(784, width, depth, 10)` (muPC), states relaxed by gradient descent on the
state energy (standard PC: `pc.GradientDescent(T, optax.sgd(step, momentum))` from the
feedforward pass), parameter gradient dF/dtheta at the relaxed states. The ground truth is
`jax.grad` of the squared error of the same network on the same batch (backprop). Measured:

- `initial`: on the initial network and one training batch, for each `--solvers` entry
  `T:step:momentum` (output precision 1), the cosine between PC's and backprop's gradient of
  the stem, of every block's weight matrix, and of the head; the energy after inference over
  the energy before it.
- `trained`: the same on the network the last PC run below trained, at its output precision.
- `training`: the network trained `--steps` steps with Adam (`--lr`) by backprop and by PC
  (`--train-solver`, each `--output-precisions` value), the same batches in the same order;
  every `--every` steps the test accuracy and, on that step's batch, the same cosines.

A state update reads only its neighbours' errors, so the output error needs at least one
update per block to reach the stem; the cosines show how far it got and how well the relaxed
errors point along backprop's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import nn

from .deep import accuracy_on, mnist_arrays

OUTPUT = "out"
DEFAULT_SOLVERS = (
    "128:0.45:0,128:0.2:0.9,128:0.9:0.9,160:0.9:0.9,160:0.6:0.95,640:0.6:0.99,2000:0.4:0"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--every", type=int, default=50, help="measure every this many steps")
    parser.add_argument(
        "--solvers", default=DEFAULT_SOLVERS, help="T:step:momentum entries for `initial`"
    )
    parser.add_argument("--train-solver", default="160:0.6:0.95", help="T:step:momentum")
    parser.add_argument("--output-precisions", default="1,0.01")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--data-dir", help="MNIST directory (default $PCJAX_DATA)")
    parser.add_argument("--seed", type=int, default=0)


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / "deep-align.json"


def parse_solver(text: str) -> tuple[int, float, float]:
    steps, step, momentum = text.split(":")
    return int(steps), float(step), float(momentum)


def solver(steps: int, step: float, momentum: float) -> pc.GradientDescent:
    return pc.GradientDescent(steps, optax.sgd(step, momentum=momentum or None))


def squared_error(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum((nn.call(model, x) - y) ** 2)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """cos(a, b); 0 where either is exactly zero (a block the output error has not reached)."""
    norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(norms > 0, jnp.sum(a * b) / jnp.where(norms > 0, norms, 1), 0)


def alignment(grads: Any, truth: Any) -> dict[str, jax.Array]:
    """Cosines between a gradient of ResidualMLP's parameters and the ground truth's."""
    blocks = jax.vmap(_cosine)(grads.blocks, truth.blocks)
    return {
        "stem": _cosine(grads.stem, truth.stem),
        "blocks": blocks,
        "head": _cosine(grads.head, truth.head),
    }


def pc_gradient(model, x, y, inference: pc.GradientDescent, output_precision: float):
    """Standard PC: relax the states from the feedforward pass, then dF/dtheta there; also
    the energy before and after inference."""
    precision = {OUTPUT: jnp.asarray(output_precision, x.dtype)}
    observed = {OUTPUT: y}
    states = pc.forward_init(nn.call, model, x)
    del states[OUTPUT]
    before = pc.energy(nn.call, model, states, x, observed, precision=precision)
    relaxed, info = pc.infer(
        nn.call, model, states, x, observed, solver=inference, precision=precision
    )
    grads = pc.param_grads(nn.call, model, relaxed, x, observed, precision=precision)
    return grads, before, info


def summary(cosines: dict[str, Any]) -> dict[str, Any]:
    blocks = np.asarray(cosines["blocks"])
    return {
        "stem": float(cosines["stem"]),
        "head": float(cosines["head"]),
        "blocks_min": float(blocks.min()),
        "blocks_median": float(np.median(blocks)),
        # The deepest block (0 = the first after the stem) from which every block up to the
        # head has cosine > 0.5: how far down the output error arrived.
        "aligned_from": int(len(blocks) - np.argmin(blocks[::-1] > 0.5))
        if not (blocks > 0.5).all()
        else 0,
        "blocks": [round(float(c), 4) for c in blocks],
    }


def solver_alignment(args, model, x, y, output_precision: float) -> dict[str, Any]:
    """The alignment after inference with each `--solvers` entry, on one network and batch."""
    truth = eqx.filter_grad(squared_error)(model, x, y)
    rows = {}
    for text in args.solvers.split(","):
        inference = solver(*parse_solver(text))
        run = eqx.filter_jit(lambda m, a, b, s=inference: pc_gradient(m, a, b, s, output_precision))
        grads, before, info = run(model, x, y)
        rows[text] = {
            **summary(alignment(grads, truth)),
            "energy_ratio": float(info.energy / before),
            "grad_norm": float(info.grad_norm),
            "diverged": bool(info.diverged),
        }
        harness.log(f"  {text}: {rows[text]['blocks_min']:.3f} min block cosine")
    return rows


def train(args, model, data, method: str, output_precision: float | None) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    optimizer = optax.adam(args.lr)
    inference = solver(*parse_solver(args.train_solver))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        truth = eqx.filter_grad(squared_error)(model, x, y)
        if method == "backprop":
            grads, ratio, diverged = truth, jnp.ones(()), jnp.zeros((), bool)
        else:
            grads, before, info = pc_gradient(model, x, y, inference, output_precision)
            ratio, diverged = info.energy / before, info.diverged
        updates, opt_state = optimizer.update(grads, opt_state, model)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, alignment(grads, truth), ratio, diverged

    predict = eqx.filter_jit(lambda m, x: jnp.argmax(nn.call(m, x), -1))

    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    order = np.random.default_rng(args.seed).permutation(len(x_train))
    points, seconds = [], 0.0
    for i in range(args.steps):
        start = (i * args.batch) % (len(x_train) - args.batch)
        idx = order[start : start + args.batch]
        begin = time.perf_counter()
        model, opt_state, cosines, ratio, diverged = step(
            model, opt_state, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
        )
        if bool(diverged):
            return {"points": points, "diverged_at": i + 1, "seconds_per_step": None}, model
        seconds += time.perf_counter() - begin
        if (i + 1) % args.every == 0:
            point = {
                "step": i + 1,
                "test_accuracy": accuracy_on(predict, model, x_test, y_test),
                **summary(cosines),
            }
            point["energy_ratio"] = float(ratio)
            points.append(point)
            harness.log(
                f"  {method} {output_precision}: step {i + 1} test {point['test_accuracy']:.4f}"
            )
    result = {"points": points, "diverged_at": None, "seconds_per_step": seconds / args.steps}
    return result, model


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    data = mnist_arrays(args.data_dir)
    model = nn.ResidualMLP(784, args.width, args.depth, 10, key=jax.random.PRNGKey(args.seed))
    x, y = jnp.asarray(data[0][: args.batch]), jnp.asarray(data[1][: args.batch])
    config = {k: v for k, v in vars(args).items() if k not in ("out", "experiment")}
    results = {"initial": solver_alignment(args, model, x, y, 1.0)}
    runs = {"backprop": train(args, model, data, "backprop", None)[0]}
    for p in map(float, args.output_precisions.split(",")):
        runs[f"PC, output precision {p:g}"], trained = train(args, model, data, "pc", p)
    results["training"] = runs
    results["trained"] = solver_alignment(args, trained, x, y, p)
    results["trained_output_precision"] = p
    return config, results
