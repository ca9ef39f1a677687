r"""Inference (relaxation): the free states descend the energy, with any solver.

`pcjax.infer(fn, params, states, x, observed, solver=...)` builds the state field of `fn`'s
energy (or of a transformation of it, `pcjax.fixed_predictions` / `pcjax.preconditioned`) at
fixed parameters and hands it to the solver (`pcjax.GradientDescent`, `pcjax.ODE`). Standard PC
differentiates the energy with `jax.grad`:

$$\frac{\partial F}{\partial x_i} = P_i e_i - \sum_{c \in \text{children}(i)}
\Big(\frac{\partial \mu_c}{\partial x_i}\Big)^{\!\top} P_c e_c.$$
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from ._energy import Precision, checked_values, node_dicts
from ._models import EnergyModel, as_model, fixed_predictions, preconditioned
from ._solvers import (
    AbstractSolver,
    GradientDescent,
    InferInfo,
    check_solver_fits,
    sample_axes,
)
from ._tagging import Nodes, scan_depths

Array = jax.Array
__all__ = ["infer", "legacy_solver", "run_solver"]


def infer(
    fn: Callable[..., Any] | EnergyModel,
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    solver: AbstractSolver | None = None,
    precision: Precision | None = None,
    key: Array | None = None,
    **legacy: Any,
) -> tuple[Nodes, InferInfo]:
    r"""Relax the free node states: run `solver` on the state field of the energy.

    **Arguments** (as for `pcjax.energy`, plus):

    - `fn`: the tagged forward function, or an energy transformation of it
      (`pcjax.fixed_predictions(fn)`, `pcjax.preconditioned(...)`,
      `pcjax.error_parameterised(fn)`: the solver then runs on the errors).
    - `solver`: `pcjax.GradientDescent(steps, optimizer, tol=...)`, `pcjax.ODE(...)` or
      `pcjax.ConjugateGradient(steps)`.
    - `precision`: the node precisions (see `pcjax.energy`).
    - `key`: a `jax.random` key for stochastic solvers (`GradientDescent(optimizer=
      pcjax.langevin(eta))`): update `t` uses `jax.random.fold_in(key, t)`, so the same key
      replays the same run and a new key draws fresh noise.

    **Returns:** `(states, info)`: the relaxed states and an `InferInfo` (steps, final energy
    and per-sample gradient norm, converged, diverged, field evaluations). With the solver's
    `throw=True` a diverged or unconverged run raises instead.

    The keywords of pcjax 0.1 (`steps=`, `optimizer=`, `step_size=`, `fixed_predictions=`,
    `precondition=`, `tol=`, `record_energy=`, `raise_on_divergence=`, `unroll=`) still work
    for this release, with a `DeprecationWarning`; see the README's migration table.
    """
    if legacy:
        if solver is not None:
            raise TypeError(
                f"pcjax.infer: pass either `solver=` or the deprecated keywords {sorted(legacy)}, "
                "not both."
            )
        fn, solver = legacy_solver(fn, "pcjax.infer", **legacy)
    elif solver is None:
        raise TypeError(
            "pcjax.infer: pass an inference solver, e.g. solver=pcjax.GradientDescent(steps=20)."
        )
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            "pcjax.infer: `solver` must be a pcjax solver (pcjax.GradientDescent, pcjax.ODE, "
            "pcjax.ConjugateGradient), "
            f"got {type(solver).__name__}."
        )
    model = as_model(fn, "pcjax.infer")
    states, observed = node_dicts(states, observed)
    _, spec = checked_values(model.fn, params, states, x, observed, precision)
    field = model.field(params, x, observed, spec)
    variables = model.to_variables(params, x, observed, states)
    layout = sample_axes({**states, **observed}, scan_depths(model.fn, params, x))
    check_solver_fits(solver, model, "pcjax.infer", {**states, **observed}, layout)
    variables, info = run_solver(solver, field, variables, key, layout)
    return model.to_states(params, x, observed, variables), info


def run_solver(
    solver: AbstractSolver,
    field: Callable[[Nodes], tuple[Array, Nodes]],
    states: Nodes,
    key: Array | None,
    sample_axes: Mapping[str, int],
) -> tuple[Nodes, InferInfo]:
    """Run `solver` on `field` from `states`, evaluate the field at the result and report."""
    states, steps, evaluations, energies, initial = solver.run(
        field, states, key=key, sample_axes=sample_axes
    )
    value, grads = field(states)
    return solver.report(states, value, grads, steps, evaluations, energies, initial, sample_axes)


_LEGACY_SOLVER = {"steps", "optimizer", "step_size", "tol", "record_energy", "unroll"}
_LEGACY_MODEL = {"fixed_predictions", "precondition"}


def legacy_solver(
    fn: Any, where: str, *, raise_on_divergence: bool = False, **options: Any
) -> tuple[EnergyModel, GradientDescent]:
    """The model and solver that pcjax 0.1's keyword arguments describe."""
    unknown = sorted(set(options) - _LEGACY_SOLVER - _LEGACY_MODEL)
    if unknown:
        raise TypeError(f"{where}: unexpected keyword argument(s) {unknown}.")
    warnings.warn(
        f"{where}: the keywords {sorted(options)} are deprecated; pass solver=pcjax."
        "GradientDescent(steps, optimizer, tol=...) and transform the network with "
        "pcjax.fixed_predictions / pcjax.preconditioned (see the README's migration table).",
        DeprecationWarning,
        stacklevel=3,
    )
    if "steps" not in options:
        raise TypeError(f"{where}: `steps` is required (or pass solver=...).")
    model = as_model(fn, where)
    if options.pop("fixed_predictions", False):
        model = fixed_predictions(model)
    if options.pop("precondition", False):
        model = preconditioned(model)
    optimizer: optax.GradientTransformation | None = options.pop("optimizer", None)
    step_size = options.pop("step_size", 0.1)
    solver = GradientDescent(
        options.pop("steps"),
        optimizer,
        step_size=step_size,
        throw=raise_on_divergence,
        **options,
    )
    return model, solver
