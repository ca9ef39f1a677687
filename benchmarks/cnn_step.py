"""Time of a jitted PC training step of a VGG-style CNN against a hand-written reference.

The CNN is `pcjax.nn.VGG(3, channels, [128], 10, image_size=32)`: 3x3 convolutions + ReLU +
2x2 max pooling, a dense hidden layer, a Gaussian output node. The reference writes the same PC
step by hand in pure JAX (`benchmarks/reference.py`): feedforward initialisation, T steps in
`lax.scan` where each node's error is pulled back through its child's layer with one `jax.vjp`
per layer, the local parameter gradients at the relaxed states, and an Adam update. Both are
checked to agree (one SGD step).

    python benchmarks/cnn_step.py [--batch 128] [--steps 8] [--channels 32,64,128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax

import pcjax as pc
from pcjax import nn
from pcjax._inference import UNROLL_LIMIT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import layer_functions, layered_reference_step

STATE_STEP = 0.1


def reference_step(optimizer, steps, unroll, model, opt_state, x, y):
    fs, layers, rebuild = layer_functions(model)
    return layered_reference_step(
        optimizer, steps, STATE_STEP, fs, layers, rebuild, model, opt_state, x, y, unroll
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--channels", default="32,64,128")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")]
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    model = nn.VGG(3, channels, [128], 10, image_size=32, key=k1)
    x = jax.random.normal(k2, (args.batch, 32, 32, 3))
    y = jax.nn.one_hot(jax.random.randint(k3, (args.batch,), 0, 10), 10)
    output = f"fc{len(model.dense_layers) - 1}"

    def steps_for(optimizer):
        """pcjax and the reference, each with the inference loop rolled and fully unrolled."""

        def pcjax_step(unroll, m, s, x, y):
            return pc.train_step(
                nn.call,
                m,
                s,
                x,
                {output: y},
                optimizer=optimizer,
                steps=args.steps,
                step_size=STATE_STEP,
                unroll=unroll,
            )[:2]

        return {
            (name, loop): eqx.filter_jit(functools.partial(step, unroll))
            for name, step in [
                ("pcjax", pcjax_step),
                ("reference", functools.partial(reference_step, optimizer, args.steps)),
            ]
            for loop, unroll in [("rolled", 1), ("unrolled", True)]
        }

    sgd = optax.sgd(1.0)
    results = {
        key: step(model, sgd.init(eqx.filter(model, eqx.is_inexact_array)), x, y)[0]
        for key, step in steps_for(sgd).items()
    }
    for result in results.values():  # all four compute the same update
        for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(results["pcjax", "rolled"])):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

    optimizer = optax.adam(1e-3)
    steps = steps_for(optimizer)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    carries = {key: step(model, opt_state, x, y) for key, step in steps.items()}
    jax.block_until_ready(carries)
    times = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            carries[key] = step(*carries[key], x, y)
            jax.block_until_ready(carries[key])
            times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(t) for key, t in times.items()}
    print(
        f"device: {jax.devices()[0].device_kind}; VGG channels {channels}, batch {args.batch}, "
        f"T={args.steps}"
    )
    for loop in ("rolled", "unrolled"):
        mine, theirs = median["pcjax", loop], median["reference", loop]
        print(
            f"{loop:>8} loop: reference {1e3 * theirs:.1f} ms, pcjax {1e3 * mine:.1f} ms, "
            f"ratio {mine / theirs:.3f}"
        )
    default = "unrolled" if args.steps <= UNROLL_LIMIT else "rolled"
    print(
        f"pcjax default ({default}) vs the rolled lax.scan reference: "
        f"{median['pcjax', default] / median['reference', 'rolled']:.3f}"
    )


if __name__ == "__main__":
    main()
