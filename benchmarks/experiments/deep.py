"""Deep residual PC networks on MNIST: muPC against the standard parameterisation.

    python benchmarks/run.py deep [--depths 16,128] [--epochs 1] [--batch 32] [--width 32]
        [--inference epc|pc|backprop] [--inference-steps 16] [--state-step 0.01]
        [--state-momentum 0] [--output-precision 1] [--lr 1e-3] [--cosine]
        [--network ResidualMLP] [--data-dir DIR] [--max-steps N] [--reuse EARLIER.json]
        [--checkpoint DIR] [--checkpoint-every 100]

`pcjax.nn.ResidualMLP(784, width, depth, 10, parameterisation="mupc" | "standard")` (muPC's
network; `--network ResNet`: `pcjax.nn.ResNet(..., mupc=..., scan_layers=True)`), its blocks
in one `lax.scan` so that compilation does not grow with depth, trained with
`pc.Equilibrium(pc.GradientDescent(T, step_size=a))` and Adam (optionally cosine-decayed) at
the same learning rate for every depth and parameterisation (muPC's promise: the learning rate
transfers across depth). `--inference epc` relaxes the prediction errors
(`pc.error_parameterised`), `pc` the states (standard PC); `backprop` trains the same network
on the same batches with `jax.grad` of the output node's squared error (the reference).
Recorded per run: the test accuracy (feedforward prediction, 10,000 test images) after every
epoch (and every `--eval-every` steps), seconds per epoch (training only), divergence (a
non-finite energy stops the run), and how many steps' inference left the energy above its
start (`TrainInfo.energy_rose`: a state step too large for the network, which need not produce
a NaN).
`--reuse` takes the runs of an earlier result file made with the same settings instead of
rerunning them (each marked `reused_from`), so that one table can grow run by run.
`--checkpoint DIR` saves each run's parameters, optimizer state and record every
`--checkpoint-every` steps and at every epoch's end; the same command started again resumes
there (the batches drawn as in an uninterrupted run), so that a run longer than a session can
be finished in several.

`--step-over-depth` divides the state step by the depth. In ePC's error coordinates an offset
shared by every block moves the top of the residual stream depth times as far (the field's
largest curvature grows like the depth), so a fixed step that is stable at 16 blocks overshoots
at 128, and the curvature grows further as the output weights grow in training (measured at 128
blocks, Adam 0.01: one error step of 1.0 diverges, 0.1 stalls at 27%, 0.5 / 128 reaches 95%
and then oscillates down to 77%, 0.25 / 128 trains smoothly).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import data as bdata
import equinox as eqx
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import nn

OUTPUT = "out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", default="16,128", help="comma-separated residual depths")
    parser.add_argument("--parameterisations", default="mupc,standard")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inference", choices=["pc", "epc", "backprop"], default="epc")
    parser.add_argument("--inference-steps", type=int, default=16)
    parser.add_argument("--state-step", type=float, default=0.01)
    parser.add_argument(
        "--state-momentum",
        type=float,
        default=0.0,
        help="heavy-ball momentum of the state updates (optax.sgd(step, momentum)); 0: plain GD",
    )
    parser.add_argument(
        "--step-over-depth",
        action="store_true",
        help="use state step / depth (ePC: the stable step shrinks like 1 / depth)",
    )
    parser.add_argument(
        "--output-precision",
        type=float,
        default=1.0,
        help="precision of the clamped output node (small: PC's gradient nearer backprop's)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--cosine", action="store_true", help="decay the learning rate to 0 over the run"
    )
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--max-steps", type=int, help="stop each run after this many steps")
    parser.add_argument("--data-dir", help="MNIST directory (default $PCJAX_DATA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse",
        help="an earlier deep.json with the same settings: its runs are kept, not rerun",
    )
    parser.add_argument(
        "--checkpoint",
        help="a directory: save each run's state there every --checkpoint-every steps and "
        "resume from it when the same command runs again (long runs across sessions)",
    )
    parser.add_argument("--checkpoint-every", type=positive_int, default=100)
    parser.add_argument(
        "--network",
        choices=["ResidualMLP", "ResNet"],
        default="ResidualMLP",
        help="pcjax.nn.ResidualMLP (muPC's network) or pcjax.nn.ResNet (two-layer branches)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / "deep.json"


def mnist_arrays(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, jax.Array, np.ndarray]:
    """MNIST as (flat training images, one-hot training labels, flat test images on the
    device, test labels)."""
    mnist = bdata.mnist(data_dir, fallback=False)
    return (
        bdata.flat(mnist.x_train),
        bdata.onehot(mnist.y_train),
        jnp.asarray(bdata.flat(mnist.x_test)),
        np.asarray(mnist.y_test),
    )


def accuracy_on(predict, model, x_test: jax.Array, y_test: np.ndarray) -> float:
    """The fraction of test images whose `predict(model, x)` class is the label, in chunks of
    2,000 images."""
    hits = [
        np.asarray(predict(model, x_test[i : i + 2000])) == y_test[i : i + 2000]
        for i in range(0, len(x_test), 2000)
    ]
    return float(np.mean(np.concatenate(hits)))


def train(args, depth: int, mupc: bool, data) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    key = jax.random.PRNGKey(args.seed)
    if args.network == "ResNet":
        model = nn.ResNet(784, args.width, depth, 10, key=key, mupc=mupc, scan_layers=True)
    else:
        kind = "mupc" if mupc else "standard"
        model = nn.ResidualMLP(784, args.width, depth, 10, key=key, parameterisation=kind)
    net = nn.call
    per_epoch = len(x_train) // args.batch
    total = args.epochs * per_epoch if args.max_steps is None else args.max_steps
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, total) if args.cosine else args.lr)
    step = (
        backprop_step(net, optimizer)
        if args.inference == "backprop"
        else pc_step(args, depth, optimizer)
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    predict = eqx.filter_jit(lambda m, x: jnp.argmax(net(m, x), -1))

    def accuracy(m) -> float:
        return accuracy_on(predict, m, x_test, y_test)

    # The record so far; "seconds": the training time of the epoch in progress (0 at its start).
    progress = {"done": 0, "curve": [], "epochs": [], "rose": 0, "seconds": 0.0, "resumed_at": []}
    saved = checkpoint_path(args, depth, mupc)
    if saved is not None and saved.exists():
        (model, opt_state), progress = pc.load_checkpoint(saved, (model, opt_state))
        ours, theirs = checkpoint_config(vars(args)), checkpoint_config(progress.pop("config"))
        check_same_settings(theirs, ours, saved)
        progress.setdefault("resumed_at", []).append(
            progress["done"]
        )  # that epoch's time includes a compile
        harness.log(f"  resuming {saved.name} after step {progress['done']}")
    curve, epochs, done, rose = (progress[k] for k in ("curve", "epochs", "done", "rose"))
    diverged = False

    def save(seconds: float) -> None:
        if saved is not None:
            state = {"done": done, "curve": curve, "epochs": epochs, "rose": rose}
            state["resumed_at"] = progress["resumed_at"]
            metadata = {**state, "seconds": seconds, "config": checkpoint_config(vars(args))}
            pc.save_checkpoint(saved, (model, opt_state), metadata=metadata)

    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))  # drawn for every epoch, so a resume replays it
        if epoch < len(epochs):
            continue  # finished before the resume
        seconds = progress["seconds"] if done > epoch * per_epoch else 0.0
        for i in range(done - epoch * per_epoch, per_epoch):
            if args.max_steps is not None and done >= args.max_steps:
                break
            idx = order[i * args.batch : (i + 1) * args.batch]
            batch = (jnp.asarray(x_train[idx]), {OUTPUT: jnp.asarray(y_train[idx])})
            start = time.perf_counter()
            model, opt_state, info = step(model, opt_state, *batch)
            diverged = bool(info.diverged)  # blocks: the step's time is complete
            seconds += time.perf_counter() - start
            rose += bool(info.energy_rose)  # inference left the energy above its start
            done += 1
            if diverged:
                break
            if done % args.eval_every == 0:
                curve.append([done, accuracy(model)])  # a list, as JSON gives it back
                harness.log(f"    step {done}: test {curve[-1][1]:.4f}")
            if done % args.checkpoint_every == 0 and done % per_epoch:
                save(seconds)
        epochs.append({"epoch": epoch + 1, "seconds": seconds, "steps": done})
        if diverged:
            break
        if args.max_steps is not None and done >= args.max_steps:
            save(seconds)  # the record as it stands: a rerun resumes with nothing left to do
            break
        epochs[-1]["test_accuracy"] = accuracy(model)
        save(0.0)
        harness.log(
            f"  depth {depth}, {'muPC' if mupc else 'standard'}: epoch {epoch + 1} test "
            f"{epochs[-1]['test_accuracy']:.4f} ({seconds:.0f} s)"
        )
    final = None if diverged else accuracy(model)
    harness.log(
        f"depth {depth}, {'muPC' if mupc else 'standard'}: final {final}, diverged {diverged} "
        f"after {done} steps"
    )
    return {
        "curve": curve,
        "epochs": epochs,
        "steps": done,
        "diverged": diverged,
        "energy_rose_steps": rose,
        "final": final,
        **({"resumed_at_steps": progress["resumed_at"]} if progress["resumed_at"] else {}),
    }


def checkpoint_path(args, depth: int, mupc: bool) -> Path | None:
    """Where `--checkpoint` keeps the run of this depth and parameterisation."""
    if not args.checkpoint:
        return None
    Path(args.checkpoint).mkdir(parents=True, exist_ok=True)
    return Path(args.checkpoint) / f"{'mupc' if mupc else 'standard'}-{depth}.ckpt"


def checkpoint_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the run that saved it."""
    ignored = ("out", "experiment", "reuse", "depths", "parameterisations", "checkpoint")
    ignored += ("checkpoint_every", "data_dir")  # neither changes what the run computes
    return {k: v for k, v in settings.items() if k not in ignored}


