"""Accuracy and step time of PC training in float32, bfloat16 compute (float32 states and
energy, `pcjax.mixed_precision`) and float64, on the same MNIST MLP.

    python benchmarks/dtypes.py --data-dir ../shared/data [--epochs 2] [--hidden 256]

MLP 784-H-H-10 (GELU, pre-activation nodes, squared-error label node), T = 8, state step 0.1,
AdamW 1e-3 cosine, batch 128; float32 master parameters for the bfloat16 run. Same seed and
data order for all three.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)  # for the float64 run; the others cast explicitly

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import pcjax as pc  # noqa: E402
from pcjax import datasets, nn  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    data = datasets.load_mnist(args.data_dir, download=args.data_dir is None)
    x_train = data.x_train.reshape(len(data.x_train), -1)
    x_test = data.x_test.reshape(len(data.x_test), -1)
    onehot = np.eye(10)[data.y_train]
    batch, per_epoch = 128, len(x_train) // 128
    total = per_epoch * args.epochs
    optimizer = optax.adamw(optax.cosine_decay_schedule(1e-3, total), weight_decay=1e-4)
    runs = {
        "float32": (jnp.float32, nn.call),
        "bfloat16 compute": (jnp.float32, pc.mixed_precision(nn.call)),
        "float64": (jnp.float64, nn.call),
    }
    print(f"device: {jax.devices()[0].device_kind}; MLP 784-{args.hidden}-{args.hidden}-10")
    for name, (dtype, fn) in runs.items():
        model = nn.MLP([784, args.hidden, args.hidden, 10], key=jax.random.PRNGKey(0))
        model = jax.tree.map(
            lambda a, d=dtype: a.astype(d) if eqx.is_inexact_array(a) else a, model
        )
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = jax.jit(
            functools.partial(pc.train_step, fn, optimizer=optimizer, steps=8, step_size=0.1)
        )
        rng = np.random.default_rng(0)
        times = []
        for _ in range(args.epochs):
            order = rng.permutation(len(x_train))
            for i in range(per_epoch):
                index = order[i * batch : (i + 1) * batch]
                start = time.perf_counter()
                model, opt_state, info = step(
                    model, opt_state, x_train[index].astype(dtype),
                    {"h2": onehot[index].astype(dtype)},
                )  # fmt: skip
                jax.block_until_ready(model)
                times.append(time.perf_counter() - start)
        predict = jax.jit(lambda m, x, fn=fn: jnp.argmax(fn(m, x), -1))
        accuracy = float(np.mean(np.asarray(predict(model, x_test.astype(dtype))) == data.y_test))
        print(
            f"{name:>17}: test accuracy {accuracy:.4f}, median step "
            f"{1e3 * statistics.median(times[1:]):.2f} ms, diverged {bool(info.diverged)}"
        )


if __name__ == "__main__":
    main()
