r"""Inference (relaxation): the free states descend the energy, with any solver.

`pcjax.infer(fn, params, states, x, observed, solver=...)` builds the state field of `fn`'s
energy (or of a transformation of it, [pcjax.fixed_predictions][] / [pcjax.preconditioned][]) at
fixed parameters and hands it to the solver ([pcjax.GradientDescent][], [pcjax.ODE][]). Standard PC
differentiates the energy with `jax.grad`:

$$\frac{\partial F}{\partial x_i} = P_i e_i - \sum_{c \in \text{children}(i)}
\Big(\frac{\partial \mu_c}{\partial x_i}\Big)^{\!\top} P_c e_c.$$
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from ._energy import Precision, checked_values, node_dicts
from ._harvest import traces_once
from ._models import EnergyModel, as_model
from ._solvers import AbstractSolver, InferInfo, check_solver_fits, sample_axes
from ._tagging import Nodes, scan_depths

Array = jax.Array
__all__ = ["infer", "run_solver"]


@traces_once
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
    **removed: Any,
) -> tuple[Nodes, InferInfo]:
    r"""Relax the free node states: run `solver` on the state field of the energy.

    **Main arguments:**

    - `fn`: the tagged forward function `fn(params, x)`, or an energy transformation of it
      ([pcjax.fixed_predictions][], [pcjax.preconditioned][], [pcjax.error_parameterised][]:
      the solver then runs on the errors, [pcjax.bidirectional][]).
    - `params`: its parameters (any pytree, e.g. an equinox module).
    - `states`: dict of the free nodes' starting states, usually from
      [pcjax.forward_init][]; each of its node's shape (batch first, after any stacked
      `lax.scan` axes).
    - `x`: the input of `fn` (any pytree, or None).
    - `observed`: dict of the clamped nodes' values (e.g. the label node); default None
      (none). Every node is in exactly one of `states` and `observed`.
    - `solver`: keyword, required: [pcjax.GradientDescent][]`(steps, optimizer, tol=...)`,
      [pcjax.Backtracking][]`(steps)` (gradient descent that keeps no step raising the
      energy), [pcjax.ODE][]`(...)`, [pcjax.ConjugateGradient][]`(steps)`, or
      [pcjax.GaussNewton][]`(steps)` / [pcjax.LevenbergMarquardt][]`(steps)` (Gaussian
      energies as weighted least squares).

    **Other arguments:**

    - `precision`: the node precisions (see [pcjax.energy][]); default None (1 for every
      node).
    - `key`: a `jax.random` key for stochastic solvers (`GradientDescent(optimizer=
      pcjax.langevin(eta))`): update `t` uses `jax.random.fold_in(key, t)`, so the same key
      replays the same run and a new key draws fresh noise. Default None.

    **Returns:** `(states, info)`: the relaxed states (a dict like `states`) and an
    [pcjax.InferInfo][] (steps, final energy and per-sample gradient norm, converged,
    diverged, field evaluations). With the solver's `throw=True` a diverged or unconverged
    run raises instead.

    **Raises:** `TypeError` without a `solver`, and for pcjax 0.1's keywords (`steps=`,
    `step_size=`, `optimizer=`, `tol=`, `fixed_predictions=`, ...), removed in pcjax 0.3: the
    message shows the composed call that replaces them, e.g. `steps=20` ->
    `solver=pcjax.GradientDescent(20)`. `ValueError` (naming the node and the shapes) for
    unknown or missing nodes, states of the wrong shape or dtype, and precisions that do not
    fit; a stochastic optimizer without a `key`.

    **Example** ([setup][examples-setup]): clamp the label node, relax the hidden node.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> states, info = pc.infer(
    ...     fn, params, {"h": start["h"]}, x, {"y": y}, solver=pc.GradientDescent(20)
    ... )
    >>> int(info.steps), bool(info.energy < info.initial_energy), bool(info.diverged)
    (20, True, False)

    ```
    """
    if removed:
        raise TypeError(_removed_keywords_message(removed))
    if solver is None:
        raise TypeError(
            "pcjax.infer: pass an inference solver, e.g. solver=pcjax.GradientDescent(20)."
        )
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            "pcjax.infer: `solver` must be a pcjax solver (pcjax.GradientDescent, "
            "pcjax.Backtracking, pcjax.ODE, pcjax.ConjugateGradient, pcjax.GaussNewton, "
            "pcjax.LevenbergMarquardt), "
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


#: pcjax 0.1's keywords of `infer` (removed in 0.3) -> the `GradientDescent` keyword each became.
_REMOVED_SOLVER_KEYWORDS = {
    "step_size": "step_size",
    "tol": "tol",
    "record_energy": "record_energy",
    "unroll": "unroll",
    "raise_on_divergence": "throw",
}
#: pcjax 0.1's flags of `infer` (removed in 0.3) -> the transformation of `fn` each became.
_REMOVED_MODEL_KEYWORDS = {
    "fixed_predictions": "pcjax.fixed_predictions",
    "precondition": "pcjax.preconditioned",
}
_REMOVED = {"steps", "optimizer", *_REMOVED_SOLVER_KEYWORDS, *_REMOVED_MODEL_KEYWORDS}


def _removed_keywords_message(removed: Mapping[str, Any]) -> str:
    """The error for keywords `infer` does not take: the composed call for pcjax 0.1's."""
    unknown = sorted(set(removed) - _REMOVED)
    if unknown:
        return f"pcjax.infer() got unexpected keyword argument(s) {unknown}."

    def shown(name: str) -> str:  # plain Python values are shown, others by their name
        value = removed[name]
        return repr(value) if isinstance(value, (bool, int, float, type(None))) else name

    arguments = [shown("steps") if "steps" in removed else "steps"]
    if "optimizer" in removed:
        arguments.append(shown("optimizer"))
    arguments += [
        f"{new}={shown(old)}" for old, new in _REMOVED_SOLVER_KEYWORDS.items() if old in removed
    ]
    network = "fn"
    for old, transformation in _REMOVED_MODEL_KEYWORDS.items():
        if removed.get(old, False):
            network = f"{transformation}({network})"
    names = ", ".join(f"`{name}=`" for name in sorted(removed))
    return (
        f"pcjax.infer: the keyword(s) {names} were removed in pcjax 0.3 (deprecated since 0.2); "
        f"compose the call instead: pcjax.infer({network}, params, states, x, observed, "
        f"solver=pcjax.GradientDescent({', '.join(arguments)})) (see the 0.3.0 entry of the "
        "changelog)."
    )


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
