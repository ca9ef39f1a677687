"""The benchmark harness: every timing and every result file of `benchmarks/` goes through here.

Rules, the same for every experiment:

1. **Compile first.** `compile_step` lowers and compiles a step ahead of time
   (`jax.jit(fn).lower(...).compile()`), so compilation is never timed, and reports the compile
   seconds and XLA's memory estimate of one call.
2. **Interleave the compared runs.** `interleave` calls every run once per round (the order
   rotating from round to round), so that all of them see the same machine load.
3. **Block.** Each timed call ends with `jax.block_until_ready` on what it returned.
4. **Median of repeats.** `summary` reports the median (and min, max, count) of the per-call
   times; ratios are ratios of medians measured in the same process (`ratio`).
5. **Peak memory where available.** XLA's buffer assignment of one compiled call (arguments +
   outputs + temporaries - aliased), and the device's own peak (`memory_stats`, GPU/TPU only);
   also XLA's cost analysis (flops, bytes accessed), a measure of work that the machine's load
   does not disturb.
6. **JSON out.** `write_result` writes `{"experiment", "environment", "config", "results",
   "seconds"}`; `environment()` records the jax/jaxlib versions, device, host and load.
   `benchmarks/report.py` renders the README's tables from these files.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# ---------------------------------------------------------------------------------------------
# Compilation and memory


class Compiled(NamedTuple):
    """A compiled step, the seconds its compilation took, XLA's memory estimate of a call
    (bytes) and XLA's cost analysis of it (flops, bytes accessed); None where the backend
    reports none. The cost analysis does not depend on the machine's load: equal work shows
    as equal flops."""

    call: Callable[..., Any]
    compile_seconds: float
    memory_bytes: int | None
    flops: float | None = None
    bytes_accessed: float | None = None


def compiled_memory(compiled: Any) -> int | None:
    """XLA's buffer assignment of one call: arguments + outputs + temporaries - aliased."""
    try:
        memory = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if memory is None:
        return None
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes
    return int(total + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def compiled_cost(compiled: Any) -> tuple[float | None, float | None]:
    """XLA's cost analysis of one call: (flops, bytes accessed)."""
    try:
        cost = compiled.cost_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None, None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None, None
    return cost.get("flops"), cost.get("bytes accessed")


def compile_step(fn: Callable[..., Any], *args: Any) -> Compiled:
    """`jax.jit(fn)` lowered and compiled for `args` (every argument a pytree of arrays, or an
    equinox module whose non-array fields are static)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    return Compiled(compiled, seconds, compiled_memory(compiled), *compiled_cost(compiled))


def device_peak_memory(device: Any = None) -> int | None:
    """The device's peak bytes in use so far (GPU/TPU), or None where not reported (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


# ---------------------------------------------------------------------------------------------
# Timing


class Loop:
    """A step called on its own output: `step(*carry, *args)`, keeping the first `keep`
    outputs as the next carry. Calling the loop makes one step and returns the new carry."""

    def __init__(
        self,
        step: Callable[..., Any],
        carry: Sequence[Any],
        args: Sequence[Any] = (),
        keep: int | None = None,
    ):
        self.step, self.carry, self.args = step, tuple(carry), tuple(args)
        self.keep = len(self.carry) if keep is None else keep

    def __call__(self) -> Any:
        out = self.step(*self.carry, *self.args)
        self.carry = tuple(out[: self.keep])
        return self.carry


def interleave(
    calls: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    start: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each of `repeats` calls of every `name -> call()`, interleaved.

    Every call's result is passed to `jax.block_until_ready` inside the timed interval. Each
    round calls every run once, starting one run later than the previous round (so no run is
    always first after the previous round's last; `start` offsets the rotation). `warmup`
    untimed rounds come first (compile with `compile_step` before: a warm-up round is not
    meant to absorb compilation)."""
    if repeats < 1:
        raise ValueError(f"interleave: `repeats` must be at least 1, got {repeats}.")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            jax.block_until_ready(calls[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = (start + r) % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            began = clock()
            jax.block_until_ready(calls[name]())
            times[name].append(clock() - began)
    return times


def repeats_for(
    calls: Mapping[str, Callable[[], Any]],
    minimum: int,
    budget_seconds: float,
    maximum: int = 1000,
) -> int:
    """How many interleaved rounds to time: at least `minimum`, more when one round of
    `calls` (each timed once here, after a warm-up call) takes less than `budget_seconds` /
    `minimum`, up to `maximum` rounds. Short steps need many calls for a stable median."""
    for call in calls.values():
        jax.block_until_ready(call())
    began = time.perf_counter()
    for call in calls.values():
        jax.block_until_ready(call())
    per_call = (time.perf_counter() - began) / max(len(calls), 1)
    wanted = int(budget_seconds / per_call) if per_call > 0 else maximum
    return max(minimum, min(maximum, wanted))


def summary(times: Sequence[float]) -> dict[str, float | int]:
    """Median, min and max seconds of repeated calls, and their count."""
    if not times:
        raise ValueError("summary: no times")
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def ratio(numerator: Mapping[str, Any], denominator: Mapping[str, Any]) -> float:
    """The ratio of two `summary` medians."""
    return numerator["median_s"] / denominator["median_s"]


def time_to_target(
    step: Callable[..., Any],
    params: Any,
    opt_state: Any,
    train: tuple[np.ndarray, np.ndarray],
    evaluate: Callable[[Any], float],
    *,
    batch: int,
    epochs: int,
    target: float,
    checks_per_epoch: int = 4,
    stop_at_target: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Train `step(params, opt_state, x, y) -> (params, opt_state)` for `epochs` epochs of
    shuffled batches (the order fixed by `seed`) and evaluate `evaluate(params)` (a test
    accuracy) `checks_per_epoch` times an epoch.

    Returns the steps and training seconds (evaluation excluded, `block_until_ready` after
    every step) until the accuracy first reached `target` (None if never), the accuracy then,
    the best and the final accuracy (the one at the last check, if `stop_at_target` cut the
    run short)."""
    x_train, y_train = train
    rng = np.random.default_rng(seed)
    per_epoch = len(x_train) // batch
    check_every = max(per_epoch // checks_per_epoch, 1)
    steps, elapsed, best, accuracy = 0, 0.0, 0.0, 0.0
    reached: dict[str, Any] = {"steps": None, "seconds": None, "accuracy": None}
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(per_epoch):
            index = order[i * batch : (i + 1) * batch]
            start = time.perf_counter()
            params, opt_state = step(params, opt_state, x_train[index], y_train[index])
            jax.block_until_ready(params)
            elapsed += time.perf_counter() - start
            steps += 1
            if steps % check_every == 0 or (i == per_epoch - 1):
                accuracy = float(evaluate(params))
                best = max(best, accuracy)
                if accuracy >= target and reached["steps"] is None:
                    reached = {"steps": steps, "seconds": elapsed, "accuracy": accuracy}
                    if stop_at_target:
                        return {**reached, "best": best, "final": accuracy}
    return {**reached, "best": best, "final": accuracy, "total_seconds": elapsed}


def time_once(call: Callable[[], Any]) -> tuple[Any, float]:
    """`(result, seconds)` of one blocking call (compilation times, whole training runs)."""
    start = time.perf_counter()
    result = jax.block_until_ready(call())
    return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Environment and result files


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment() -> dict[str, Any]:
    """What a result depends on besides its config: versions, device, host, load, date."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", None),
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "load_average": load_average(),  # 1, 5, 15 minutes, at the start of the run
        "date": datetime.date.today().isoformat(),
    }


def describe(env: Mapping[str, Any]) -> str:
    """One line for a table caption."""
    load = env.get("load_average")
    load_text = f"; load {load[0]:.2f}" if load else ""
    return (
        f"{env['device']} ({env['backend']}, {env['device_count']} device(s)); {env['host']}"
        f"{load_text}; jax {env['jax']}; {env['date']}"
    )


def result_document(
    experiment: str,
    config: Mapping[str, Any],
    results: Any,
    seconds: float | None = None,
    env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "environment": dict(env) if env is not None else environment(),
        "config": dict(config),
        "results": results,
        "seconds": seconds,
    }


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_result(path: str | os.PathLike, document: Mapping[str, Any]) -> Path:
    """Write a result document as JSON (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=_jsonable) + "\n")
    return path


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def log(*parts: Any) -> None:
    """Progress output."""
    print(*parts, flush=True)
