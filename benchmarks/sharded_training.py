"""Data-parallel PC training: single device vs `jax.jit` with shardings vs `jax.shard_map`.

    python benchmarks/sharded_training.py --devices 4 [--data-dir DIR] [--steps 50] [--json F]
        [--check-vma false]

Without GPUs, `--devices N` simulates N CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before JAX starts). The script
trains the same MLP by PC from the same initial parameters on the same batches three ways, then
reports the largest parameter difference of each sharded run from the single-device run, and
the training throughput (samples per second) of the jit-with-shardings recipe on 1, 2, 4, ...
devices (and of the shard_map recipe on all of them). `--check-vma false` runs `jax.shard_map`
without its type checks, so that the parameter gradients stay device-local instead of arriving
summed over the devices; `pcjax.cross_device_mean` averages them correctly either way. On a
multi-host cluster call `jax.distributed.initialize()` first (see the README):
`pcjax.data_mesh()` then spans every host's devices.

A script of its own rather than a `run.py` experiment because the simulated device count must
be set before JAX starts; it uses the shared `data.py` and `harness.py` (its `--json` file is a
harness result document whose results also stand at the top level).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="CPU devices to simulate")
    parser.add_argument("--data-dir", help="MNIST directory (else synthetic 28 x 28 images)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--optimizer", choices=["adam", "sgd"], default="adam", help="Adam 1e-3 or SGD 0.1"
    )
    parser.add_argument(
        "--check-vma",
        choices=["true", "false"],
        default="true",
        help="jax.shard_map's check_vma (false: device-local parameter gradients)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


args = parse_args()
if "jax" not in sys.modules and args.devices > 1:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"

import data as bdata  # noqa: E402
import equinox as eqx  # noqa: E402
import harness  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import pcjax as pc  # noqa: E402
from pcjax import nn  # noqa: E402

RULE = pc.Equilibrium(pc.GradientDescent(8, step_size=0.1))


def main():
    env = harness.environment()
    devices = jax.devices()
    dataset = bdata.mnist(args.data_dir, n_train=4096, n_test=512)
    x_all, y_all = bdata.flat(dataset.x_train), bdata.onehot(dataset.y_train)
    model = nn.MLP([784, args.hidden, args.hidden, 10], key=jax.random.PRNGKey(0))
    optimizer = optax.adam(1e-3) if args.optimizer == "adam" else optax.sgd(0.1)
    train = pc.make_train_step(nn.call, RULE, optimizer)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(x_all), args.batch, replace=False) for _ in range(args.steps)]

    def run(step, model, opt_state, place_batch=lambda t: t):
        start = None
        for i, index in enumerate(batches):
            if i == 1:  # the first call compiles
                jax.block_until_ready(model)
                start = time.perf_counter()
            x, y = place_batch((x_all[index], y_all[index]))
            model, opt_state, _ = step(model, opt_state, x, {"h2": y})
        jax.block_until_ready(model)
        seconds = time.perf_counter() - start
        return model, args.batch * (len(batches) - 1) / seconds

    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    single_step = jax.jit(train)
    with jax.default_device(devices[0]):
        reference, single_throughput = run(single_step, model, opt_state)

    results = {"devices": len(devices), "device_kind": devices[0].device_kind}
    results["data"] = dataset.name
    results["optimizer"] = args.optimizer
    results["check_vma"] = args.check_vma == "true"
    results["throughput"] = {"1 device (no sharding)": single_throughput}

    # Recipe 1: jit with shardings (GSPMD). Same program; the inputs carry the shardings.
    for n in sorted({2**k for k in range(1, len(devices).bit_length())} | {len(devices)}):
        if n > len(devices) or args.batch % n:
            continue
        mesh = pc.data_mesh(devices[:n])
        step = jax.jit(train)
        sharded, throughput = run(
            step,
            pc.replicate(model, mesh),
            pc.replicate(opt_state, mesh),
            lambda t, mesh=mesh: pc.shard_batch(t, mesh),
        )
        results["throughput"][f"{n} devices (jit + NamedSharding)"] = throughput
        if n == len(devices):
            results["jit_max_abs_diff"] = _max_diff(sharded, reference)

    # Recipe 2: shard_map. Each device trains on its shard; the optimizer first averages the
    # gradients over the devices, so every replica applies the same update.
    mesh = pc.data_mesh(devices)
    averaged = optax.chain(pc.cross_device_mean("data"), optimizer)
    averaged_train = pc.make_train_step(nn.call, RULE, averaged)

    def local_step(model, opt_state, x, observed):
        model, opt_state, info = averaged_train(model, opt_state, x, observed)
        return model, opt_state, jax.lax.psum(info.energy, "data")

    step = jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P()),
            check_vma=results["check_vma"],
        )
    )
    mapped, throughput = run(
        step,
        pc.replicate(model, mesh),
        pc.replicate(averaged.init(eqx.filter(model, eqx.is_inexact_array)), mesh),
        lambda t: pc.shard_batch(t, mesh),
    )
    results["throughput"][f"{len(devices)} devices (shard_map)"] = throughput
    results["shard_map_max_abs_diff"] = _max_diff(mapped, reference, every_device=True)
    results["param_scale"] = float(
        max(np.abs(np.asarray(leaf)).max() for leaf in jax.tree.leaves(reference))
    )
    print(json.dumps(results, indent=1))
    if args.json:  # the harness's envelope, the results also at the top level (as before)
        config = {k: v for k, v in vars(args).items() if k != "json"}
        document = harness.result_document("sharded", config, results, None, env)
        harness.write_result(args.json, {**results, **document})
    return results


def _max_diff(a, b, every_device: bool = False) -> float:
    """The largest absolute difference between the leaves of `a` and `b`; with `every_device`,
    over each device's copy of the (replicated) leaves of `a`, so drifting replicas show."""

    def copies(u):
        return [s.data for s in u.addressable_shards] if every_device else [u]

    return float(
        max(
            np.abs(np.asarray(c) - np.asarray(v)).max()
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
            for c in copies(u)
        )
    )


if __name__ == "__main__":
    main()
