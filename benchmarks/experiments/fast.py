"""PC configurations against backprop on the demo's network: step time and time to 98%.

    python benchmarks/run.py fast [--data-dir DIR] [--epochs 4] [--target 0.98] [--quick]
                                  [--candidates NAME,NAME,...]

The demo's MLP (784-1024-1024-10, GELU, batch 128, AdamW with a cosine schedule over
`--epochs` epochs, `pcjax.demo`) trained from the same initial weights and batch order by
backprop and by each PC candidate (an energy transformation, a solver and a number of inference
steps; never fixed predictions). For each: the median step time relative to backprop's
(interleaved calls, same process), the training seconds (evaluation excluded) and steps until
the test accuracy, evaluated every quarter epoch, first reaches `--target`, those seconds
relative to backprop's, and the final accuracy. `--quick`: step times only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

import data as bdata
import harness
import jax
import jax.numpy as jnp
import optax

import pcjax as pc
from pcjax import demo

OUTPUT = "h2"


class Candidate(NamedTuple):
    name: str
    epc: bool  # error-parameterised inference, else standard PC
    steps: int
    step_size: float
    preset: str | None = None  # built by `pc.preset` (its settings are the fields above)

    def configuration(self, fn):
        """`(model, rule)` for `pc.make_train_step`."""
        if self.preset is not None:
            return pc.preset(self.preset, fn)
        rule = pc.Equilibrium(pc.GradientDescent(self.steps, step_size=self.step_size))
        return (pc.error_parameterised(fn) if self.epc else fn), rule


CANDIDATES = {
    c.name: c
    for c in (
        Candidate("PC T=8 step 0.1 (demo)", False, 8, 0.1),
        Candidate("PC T=4 step 0.5", False, 4, 0.5),
        Candidate("PC T=2 step 1.0", False, 2, 1.0),
        Candidate("PC T=2 step 0.5", False, 2, 0.5),
        Candidate("ePC T=1 step 1.0 (preset fast)", True, 1, 1.0, preset="fast"),
        Candidate("ePC T=1 step 0.5", True, 1, 0.5),
        Candidate("ePC T=2 step 0.5", True, 2, 0.5),
    )
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help=f"MNIST directory (default ${bdata.DATA_ENV})")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--quick", action="store_true", help="step times only")


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / ("fast-quick.json" if args.quick else "fast.json")


def pc_step(candidate: Candidate, optimizer: optax.GradientTransformation):
    train = pc.make_train_step(*candidate.configuration(demo.mlp), optimizer)

    def step(params, opt_state, x, y):
        params, opt_state, _ = train(params, opt_state, x, {OUTPUT: y})
        return params, opt_state

    return step


def backprop_step(optimizer: optax.GradientTransformation):
    step = demo.backprop_step(optimizer)
    return lambda params, opt_state, x, y: step(params, opt_state, x, {OUTPUT: y})[:2]


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    dataset = bdata.mnist(args.data_dir)
    x_train, y_train = bdata.flat(dataset.x_train), bdata.onehot(dataset.y_train)
    x_test, y_test = bdata.flat(dataset.x_test), dataset.y_test
    per_epoch = len(x_train) // args.batch
    optimizer = optax.adamw(
        optax.cosine_decay_schedule(args.lr, args.epochs * per_epoch), weight_decay=1e-4
    )
    params = demo.init_mlp(jax.random.PRNGKey(0), [x_train.shape[1], args.hidden, args.hidden, 10])
    x, y = jnp.asarray(x_train[: args.batch]), jnp.asarray(y_train[: args.batch])
    steps = {"backprop": backprop_step(optimizer)}
    steps.update({name: pc_step(CANDIDATES[name], optimizer) for name in names})
    compiled = {
        name: harness.compile_step(step, params, optimizer.init(params), x, y)
        for name, step in steps.items()
    }
    loops = {
        name: harness.Loop(c.call, (params, optimizer.init(params)), (x, y))
        for name, c in compiled.items()
    }
    times = harness.interleave(loops, args.repeats)
    base = harness.summary(times["backprop"])
    rows: dict[str, dict[str, Any]] = {}
    for name, t in times.items():
        stats = harness.summary(t)
        rows[name] = {**stats, "x_backprop": harness.ratio(stats, base)}
        harness.log(
            f"{name:26s} {1e3 * stats['median_s']:8.2f} ms  x {rows[name]['x_backprop']:.2f}"
        )
    if not args.quick:
        for name, c in compiled.items():
            rows[name]["to_target"] = harness.time_to_target(
                c.call,
                params,
                optimizer.init(params),
                (x_train, y_train),
                lambda p: demo.accuracy(p, x_test, y_test),
                batch=args.batch,
                epochs=args.epochs,
                target=args.target,
            )
            harness.log(f"{name:26s} to {args.target}: {rows[name]['to_target']}")
        seconds = rows["backprop"]["to_target"]["seconds"]
        for row in rows.values():
            reached = row["to_target"]["seconds"]
            row["x_backprop_to_target"] = (
                None if reached is None or seconds is None else reached / seconds
            )
    candidates = {
        n: {"epc": c.epc, "steps": c.steps, "step_size": c.step_size}
        for n, c in ((n, CANDIDATES[n]) for n in names)
    }
    config = {k: getattr(args, k) for k in ("hidden", "batch", "epochs", "lr", "target", "repeats")}
    config.update(quick=args.quick, candidates=candidates)
    return config, {"data": dataset.name, "rows": rows}
