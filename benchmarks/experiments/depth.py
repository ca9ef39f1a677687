"""Compile time and step time of PC training steps against depth and sequence length.

    python benchmarks/run.py depth [--quick] [--max-unrolled 64] [--repeats 10]

A residual PC network (`pcjax.nn.ResNet`, width 32, muPC scaling) with 8, 16, 32 and 64
blocks, and an LSTM (`pcjax.nn.LSTM`, hidden 32) over 16, 64 and 256 time steps, each written
two ways: unrolled in Python (a node per block / time step) and with `lax.scan`
(`scan_layers=True` / `scan=True`: one stacked node per quantity). Standard PC
(`pc.make_train_step(nn.call, pc.Equilibrium(pc.GradientDescent(4, step_size=0.1)), sgd)`),
batch 16. Compile time: `jax.jit(step).lower(...).compile()` (tracing, pcjax's interpretation
of the traced program, XLA); step time: median of `repeats` compiled calls, the scan and the
unrolled program of each size interleaved.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import equinox as eqx
import harness
import jax
import optax

import pcjax as pc
from pcjax import nn

WIDTH, BATCH, T = 32, 16, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="8 and 32 blocks, 16 and 64 steps")
    parser.add_argument("--max-unrolled", type=int, default=256, help="skip larger unrolled runs")
    parser.add_argument("--repeats", type=int, default=10)


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / ("depth-quick.json" if args.quick else "depth.json")


def build(kind: str, size: int, scanned: bool, key: jax.Array):
    """(model, x, y) for a ResNet with `size` blocks or an LSTM over `size` steps."""
    k1, k2, k3 = jax.random.split(key, 3)
    if kind == "resnet":
        model = nn.ResNet(16, WIDTH, size, 10, key=k1, scan_layers=scanned, mupc=True)
        x = jax.random.normal(k2, (BATCH, 16))
    else:
        model = nn.LSTM(8, WIDTH, 10, key=k1, scan=scanned)
        x = jax.random.normal(k2, (BATCH, size, 8))
    return model, x, jax.random.normal(k3, (BATCH, 10))


def compiled_step(kind: str, size: int, scanned: bool):
    """(compiled step, its arguments) of one configuration."""
    model, x, y = build(kind, size, scanned, jax.random.PRNGKey(0))
    optimizer = optax.sgd(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    params, static = eqx.partition(model, eqx.is_array)
    train = pc.make_train_step(
        nn.call, pc.Equilibrium(pc.GradientDescent(T, step_size=0.1)), optimizer
    )

    def step(params, opt_state, x, y):
        new, opt_state, info = train(eqx.combine(params, static), opt_state, x, {"out": y})
        return eqx.filter(new, eqx.is_array), opt_state, info.energy

    return harness.compile_step(step, params, opt_state, x, y), (params, opt_state, x, y)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    sizes = {
        "resnet": [8, 32] if args.quick else [8, 16, 32, 64],
        "lstm": [16, 64] if args.quick else [16, 64, 256],
    }
    config = {
        "width": WIDTH,
        "batch": BATCH,
        "T": T,
        "repeats": args.repeats,
        "sizes": sizes,
        "max_unrolled": args.max_unrolled,
        "optimizer": "sgd 1e-2",
    }
    rows = []
    for kind, kind_sizes in sizes.items():
        for size in kind_sizes:
            loops, compile_seconds = {}, {}
            for scanned in (True, False):
                if not scanned and size > args.max_unrolled:
                    continue
                loop = "scan" if scanned else "unrolled"
                compiled, arguments = compiled_step(kind, size, scanned)
                compile_seconds[loop] = compiled.compile_seconds
                # The same arguments every call: the step time at a fixed point.
                loops[loop] = functools.partial(compiled.call, *arguments)
            times = harness.interleave(loops, args.repeats)
            for loop, t in times.items():
                row = {
                    "model": kind,
                    "size": size,
                    "loop": loop,
                    "compile_seconds": compile_seconds[loop],
                    "step": harness.summary(t),
                }
                rows.append(row)
                harness.log(
                    f"| {kind} | {size} | {loop} | {row['compile_seconds']:.2f} | "
                    f"{1e3 * row['step']['median_s']:.2f} |"
                )
    scan_growth = {}
    for kind, kind_sizes in sizes.items():
        scan = {
            r["size"]: r["compile_seconds"]
            for r in rows
            if r["model"] == kind and r["loop"] == "scan"
        }
        scan_growth[kind] = scan[kind_sizes[-1]] / scan[kind_sizes[0]]
    return config, {"rows": rows, "scan_compile_growth": scan_growth}