def check_same_settings(saved: dict[str, Any], ours: dict[str, Any], path: Path) -> None:
    if saved != ours:
        differing = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        raise ValueError(f"deep --checkpoint: {path} was saved with other settings: {differing}")


def pc_step(args, depth: int, optimizer: optax.GradientTransformation):
    """The jitted PC training step: `Equilibrium` with heavy-ball gradient descent on the
    states (`--inference pc`) or on the errors (`epc`), the output node at its precision."""
    fn = pc.error_parameterised(nn.call) if args.inference == "epc" else nn.call
    state_step = args.state_step / depth if args.step_over_depth else args.state_step
    momentum = args.state_momentum or None
    solver = pc.GradientDescent(args.inference_steps, optax.sgd(state_step, momentum=momentum))
    precision = {OUTPUT: jnp.asarray(args.output_precision, jnp.float32)}
    rule = pc.Equilibrium(solver)
    return eqx.filter_jit(pc.make_train_step(fn, rule, optimizer, precision=precision))


class BackpropInfo(NamedTuple):
    """What `backprop_step` reports, named as in `pcjax.TrainInfo`."""

    diverged: jax.Array
    energy_rose: bool = False


def backprop_step(net, optimizer: optax.GradientTransformation):
    """A jitted backprop step on 1/2 |y - net(model, x)|^2 with the signature of a pcjax
    training step (`observed` holds the label under the output node's name)."""

    @eqx.filter_jit
    def step(model, opt_state, x, observed):
        def loss(m):
            return 0.5 * jnp.sum((observed[OUTPUT] - net(m, x)) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, BackpropInfo(~jnp.isfinite(value))

    return step


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    data = mnist_arrays(args.data_dir)
    depths = [int(d) for d in args.depths.split(",")]
    kinds = args.parameterisations.split(",")
    config = result_config(args)
    earlier = reusable_runs(args.reuse, config) if args.reuse else {}
    results = {}
    for depth in depths:
        for kind in kinds:
            name = f"{kind} {depth}"
            results[name] = earlier.get(name) or train(args, depth, kind == "mupc", data)
    return config, {"runs": results}


def result_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings recorded with the results (and compared by `--reuse`): all but where the
    output goes and where and how often a run saves, which do not change the results."""
    skipped = ("out", "experiment", "reuse", "checkpoint", "checkpoint_every")
    return {k: v for k, v in vars(args).items() if k not in skipped}


# Settings that may differ between a run and the file it reuses runs from.
_PER_RUN = ("depths", "parameterisations")


def reusable_runs(path: str, config: dict[str, Any]) -> dict[str, Any]:
    """The runs of an earlier result file made with the same settings (else a ValueError),
    each marked with the file and the date it was measured."""
    document = json.loads(Path(path).read_text())
    theirs = {k: v for k, v in document["config"].items() if k not in _PER_RUN}
    ours = {k: v for k, v in config.items() if k not in _PER_RUN}
    if theirs != ours:
        differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(f"deep --reuse {path}: its settings differ in {differing}")
    date = document["environment"].get("date")
    return {
        name: {**run, "reused_from": f"{Path(path).name} ({date})"}
        for name, run in document["results"]["runs"].items()
    }
