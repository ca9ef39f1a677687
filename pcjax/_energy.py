"""The variational free energy of a tagged PC network and its prediction errors.

For nodes $i$ with states $x_i$, predictions $\\mu_i = g_i(\\text{parents})$, errors
$e_i = x_i - \\mu_i$ and fixed precisions $P_i$ (scalar or per feature),

$$F = \\sum_i \\tfrac12 \\sum_{b,k} P_{i,k}\\, e_{i,bk}^2,$$

summed over the batch $b$ as well as the features $k$, so that each sample's states see only
their own energy and the state step size does not depend on the batch size. (For fixed
precisions the $-\\tfrac12 \\log\\det P_i$ term of the Gaussian free energy is a constant and is
left out.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._tagging import Nodes, predictions, run_tagged

Array = jax.Array
Precision = Mapping[str, Any]


def merge_nodes(states: Mapping[str, Array], observed: Mapping[str, Array] | None) -> Nodes:
    """All node values: the free `states` plus the clamped `observed` nodes (names disjoint)."""
    observed = {} if observed is None else observed
    both = sorted(set(states) & set(observed))
    if both:
        raise ValueError(
            f"pcjax: node(s) {both} are in both `states` and `observed`; a node is either "
            "free (a state) or clamped (observed), not both."
        )
    return {**states, **observed}


def check_partition(predicted: Mapping[str, Array], values: Mapping[str, Array]) -> None:
    """Every tagged node must have a value (unknown names are caught by `run_tagged`)."""
    missing = sorted(set(predicted) - set(values))
    if missing:
        raise ValueError(
            f"pcjax: node(s) {missing} are in neither `states` nor `observed`; every tagged "
            f"node must be free or clamped (the function tags {sorted(predicted)})."
        )


def _concrete(value: Array) -> np.ndarray | None:
    """The value as a NumPy array, or None while it is being traced."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_precision(precision: Precision | None, predicted: Mapping[str, Array]) -> Nodes:
    """Validate fixed precisions against the nodes' predictions.

    Each precision must be positive and broadcast to its node's shape without enlarging it:
    a scalar, or a per-feature array such as shape `(features,)` for a `(batch, features)`
    node. Concrete values are checked at trace time (`ValueError`); traced values are checked
    at run time with `eqx.error_if`.
    """
    if precision is None:
        return {}
    if not isinstance(precision, Mapping):
        raise TypeError(
            f"pcjax: `precision` must map node names to precisions, got {type(precision).__name__}."
        )
    unknown = sorted(set(precision) - set(predicted))
    if unknown:
        raise ValueError(
            f"pcjax: `precision` names unknown node(s) {unknown}; the function tags "
            f"{sorted(predicted)}."
        )
    checked = {}
    for name, value in precision.items():
        value = jnp.asarray(value)
        shape = predicted[name].shape
        try:
            fits = jnp.broadcast_shapes(value.shape, shape) == shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"pcjax: the precision of node {name!r} has shape {value.shape}, which does not "
                f"broadcast to the node's shape {shape}; use a scalar or a per-feature array "
                f"such as shape {shape[-1:]}."
            )
        concrete = _concrete(value)
        message = f"pcjax: the precision of node {name!r} must be positive"
        if concrete is None:
            value = eqx.error_if(
                value, jnp.any(value <= 0) | ~jnp.all(jnp.isfinite(value)), message
            )
        elif not (np.all(concrete > 0) and np.all(np.isfinite(concrete))):
            raise ValueError(f"{message}; its smallest entry is {concrete.min()!r}.")
        checked[name] = value
    return checked


def weighted_errors(
    values: Mapping[str, Array], predicted: Mapping[str, Array], precision: Mapping[str, Array]
) -> tuple[Nodes, Nodes]:
    """Errors $e_i = x_i - \\mu_i$ and precision-weighted errors $P_i e_i$ of every node."""
    errors = {name: values[name] - mu for name, mu in predicted.items()}
    weighted = {name: e * precision[name] if name in precision else e for name, e in errors.items()}
    return errors, weighted


def energy_from_errors(errors: Mapping[str, Array], weighted: Mapping[str, Array]) -> Array:
    """$F = \\sum_i \\tfrac12 e_i \\cdot P_i e_i$ from errors and weighted errors."""
    terms = [jnp.sum(errors[name] * weighted[name]) for name in errors]
    return 0.5 * sum(terms[1:], terms[0])


def checked_values(
    fn: Callable[..., Any],
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None,
    precision: Precision | None,
) -> tuple[Nodes, Nodes]:
    """Validate the node values and precisions once, at trace time, before a loop uses them.

    Returns all node values (states and observed) and the checked precisions.
    """
    values = merge_nodes(states, observed)
    predicted = jax.eval_shape(lambda: predictions(fn, params, values, x))
    check_partition(predicted, values)
    return values, check_precision(precision, predicted)


def node_energy(
    fn: Callable[..., Any],
    params: Any,
    values: Mapping[str, Array],
    x: Any,
    precision: Mapping[str, Array],
) -> Array:
    """The energy for already validated node values and precisions (the inner-loop form)."""
    predicted = predictions(fn, params, values, x)
    return energy_from_errors(*weighted_errors(values, predicted, precision))


def energy(
    fn: Callable[..., Any],
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    precision: Precision | None = None,
) -> Array:
    """Variational free energy of the PC network `fn` at the given node states.

    $$F = \\sum_i \\tfrac12 \\sum_{\\text{batch, features}} P_i\\,(x_i - \\mu_i)^2,
    \\qquad \\mu_i = g_i(\\text{states of the parents of } i),$$

    where the predictions $\\mu_i$ are the values tagged by `pcjax.node` when `fn(params, x)`
    runs with every tagged node replaced by its state.

    **Arguments:**

    - `fn`: the tagged forward function `fn(params, x)`.
    - `params`: its parameters (any pytree, e.g. an equinox module).
    - `states`: dict of the free (latent) node states.
    - `x`: the input of `fn` (any pytree, or None).
    - `observed`: dict of the clamped node values (e.g. the label node during training).
      Every tagged node must be in exactly one of `states` and `observed`.
    - `precision`: dict mapping node names to fixed positive precisions, scalar or per feature
      (default 1 for every node).

    **Returns:** the scalar energy, summed over nodes and batch.
    """
    values, checked = checked_values(fn, params, states, x, observed, precision)
    return node_energy(fn, params, values, x, checked)


def prediction_errors(
    fn: Callable[..., Any],
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
) -> Nodes:
    """Every node's prediction error $e_i = x_i - \\mu_i$ (same arguments as `energy`).

    Multiply by the node's precision for the precision-weighted error $P_i e_i$.
    """
    values = merge_nodes(states, observed)
    _, predicted = run_tagged(fn, params, x, values)
    check_partition(predicted, values)
    return weighted_errors(values, predicted, {})[0]
