"""The target table: gradient evaluations and wall time to the equilibrium certificate.

    python benchmarks/run.py equilibrium-targets [--quick] [--cases mlp,cnn,resnet,stiff]
        [--points init,trained] [--solvers NAME,...] [--cap N] [--repeats 5] [--batch 64]
        [--data-dir DIR]

For each case and each inference solver (`SOLVERS`, one entry a row), on one fixed batch, at
the initialisation and at a partly trained point (`TRAIN_STEPS` Adam steps of backprop on the
case's loss), from the feedforward states:

- **gradient evaluations to the certificate**: the fewest the solver needs until
  `InferInfo.relative_grad_norm` $= \\max_n \\lVert g_n(x) \\rVert / \\lVert g_n(x_0) \\rVert
  \\le 10^{-3}$ ($g = \\partial F / \\partial x$, $n$ the samples), counted as
  `InferInfo.evaluations` counts them (the caller's final evaluation included), except that a
  Hessian-vector product (a JVP of the gradient: a JVP/VJP pair) counts 2, not 1; or "not
  reached within `--cap`" with the certificate there. Never extrapolated.
- **wall time to it**: a jitted `pc.infer` with exactly that budget, compilation excluded, the
  median of `--repeats` calls.
- for the non-smooth CNN (ReLU, max pooling; the field need not vanish at a minimum), also
  the learning-signal gap `pc.equilibrium_gap(...).gap` (and its energy gap) at the budget
  used, against `REFERENCE` relaxed further from the solver's states, and the same for the
  suite's own budget (`suite_budget`).

**How the budget is found.** Solvers with a fixed iteration count are run once, instrumented,
at the cap: a wrapper (`Recorded`) reports every field evaluation's energy and per-sample field
norms to the host (`jax.debug.callback`), and `trace` maps them to the iterates (gradient
descent: every evaluation is one; `Backtracking`: the accepted proposals, matched to
`record_energy`'s energies; `ConjugateGradient`: the start of each Newton round). The smallest
iteration count whose iterate is certified is then run again, uninstrumented: that run's
`InferInfo` gives the row's numbers (if it does not certify, e.g. by rounding, the next counts
are tried). A solver without a trace (e.g. a new one) is searched on a doubling ladder of
budgets and bisected; `ODE` stops itself on an absolute `tol` set to $10^{-3} \\min_n \\lVert
g_n(x_0) \\rVert$ (sufficient for the certificate, so it may stop later than needed).

The goal (issue 28, item 3): every case within 50 gradient evaluations. The table
(`report.render_equilibrium_targets`) says which rows meet it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import data as bdata
import equinox as eqx
import harness
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax

import pcjax as pc
from pcjax import nn
from pcjax._solvers import AbstractSolver, per_sample_norms, resolve_sample_axes

TARGET = 1e-3  # the certificate: relative per-sample field norm
GOAL = 50  # gradient evaluations: issue 28's goal for every case
TRAIN_STEPS = {"mlp": 200, "cnn": 100, "resnet": 100, "stiff": 300}
#: The learning-signal reference for the CNN: relaxed further from each solver's states.
REFERENCE_STEPS = 400
CASES = ("mlp", "cnn", "resnet", "stiff")
POINTS = ("init", "trained")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--points", default=",".join(POINTS), help="init, trained or both")
    parser.add_argument("--solvers", help="comma-separated row names (default: all)")
    parser.add_argument("--cap", type=int, help="most gradient evaluations (default 500)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    parser.add_argument("--batch", type=int, help="the fixed batch (default 64; quick 8)")
    parser.add_argument("--data-dir", help="MNIST directory (default $PCJAX_DATA)")


def default_out(args: argparse.Namespace) -> Path:
    suffix = "-quick" if args.quick else ""
    return harness.RESULTS / f"equilibrium_targets{suffix}.json"


# ---------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One inference problem: a tagged `fn(params, x)`, its parameters at a point, a fixed batch
    (`x`, the clamped output `y` of node `output`), the node precisions, and the state step of
    plain gradient descent in the suite (`step`) with the suite's own solver (`baseline`) and
    budget (`suite_budget` iterations)."""

    name: str
    description: str
    fn: Callable[..., Any]
    params: Any
    x: jax.Array
    y: jax.Array
    output: str
    precision: dict[str, Any] | None
    step: float
    baseline: str
    suite_budget: int
    smooth: bool = True

    @property
    def observed(self) -> dict[str, jax.Array]:
        return {self.output: self.y}

    def start(self) -> dict[str, jax.Array]:
        """The feedforward states of the free nodes (the usual start of inference)."""
        values = pc.forward_init(self.fn, self.params, self.x)
        return {k: v for k, v in values.items() if k != self.output}

    def at(self, params: Any) -> Case:
        return dataclasses.replace(self, params=params)


