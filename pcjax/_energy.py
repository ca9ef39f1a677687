"""The variational free energy of a tagged PC network and its prediction errors.

For nodes $i$ with states $x_i$, predictions $\\mu_i = g_i(\\text{parents})$, errors
$e_i = x_i - \\mu_i$ and precisions $P_i$,

$$F = \\sum_i \\Big[\\tfrac12 \\sum_n e_{i,n}^\\top P_i\\, e_{i,n}
      - \\tfrac{N_i}{2} \\log\\det P_i\\Big],$$

summed over the error vectors $n$ (the batch), so that each sample's states see only their own
energy and the state step size does not depend on the batch size. The log-det term is included
for precision modules ([pcjax.ScalarPrecision][], ...) and left out for fixed precision arrays,
for which it is a constant (see `pcjax._precision`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import concrete_value
from ._harvest import GRAPH_PRECISION
from ._precision import DiagonalPrecision, FullPrecision, logdet_term, weigh
from ._precision import Precision as PrecisionModule
from ._tagging import Nodes, node_energies, predicted_with_precisions

Array = jax.Array
#: `precision` arguments: a dict of node name -> precision, or a function of the parameters
#: returning one (for precisions learned with the parameters).
Precision = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]


def node_dicts(states: Any, observed: Any) -> tuple[Nodes, Nodes]:
    """`states` and `observed` (None: no observed node) as plain dicts, checking their types."""
    for argument, value in (("states", states), ("observed", observed)):
        if not (isinstance(value, Mapping) or (argument == "observed" and value is None)):
            raise TypeError(
                f"pcjax: `{argument}` must be a dict mapping node names to arrays, got "
                f"{type(value).__name__}."
            )
    return dict(states), {} if observed is None else dict(observed)


def merge_nodes(states: Mapping[str, Array], observed: Mapping[str, Array] | None) -> Nodes:
    """All node values: the free `states` plus the clamped `observed` nodes (names disjoint)."""
    states, observed = node_dicts(states, observed)
    both = sorted(set(states) & set(observed))
    if both:
        raise ValueError(
            f"pcjax: node(s) {both} are in both `states` and `observed`; a node is either "
            "free (a state) or clamped (observed), not both."
        )
    return {**states, **observed}


def batch_size(nodes: Mapping[str, Array], scan_depths: Mapping[str, int] | None = None) -> int:
    """The batch size: the axis that all node values share after their stacked scan axes
    (`scan_depths[name]` leading axes for a node inside `lax.scan`s; none by default); 1 if
    no node has one."""
    depths = scan_depths or {}
    sizes = {
        name: jnp.shape(v)[depths.get(name, 0)]
        for name, v in nodes.items()
        if jnp.ndim(v) > depths.get(name, 0)
    }
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "pcjax: the nodes disagree on the batch size (the leading axis after any stacked "
            f"scan axes): {sizes}."
        )
    return next(iter(sizes.values()), 1)


def check_partition(predicted: Mapping[str, Array], values: Mapping[str, Array]) -> None:
    """Every tagged node must have a value (unknown names are caught by `run_tagged`)."""
    missing = sorted(set(predicted) - set(values))
    if missing:
        raise ValueError(
            f"pcjax: node(s) {missing} are in neither `states` nor `observed`; every tagged "
            f"node must be free or clamped (the function tags {sorted(predicted)})."
        )


def resolve_precision(precision: Precision | None, params: Any) -> Mapping[str, Any]:
    """The precision dict, calling `precision(params)` when it is a function.

    A plain array that the function returns is a fixed precision, like one passed directly: it
    gets no gradient (`jax.lax.stop_gradient`), since its energy term has no log-det and a
    gradient step would drive it to zero. Only precision modules are learned."""
    if precision is None:
        return {}
    function = callable(precision) and not isinstance(precision, Mapping)
    if function:
        precision = precision(params)
    if not isinstance(precision, Mapping):
        raise TypeError(
            "pcjax: `precision` must map node names to precisions (or be a function of the "
            f"parameters returning such a dict), got {type(precision).__name__}."
        )
    if function:
        precision = {
            k: v if isinstance(v, PrecisionModule) else jax.lax.stop_gradient(v)
            for k, v in precision.items()
        }
    return precision


def _check_array_precision(name: str, value: Any, shape: tuple[int, ...]) -> Array:
    value = jnp.asarray(value)
    try:
        fits = jnp.broadcast_shapes(value.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        hint = " (a full matrix? use pcjax.FullPrecision(matrix))" if value.ndim == 2 else ""
        raise ValueError(
            f"pcjax: the precision of node {name!r} has shape {value.shape}, which does not "
            f"broadcast to the node's shape {shape}; use a scalar or a per-feature array "
            f"such as shape {shape[-1:]}{hint}."
        )
    concrete = concrete_value(value)
    message = f"pcjax: the precision of node {name!r} must be positive"
    if concrete is None:
        return eqx.error_if(value, jnp.any(value <= 0) | ~jnp.all(jnp.isfinite(value)), message)
    if not (np.all(concrete > 0) and np.all(np.isfinite(concrete))):
        raise ValueError(f"{message}; its smallest entry is {concrete.min()!r}.")
    return value


def _check_module_precision(name: str, module: PrecisionModule, shape: tuple[int, ...]):
    problem = module.fits(shape)
    if problem is not None:
        raise ValueError(
            f"pcjax: the precision of node {name!r} is {problem}, which does not fit the "
            f"node's shape {shape}."
        )
    for leaf in jax.tree.leaves(module):
        concrete = concrete_value(leaf)
        if concrete is not None and not np.all(np.isfinite(concrete)):
            raise ValueError(
                f"pcjax: the precision of node {name!r} has non-finite parameters "
                "(it is not positive definite)."
            )
    return module


def check_precision(
    precision: Mapping[str, Any], predicted: Mapping[str, jax.ShapeDtypeStruct]
) -> dict[str, Any]:
    """Validate precisions against the nodes' predictions, naming the node on failure.

    Fixed arrays must be positive and broadcast to the node's shape without enlarging it;
    modules must fit the node's trailing axes. Concrete values are checked at trace time
    (`ValueError`); traced fixed arrays at run time with `eqx.error_if`.
    """
    unknown = sorted(set(precision) - set(predicted))
    if unknown:
        raise ValueError(
            f"pcjax: `precision` names unknown node(s) {unknown}; the function tags "
            f"{sorted(predicted)}."
        )
    checked = {}
    for name, value in precision.items():
        shape = tuple(predicted[name].shape)
        if isinstance(value, PrecisionModule):
            checked[name] = _check_module_precision(name, value, shape)
        else:
            checked[name] = _check_array_precision(name, value, shape)
    return checked


class CustomEnergy(NamedTuple):
    """A node's non-Gaussian energy term, `function(state, prediction) -> scalar`."""

    function: Callable[[Array, Array], Array]


