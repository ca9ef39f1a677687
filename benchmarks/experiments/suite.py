"""The suite: every task x algorithm of `tasks.py` (and the peers), speed and training.

    python benchmarks/run.py suite --quick [--data-dir DIR] [--cifar-dir DIR]
    python benchmarks/run.py suite                  # full size (hours on a CPU)
    python benchmarks/run.py suite --speed-only     # step times and memory only (gpu.sh)

Per task and algorithm: median step time (all algorithms of a task compiled first, then timed
interleaved in this process) and its ratio to backprop's (PC's also to the reference's), XLA's
memory estimate of one step, test accuracy (mean +- std over seeds), steps and training seconds
(evaluation excluded) to the task's target accuracy, and inference steps to equilibrium (state
updates, training state step, label clamped, a test batch, seed 0, until every sample's state
gradient is at most 1e-3 of the largest at the feedforward pass; None if not within 500).
Peers: energy-checked against pcjax, then timed against their own backprop (`peers.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import data as bdata
import harness
import jax
import jax.numpy as jnp
import models
import numpy as np
import peers
import tasks

import pcjax as pc
from pcjax import nn

EQUILIBRIUM_MAX_STEPS = 500
EQUILIBRIUM_RTOL = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small models, 1 epoch, 2 seeds")
    parser.add_argument("--speed-only", action="store_true", help="step times and memory only")
    parser.add_argument("--data-dir", help=f"MNIST directory (default ${bdata.DATA_ENV})")
    parser.add_argument("--cifar-dir", help="directory with cifar-10-batches-py (else synthetic)")
    parser.add_argument("--tasks", default=",".join(tasks.TASK_NAMES))
    parser.add_argument("--algorithms", default=",".join(tasks.ALGORITHMS))
    parser.add_argument("--seeds", type=int, help="default 2 (quick) or 3")
    parser.add_argument("--repeats", type=int, help="timed calls per algorithm (default 10/30)")
    parser.add_argument("--max-steps", type=int, help="cap the training steps per run")
    parser.add_argument("--peers", default="pcx,fabricpc", help="comma-separated, or 'none'")
    parser.add_argument("--peer-venvs", default=str(peers.DEFAULT_VENV_ROOT))
    parser.add_argument(
        "--energy-rtol",
        type=float,
        default=peers.DEFAULT_RTOL,
        help="relative tolerance of the peers' energy check",
    )


def mode(args: argparse.Namespace) -> str:
    return "speed" if args.speed_only else "quick" if args.quick else "full"


def default_out(args: argparse.Namespace) -> Path:
    stem = {"full": "suite", "quick": "suite-quick", "speed": "suite-speed"}[mode(args)]
    return harness.RESULTS / f"{stem}.json"


def load_task_data(task: tasks.Task, args, max_steps: int | None) -> bdata.Dataset:
    data = bdata.load(
        task.data, data_dir=args.data_dir, cifar_dir=args.cifar_dir, train_subset=task.train_subset
    )
    if max_steps is not None:  # only as many training images as that many batches
        n = min(len(data.x_train), max_steps * task.batch)
        data = data._replace(x_train=data.x_train[:n], y_train=data.y_train[:n])
    return data


def training_steps(task: tasks.Task, data: bdata.Dataset) -> int:
    return len(data.x_train) // task.batch * task.epochs


class Steps:
    """Each task x algorithm step compiled once, shared by the timing and every seed's run."""

    def __init__(self):
        self.cache: dict[tuple, tuple] = {}

    def get(self, task, algorithm, model, x, y, total):
        key = (task, algorithm, total)
        if key not in self.cache:
            step, optimizer, opt_state = tasks.build(algorithm, task, model, x, total)
            self.cache[key] = (harness.compile_step(step, model, opt_state, x, y), optimizer)
        return self.cache[key]


