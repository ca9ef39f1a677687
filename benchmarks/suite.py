"""The benchmark suite: PC algorithms next to backprop (and peer libraries) on standard tasks.

    python benchmarks/suite.py --quick [--data-dir DIR] [--cifar-dir DIR] [--out DIR]
    python benchmarks/suite.py         # the full suite (long on a CPU; meant for a GPU)
    python benchmarks/suite.py --speed-only   # step times and memory only (see gpu.sh)

Tasks: an MLP and a VGG-style CNN on MNIST, and the CIFAR-10 VGG-5 shape (four 3x3 convolutions
with pooling and a linear read-out) on CIFAR-10 when `--cifar-dir` holds it, else on a synthetic
stand-in of the same shape. Algorithms: backprop, PC (standard inference), PC with fixed
predictions (FPA), incremental PC (iPC) and PC with a Kronecker natural gradient. Every model
has a Gaussian (squared-error) output node, so that all five apply to all tasks.

Metrics, per task and algorithm: test accuracy (mean +- std over seeds), median step time
(compiled first; all algorithms of a task timed in the same process, calls interleaved, with
`block_until_ready`) and its ratio to backprop's, steps and training seconds to the task's target
accuracy, inference steps to equilibrium, and the step's peak memory as XLA's buffer assignment
reports it. For the MLP and the CNNs a hand-written `lax.scan` PC step of the same network
(`reference`, `benchmarks/reference.py`, its loop unrolled as pcjax's default) is timed beside
them. The MLP task is also run with the peer library pcx, in its
own virtual environment (`benchmarks/peers/pcx_mlp.py`); its times are ratios to a backprop step
measured in that same run.

Writes `<out>/suite[-quick|-speed].json` and `.md` (default out: `benchmarks/results`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import datasets, nn
from pcjax._inference import scan_unroll

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers
from reference import layer_functions, layered_reference_step

ALGORITHMS = ("backprop", "pc", "fpa", "ipc", "pc_natgrad")
EQUILIBRIUM_MAX_STEPS = 500
EQUILIBRIUM_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task: a data set, a network and its training budget."""

    name: str
    description: str
    data: str  # "mnist" or "cifar10"
    channels: tuple[int, ...]  # convolution widths; () for the MLP
    hidden: tuple[int, ...]  # dense hidden widths
    batch: int
    epochs: int
    target: float  # test accuracy for "time to target"
    train_subset: int | None = None  # use the first n training images only
    eval_every: int = 100  # steps between test evaluations
    inference_steps: int = 8
    state_step: float = 0.1
    lr: float = 1e-3


def tasks_for(quick: bool) -> dict[str, Task]:
    if quick:
        return {
            t.name: t
            for t in (
                Task("mlp_mnist", "MLP 784-256-256-10", "mnist", (), (256, 256), 128, 1, 0.95),
                Task(
                    "cnn_mnist",
                    "VGG conv 8,16 + dense 64",
                    "mnist",
                    (8, 16),
                    (64,),
                    64,
                    1,
                    0.9,
                    train_subset=12_000,
                    eval_every=50,
                    state_step=0.05,
                ),
                Task(
                    "vgg5_cifar",
                    "VGG-5 shape, widths / 8 (16,32,64,64)",
                    "cifar10",
                    (16, 32, 64, 64),
                    (),
                    64,
                    2,
                    0.5,
                    train_subset=5_000,
                    eval_every=26,
                    state_step=0.05,
                ),
            )
        }
    return {
        t.name: t
        for t in (
            Task("mlp_mnist", "MLP 784-1024-1024-10", "mnist", (), (1024, 1024), 128, 8, 0.98),
            Task(
                "cnn_mnist",
                "VGG conv 32,64 + dense 128",
                "mnist",
                (32, 64),
                (128,),
                128,
                5,
                0.99,
                eval_every=200,
                state_step=0.05,
            ),
            Task(
                "vgg5_cifar",
                "VGG-5 (conv 128,256,512,512 + linear)",
                "cifar10",
                (128, 256, 512, 512),
                (),
                128,
                10,
                0.7,
                eval_every=200,
                state_step=0.05,
            ),
        )
    }