def cross_entropy(state: Array, logits: Array) -> Array:
    """Categorical energy of a label node whose prediction is logits:
    $F = -\\sum_b \\sum_k y_{bk} \\log \\operatorname{softmax}(z_b)_k$.

    Use it as `pcjax.node("label", logits, energy=pcjax.cross_entropy)` with the (one-hot or
    soft) label observed. Its gradient w.r.t. the logits is $\\operatorname{softmax}(z) - y$ for
    labels that sum to one, so with fixed predictions PC reproduces backprop of the
    cross-entropy loss.

    **Arguments:**

    - `state`: the node's state: the label, one-hot or soft, shape `(batch, classes)`.
    - `logits`: the node's prediction $z$, of the same shape.

    **Returns:** the scalar energy, summed over the batch.

    **Raises:** nothing of its own (JAX's error for shapes that do not broadcast).

    **Example** ([setup][examples-setup]): a classifier whose label node takes this
    energy.

    ```pycon
    >>> pc.cross_entropy(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]])).round(4)
    Array(0.6931, dtype=float32)
    >>> def classifier(params, x):
    ...     h = pc.node("h", jnp.tanh(x @ params["w1"]))
    ...     return pc.node("y", h @ params["w2"], energy=pc.cross_entropy)
    >>> start = pc.forward_init(classifier, params, x)
    >>> F = pc.energy(classifier, params, {"h": start["h"]}, x, {"y": y})
    >>> bool(jnp.isclose(F, optax.softmax_cross_entropy(start["y"], y).sum()))
    True

    ```
    """
    return -jnp.sum(state * jax.nn.log_softmax(logits, axis=-1))


