"""Compile time and step time of PC training steps against depth and sequence length.

A residual PC network (`pcjax.nn.ResNet`, width 32) with 8, 16, 32 and 64 blocks, and an LSTM
(`pcjax.nn.LSTM`, hidden 32) over 16, 64 and 256 time steps, each written two ways: unrolled in
Python (a node per block / time step) and with `lax.scan` (`scan_layers=True` / `scan=True`:
one stacked node per quantity). Standard PC, T = 4 inference steps, batch 16, SGD.

Compile time is `jax.jit(step).lower(...).compile()` (tracing, pcjax's interpretation of the
traced program, XLA compilation); step time is the median of `--repeats` compiled calls. With
scan, compile time should stay roughly flat in depth and length.

    python benchmarks/depth_scaling.py [--quick] [--max-unrolled 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import pcjax as pc
from pcjax import nn

WIDTH, BATCH, T = 32, 16, 4


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


def measure(kind: str, size: int, scanned: bool, repeats: int) -> dict:
    model, x, y = build(kind, size, scanned, jax.random.PRNGKey(0))
    optimizer = optax.sgd(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    params, static = eqx.partition(model, eqx.is_array)

    def step(params, opt_state, x, y):
        new, opt_state, info = pc.train_step(
            nn.call, eqx.combine(params, static), opt_state, x, {"out": y},
            optimizer=optimizer, steps=T, step_size=0.1,
        )  # fmt: skip
        return eqx.filter(new, eqx.is_array), opt_state, info.energy

    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(params, opt_state, x, y))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, opt_state, x, y))
        times.append(time.perf_counter() - start)
    return {
        "model": kind,
        "size": size,
        "loop": "scan" if scanned else "unrolled",
        "compile_seconds": compile_seconds,
        "step_seconds": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 and 32 blocks, 16 and 64 steps")
    parser.add_argument("--max-unrolled", type=int, default=256, help="skip larger unrolled runs")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    sizes = {"resnet": [8, 32] if args.quick else [8, 16, 32, 64]}
    sizes["lstm"] = [16, 64] if args.quick else [16, 64, 256]
    print(f"device: {jax.devices()[0].platform}; jax {jax.__version__}; width {WIDTH}, ", end="")
    print(f"batch {BATCH}, T={T}\n")
    print("| model | size | loop | compile (s) | step (ms) |\n| --- | --- | --- | --- | --- |")
    results = []
    for kind, kind_sizes in sizes.items():
        for size in kind_sizes:
            for scanned in (True, False):
                if not scanned and size > args.max_unrolled:
                    continue
                r = measure(kind, size, scanned, args.repeats)
                results.append(r)
                print(
                    f"| {kind} | {size} | {r['loop']} | {r['compile_seconds']:.2f} | "
                    f"{1e3 * r['step_seconds']:.2f} |",
                    flush=True,
                )
    for kind, kind_sizes in sizes.items():
        scan = {r["size"]: r["compile_seconds"] for r in results if r["model"] == kind and
                r["loop"] == "scan"}  # fmt: skip
        print(f"{kind}: scan compile time, largest / smallest = "
              f"{scan[kind_sizes[-1]] / scan[kind_sizes[0]]:.2f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].platform, "results": results}, f, indent=1)


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