def time_steps(task, data, algorithms, repeats, steps: Steps) -> dict[str, dict[str, Any]]:
    """Median step time and memory of each algorithm, compiled first, calls interleaved."""
    model = models.network(
        data.x_train.shape[1:], task.channels, task.hidden, jax.random.PRNGKey(0)
    )
    x = jnp.asarray(models.inputs_for(model, data.x_train[: task.batch]))
    y = jnp.asarray(bdata.onehot(data.y_train[: task.batch]))
    loops, compiled = {}, {}
    for name in algorithms:
        params = tasks.ALGORITHMS[name].params(model, jax.random.PRNGKey(1))
        compiled[name], optimizer = steps.get(task, name, params, x, y, training_steps(task, data))
        opt_state = optimizer.init(models.trainable(params))
        loops[name] = harness.Loop(compiled[name].call, (params, opt_state), (x, y))
    times = harness.interleave(loops, repeats)
    result = {}
    for name in algorithms:
        stats = harness.summary(times[name])
        result[name] = {
            "step_seconds": stats["median_s"],
            "times": stats,
            "peak_memory_bytes": compiled[name].memory_bytes,
            "flops": compiled[name].flops,
            "compile_seconds": compiled[name].compile_seconds,
        }
    for name in algorithms:
        if "backprop" in result:
            result[name]["x_backprop"] = harness.ratio(
                result[name]["times"], result["backprop"]["times"]
            )
    if "pc" in result and "reference" in result:
        result["pc"]["x_reference"] = harness.ratio(
            result["pc"]["times"], result["reference"]["times"]
        )
        if result["pc"]["flops"] and result["reference"]["flops"]:
            result["pc"]["flops_x_reference"] = result["pc"]["flops"] / result["reference"]["flops"]
    return result


@functools.cache
def _predictor():
    return jax.jit(lambda m, x: jnp.argmax(nn.call(m, x), -1))


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    predict = _predictor()
    hits = sum(
        int(jnp.sum(predict(model, x[i : i + batch]) == y[i : i + batch]))
        for i in range(0, len(x), batch)
    )
    return hits / len(x)


def train(task, data, algorithm: str, seed: int, steps: Steps) -> dict[str, Any]:
    """Train one model; test accuracy every `eval_every` steps; time to the target."""
    model = models.network(
        data.x_train.shape[1:], task.channels, task.hidden, jax.random.PRNGKey(seed)
    )
    params = tasks.ALGORITHMS[algorithm].params(model, jax.random.PRNGKey(1000 + seed))
    x_train = models.inputs_for(model, data.x_train)
    x_test = models.inputs_for(model, data.x_test)
    per_epoch = len(x_train) // task.batch
    total = training_steps(task, data)
    onehot = bdata.onehot(data.y_train)
    compiled, optimizer = steps.get(
        task,
        algorithm,
        params,
        jnp.asarray(x_train[: task.batch]),
        jnp.asarray(onehot[: task.batch]),
        total,
    )
    step = compiled.call
    opt_state = optimizer.init(models.trainable(params))
    rng = np.random.default_rng(seed)
    curve, seconds, done, diverged = [], 0.0, 0, False
    while done < total and not diverged:
        order = rng.permutation(len(x_train))
        start = time.perf_counter()
        for i in range(per_epoch):
            index = order[i * task.batch : (i + 1) * task.batch]
            params, opt_state = step(params, opt_state, x_train[index], onehot[index])
            done += 1
            if done % task.eval_every == 0 or i == per_epoch - 1:
                jax.block_until_ready(params)
                seconds += time.perf_counter() - start  # training time only, not evaluation
                if not finite(params):
                    diverged = True
                    break
                network = tasks.network_of(params)
                curve.append((done, seconds, accuracy(network, x_test, data.y_test)))
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
        y = bdata.onehot(data.y_test[: task.batch])
        result["equilibrium_steps"] = equilibrium_steps(
            task, params, x_test[: task.batch], y, tasks.ALGORITHMS[algorithm]
        )
    return result


def finite(model) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(models.trainable(model))
    )


