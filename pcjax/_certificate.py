r"""How far given states are from equilibrium, measured where it matters: the learning signal.

PC's learning rule $\partial F / \partial \theta$ is PC's rule only at the relaxed states.
`InferInfo.relative_grad_norm` certifies cheaply, on every step, how far the state field has
fallen from its start; `equilibrium_gap` measures on request what a user reports: the relative
error of the parameter gradient at the given states against the one at a much more thoroughly
relaxed reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._energy import Precision
from ._inference import infer
from ._learning import param_grads
from ._models import energy
from ._solvers import AbstractSolver, GradientDescent, InferInfo

Array = jax.Array
__all__ = ["EquilibriumGap", "equilibrium_gap"]


class EquilibriumGap(NamedTuple):
    r"""What [pcjax.equilibrium_gap][] returns.

    **Fields:**

    - `gap`: $\lVert g(x) - g(x^\star) \rVert / \lVert g(x^\star) \rVert$, $g$ the parameter
      gradient $\partial F / \partial \theta$ (all parameters flattened), $x$ the given states,
      $x^\star$ the reference's.
    - `energy_gap`: $(F(x) - F(x^\star)) / \max(|F(x^\star)|, \text{tiny})$: how much energy
      the given states leave on the table (negative if the reference ended higher: then it is
      not a reference).
    - `reference`: the reference run's `InferInfo` (its own certificate:
      `relative_grad_norm`, `converged`).
    - `reference_states`: $x^\star$, a dict like the given states.

    **Example:** see [pcjax.equilibrium_gap][].

    ```pycon
    >>> pc.EquilibriumGap._fields
    ('gap', 'energy_gap', 'reference', 'reference_states')

    ```
    """

    gap: Array
    energy_gap: Array
    reference: InferInfo
    reference_states: dict


def equilibrium_gap(
    fn: Callable[..., Any],
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    precision: Precision | None = None,
    reference: AbstractSolver | None = None,
    key: Array | None = None,
) -> EquilibriumGap:
    r"""The relative error of the learning signal at `states` against a thoroughly relaxed
    reference (see `EquilibriumGap`), so that an experiment can state "at equilibrium to X%".

    The reference relaxes from `states` with `reference` (default
    `GradientDescent(4000, step_size=0.05)`: slow but stable for Hessians with largest
    eigenvalue below 40; pass a solver suited to the model, e.g. `pcjax.ConjugateGradient(50,
    newton_steps=5)` for smooth standard-PC energies, and read `reference.relative_grad_norm`,
    which should be far below the gap it certifies).

    **Non-smooth networks** (ReLU, max pooling): the field need not vanish at the minimum, so
    `relative_grad_norm` can stall above zero at a true minimum. What this function certifies
    there is the learning-signal gap `gap` and the `energy_gap` to the best energy the
    reference finds, not a vanishing field; a small `gap` with a small non-negative
    `energy_gap` says the given states are as good as the reference's for learning.

    **Arguments:** as [pcjax.infer][] (`fn`, `params`, the `states` to certify, `x`,
    `observed`, `precision`), plus:

    - `reference`: the reference solver; default None (the gradient descent above).
    - `key`: a random key for a stochastic reference; default None.

    **Returns:** an [pcjax.EquilibriumGap][]. jit it with `eqx.filter_jit` (the solver is a
    module).

    **Raises:** `ValueError` as [pcjax.infer][] (unknown or missing nodes, shapes).

    **Example** ([setup][examples-setup]): five steps leave the learning signal off by a few
    percent; the reference relaxes much further.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> states, _ = pc.infer(
    ...     fn, params, {"h": start["h"]}, x, {"y": y}, solver=pc.GradientDescent(5)
    ... )
    >>> result = pc.equilibrium_gap(
    ...     fn, params, states, x, {"y": y}, reference=pc.ConjugateGradient(8, newton_steps=4)
    ... )
    >>> round(float(result.gap), 2), bool(result.energy_gap >= 0)
    (..., True)
    >>> bool(result.reference.relative_grad_norm < 1e-3)
    True

    ```
    """
    if reference is None:
        reference = GradientDescent(4000, step_size=0.05)
    relaxed, info = infer(
        fn, params, states, x, observed, solver=reference, precision=precision, key=key
    )

    def flat_grads(values):
        grads = param_grads(fn, params, values, x, observed, precision=precision)
        return ravel_pytree(eqx.filter(grads, eqx.is_inexact_array))[0]

    given, best = flat_grads(dict(states)), flat_grads(relaxed)
    norm = jnp.linalg.norm(best)
    gap = jnp.linalg.norm(given - best) / jnp.where(norm > 0, norm, 1.0)
    f_given = energy(fn, params, states, x, observed, precision=precision)
    f_best = energy(fn, params, relaxed, x, observed, precision=precision)
    tiny = jnp.finfo(jnp.result_type(f_best)).tiny
    energy_gap = (f_given - f_best) / jnp.maximum(jnp.abs(f_best), tiny)
    return EquilibriumGap(gap, energy_gap, info, relaxed)
