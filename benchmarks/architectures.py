"""PC next to backprop on small tasks for the LSTM, ResNet and Transformer builders.

    python benchmarks/architectures.py [--epochs 20] [--plot curves.png]

Tasks (synthetic or bundled, so no download is needed):
- LSTM: the adding problem (sequences of length 10 with two marked values; regress their sum);
- ResNet (4 residual blocks, width 64): the UCI 8x8 digits (scikit-learn), cross-entropy output;
- Transformer block: majority token of a length-8 sequence over a vocabulary of 6.

Every model is trained by standard PC (`pcjax.train_step`, T inference steps of SGD on the states)
and by backprop with the same optimizer (Adam) and batches; the script prints the test loss after
every epoch for both, and the final test metric.
"""

from __future__ import annotations

import argparse
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import nn
from pcjax.datasets import load_digits


def adding_problem(rng, n, length=10):
    values = rng.uniform(0, 1, (n, length)).astype(np.float32)
    marks = np.zeros((n, length), np.float32)
    for row in marks:
        row[rng.choice(length, 2, replace=False)] = 1.0
    x = np.stack([values, marks], axis=-1)
    return x, (values * marks).sum(1, keepdims=True)


def majority(rng, n, length=8, vocab=6):
    tokens = rng.integers(0, vocab, (n, length))
    counts = np.stack([(tokens == v).sum(1) for v in range(vocab)], 1) + rng.uniform(
        0, 0.1, (n, vocab)
    )
    return np.eye(vocab, dtype=np.float32)[tokens], np.eye(vocab, dtype=np.float32)[
        counts.argmax(1)
    ]


def tasks(seed):
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    x, y = adding_problem(rng, 6000)
    lstm = nn.LSTM(2, 32, 1, key=key)
    digits = load_digits()
    resnet = nn.ResNet(64, 64, 4, 10, key=key, output_energy=pc.cross_entropy)
    xt, yt = majority(rng, 6000)
    block = nn.TransformerBlock(6, 2, 32, 6, key=key, output_energy=pc.cross_entropy)
    return {
        "LSTM / adding problem (test MSE)": (
            lstm,
            "out",
            (x[:5000], y[:5000], x[5000:], y[5000:]),
            "mse",
        ),
        "ResNet / UCI digits (test accuracy)": (
            resnet,
            "out",
            (
                digits.x_train.reshape(-1, 64),
                np.eye(10, dtype=np.float32)[digits.y_train],
                digits.x_test.reshape(-1, 64),
                np.eye(10, dtype=np.float32)[digits.y_test],
            ),
            "accuracy",
        ),
        "Transformer / majority token (test accuracy)": (
            block,
            "out",
            (xt[:5000], yt[:5000], xt[5000:], yt[5000:]),
            "accuracy",
        ),
    }


def loss_fn(model, x, y, metric):
    out = nn.call(model, x)
    if metric == "mse":
        return 0.5 * jnp.mean(jnp.sum((y - out) ** 2, -1))
    return optax.softmax_cross_entropy(out, y).mean()


def evaluate(model, x, y, metric):
    out = nn.call(model, x)
    if metric == "mse":
        return float(jnp.mean(jnp.sum((y - out) ** 2, -1)))
    return float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(y, -1)))


def train(model, output, data, metric, method, args):
    x_train, y_train, x_test, y_test = data
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    if method == "PC":
        step = eqx.filter_jit(
            functools.partial(
                pc.train_step,
                nn.call,
                optimizer=optimizer,
                steps=args.inference_steps,
                step_size=args.state_step_size,
            )
        )
    else:

        @eqx.filter_jit
        def step(model, opt_state, x, observed):
            grads = eqx.filter_grad(loss_fn)(model, x, observed[output], metric)
            updates, opt_state = optimizer.update(grads, opt_state, model)
            return eqx.apply_updates(model, updates), opt_state, None

    test_loss = eqx.filter_jit(loss_fn)
    rng = np.random.default_rng(0)
    curve = []
    for _ in range(args.epochs):
        order = rng.permutation(len(x_train))
        for i in range(0, len(x_train) - args.batch + 1, args.batch):
            index = order[i : i + args.batch]
            model, opt_state, _ = step(model, opt_state, x_train[index], {output: y_train[index]})
        curve.append(float(test_loss(model, x_test, y_test, metric)))
    return curve, evaluate(model, x_test, y_test, metric)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--state-step-size", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="save the test-loss curves to this PNG (needs matplotlib)")
    args = parser.parse_args()
    curves = {}
    for name, (model, output, data, metric) in tasks(args.seed).items():
        print(f"\n{name}")
        for method in ["backprop", "PC"]:
            curve, final = train(model, output, data, metric, method, args)
            curves[name, method] = curve
            shown = " ".join(f"{c:.3f}" for c in curve[:: max(1, len(curve) // 10)])
            print(f"  {method:8s} final {final:.4f}   test loss by epoch: {shown}", flush=True)
    if args.plot:
        import matplotlib.pyplot as plt

        names = sorted({name for name, _ in curves})
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5))
        for ax, name in zip(np.atleast_1d(axes), names):
            for method in ["backprop", "PC"]:
                ax.plot(curves[name, method], label=method)
            ax.set_title(name.split(" (")[0])
            ax.set_xlabel("epoch")
            ax.set_ylabel("test loss")
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