def equilibrium_steps(task, params, x, y, algorithm: tasks.Algorithm) -> int | None:
    """Updates of the algorithm's inference variables (states; ePC: errors) until every
    sample's field falls to 1e-3 of the largest per-sample field norm at the start (the
    feedforward pass, or the amortiser's proposal; label clamped, the training state step), or
    None if not within 500."""
    output = models.output_node(tasks.network_of(params))
    observed = {output: jnp.asarray(y)}
    fn = algorithm.network
    if algorithm.start is not None:
        states = algorithm.start(params, x)
    else:
        states = pc.forward_init(algorithm.forward, params, x)
        states = {k: v for k, v in states.items() if k != output}
    # tol = inf: no update; the report is the field at the start.
    at_start = pc.GradientDescent(1, step_size=task.state_step, tol=float("inf"))
    _, start = pc.infer(fn, params, states, x, observed, solver=at_start)
    tol = EQUILIBRIUM_RTOL * float(start.grad_norm)
    solver = pc.GradientDescent(EQUILIBRIUM_MAX_STEPS, step_size=task.state_step, tol=tol)
    _, info = pc.infer(fn, params, states, x, observed, solver=solver)
    count = int(info.steps)
    return count if count < EQUILIBRIUM_MAX_STEPS else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
    to_target = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    seconds = [r["seconds_to_target"] for r in runs if r["seconds_to_target"] is not None]
    equilibrium = [r.get("equilibrium_steps") for r in runs if "equilibrium_steps" in r]
    return {
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_std": float(np.std(accs)) if accs else None,
        "seeds": len(runs),
        "diverged": sum(r["diverged"] for r in runs),
        "reached_target": len(to_target),
        "steps_to_target": float(np.median(to_target)) if to_target else None,
        "seconds_to_target": float(np.median(seconds)) if seconds else None,
        "equilibrium_steps": equilibrium[0] if equilibrium else None,
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    all_tasks = tasks.tasks(args.quick)
    task_names = args.tasks.split(",")
    algorithms = args.algorithms.split(",")
    for name in task_names:
        if name not in all_tasks:
            raise SystemExit(f"unknown task {name!r}; choose from {list(all_tasks)}")
    for name in algorithms:
        if name not in tasks.ALGORITHMS:
            raise SystemExit(f"unknown algorithm {name!r}; choose from {list(tasks.ALGORITHMS)}")
    if "backprop" not in algorithms:
        algorithms.insert(0, "backprop")  # every time is also a ratio to backprop
    seeds = args.seeds or (2 if args.quick else 3)
    repeats = args.repeats or (10 if args.quick else 30)
    peer_names = [] if args.peers == "none" else args.peers.split(",")
    config = {
        "mode": mode(args),
        "tasks": task_names,
        "algorithms": algorithms,
        "seeds": 0 if args.speed_only else seeds,
        "repeats": repeats,
        "max_steps": args.max_steps,
        "peers": peer_names,
        "energy_rtol": args.energy_rtol,
        "equilibrium": {"max_steps": EQUILIBRIUM_MAX_STEPS, "rtol": EQUILIBRIUM_RTOL},
    }
    results: dict[str, Any] = {"tasks": {}, "peers": []}
    steps = Steps()
    for name in task_names:
        task = all_tasks[name]
        if args.max_steps is not None:
            task = dataclasses.replace(task, eval_every=min(task.eval_every, args.max_steps))
        data = load_task_data(task, args, args.max_steps)
        applicable = [a for a in algorithms if task.kind in tasks.ALGORITHMS[a].kinds]
        harness.log(f"{name}: {task.description} on {data.name} ({len(data.x_train)} train)")
        entry = {
            "description": task.description,
            "data": data.name,
            "target": task.target,
            "config": dataclasses.asdict(task),
            "timing": time_steps(task, data, applicable, repeats, steps),
            # the device's peak so far in this process (GPU/TPU; None on a CPU)
            "device_peak_memory_bytes": harness.device_peak_memory(),
        }
        for algorithm, timing in entry["timing"].items():
            harness.log(
                f"  {algorithm:>10}: {1e3 * timing['step_seconds']:8.2f} ms/step "
                f"(x backprop {timing.get('x_backprop', float('nan')):.2f})"
            )
        if not args.speed_only:
            entry["runs"], entry["training"] = {}, {}
            for algorithm in applicable:
                if not tasks.ALGORITHMS[algorithm].trained:
                    continue
                runs = [train(task, data, algorithm, seed, steps) for seed in range(seeds)]
                entry["runs"][algorithm] = runs
                entry["training"][algorithm] = summary = summarise(runs)
                harness.log(
                    f"  {algorithm:>10}: test {summary['accuracy_mean']}, steps to "
                    f"{task.target}: {summary['steps_to_target']}, equilibrium: "
                    f"{summary['equilibrium_steps']}"
                )
        results["tasks"][name] = entry
        for peer in peer_names:
            if peer in peers.PEERS and task.kind not in peers.PEERS[peer].kinds:
                continue  # the peer does not implement this network
            results["peers"].append(
                peers.run_peer(
                    peer,
                    task,
                    data,
                    Path(args.peer_venvs),
                    repeats,
                    args.speed_only,
                    args.energy_rtol,
                )
            )
    return config, results
