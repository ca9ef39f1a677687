"""Accuracy and step time of PC training in float32, bfloat16 compute (float32 states and
energy, `pcjax.mixed_precision`) and float64, on the same MNIST MLP.

    python benchmarks/run.py dtypes [--data-dir DIR] [--epochs 2] [--hidden 256]

MLP 784-H-H-10 (GELU, pre-activation nodes, squared-error label node), T = 8, state step 0.1,
AdamW 1e-3 cosine, batch 128; float32 master parameters for the bfloat16 run. Same seed and
data order for all three; their steps are interleaved batch by batch (each timed with
`block_until_ready`, the rotation changing every batch), and the step time is the median over
all steps after compilation.
"""

from __future__ import annotations

import argparse
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

BATCH, T, STATE_STEP = 128, 8, 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help=f"MNIST directory (default ${bdata.DATA_ENV})")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-steps", type=int, help="stop each run after this many steps")


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / "dtypes.json"


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    with jax.enable_x64(True):  # for the float64 run; the others cast explicitly
        return _run(args)


def _run(args):
    dataset = bdata.mnist(args.data_dir)
    x_train, x_test = bdata.flat(dataset.x_train), bdata.flat(dataset.x_test)
    onehot = bdata.onehot(dataset.y_train)
    per_epoch = len(x_train) // BATCH
    total = per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    optimizer = optax.adamw(optax.cosine_decay_schedule(1e-3, total), weight_decay=1e-4)
    rule = pc.Equilibrium(pc.GradientDescent(T, step_size=STATE_STEP))
    variants = {
        "float32": (jnp.float32, nn.call),
        "bfloat16 compute": (jnp.float32, pc.mixed_precision(nn.call)),
        "float64": (jnp.float64, nn.call),
    }
    sizes = [784, args.hidden, args.hidden, 10]
    output = "h2"
    runs = {}
    for name, (dtype, fn) in variants.items():
        model = nn.MLP(sizes, key=jax.random.PRNGKey(0))
        model = jax.tree.map(
            lambda a, d=dtype: a.astype(d) if eqx.is_inexact_array(a) else a, model
        )
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        train = pc.make_train_step(fn, rule, optimizer)

        def step(model, opt_state, x, y, train=train):
            return train(model, opt_state, x, {output: y})

        x0, y0 = x_train[:BATCH].astype(dtype), onehot[:BATCH].astype(dtype)
        compiled = harness.compile_step(step, model, opt_state, x0, y0)
        runs[name] = {
            "dtype": dtype,
            "fn": fn,
            "call": compiled.call,
            "carry": (model, opt_state),
            "diverged": False,
            "compile_seconds": compiled.compile_seconds,
        }

    batch: dict[str, np.ndarray] = {}

    def call(name):
        run = runs[name]
        x, y = batch["x"].astype(run["dtype"]), batch["y"].astype(run["dtype"])
        model, opt_state, info = run["call"](*run["carry"], x, y)
        run["carry"], run["info"] = (model, opt_state), info
        return model

    calls = {name: (lambda name=name: call(name)) for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    rng = np.random.default_rng(0)
    done = 0
    while done < total:
        order = rng.permutation(len(x_train))
        for i in range(per_epoch):
            if done >= total:
                break
            index = order[i * BATCH : (i + 1) * BATCH]
            batch["x"], batch["y"] = x_train[index], onehot[index]
            for name, t in harness.interleave(calls, 1, warmup=0, start=done).items():
                times[name].extend(t)
            for run in runs.values():
                run["diverged"] |= bool(run["info"].diverged)
            done += 1
    results = {}
    for name, run in runs.items():
        fn, dtype = run["fn"], run["dtype"]
        predict = jax.jit(lambda m, x, fn=fn: jnp.argmax(fn(m, x), -1))
        guesses = np.asarray(predict(run["carry"][0], x_test.astype(dtype)))
        results[name] = {
            "test_accuracy": float(np.mean(guesses == dataset.y_test)),
            "step": harness.summary(times[name]),
            "compile_seconds": run["compile_seconds"],
            "diverged": run["diverged"],
        }
        harness.log(
            f"{name:>17}: test accuracy {results[name]['test_accuracy']:.4f}, median step "
            f"{1e3 * results[name]['step']['median_s']:.2f} ms, diverged {run['diverged']}"
        )
    config = {
        "hidden": args.hidden,
        "epochs": args.epochs,
        "steps": total,
        "batch": BATCH,
        "T": T,
        "state_step": STATE_STEP,
        "optimizer": "adamw 1e-3 cosine, wd 1e-4",
    }
    return config, {"data": dataset.name, "runs": results}
