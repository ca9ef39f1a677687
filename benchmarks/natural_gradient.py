"""PC + natural gradient vs PC + Adam vs backprop + Adam on an MNIST MLP.

Reports, for the same 784-H-H-10 GELU MLP (pcjax.dense layers, T inference steps, batch 128):

1. the steps and wall-clock time each method needs to reach a target test accuracy (98% by
   default), evaluated every quarter epoch, up to `--epochs`;
2. the time per training step of each natural-gradient mode relative to a PC + Adam step
   (medians of interleaved calls, after compilation).

    python benchmarks/natural_gradient.py --data-dir ../shared/data [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax.datasets import load_mnist


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


def make_steps(args):
    """name -> (jitted step(params, opt_state, x, y), optimizer)."""
    label = "h2"
    mask = pc.fisher_mask(mlp, init([784, args.hidden, args.hidden, 10]), jnp.zeros((1, 784)))

    def pc_step(optimizer, fisher=None):
        step = functools.partial(
            pc.train_step, mlp, optimizer=optimizer, steps=args.inference_steps, fisher=fisher
        )
        return jax.jit(lambda p, s, x, y: step(p, s, x, {label: y})[:2]), optimizer

    def backprop_step(optimizer):
        def step(params, opt_state, x, y):
            grads = jax.grad(lambda p: 0.5 * jnp.sum((y - mlp(p, x)) ** 2) / x.shape[0])(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.jit(step), optimizer

    return {
        "backprop + Adam": backprop_step(optax.adam(args.adam_lr)),
        "PC + Adam": pc_step(optax.adam(args.adam_lr)),
        "PC + natural (kronecker)": pc_step(
            natural("kronecker", args.natural_lr, args.damping, mask), "kronecker"
        ),
        "PC + natural (diagonal)": pc_step(
            natural("diagonal", args.natural_lr, args.damping, mask), "diagonal"
        ),
        "PC + natural (matrix_free)": pc_step(
            natural("matrix_free", args.natural_lr, args.damping, mask), "matrix_free"
        ),
    }


def time_to_target(step, optimizer, data, args):
    x_train, y_train, x_test, y_test = data
    params = init([784, args.hidden, args.hidden, 10])
    opt_state = optimizer.init(params)
    predict = jax.jit(lambda p, x: jnp.argmax(mlp(p, x), -1))
    rng = np.random.default_rng(0)
    per_epoch = len(x_train) // args.batch
    check_every = per_epoch // 4
    steps, elapsed, best = 0, 0.0, 0.0
    params, opt_state = step(params, opt_state, x_train[:128], y_train[:128])  # compile
    params = init([784, args.hidden, args.hidden, 10])
    opt_state = optimizer.init(params)
    for _ in range(args.epochs):
        order = rng.permutation(len(x_train))
        for i in range(per_epoch):
            index = order[i * args.batch : (i + 1) * args.batch]
            start = time.perf_counter()
            params, opt_state = step(params, opt_state, x_train[index], y_train[index])
            jax.block_until_ready(params)
            elapsed += time.perf_counter() - start
            steps += 1
            if steps % check_every == 0:
                accuracy = float(jnp.mean(predict(params, x_test) == y_test))
                best = max(best, accuracy)
                if accuracy >= args.target:
                    return {"steps": steps, "seconds": elapsed, "accuracy": accuracy}
    return {"steps": None, "seconds": None, "accuracy": best}


def step_times(steps, data, args, repeats):
    x_train, y_train = data[0][: args.batch], data[1][: args.batch]
    states = {}
    for name, (step, optimizer) in steps.items():
        params = init([784, args.hidden, args.hidden, 10])
        states[name] = step(params, optimizer.init(params), x_train, y_train)
        jax.block_until_ready(states[name])
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (step, _) in steps.items():
            start = time.perf_counter()
            states[name] = step(*states[name], x_train, y_train)
            jax.block_until_ready(states[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
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
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.hidden = 256
    data = load_mnist(args.data_dir)
    data = (
        data.x_train.reshape(-1, 784),
        np.eye(10, dtype=np.float32)[data.y_train],
        data.x_test.reshape(-1, 784),
        data.y_test,
    )
    steps = make_steps(args)
    print(
        f"device: {jax.devices()[0].device_kind}; MLP 784-{args.hidden}-{args.hidden}-10, "
        f"T={args.inference_steps}, batch {args.batch}"
    )
    times = step_times(steps, data, args, args.repeats)
    base = times["PC + Adam"]
    print(f"\n{'method':28s} {'step ms':>8s} {'x PC+Adam':>10s}")
    for name, t in times.items():
        print(f"{name:28s} {1e3 * t:8.2f} {t / base:10.2f}", flush=True)
    results = {"step_seconds": times, "to_target": {}}
    if not args.quick:
        print(
            f"\n{'method':28s} {'steps to ' + str(args.target):>14s} {'seconds':>8s} "
            f"{'best acc':>8s}"
        )
        for name, (step, optimizer) in steps.items():
            if "matrix_free" in name:
                continue  # its step cost makes a full run impractical on a CPU
            row = time_to_target(step, optimizer, data, args)
            results["to_target"][name] = row
            reached = row["steps"] is not None
            print(
                f"{name:28s} {row['steps'] if reached else 'not reached':>14} "
                f"{row['seconds'] if reached else float('nan'):8.1f} {row['accuracy']:8.4f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
