"""PC + natural gradient vs PC + Adam vs backprop + Adam on an MNIST MLP.

    python benchmarks/run.py natgrad [--data-dir DIR] [--quick] [--epochs 8] [--target 0.98]

For the same 784-H-H-10 GELU MLP (`pcjax.dense` layers, T inference steps of state step 0.1,
batch 128):

1. the time per training step of each method relative to a PC + Adam step (compiled first,
   medians of interleaved calls): backprop + Adam, PC + Adam, and PC with
   `optax.chain(pc.natural_gradient(mode, damping=..., ...), optax.sgd(lr, momentum=0.9))` in the
   modes kronecker, diagonal (running factors: EMA 0.95, refresh every 10) and matrix_free
   (10 CG iterations); the training step passes its `context` to the optimizer, from which
   `pc.natural_gradient` computes its Fisher statistics;
2. unless `--quick`: the steps and training seconds (evaluation excluded) each method needs to
   reach `--target` test accuracy, evaluated every quarter epoch, up to `--epochs` (the
   matrix-free mode is left out: its step cost makes a full run impractical on a CPU).

`--quick`: step times only, H = 256.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import data as bdata
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc

OUTPUT = "h2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help=f"MNIST directory (default ${bdata.DATA_ENV})")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inference-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--natural-lr", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="step times only, small network")


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / ("natgrad-quick.json" if args.quick else "natgrad.json")


def mlp(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        h = pc.node(f"h{i}", pc.dense(h, w, b))
        if i < len(params) - 1:
            h = jax.nn.gelu(h)
    return h


def init(sizes, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def natural(mode, lr, damping, mask, refresh_every=10, momentum=0.9, cg_iters=10):
    """Natural gradient + SGD with momentum; running factors for the `mask`ed dense layers."""
    if mode == "matrix_free":
        transform = pc.natural_gradient(mode, damping=damping, cg_iters=cg_iters)
    else:
        transform = pc.natural_gradient(
            mode, damping=damping, ema_decay=0.95, refresh_every=refresh_every, mask=mask
        )
    return optax.chain(transform, optax.sgd(lr, momentum=momentum))


def methods(args, sizes) -> dict[str, tuple[Any, optax.GradientTransformation]]:
    """name -> (step(params, opt_state, x, y) -> (params, opt_state), optimizer)."""
    mask = pc.fisher_mask(mlp, init(sizes), jnp.zeros((1, sizes[0])))
    rule = pc.Equilibrium(pc.GradientDescent(args.inference_steps, step_size=0.1))

    def pc_method(optimizer):
        train = pc.make_train_step(mlp, rule, optimizer)
        return (lambda p, s, x, y: train(p, s, x, {OUTPUT: y})[:2]), optimizer

    def backprop(optimizer):
        def step(params, opt_state, x, y):
            grads = jax.grad(lambda p: 0.5 * jnp.sum((y - mlp(p, x)) ** 2) / x.shape[0])(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step, optimizer

    def nat(mode):
        return pc_method(natural(mode, args.natural_lr, args.damping, mask))

    return {
        "backprop + Adam": backprop(optax.adam(args.adam_lr)),
        "PC + Adam": pc_method(optax.adam(args.adam_lr)),
        "PC + natural (diagonal)": nat("diagonal"),
        "PC + natural (kronecker)": nat("kronecker"),
        "PC + natural (matrix_free)": nat("matrix_free"),
    }


def time_to_target(compiled, optimizer, data, args, sizes) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    params = init(sizes)
    predict = jax.jit(lambda p, x: jnp.argmax(mlp(p, x), -1))
    row = harness.time_to_target(
        compiled,
        params,
        optimizer.init(params),
        (x_train, y_train),
        lambda p: jnp.mean(predict(p, x_test) == y_test),
        batch=args.batch,
        epochs=args.epochs,
        target=args.target,
        stop_at_target=True,
    )
    accuracy = row["best"] if row["steps"] is None else row["accuracy"]
    return {"steps": row["steps"], "seconds": row["seconds"], "accuracy": accuracy}


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    if args.quick:
        args.hidden = 256
    sizes = [784, args.hidden, args.hidden, 10]
    dataset = bdata.mnist(args.data_dir)
    data = (
        bdata.flat(dataset.x_train),
        bdata.onehot(dataset.y_train),
        bdata.flat(dataset.x_test),
        dataset.y_test,
    )
    x, y = jnp.asarray(data[0][: args.batch]), jnp.asarray(data[1][: args.batch])
    params = init(sizes)
    compiled, loops = {}, {}
    all_methods = methods(args, sizes)
    for name, (step, optimizer) in all_methods.items():
        opt_state = optimizer.init(params)
        compiled[name] = harness.compile_step(step, params, opt_state, x, y)
        loops[name] = harness.Loop(compiled[name].call, (params, opt_state), (x, y))
    times = harness.interleave(loops, args.repeats)
    base = harness.summary(times["PC + Adam"])
    steps = {}
    for name, t in times.items():
        stats = harness.summary(t)
        steps[name] = {
            **stats,
            "x_pc_adam": harness.ratio(stats, base),
            "compile_seconds": compiled[name].compile_seconds,
            "memory_bytes": compiled[name].memory_bytes,
        }
        ratio = steps[name]["x_pc_adam"]
        harness.log(f"{name:28s} {1e3 * stats['median_s']:8.2f} ms  x {ratio:.2f}")
    to_target = {}
    if not args.quick:
        for name, (_, optimizer) in all_methods.items():
            if "matrix_free" in name:
                continue  # its step cost makes a full run impractical on a CPU
            row = time_to_target(compiled[name].call, optimizer, data, args, sizes)
            to_target[name] = row
            harness.log(f"{name:28s} to {args.target}: {row}")
    config = {
        k: getattr(args, k)
        for k in (
            "hidden",
            "inference_steps",
            "batch",
            "epochs",
            "target",
            "adam_lr",
            "natural_lr",
            "damping",
            "repeats",
            "quick",
        )
    }
    config.update(state_step=0.1, ema_decay=0.95, refresh_every=10, cg_iters=10, momentum=0.9)
    return config, {"data": dataset.name, "steps": steps, "to_target": to_target}