def node_term(spec: Any, state: Array, prediction: Array, precision: Array | None = None) -> Array:
    """One node's energy: its custom energy, or the Gaussian
    $\\tfrac12 e^\\top P e - \\tfrac N2 \\log\\det P$ (the log-det for precision modules);
    with an in-graph `precision` $p$ (elementwise, computed by the network),
    $\\tfrac12 \\sum p\\, e^2 - \\tfrac12 \\sum \\log p$."""
    if isinstance(spec, CustomEnergy):
        return spec.function(state, prediction)
    error = state - prediction
    if spec is GRAPH_PRECISION:
        precision = precision.astype(error.dtype)
        return 0.5 * jnp.sum(precision * jnp.square(error)) - 0.5 * jnp.sum(jnp.log(precision))
    if spec is None:  # unit precision: the simplest gradient, just the error
        return 0.5 * jnp.sum(jnp.square(error))
    return 0.5 * jnp.sum(error * weigh(spec, error)) + logdet_term(spec, error)


def total_energy(
    values: Mapping[str, Array],
    predicted: Mapping[str, Array],
    spec: Mapping[str, Any],
    precisions: Mapping[str, Array] | None = None,
) -> Array:
    """$F = \\sum_i F_i(x_i, \\mu_i)$ over every predicted node; `spec` maps node names to
    precisions, `CustomEnergy` or `GRAPH_PRECISION` (missing: unit-precision Gaussian), and
    `precisions` holds the in-graph precisions of the `GRAPH_PRECISION` nodes."""
    precisions = precisions or {}
    missing = sorted(k for k in predicted if spec.get(k) is GRAPH_PRECISION and k not in precisions)
    if missing:
        raise AssertionError(f"pcjax internal: no in-graph precision for node(s) {missing}")
    terms = [
        node_term(spec.get(name), values[name], mu, precisions.get(name))
        for name, mu in predicted.items()
    ]
    return sum(terms[1:], terms[0])


def current_spec(precision: Precision | None, params: Any, checked: Mapping[str, Any]) -> dict:
    """The node specs for `params`: precisions learned with the parameters are re-read from
    them (custom energies kept); otherwise the checked specs."""
    if callable(precision) and not isinstance(precision, Mapping):
        customs = {k: v for k, v in checked.items() if is_own_energy(v)}
        return {**resolve_precision(precision, params), **customs}
    return dict(checked)


def checked_values(
    fn: Callable[..., Any],
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None,
    precision: Precision | None,
) -> tuple[Nodes, dict[str, Any]]:
    """Validate the node values and precisions once, at trace time, before a loop uses them.

    Returns all node values (states and observed) and the node specs: the checked precisions
    plus a `CustomEnergy` for every node tagged with its own energy.
    """
    values = merge_nodes(states, observed)
    for name, value in values.items():
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(
                f"pcjax: the value of node {name!r} must be an array, got {type(value).__name__}."
            )
        if jnp.ndim(value) >= 1 and jnp.shape(value)[0] == 0:
            raise ValueError(
                f"pcjax: node {name!r} has an empty batch (shape {jnp.shape(value)}); "
                "pass at least one sample."
            )
    for name, value in states.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(
                f"pcjax: the state of free node {name!r} has dtype {value.dtype}; free states "
                "are optimised by gradient descent and must be floating point (cast it, e.g. "
                "with .astype(jnp.float32), or pass the node in `observed`)."
            )
    predicted, customs = node_energies(fn, params, values, x, set(values) - set(states))
    check_partition(predicted, values)
    checked = check_precision(resolve_precision(precision, params), predicted)
    in_graph = sorted(k for k, f in customs.items() if f is GRAPH_PRECISION)
    clash = sorted(set(checked) & set(customs) - set(in_graph))
    if clash:
        raise ValueError(
            f"pcjax: node(s) {clash} have a custom energy (pcjax.node(..., energy=...)) and "
            "take no precision."
        )
    clash = sorted(set(checked) & set(in_graph))
    if clash:
        raise ValueError(
            f"pcjax: node(s) {clash} compute their precision in the function "
            "(pcjax.node(..., precision=...)); do not also pass one in `precision`."
        )
    own = {k: f if f is GRAPH_PRECISION else CustomEnergy(f) for k, f in customs.items()}
    return values, {**checked, **own}