def load_data(
    task: Task, data_dir: str | None, cifar_dir: str | None, max_steps: int | None = None
) -> datasets.Dataset:
    """The task's data; with `max_steps`, only as many training images as that many batches."""
    if task.data == "mnist":
        try:
            data = datasets.load_mnist(data_dir, download=data_dir is None)
        except datasets.DatasetUnavailableError as error:
            # Keep the task's shapes (and so its timings): a synthetic set of MNIST's shape.
            print(f"  MNIST unavailable ({error}); using synthetic 28 x 28 images.", flush=True)
            data = datasets.synthetic_images((28, 28), n_train=12_000, n_test=2_000)
    elif cifar_dir is not None:
        data = datasets.load_cifar10(cifar_dir)
    else:
        data = datasets.synthetic_images((32, 32, 3), n_train=10_000, n_test=2_000)
    n = len(data.x_train) if task.train_subset is None else task.train_subset
    n = n if max_steps is None else min(n, max_steps * task.batch)
    data = data._replace(x_train=data.x_train[:n], y_train=data.y_train[:n])
    if data.x_train.ndim == 3:  # grey images: add a channel axis for the CNNs
        data = data._replace(x_train=data.x_train[..., None], x_test=data.x_test[..., None])
    return data


def build_model(task: Task, image_shape: tuple[int, ...], key: jax.Array) -> eqx.Module:
    if not task.channels:
        sizes = [int(np.prod(image_shape)), *task.hidden, 10]
        return nn.MLP(sizes, key=key)
    return nn.VGG(image_shape[-1], task.channels, task.hidden, 10, image_shape[0], key=key)


def output_node(model: eqx.Module) -> str:
    if isinstance(model, nn.MLP):
        return f"h{len(model.layers) - 1}"
    return f"fc{len(model.dense_layers) - 1}"


def inputs_for(model: eqx.Module, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) if isinstance(model, nn.MLP) else x


def optimizer_for(
    algorithm: str, task: Task, total_steps: int, mask: Any = None
) -> optax.GradientTransformation:
    """The parameter optimizer; `mask` marks the layers the natural gradient preconditions."""
    if algorithm == "pc_natgrad":
        return optax.chain(
            pc.natural_gradient(
                "kronecker", damping=0.1, ema_decay=0.95, refresh_every=10, mask=mask
            ),
            optax.sgd(optax.cosine_decay_schedule(0.05, total_steps), momentum=0.9),
        )
    if algorithm == "ipc":  # iPC updates the parameters at every inference step
        total_steps *= task.inference_steps
    return optax.adamw(optax.cosine_decay_schedule(task.lr, total_steps), weight_decay=1e-4)


def step_for(algorithm: str, task: Task, output: str, optimizer) -> Callable:
    """`(model, opt_state, x, y) -> (model, opt_state, diverged)` for one algorithm."""
    if algorithm == "backprop":

        def backprop(model, opt_state, x, y):
            grads = jax.grad(lambda m: 0.5 * jnp.sum((y - nn.call(m, x)) ** 2) / x.shape[0])(model)
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return eqx.apply_updates(model, updates), opt_state, jnp.asarray(False)

        return backprop
    if algorithm == "reference":

        def reference(model, opt_state, x, y):
            fs, layers, rebuild = layer_functions(model)
            model, opt_state = layered_reference_step(
                optimizer, task.inference_steps, task.state_step, fs, layers, rebuild,
                model, opt_state, x, y, unroll=scan_unroll(task.inference_steps, None),
            )  # fmt: skip
            return model, opt_state, jnp.asarray(False)

        return reference
    options = {
        "pc": {},
        "fpa": {"fixed_predictions": True},
        "ipc": {"incremental": True},
        "pc_natgrad": {"fisher": "kronecker"},
    }[algorithm]

    def pc_step(model, opt_state, x, y):
        model, opt_state, info = pc.train_step(
            nn.call,
            model,
            opt_state,
            x,
            {output: y},
            optimizer=optimizer,
            steps=task.inference_steps,
            step_size=task.state_step,
            **options,
        )
        return model, opt_state, info.diverged

    return pc_step


def compile_step(step: Callable, model, opt_state, x, y):
    """The compiled step and its memory: XLA's buffer assignment for one call (arguments,
    outputs and temporaries, less aliased buffers), or None where the backend reports none."""
    compiled = jax.jit(step).lower(model, opt_state, x, y).compile()
    memory = compiled.memory_analysis()
    if memory is None:
        return compiled, None
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes
    return compiled, total + memory.temp_size_in_bytes - memory.alias_size_in_bytes


