"""Step parity: a jitted pcjax PC training step against a hand-written reference, same run.

    python benchmarks/run.py step [--quick] [--networks mlp,cnn] [--repeats N]
        [--batch 64 --channels 16,32,64 --steps 8]

- `mlp`: `pc.make_train_step(tanh_mlp, pc.Equilibrium(pc.GradientDescent(T, step_size=0.1)),
  optax.adam(1e-3))` on the functional tanh MLP against `models.tanh_mlp_reference_step`
  (no autodiff at all), both with pcjax's default loop form; three configurations.
- `cnn`: the same on `pcjax.nn.VGG(3, channels, [128], 10, image_size=32)` (32x32x3 input)
  against `models.layered_reference_step` (one `jax.vjp` per layer), each with the inference
  loop rolled (`unroll=1`) and fully unrolled (`unroll=True`); also pcjax's default form
  against the rolled reference.

Before timing, one SGD(1.0) step of each from the same start must give the same parameters
(rtol 1e-3, atol 1e-5): the same maths. Then Adam steps, compiled first, calls interleaved,
median of `repeats` calls or of as many as fill about 3 s per step, whichever is more (a 6 ms
step timed 30 times moves its ratio by several percent from run to run); the ratio is
pcjax / reference (requirement: <= 1.05).
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
import models
import numpy as np
import optax

import pcjax as pc
from pcjax import nn
from pcjax._solvers import scan_unroll

STATE_STEP = 0.1
BUDGET_SECONDS = 3.0  # fast steps get more calls than `repeats`: about this long each
MLP_CONFIGS = [
    # (name, layer sizes, batch, inference steps)
    ("MLP 784-128x3-10", [784, 128, 128, 128, 10], 128, 8),
    ("MLP 784-1024x2-10", [784, 1024, 1024, 10], 128, 8),
    ("MLP 784-1024x3-10", [784, 1024, 1024, 1024, 10], 1024, 20),
]
CNN_CONFIGS = [
    # (channels, batch, inference steps)
    ((16, 32, 64), 64, 8),
    ((32, 64, 128), 128, 8),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--networks", default="mlp,cnn", help="mlp, cnn or both")
    parser.add_argument("--quick", action="store_true", help="the smallest configuration of each")
    parser.add_argument("--repeats", type=int, help="timed calls of each (default MLP 30, CNN 10)")
    parser.add_argument("--batch", type=int, help="CNN: one configuration of this batch ...")
    parser.add_argument("--channels", help="... these channels (default 16,32,64) ...")
    parser.add_argument("--steps", type=int, default=8, help="... and T (default 8)")


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / ("step-quick.json" if args.quick else "step.json")


def check_same(results: dict[Any, Any], rtol: float = 1e-3, atol: float = 1e-5) -> None:
    """Every result's leaves equal the first's."""
    first, *rest = results.values()
    for other in rest:
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(first)):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def pc_step(fn, steps: int, optimizer, output: str, unroll=None):
    rule = pc.Equilibrium(pc.GradientDescent(steps, step_size=STATE_STEP, unroll=unroll))
    train = pc.make_train_step(fn, rule, optimizer)
    return lambda p, s, x, y: train(p, s, x, {output: y})[:2]


def timed(steps: dict[str, Any], params, opt_state, x, y, repeats) -> dict[str, dict]:
    """Compile each `(params, opt_state, x, y) -> (params, opt_state)`, time interleaved."""
    loops, compiled = {}, {}
    for name, step in steps.items():
        compiled[name] = harness.compile_step(step, params, opt_state, x, y)
        loops[name] = harness.Loop(compiled[name].call, (params, opt_state), (x, y))
    repeats = harness.repeats_for(loops, repeats, BUDGET_SECONDS)
    times = harness.interleave(loops, repeats)
    return {
        name: {
            **harness.summary(t),
            "compile_seconds": compiled[name].compile_seconds,
            "flops": compiled[name].flops,
            "bytes_accessed": compiled[name].bytes_accessed,
        }
        for name, t in times.items()
    }


def flops_ratio(a: dict, b: dict) -> float | None:
    return a["flops"] / b["flops"] if a.get("flops") and b.get("flops") else None


def mlp_problem(sizes, batch, steps):
    """(params, x, y, steps_for(optimizer) -> {"reference", "pcjax"}) of a tanh MLP."""
    rng = np.random.default_rng(0)
    params = models.init_tanh_mlp(sizes, rng)
    x = jnp.asarray(rng.standard_normal((batch, sizes[0]), np.float32))
    y = jnp.asarray(bdata.onehot(rng.integers(0, sizes[-1], batch), sizes[-1]))
    output = f"h{len(sizes) - 2}"
    unroll = scan_unroll(steps, None)  # pcjax's default loop form, for both

    def steps_for(optimizer):
        return {
            "reference": lambda p, s, x, y: models.tanh_mlp_reference_step(
                optimizer, steps, STATE_STEP, p, s, x, y, unroll
            ),
            "pcjax": pc_step(models.tanh_mlp, steps, optimizer, output),
        }

    return params, x, y, steps_for


def cnn_problem(channels, batch, steps, image_size: int = 32):
    """(model, x, y, steps_for(optimizer) -> {"pcjax rolled", "reference rolled", ...})."""
    model = nn.VGG(3, channels, [128], 10, image_size=image_size, key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, image_size, image_size, 3), np.float32))
    y = jnp.asarray(bdata.onehot(rng.integers(0, 10, batch)))
    output = models.output_node(model)

    def steps_for(optimizer):
        return {
            f"{name} {loop}": step
            for loop, unroll in [("rolled", 1), ("unrolled", True)]
            for name, step in [
                ("pcjax", pc_step(nn.call, steps, optimizer, output, unroll)),
                ("reference", models.reference_step(optimizer, steps, STATE_STEP, unroll)),
            ]
        }

    return model, x, y, steps_for


def check_problem(params, x, y, steps_for) -> None:
    """One SGD(1.0) step of every variant from the same start: the same parameters."""
    sgd = optax.sgd(1.0)
    opt_state = sgd.init(models.trainable(params))
    check_same(
        {k: eqx.filter_jit(f)(params, opt_state, x, y)[0] for k, f in steps_for(sgd).items()}
    )


def time_problem(params, x, y, steps_for, repeats) -> dict[str, dict]:
    adam = optax.adam(1e-3)
    return timed(steps_for(adam), params, adam.init(models.trainable(params)), x, y, repeats)


def mlp_row(name, sizes, batch, steps, repeats) -> dict[str, Any]:
    problem = mlp_problem(sizes, batch, steps)
    check_problem(*problem)
    times = time_problem(*problem, repeats)
    return {
        "network": name,
        "batch": batch,
        "T": steps,
        "unroll": scan_unroll(steps, None),
        "reference": times["reference"],
        "pcjax": times["pcjax"],
        "ratio": harness.ratio(times["pcjax"], times["reference"]),
        "flops_ratio": flops_ratio(times["pcjax"], times["reference"]),
    }


def cnn_row(channels, batch, steps, repeats) -> dict[str, Any]:
    problem = cnn_problem(channels, batch, steps)
    check_problem(*problem)
    times = time_problem(*problem, repeats)
    default = "unrolled" if scan_unroll(steps, None) is True else "rolled"
    return {
        "network": f"VGG {','.join(map(str, channels))} + 128",
        "batch": batch,
        "T": steps,
        "times": times,
        "ratio_rolled": harness.ratio(times["pcjax rolled"], times["reference rolled"]),
        "ratio_unrolled": harness.ratio(times["pcjax unrolled"], times["reference unrolled"]),
        "flops_ratio_rolled": flops_ratio(times["pcjax rolled"], times["reference rolled"]),
        "flops_ratio_unrolled": flops_ratio(times["pcjax unrolled"], times["reference unrolled"]),
        "default_loop": default,
        "default_vs_rolled_reference": harness.ratio(
            times[f"pcjax {default}"], times["reference rolled"]
        ),
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    networks = args.networks.split(",")
    for network in networks:
        if network not in ("mlp", "cnn"):
            raise SystemExit(f"unknown network {network!r}; choose from mlp, cnn")
    mlp_configs = MLP_CONFIGS[:1] if args.quick else MLP_CONFIGS
    cnn_configs = CNN_CONFIGS[:1] if args.quick else CNN_CONFIGS
    if args.batch or args.channels:
        channels = tuple(int(c) for c in (args.channels or "16,32,64").split(","))
        cnn_configs = [(channels, args.batch or 64, args.steps)]
    config = {
        "networks": networks,
        "state_step": STATE_STEP,
        "optimizer": "adam 1e-3",
        "repeats_mlp": args.repeats or 30,
        "repeats_cnn": args.repeats or 10,
        "budget_seconds": BUDGET_SECONDS,
        "mlp": [list(c) for c in mlp_configs] if "mlp" in networks else [],
        "cnn": [list(c) for c in cnn_configs] if "cnn" in networks else [],
    }
    results: dict[str, list] = {"mlp": [], "cnn": []}
    if "mlp" in networks:
        for name, sizes, batch, steps in mlp_configs:
            row = mlp_row(name, sizes, batch, steps, config["repeats_mlp"])
            results["mlp"].append(row)
            harness.log(
                f"{name}, batch {batch}, T={steps}: reference "
                f"{1e3 * row['reference']['median_s']:.2f} ms, pcjax "
                f"{1e3 * row['pcjax']['median_s']:.2f} ms, ratio {row['ratio']:.3f}"
            )
    if "cnn" in networks:
        for channels, batch, steps in cnn_configs:
            row = cnn_row(channels, batch, steps, config["repeats_cnn"])
            results["cnn"].append(row)
            harness.log(
                f"{row['network']}, batch {batch}, T={steps}: ratio rolled "
                f"{row['ratio_rolled']:.3f}, unrolled {row['ratio_unrolled']:.3f}, default vs "
                f"rolled reference {row['default_vs_rolled_reference']:.3f}"
            )
    return config, results