def is_own_energy(spec: Any) -> bool:
    """Whether a node spec is the node's own (a custom energy or an in-graph precision) rather
    than a precision passed to pcjax."""
    return isinstance(spec, CustomEnergy) or spec is GRAPH_PRECISION


def in_graph_nodes(spec: Mapping[str, Any]) -> list[str]:
    """The nodes whose precision the function computes (`pcjax.node(..., precision=)`)."""
    return sorted(k for k, v in spec.items() if v is GRAPH_PRECISION)


def node_energy(
    fn: Callable[..., Any],
    params: Any,
    values: Mapping[str, Array],
    x: Any,
    precision: Mapping[str, Any],
) -> Array:
    """The energy for already validated node values and precisions (the inner-loop form)."""
    predicted, in_graph = predicted_with_precisions(fn, params, values, x)
    return total_energy(values, predicted, precision, in_graph)


def _root_weigh(precision: Any, error: Array) -> Array:
    r"""$R^\top e$ for every error vector (the last axis), $R R^\top = P$: $\sqrt{p}\, e$ for
    scalar and per-feature precisions, $e^\top L$ ($P = L L^\top$, Cholesky) for a full one;
    in the errors' dtype."""
    if isinstance(precision, DiagonalPrecision):
        root = jnp.sqrt(precision.values())
    elif isinstance(precision, FullPrecision):
        chol = precision.cholesky() if precision.floor == 0.0 else None
        if chol is None:  # P = L L^T + floor I: factor P itself
            chol = jnp.linalg.cholesky(precision.matrix())
        return (error @ chol.astype(error.dtype)).astype(error.dtype)
    elif isinstance(precision, PrecisionModule):  # another module kind: factor its matrix
        chol = jnp.linalg.cholesky(precision.dense(error.shape[-1]))
        return (error @ chol.astype(error.dtype)).astype(error.dtype)
    else:
        root = jnp.sqrt(jnp.asarray(precision))
    return (root.astype(error.dtype) * error).astype(error.dtype)


def node_residual(name: str, spec: Any, error: Array, where: str = "pcjax") -> Array:
    r"""The least-squares residual $r_i = R_i^\top e_i$ ($R_i R_i^\top = P_i$) of node `name`,
    so that its Gaussian energy term is $\tfrac12 \lVert r_i \rVert^2$ plus a term that does
    not depend on the node values (the log-det of a precision module).

    **Raises:** `ValueError` naming the node when its energy is not a Gaussian least-squares
    term of the node values: a custom energy (`pcjax.node(..., energy=...)`), or a precision
    computed in the function (`pcjax.node(..., precision=p)`), whose
    $-\tfrac12 \sum \log p$ depends on the states that compute $p$.
    """
    if isinstance(spec, CustomEnergy):
        raise ValueError(
            f"{where}: node {name!r} has its own energy (pcjax.node(..., energy=...)), which "
            "is not a Gaussian least-squares term sqrt(P) e; a least-squares solver needs "
            "every node's energy to be one (use pcjax.Backtracking or pcjax.GradientDescent)."
        )
    if spec is GRAPH_PRECISION:
        raise ValueError(
            f"{where}: node {name!r} computes its precision in the function "
            "(pcjax.node(..., precision=p)); its energy's -1/2 sum log p term depends on the "
            "states that compute p and is not a least-squares term (pass a precision that "
            "does not depend on the states in `precision=`, or use pcjax.Backtracking)."
        )
    if spec is None:
        return error
    return _root_weigh(spec, error)


def node_residuals(
    values: Mapping[str, Array],
    predicted: Mapping[str, Array],
    spec: Mapping[str, Any],
    where: str = "pcjax",
) -> Nodes:
    r"""Every predicted node's residual $R_i^\top (x_i - \mu_i)$ (`node_residual`): the energy
    `total_energy` weighs is $\tfrac12 \sum_i \lVert r_i \rVert^2$ plus terms that do not
    depend on the node values."""
    errors = {name: values[name] - mu.astype(values[name].dtype) for name, mu in predicted.items()}
    return {name: node_residual(name, spec.get(name), e, where) for name, e in errors.items()}