_COMPILED: dict[tuple, tuple] = {}


def prepared_step(task: Task, algorithm: str, model, x, y, total: int):
    """`(compiled step, optimizer, memory, compile seconds)`, compiled once per task and
    algorithm and shared by the timing and every seed's training run."""
    key = (task, algorithm, total)
    if key not in _COMPILED:
        mask = pc.fisher_mask(nn.call, model, x) if algorithm == "pc_natgrad" else None
        optimizer = optimizer_for(algorithm, task, total, mask)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = step_for(algorithm, task, output_node(model), optimizer)
        start = time.perf_counter()
        compiled, memory = compile_step(step, model, opt_state, x, y)
        _COMPILED[key] = (compiled, optimizer, memory, time.perf_counter() - start)
    return _COMPILED[key]


def training_steps(task: Task, data) -> int:
    return len(data.x_train) // task.batch * task.epochs


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    predict = _predictor()
    hits = sum(
        int(jnp.sum(predict(model, x[i : i + batch]) == y[i : i + batch]))
        for i in range(0, len(x), batch)
    )
    return hits / len(x)


@functools.cache
def _predictor():
    return jax.jit(lambda m, x: jnp.argmax(nn.call(m, x), -1))


def time_steps(task: Task, data, algorithms, repeats: int) -> dict[str, dict[str, Any]]:
    """Median step time and peak memory of each algorithm (and the reference), interleaved."""
    model = build_model(task, data.x_train.shape[1:], jax.random.PRNGKey(0))
    x = jnp.asarray(inputs_for(model, data.x_train[: task.batch]))
    y = onehot_of(data.y_train[: task.batch])
    names = [*algorithms, "reference"] if "pc" in algorithms else list(algorithms)
    runs = {}
    for name in names:
        compiled, optimizer, peak, seconds = prepared_step(
            task, name, model, x, y, training_steps(task, data)
        )
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        carry = compiled(model, opt_state, x, y)[:2]
        jax.block_until_ready(carry)
        runs[name] = {"step": compiled, "carry": carry, "times": [], "peak": peak}
        runs[name]["compile_seconds"] = seconds
    for _ in range(repeats):
        for run in runs.values():
            start = time.perf_counter()
            *carry, _ = run["step"](*run["carry"], x, y)
            jax.block_until_ready(carry)
            run["times"].append(time.perf_counter() - start)
            run["carry"] = carry
    backprop = statistics.median(runs["backprop"]["times"]) if "backprop" in runs else None
    result = {}
    for name, run in runs.items():
        median = statistics.median(run["times"])
        result[name] = {
            "step_seconds": median,
            "x_backprop": median / backprop if backprop else None,
            "peak_memory_bytes": run["peak"],
            "compile_seconds": run["compile_seconds"],
        }
    if "reference" in result and "pc" in result:
        result["pc"]["x_reference"] = (
            result["pc"]["step_seconds"] / result["reference"]["step_seconds"]
        )
    return result


