"""The main job: a discriminative PC network on MNIST, next to the same network trained by
backprop.

    python -m pcjax.demo [--epochs N] [--data-dir DIR] [--checkpoint FILE]

The network is an MLP whose pre-activations are PC nodes; the label node (one-hot) is clamped
during training and the parameters learn from the relaxed states (`pcjax.make_train_step`). Test
accuracy is measured by the feedforward pass, which is the network's equilibrium when the label
node is free. Without MNIST on disk or a network, it falls back to the UCI handwritten digits
bundled with scikit-learn (1,797 images of 8 x 8 pixels).

With `--checkpoint FILE` the run saves its state (parameters, optimizer states, epoch, the data
order's random state) after every epoch, atomically, and a rerun of the same command resumes
from it: a killed and resumed run ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import datasets

Params = list[tuple[jax.Array, jax.Array]]


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """A GELU MLP whose pre-activations h0, h1, ... are PC nodes (the last one is the label)."""
    h = x
    for i, (w, b) in enumerate(params):
        h = pc.node(f"h{i}", h @ w + b)
        if i < len(params) - 1:
            h = jax.nn.gelu(h)
    return h


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) * np.sqrt(1.0 / a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def backprop_step(optimizer: optax.GradientTransformation) -> Callable:
    """The same network and objective (half the squared error to the one-hot label, averaged
    over the batch), trained by backprop."""

    def step(params, opt_state, x, observed):
        (label,) = observed.values()
        loss, grads = jax.value_and_grad(
            lambda p: 0.5 * jnp.sum((label - mlp(p, x)) ** 2) / x.shape[0]
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@jax.jit
def _count_hits(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """The number of rows whose predicted class, $\\arg\\max_k\\, \\mathrm{mlp}(x)_k$, is `y`."""
    return jnp.sum(jnp.argmax(mlp(params, x), -1) == y)


def accuracy(params: Params, x: np.ndarray, y: np.ndarray, batch: int = 2000) -> float:
    """The fraction of rows of `x` whose predicted class is `y`.

    Evaluated in chunks of `min(batch, len(x))` rows; the last chunk is padded to that size with
    rows labelled -1 (no class), so every call on sets of that chunk size reuses one compiled
    function (one per distinct chunk size and network, compiled on the first call).
    """
    size = min(batch, len(x))
    y = np.asarray(y, np.int32)
    hits = 0
    for start in range(0, len(x), size):
        xs, ys = x[start : start + size], y[start : start + size]
        if len(xs) < size:
            pad = size - len(xs)
            xs = np.concatenate([xs, np.zeros((pad, *xs.shape[1:]), xs.dtype)])
            ys = np.concatenate([ys, np.full(pad, -1, np.int32)])
        hits += int(_count_hits(params, xs, ys))
    return hits / len(x)


def load(data_dir: str | None, download: bool) -> datasets.Dataset:
    try:
        return datasets.load_mnist(data_dir, download=download)
    except datasets.DatasetUnavailableError as error:
        print(f"MNIST unavailable ({error}).", file=sys.stderr)
        print(
            "Falling back to the UCI handwritten digits bundled with scikit-learn "
            "(1,797 images, 8 x 8); the 98% target is for MNIST.",
            file=sys.stderr,
        )
        return datasets.load_digits()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pcjax.demo",
        description="Train a discriminative predictive-coding MLP on MNIST next to backprop.",
    )
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory with the MNIST .gz files "
        f"(default ${datasets.DATA_DIR_ENV} or ~/.cache/pcjax)",
    )
    parser.add_argument("--no-download", action="store_true", help="never download MNIST")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the two hidden layers")
    parser.add_argument("--inference-steps", type=int, default=8, help="T, state updates per batch")
    parser.add_argument(
        "--state-step-size", type=float, default=0.1, help="SGD step for the states"
    )
    parser.add_argument(
        "--preset",
        choices=["fast", "standard"],
        default=None,
        help="a named PC configuration (pcjax.preset) in place of --inference-steps and "
        "--state-step-size; 'fast': ePC with one inference step",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-backprop", action="store_true", help="skip the backprop baseline")
    parser.add_argument(
        "--certify",
        action="store_true",
        help="after training, measure how far the demo's inference is from equilibrium on "
        f"{CERTIFY_IMAGES} test images (pcjax.equilibrium_gap against a Backtracking reference)",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="file to save the run to after every epoch, and to resume from if it exists",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many epochs of this invocation (resume later with --checkpoint)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.hidden < 1 or args.inference_steps < 1:
        parser.error("--epochs, --batch-size, --hidden and --inference-steps must be positive")
    if args.stop_after is not None and args.stop_after < 1:
        parser.error("--stop-after must be positive")
    return args


# The settings a checkpoint must agree with to be resumed.
RESUME_KEYS = ("epochs", "hidden", "inference_steps", "state_step_size", "lr", "batch_size")
RESUME_KEYS += ("seed", "no_backprop", "preset")


def resume(args: argparse.Namespace, runs: dict, rng: np.random.Generator) -> int:
    """Load `args.checkpoint` into `runs` and `rng` if it exists; the epoch to start from."""
    if args.checkpoint is None or not os.path.exists(args.checkpoint):
        return 1
    like = {name: (run[1], run[2]) for name, run in runs.items()}
    state, meta = pc.load_checkpoint(args.checkpoint, like)
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    if meta["settings"] != settings or meta["data"] != args.data_name:
        raise SystemExit(
            f"{args.checkpoint} was written by a run with other settings or data "
            f"({meta['settings']}, {meta['data']}); remove it or use another --checkpoint."
        )
    for name, (params, opt_state) in state.items():
        runs[name][1:] = [params, opt_state]
    rng.bit_generator.state = meta["rng"]
    print(f"resumed from {args.checkpoint} after epoch {meta['epoch']}")
    return meta["epoch"] + 1


def save(args: argparse.Namespace, runs: dict, rng: np.random.Generator, epoch: int) -> None:
    meta = {
        "epoch": epoch,
        "rng": rng.bit_generator.state,
        "settings": {key: getattr(args, key) for key in RESUME_KEYS},
        "data": args.data_name,
    }
    pc.save_checkpoint(
        args.checkpoint, {name: (run[1], run[2]) for name, run in runs.items()}, metadata=meta
    )


CERTIFY_IMAGES = 32
#: The reference of `--certify`: energy-decreasing steps, far more than the demo's inference.
CERTIFY_REFERENCE_STEPS = 400


def certify(
    network: Any, rule: Any, params: Any, x: Any, observed: dict, preset: str | None
) -> str:
    """How far the demo's inference is from equilibrium on one batch, as a printable line: the
    certificate of its own run (`InferInfo.relative_grad_norm`) and the relative error of its
    learning signal dF/dθ against a reference relaxed much further (`pcjax.equilibrium_gap`).
    The "fast" preset (ePC on the errors) is reported as not measured."""
    if preset == "fast" or not isinstance(rule, pc.Equilibrium):
        return "equilibrium: not measured for this preset (--certify takes standard PC)"
    [label] = observed
    start = {k: v for k, v in pc.forward_init(network, params, x).items() if k != label}
    states, info = pc.infer(network, params, start, x, observed, solver=rule.solver)
    reference = pc.Backtracking(CERTIFY_REFERENCE_STEPS, step_size=1.0)
    gap = pc.equilibrium_gap(network, params, states, x, observed, reference=reference)
    return (
        f"equilibrium on {len(x)} test images: the demo's inference ends at "
        f"{float(info.relative_grad_norm):.2g} of the start's state field (1e-3 certifies); "
        f"its parameter gradient is {float(gap.gap):.1%} from that of a reference relaxed by "
        f"Backtracking({CERTIFY_REFERENCE_STEPS}) (reference certificate "
        f"{float(gap.reference.relative_grad_norm):.2g})"
    )


def main(argv: Sequence[str] | None = None) -> float:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    data = load(args.data_dir, download=not args.no_download)
    x_train = data.x_train.reshape(len(data.x_train), -1)
    x_test = data.x_test.reshape(len(data.x_test), -1)
    y_onehot = np.eye(10, dtype=np.float32)[data.y_train]
    batch = min(args.batch_size, len(x_train))
    batches_per_epoch = len(x_train) // batch
    label = "h2"
    inference_name = f"preset {args.preset}" if args.preset else f"T={args.inference_steps}"
    print(
        f"{data.name}: {len(x_train)} train / {len(x_test)} test; MLP {x_train.shape[1]}-"
        f"{args.hidden}-{args.hidden}-10, {inference_name}, batch {batch}, "
        f"{args.epochs} epochs on {jax.devices()[0].platform}"
    )

    optimizer = optax.adamw(
        optax.cosine_decay_schedule(args.lr, args.epochs * batches_per_epoch), weight_decay=1e-4
    )
    if args.preset is None:
        inference = pc.GradientDescent(args.inference_steps, step_size=args.state_step_size)
        network, rule = mlp, pc.Equilibrium(inference)
    else:
        network, rule = pc.preset(args.preset, mlp)
    pc_step = jax.jit(pc.make_train_step(network, rule, optimizer), donate_argnums=(0, 1))
    bp_step = jax.jit(backprop_step(optimizer), donate_argnums=(0, 1))
    init = init_mlp(jax.random.PRNGKey(args.seed), [x_train.shape[1], args.hidden, args.hidden, 10])
    runs = {"PC": [pc_step, init, None], "backprop": [bp_step, init, None]}
    if args.no_backprop:
        del runs["backprop"]
    for run in runs.values():
        run[1] = jax.tree.map(jnp.array, run[1])  # own copies: steps donate their buffers
        run[2] = optimizer.init(run[1])

    rng = np.random.default_rng(args.seed)
    args.data_name = data.name
    first = resume(args, runs, rng)
    last = args.epochs if args.stop_after is None else min(args.epochs, first - 1 + args.stop_after)
    for epoch in range(first, last + 1):
        order = rng.permutation(len(x_train))
        line = [f"epoch {epoch}/{args.epochs}"]
        for name, run in runs.items():
            step, params, opt_state = run
            start = time.perf_counter()
            for i in tqdm(range(batches_per_epoch), desc=f"{name} epoch {epoch}", leave=False):
                index = order[i * batch : (i + 1) * batch]
                params, opt_state, info = step(
                    params, opt_state, x_train[index], {label: y_onehot[index]}
                )
            jax.block_until_ready(params)
            seconds = time.perf_counter() - start
            if name == "PC" and bool(info.diverged):
                raise RuntimeError("PC inference diverged; lower --state-step-size.")
            run[1:] = [params, opt_state]
            # The equilibrium certificate of the epoch's last step: the worst sample's state
            # field at the end of inference relative to its start (1e-3 certifies).
            certificate = (
                f", equilibrium {float(info.relative_grad_norm):.2g}" if name == "PC" else ""
            )
            line.append(
                f"{name}: train {accuracy(params, x_train, data.y_train):.4f} "
                f"test {accuracy(params, x_test, data.y_test):.4f} ({seconds:.1f} s{certificate})"
            )
        print(" | ".join(line), flush=True)
        if args.checkpoint is not None:
            save(args, runs, rng, epoch)
    if last < args.epochs:
        print(f"stopped after epoch {last} of {args.epochs}; rerun to resume")
    if args.certify:
        y_test = np.eye(10, dtype=np.float32)[data.y_test[:CERTIFY_IMAGES]]
        observed = {label: y_test}
        print(certify(network, rule, runs["PC"][1], x_test[:CERTIFY_IMAGES], observed, args.preset))
    test_accuracy = accuracy(runs["PC"][1], x_test, data.y_test)
    print(f"test accuracy: {test_accuracy:.4f}")
    return test_accuracy


if __name__ == "__main__":
    main()