def mnist_batches(args, quick: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """MNIST training images (28 x 28 x 1, in [0, 1]) and one-hot labels, and the data name."""
    mnist = bdata.mnist(args.data_dir, fallback=True)
    images = np.asarray(mnist.x_train, np.float32).reshape(-1, 28, 28, 1)
    labels = bdata.onehot(mnist.y_train)
    return images, labels, mnist.name


def make_cases(args, quick: bool) -> tuple[dict[str, Case], dict[str, Callable], str]:
    """The cases at initialisation and, per case, `trainer(case) -> case at a trained point`."""
    batch = args.batch or (8 if quick else 64)
    images, labels, data_name = mnist_batches(args, quick)
    rng = np.random.default_rng(0)
    index = rng.permutation(len(images))[:batch]
    x_img, y_img = jnp.asarray(images[index]), jnp.asarray(labels[index])
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = (256, 256) if quick else (1024, 1024)
    mlp = nn.MLP([784, *hidden, 10], key=keys[0])
    channels, dense = ((8, 16), (64,)) if quick else ((32, 64), (128,))
    cnn = nn.VGG(1, channels, dense, 10, 28, key=keys[1])
    width, depth = (16, 8) if quick else (128, 128)
    resnet = nn.ResidualMLP(784, width, depth, 10, key=keys[2], parameterisation="mupc")
    stiff_x, stiff_y, stiff_data = regression_r1(batch, 2000)
    stiff_params = models.init_tanh_mlp([10, 64, 64, 8], np.random.default_rng(1))
    flat = x_img.reshape(batch, -1)
    cases = {
        "mlp": Case(
            "mlp",
            f"suite MLP 784-{hidden[0]}-{hidden[1]}-10 (GELU)",
            nn.call,
            mlp,
            flat,
            y_img,
            models.output_node(mlp),
            None,
            0.1,
            "sgd",
            8,
        ),
        "cnn": Case(
            "cnn",
            f"suite CNN conv {','.join(map(str, channels))} + dense {dense[0]} (ReLU, max pool)",
            nn.call,
            cnn,
            x_img,
            y_img,
            models.output_node(cnn),
            None,
            0.05,
            "sgd",
            8,
            smooth=False,
        ),
        "resnet": Case(
            "resnet",
            f"muPC ResidualMLP width {width}, {depth} blocks, output precision 0.01",
            nn.call,
            resnet,
            flat,
            y_img,
            "out",
            {"out": jnp.asarray(0.01, jnp.float32)},
            0.6,
            "heavy-ball",
            640,
        ),
        "stiff": Case(
            "stiff",
            "tanh MLP 10-64-64-8 on R1, output precisions 100 and 1/9 (ratio 900)",
            models.tanh_mlp,
            stiff_params,
            stiff_x[:batch],
            stiff_y[:batch],
            "h2",
            {"h2": pc.DiagonalPrecision(R1_PRECISION)},
            0.1,
            "sgd",
            100,
        ),
    }
    image_train = (images, labels)
    trainers = {
        "mlp": lambda case: trained(case, image_train, flat_images=True),
        "cnn": lambda case: trained(case, image_train, flat_images=False),
        "resnet": lambda case: trained(case, image_train, flat_images=True),
        "stiff": lambda case: trained(case, stiff_data, flat_images=False),
    }
    return cases, trainers, data_name


#: R1's output noise: sigma 0.1 on outputs 0-3, 3 on outputs 4-7; precisions 1 / sigma^2.
R1_PRECISION = jnp.asarray([100.0] * 4 + [1 / 9] * 4, jnp.float32)


def regression_r1(batch: int, n: int) -> tuple[jax.Array, jax.Array, tuple]:
    """The uncertainty notebook's R1 task: a random tanh teacher 10 -> 32 -> 8, standardised
    outputs, noise sigma 0.1 on outputs 0-3 and 3 on outputs 4-7. Returns the fixed batch
    (the first `batch` points) and `n` training pairs."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(10, 32)) / np.sqrt(10)
    w2 = rng.normal(size=(32, 8)) / np.sqrt(32)
    x = rng.normal(size=(n, 10))
    f = np.tanh(2 * x @ w1) @ w2
    f = (f - f.mean(0)) / f.std(0)
    sigma = np.where(np.arange(8) < 4, 0.1, 3.0)
    y = (f + sigma * rng.normal(size=f.shape)).astype(np.float32)
    x = x.astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y), (x, y)


def trained(case: Case, train: tuple[np.ndarray, np.ndarray], *, flat_images: bool) -> Case:
    """`case` after `TRAIN_STEPS[case.name]` Adam (1e-3) steps of backprop on its loss
    $\\tfrac12 \\sum P (y - f(x))^2$ over random training batches of its size (a partly
    trained point; the fixed batch may be among them)."""
    x_train, y_train = train
    precision = 1.0
    if case.precision is not None:
        p = case.precision[case.output]
        precision = p.values() if isinstance(p, pc.DiagonalPrecision) else p
    optimizer = optax.adam(1e-3)
    params = case.params
    opt_state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(params, opt_state, x, y):
        def loss(p):
            return 0.5 * jnp.sum(precision * (y - case.fn(p, x)) ** 2) / x.shape[0]

        grads = eqx.filter_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(params, eqx.is_array))
        return eqx.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(1)
    batch = case.x.shape[0]
    for _ in range(TRAIN_STEPS[case.name]):
        index = rng.integers(0, len(x_train), batch)
        x = x_train[index].reshape(batch, -1) if flat_images else x_train[index]
        params, opt_state = step(params, opt_state, jnp.asarray(x), jnp.asarray(y_train[index]))
    return case.at(params)


# ---------------------------------------------------------------------------------------------
# Solvers: one entry a row


class Recorded(AbstractSolver):
    """`inner` with every field evaluation's energy and per-sample field norms sent to `sink`
    (on the host, in order); the numbers `inner` computes are unchanged."""

    inner: AbstractSolver
    sink: Callable[[Any, Any], None] = eqx.field(static=True)
    tol: Any
    throw: bool = eqx.field(static=True)

    def __init__(self, inner: AbstractSolver, sink: Callable[[Any, Any], None]):
        self.inner, self.sink, self.tol, self.throw = inner, sink, inner.tol, inner.throw

    def uses_key(self) -> bool:
        return self.inner.uses_key()

    def run(self, field, states, *, key, sample_axes):
        layout = resolve_sample_axes(states, sample_axes)

        def recorded(x):
            value, grads = field(x)
            jax.debug.callback(self.sink, value, per_sample_norms(grads, layout), ordered=True)
            return value, grads

        return self.inner.run(recorded, states, key=key, sample_axes=sample_axes)


Stream = list[tuple[float, np.ndarray]]  # (energy, per-sample field norms) per evaluation


def certificate(norms: np.ndarray, start: np.ndarray) -> float:
    """$\\max_n \\lVert g_n \\rVert / \\lVert g_n(x_0) \\rVert$ (as `InferInfo` defines it)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        at_rest = np.where(norms > 0, np.inf, 0.0)  # a sample that started at equilibrium
        ratio = np.where(start > 0, norms / np.where(start > 0, start, 1), at_rest)
    return float(np.max(ratio)) if np.all(np.isfinite(norms)) else math.inf


def trace_iterates(stream: Stream, info: Any, size: int) -> list[tuple[int, float]]:
    """Gradient descent: evaluation `j` is at iterate `j`, the state after `j` updates."""
    start = stream[0][1]
    return [(j, certificate(n, start)) for j, (_, n) in enumerate(stream)]


def trace_rounds(stream: Stream, info: Any, size: int) -> list[tuple[int, float]]:
    """Newton-CG: evaluation `j` (a linearisation) is at the start of round `j`, after `j`
    rounds."""
    return trace_iterates(stream, info, size)


def trace_backtracking(stream: Stream, info: Any, size: int) -> list[tuple[int, float]]:
    """`Backtracking(record_energy=True)`: iterate `t+1` is the proposal of iteration `t` whose
    energy is `energies[t+1]` bit for bit (the accepted one), or iterate `t` when none of the
    iteration's proposals is (all rejected: the states stay)."""
    energies = [float(e) for e in np.asarray(info.energies)] + [float(info.energy)]
    start = stream[0][1]
    out = [(0, certificate(start, start))]
    current, cursor = stream[0][1], 0
    for t in range(size):
        target, found = energies[t + 1], None
        for j in range(cursor + 1, len(stream)):
            if stream[j][0] == target:
                found = j
                break
        if found is None:  # all proposals rejected (or the stream ended): the states stay
            if energies[t + 1] != energies[t]:
                break  # cannot place it: stop the trace here
        else:
            current, cursor = stream[found][1], found
        out.append((t + 1, certificate(current, start)))
    return out


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """One row of the table.

    - `make(case, size, start_norms)`: the solver with `size` iterations (steps, Newton rounds,
      most ODE steps); `start_norms` are the per-sample field norms at the start.
    - `size_for(cap)`: the size whose run makes at most about `cap` gradient evaluations.
    - `trace(stream, info, size)`: `(size, certificate)` of the iterates of one instrumented run
      at that size, or None: then the budget is searched on a ladder of runs.
    - `stops_itself`: the solver ends at the certificate by itself (one run at the cap).
    - `evaluations(info)`: gradient evaluations of a run (a JVP/VJP pair counts 2).
    """

    name: str
    make: Callable[[Case, int, np.ndarray], AbstractSolver]
    size_for: Callable[[int], int]
    trace: Callable[[Stream, Any, int], list[tuple[int, float]]] | None = None
    stops_itself: bool = False
    evaluations: Callable[[Any], int] = lambda info: int(info.evaluations)


def baseline_optimizer(case: Case) -> optax.GradientTransformation:
    """The suite's state optimizer of the case: plain SGD, or heavy ball 0.99 (the 128-block
    run that trained, `results/deep-pc-640.json`)."""
    if case.baseline == "heavy-ball":
        return optax.sgd(case.step, momentum=0.99)
    return optax.sgd(case.step)


CG_ITERATIONS = 10  # per Newton round
LS_CG = 10  # CG iterations per Gauss-Newton / Levenberg-Marquardt step
ODE_PER_STEP = 3  # Heun: two stages (FSAL: one new) + the steady-state check, about


def _cg_evaluations(info: Any) -> int:
    # InferInfo counts a Hessian-vector product as 1; it is a JVP of the gradient: count 2.
    return int(info.evaluations) + int(info.steps)


def _ode_tol(start_norms: np.ndarray) -> float:
    return float(TARGET * np.min(start_norms[start_norms > 0]))


SOLVERS: list[SolverSpec] = [
    SolverSpec(
        "GD (suite settings)",
        lambda case, n, s: pc.GradientDescent(n, baseline_optimizer(case)),
        lambda cap: cap - 1,
        trace_iterates,
    ),
    SolverSpec(
        "Backtracking (step 1)",
        lambda case, n, s: pc.Backtracking(n, step_size=1.0, record_energy=True),
        lambda cap: cap - 2,
        trace_backtracking,
    ),
    SolverSpec(
        "GD + momentum 0.9",
        lambda case, n, s: pc.GradientDescent(n, optax.sgd(case.step, momentum=0.9)),
        lambda cap: cap - 1,
        trace_iterates,
    ),
    SolverSpec(
        f"Newton-CG ({CG_ITERATIONS} per round, per sample)",
        lambda case, n, s: pc.ConjugateGradient(CG_ITERATIONS, newton_steps=n, per_sample=True),
        lambda cap: max((cap - 1) // (2 * CG_ITERATIONS + 1), 1),
        trace_rounds,
        evaluations=_cg_evaluations,
    ),
    SolverSpec(
        f"GaussNewton ({LS_CG} CG per step)",
        lambda case, n, s: pc.GaussNewton(n, cg_steps=LS_CG),
        lambda cap: max((cap - 2) // (2 * LS_CG + 4), 1),
    ),
    SolverSpec(
        f"LevenbergMarquardt ({LS_CG} CG per step)",
        lambda case, n, s: pc.LevenbergMarquardt(n, cg_steps=LS_CG),
        lambda cap: max((cap - 3) // (2 * LS_CG + 5), 1),
    ),
    SolverSpec(
        "ODE (Heun, dtmax 0.5)",
        lambda case, n, s: pc.ODE(tol=_ode_tol(s), max_steps=n),
        lambda cap: max(cap // ODE_PER_STEP, 1),
        stops_itself=True,
    ),
]


# ---------------------------------------------------------------------------------------------
# Measuring one row


def relax_fn(case: Case, solver: AbstractSolver) -> Callable:
    """A jitted `(params, states, x, observed) -> (states, info)` of `pc.infer` with `solver`."""

    @eqx.filter_jit
    def relax(params, states, x, observed):
        return pc.infer(
            case.fn, params, states, x, observed, solver=solver, precision=case.precision
        )

    return relax


def timed_run(case: Case, solver: AbstractSolver, repeats: int) -> tuple[Any, Any, dict]:
    """(states, info, time summary): compiled by a first call, then `repeats` timed calls."""
    relax = relax_fn(case, solver)
    args = (case.params, case.start(), case.x, case.observed)
    states, info = relax(*args)
    jax.block_until_ready(states)
    times = []
    for _ in range(repeats):
        _, seconds = harness.time_once(lambda: jax.block_until_ready(relax(*args)))
        times.append(seconds)
    return states, info, harness.summary(times)


def instrumented_run(case: Case, solver: AbstractSolver) -> tuple[Stream, Any, Any]:
    """(the evaluations' stream, states, info) of one run of `solver`, recorded."""
    stream: Stream = []

    def sink(value, norms):
        stream.append((float(value), np.asarray(norms, np.float64)))

    states, info = relax_fn(case, Recorded(solver, sink))(
        case.params, case.start(), case.x, case.observed
    )
    jax.block_until_ready(states)
    jax.effects_barrier()
    return stream, states, info


def info_summary(spec: SolverSpec, info: Any) -> dict[str, Any]:
    return {
        "evaluations": spec.evaluations(info),
        "certificate": float(info.relative_grad_norm),
        "diverged": bool(info.diverged),
        "energy_rose": bool(info.energy_rose),
        "energy": float(info.energy),
        "initial_energy": float(info.initial_energy),
    }


def measure(
    spec: SolverSpec, case: Case, cap: int, repeats: int, start_norms: np.ndarray
) -> dict[str, Any]:
    """The row: the smallest budget that certifies (`reached`), its uninstrumented run's
    numbers and time; or the certificate at the cap."""

    def make(size: int) -> AbstractSolver:
        return spec.make(case, size, start_norms)

    top = spec.size_for(cap)
    if spec.stops_itself:
        candidates, at_cap = [top], None
    elif spec.trace is not None:
        stream, states, info = instrumented_run(case, make(top))
        at_cap = info_summary(spec, info)
        iterates = spec.trace(stream, info, top)
        certified = [size for size, cert in iterates if size >= 1 and cert <= TARGET]
        if not certified and at_cap["certificate"] <= TARGET and not at_cap["diverged"]:
            certified = [top]  # only the final state (not in the stream) certifies
        if not certified:
            return {"reached": False, "cap": cap, "size": top, "at_cap": at_cap, "states": states}
        first = certified[0]
        candidates = [s for s in range(first, first + 3) if s <= top]
    else:
        candidates, at_cap = ladder(case, make, top), None
        if not candidates:
            candidates = [top]  # not certified at the cap: its run reports where it stands
    for size in candidates:
        states, info, times = timed_run(case, make(size), repeats)
        row = info_summary(spec, info)
        if row["certificate"] <= TARGET and not row["diverged"]:
            return {"reached": True, "size": size, **row, "time": times, "states": states}
    row = info_summary(spec, info)
    return {"reached": False, "cap": cap, "size": size, "at_cap": at_cap or row, "states": states}


def ladder(case: Case, make: Callable[[int], AbstractSolver], top: int) -> list[int]:
    """The smallest size on a doubling ladder (then bisected) whose run certifies, as a
    one-element list; empty if even `top` does not."""

    def certifies(size: int) -> bool:
        _, info = relax_fn(case, make(size))(case.params, case.start(), case.x, case.observed)
        return float(info.relative_grad_norm) <= TARGET and not bool(info.diverged)

    low, high = 0, 1
    while not certifies(high):
        if high >= top:
            return []
        low, high = high, min(2 * high, top)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if certifies(middle) else (middle, high)
    return [high]


def start_field_norms(case: Case) -> np.ndarray:
    """Each sample's field norm at the feedforward start (the first evaluation of a run)."""
    stream, _, _ = instrumented_run(case, pc.GradientDescent(1))
    return stream[0][1]


def learning_gap(case: Case, states: Any) -> dict[str, float]:
    """`pc.equilibrium_gap` at `states` against `REFERENCE` relaxed further from them."""
    reference = pc.Backtracking(REFERENCE_STEPS, step_size=1.0)

    @eqx.filter_jit
    def gap(params, states, x, observed):
        return pc.equilibrium_gap(
            case.fn, params, states, x, observed, precision=case.precision, reference=reference
        )

    result = gap(case.params, states, case.x, case.observed)
    return {
        "gap": float(result.gap),
        "energy_gap": float(result.energy_gap),
        "reference_certificate": float(result.reference.relative_grad_norm),
        "reference_steps": REFERENCE_STEPS,
    }


# ---------------------------------------------------------------------------------------------
# The experiment


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    quick = args.quick
    cap = args.cap or (60 if quick else 500)
    repeats = 2 if quick else args.repeats
    names = args.cases.split(",")
    points = args.points.split(",")
    wanted = set(args.solvers.split(",")) if args.solvers else None
    specs = [s for s in SOLVERS if wanted is None or s.name in wanted]
    cases, trainers, data_name = make_cases(args, quick)
    config = {
        "quick": quick,
        "cap": cap,
        "repeats": repeats,
        "batch": int(cases["mlp"].x.shape[0]),
        "target": TARGET,
        "goal": GOAL,
        "train_steps": TRAIN_STEPS,
        "reference_steps": REFERENCE_STEPS,
        "cases": names,
        "points": points,
        "solvers": [s.name for s in specs],
        "command": "python benchmarks/run.py equilibrium-targets" + (" --quick" if quick else ""),
    }
    results: dict[str, Any] = {"data": data_name, "cases": {}}
    for name in names:
        base = cases[name]
        entry = {"description": base.description, "smooth": base.smooth, "points": {}}
        results["cases"][name] = entry
        for point in points:
            case = base if point == "init" else trainers[name](base)
            harness.log(f"{name} ({point})")
            entry["points"][point] = measure_point(case, specs, cap, repeats)
    return config, results


def measure_point(case: Case, specs: Sequence[SolverSpec], cap: int, repeats: int) -> dict:
    """Every row at one point, and the suite's own budget of its baseline solver."""
    rows, start_norms = {}, start_field_norms(case)
    for spec in specs:
        row = measure(spec, case, cap, repeats, start_norms)
        states = row.pop("states", None)
        if not case.smooth and states is not None:
            row["learning_gap"] = learning_gap(case, states)
        rows[spec.name] = row
        harness.log(f"  {spec.name}: {describe_row(row)}")
    suite = pc.GradientDescent(case.suite_budget, baseline_optimizer(case))
    states, info, times = timed_run(case, suite, repeats)
    budget = {"steps": case.suite_budget, **info_summary(SOLVERS[0], info), "time": times}
    if not case.smooth:
        budget["learning_gap"] = learning_gap(case, states)
    harness.log(f"  suite budget {case.suite_budget}: certificate {budget['certificate']:.3g}")
    return {"rows": rows, "suite_budget": budget}


def describe_row(row: dict[str, Any]) -> str:
    if row["reached"]:
        return f"{row['evaluations']} evaluations, {1e3 * row['time']['median_s']:.1f} ms"
    at_cap = row.get("at_cap") or {}
    return f"not reached within {row['cap']} (certificate {at_cap.get('certificate')})"