def train(task: Task, data, algorithm: str, seed: int) -> dict[str, Any]:
    """Train one model; test accuracy every `eval_every` steps; time to the target."""
    key = jax.random.PRNGKey(seed)
    model = build_model(task, data.x_train.shape[1:], key)
    output = output_node(model)
    x_train = inputs_for(model, data.x_train)
    x_test = inputs_for(model, data.x_test)
    per_epoch = len(x_train) // task.batch
    total = training_steps(task, data)
    onehot = onehot_of(data.y_train)
    step, optimizer, _, _ = prepared_step(
        task, algorithm, model, x_train[: task.batch], onehot[: task.batch], total
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(seed)
    curve, seconds, done, diverged = [], 0.0, 0, False
    while done < total and not diverged:
        order = rng.permutation(len(x_train))
        start = time.perf_counter()
        for i in range(per_epoch):
            index = order[i * task.batch : (i + 1) * task.batch]
            model, opt_state, bad = step(model, opt_state, x_train[index], onehot[index])
            done += 1
            if done % task.eval_every == 0 or i == per_epoch - 1:
                jax.block_until_ready(model)
                seconds += time.perf_counter() - start  # training time only, not evaluation
                if bool(bad):
                    diverged = True
                    break
                curve.append((done, seconds, accuracy(model, x_test, data.y_test)))
                start = time.perf_counter()
    reached = next(((s, t) for s, t, a in curve if a >= task.target), (None, None))
    result = {
        "seed": seed,
        "test_accuracy": curve[-1][2] if curve and not diverged else None,
        "diverged": diverged,
        "steps_to_target": reached[0],
        "seconds_to_target": reached[1],
        "curve": curve,
    }
    if algorithm != "backprop" and seed == 0 and not diverged:
        result["equilibrium_steps"] = equilibrium_steps(
            task, model, output, x_test[: task.batch], onehot_of(data.y_test[: task.batch]),
            fixed_predictions=algorithm == "fpa",
        )  # fmt: skip
    return result


def onehot_of(labels: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[labels]


def equilibrium_steps(task, model, output, x, y, *, fixed_predictions: bool) -> int | None:
    """State updates until every sample's state gradient falls to 1e-3 of the largest
    per-sample gradient norm at the feedforward pass (label clamped, the training state step),
    or None if not within 500. (`infer`'s `tol` is a bound on each sample's gradient norm.)"""
    observed = {output: jnp.asarray(y)}
    states = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != output}
    grads = jax.grad(lambda s: pc.energy(nn.call, model, {**s, **observed}, x))(states)
    per_sample = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in grads.values())
    tol = EQUILIBRIUM_RTOL * float(jnp.sqrt(jnp.max(per_sample)))
    _, info = pc.infer(
        nn.call,
        model,
        states,
        x,
        observed,
        steps=EQUILIBRIUM_MAX_STEPS,
        step_size=task.state_step,
        fixed_predictions=fixed_predictions,
        tol=tol,
    )
    steps = int(info.steps)
    return steps if steps < EQUILIBRIUM_MAX_STEPS else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
    steps = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    seconds = [r["seconds_to_target"] for r in runs if r["seconds_to_target"] is not None]
    equilibrium = [r.get("equilibrium_steps") for r in runs if "equilibrium_steps" in r]
    return {
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_std": float(np.std(accs)) if accs else None,
        "seeds": len(runs),
        "diverged": sum(r["diverged"] for r in runs),
        "reached_target": len(steps),
        "steps_to_target": float(np.median(steps)) if steps else None,
        "seconds_to_target": float(np.median(seconds)) if seconds else None,
        "equilibrium_steps": equilibrium[0] if equilibrium else None,
    }


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Device: {report['device']}; jax {report['jax']}; {report['date']}; "
        f"mode: {report['mode']}; seeds: {report['seeds']}.",
        "",
        "| task | algorithm | test accuracy | step time | x backprop | steps to target "
        "| seconds to target | inference steps to equilibrium | step peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task_name, task in report["tasks"].items():
        for algorithm, timing in task["timing"].items():
            summary = task.get("training", {}).get(algorithm)
            accuracy = "-"
            to_target = seconds = equilibrium = "-"
            if summary is not None:
                if summary["accuracy_mean"] is not None:
                    accuracy = f"{summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}"
                if summary["diverged"]:
                    accuracy += f" ({summary['diverged']} diverged)"
                reached = f" ({summary['reached_target']}/{summary['seeds']})"
                to_target = _fmt(summary["steps_to_target"], ".0f", "not reached") + reached
                seconds = _fmt(summary["seconds_to_target"], ".1f", "-")
                equilibrium = _fmt(summary["equilibrium_steps"], "d", "-")
                if summary["equilibrium_steps"] is None and algorithm != "backprop":
                    equilibrium = f"> {EQUILIBRIUM_MAX_STEPS}"
            memory = timing["peak_memory_bytes"]
            ratio = _fmt(timing["x_backprop"], ".2f")
            if "x_reference" in timing:
                ratio += f" ({timing['x_reference']:.3f} x reference)"
            lines.append(
                f"| {task_name} (target {task['target']:.2f}) | {algorithm} | {accuracy} "
                f"| {1e3 * timing['step_seconds']:.2f} ms | {ratio} | {to_target} | {seconds} "
                f"| {equilibrium} | {_fmt(memory and memory / 2**20, '.1f')} MiB |"
            )
    for peer in report.get("peers", []):
        if peer.get("error"):
            lines.append(f"| mlp_mnist | {peer['name']} | unavailable: {peer['error']} |||||||")
            continue
        lines.append(
            f"| mlp_mnist | {peer['name']} {peer.get('version', '')} (own venv, jax "
            f"{peer.get('jax', '?')}) | {_fmt(peer.get('test_accuracy'), '.4f')} "
            f"| {1e3 * peer['step_seconds']:.2f} ms | {peer['x_backprop']:.2f} (its own "
            f"backprop: {1e3 * peer['backprop_step_seconds']:.2f} ms) | - | - | - | - |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, 1 epoch, 2 seeds")
    parser.add_argument("--speed-only", action="store_true", help="step times and memory only")
    parser.add_argument("--data-dir", help="MNIST directory (default $PCJAX_DATA_DIR)")
    parser.add_argument("--cifar-dir", help="directory with cifar-10-batches-py (else synthetic)")
    parser.add_argument("--tasks", default=",".join(["mlp_mnist", "cnn_mnist", "vgg5_cifar"]))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--seeds", type=int, help="default 2 (quick) or 3")
    parser.add_argument("--repeats", type=int, help="timed calls per algorithm (default 10/30)")
    parser.add_argument("--max-steps", type=int, help="cap the training steps per run")
    parser.add_argument("--peers", default="pcx", help="comma-separated peers, or 'none'")
    parser.add_argument("--peer-venvs", default=str(peers.DEFAULT_VENV_ROOT))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    all_tasks = tasks_for(args.quick)
    task_names = args.tasks.split(",")
    algorithms = args.algorithms.split(",")
    for name in task_names:
        if name not in all_tasks:
            parser.error(f"unknown task {name!r}; choose from {list(all_tasks)}")
    for name in algorithms:
        if name not in ALGORITHMS:
            parser.error(f"unknown algorithm {name!r}; choose from {list(ALGORITHMS)}")
    if "backprop" not in algorithms:
        algorithms.insert(0, "backprop")  # every time is also a ratio to backprop
    seeds = args.seeds or (2 if args.quick else 3)
    repeats = args.repeats or (10 if args.quick else 30)
    mode = "speed" if args.speed_only else "quick" if args.quick else "full"
    report = {
        "mode": mode,
        "date": datetime.date.today().isoformat(),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, "
        f"{jax.device_count()} device(s)); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "jax": jax.__version__,
        "seeds": 0 if args.speed_only else seeds,
        "tasks": {},
    }
    started = time.perf_counter()
    for name in task_names:
        task = all_tasks[name]
        if args.max_steps is not None:
            task = dataclasses.replace(task, eval_every=min(task.eval_every, args.max_steps))
        data = load_data(task, args.data_dir, args.cifar_dir, args.max_steps)
        print(f"{name}: {task.description} on {data.name} ({len(data.x_train)} train)", flush=True)
        entry = {
            "description": task.description,
            "data": data.name,
            "target": task.target,
            "config": dataclasses.asdict(task),
            "timing": time_steps(task, data, algorithms, repeats),
        }
        for algorithm, timing in entry["timing"].items():
            print(
                f"  {algorithm:>10}: {1e3 * timing['step_seconds']:8.2f} ms/step "
                f"(x backprop {_fmt(timing['x_backprop'], '.2f')})",
                flush=True,
            )
        if not args.speed_only:
            entry["runs"], entry["training"] = {}, {}
            for algorithm in algorithms:
                runs = [train(task, data, algorithm, seed) for seed in range(seeds)]
                entry["runs"][algorithm] = runs
                entry["training"][algorithm] = summary = summarise(runs)
                print(
                    f"  {algorithm:>10}: test {_fmt(summary['accuracy_mean'], '.4f')} ± "
                    f"{_fmt(summary['accuracy_std'], '.4f')}, steps to {task.target}: "
                    f"{_fmt(summary['steps_to_target'], '.0f')}, equilibrium: "
                    f"{summary['equilibrium_steps']}",
                    flush=True,
                )
        report["tasks"][name] = entry
    if args.peers != "none" and "mlp_mnist" in task_names:
        task = all_tasks["mlp_mnist"]
        data = load_data(task, args.data_dir, args.cifar_dir, args.max_steps)
        report["peers"] = [
            peers.run_peer(name, task, data, Path(args.peer_venvs), repeats, args.speed_only)
            for name in args.peers.split(",")
        ]
    report["total_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / {"full": "suite", "quick": "suite-quick", "speed": "suite-speed"}[mode]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
