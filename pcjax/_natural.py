"""The Fisher information of a PC network and the natural-gradient optax transform.

Each node of a PC network is a Gaussian with mean $\\mu_i(\\theta)$ and precision $P_i$, so the
Fisher information of the parameters at the relaxed states is the Gauss-Newton matrix

$$G = \\frac1B \\sum_i J_i^\\top P_i J_i, \\qquad J_i = \\partial \\mu_i / \\partial \\theta,$$

averaged over the batch. For a dense layer $\\mu = h W + b$ ($W$ of shape `(in, out)`) it is
the Kronecker product $G_W = \\mathbb{E}[h h^\\top] \\otimes P$, i.e. $G_W[V] = A V P$ with
$A = \\mathbb{E}[h h^\\top]$, and $G_b = P$. The natural gradient multiplies the gradient by the
*inverse* of $G$: $A^{-1} (\\partial F/\\partial W) P^{-1}$. Since
$\\partial F / \\partial W = -h (P e)^\\top$, the output precision cancels. Multiplying the gradient
by the precision instead (`precision_weighted_gradient`) multiplies by the Fisher, not its
inverse, and is offered for comparison only.

Three modes of `natural_gradient`, with the statistics produced by `fisher_statistics`:

- `"diagonal"`: $G[W_{kj}] = A_{kk} P_{jj}$, a division per entry;
- `"kronecker"`: $(G + \\lambda I)^{-1} g$ for $G = A \\otimes P$, solved exactly through the
  eigendecompositions of $A$ and $P$, for every dense layer tagged as a node (found in the
  traced program: [pcjax.dense][], `eqx.nn.Linear`, `h @ w + b`, under `vmap`,
  in `lax.scan` bodies with shared or stacked weights);
- `"matrix_free"`: any tagged function: $(G + \\lambda I) u = g$ solved by conjugate gradients
  with $G v = \\frac1B J^\\top P J v$ from `jax.linearize` and its transpose, over the parameters
  the predictions depend on (the others have a zero Fisher block and pass through).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax

from ._cg import conjugate_gradients, dots
from ._checks import concrete_value
from ._dense import dense_inputs, dense_sites
from ._energy import CustomEnergy, Precision, batch_size, checked_values, in_graph_nodes
from ._harvest import traces_once
from ._models import Bidirectional, EnergyModel, as_model
from ._precision import dense_matrix, weigh
from ._sharding import device_mean
from ._tagging import predictions, scan_depths

Array = jax.Array
MODES = ("diagonal", "kronecker", "matrix_free")


class KroneckerFactors(eqx.Module):
    r"""Fisher factors of one dense parameter: $G = A \otimes P$.

    `inputs` is $A = \mathbb{E}[h h^\top]$ (or its diagonal, `"diagonal"` mode; a 1 x 1 count of
    positions for a bias), `outputs` is the node's precision $P$ (or its diagonal).
    `transposed`: the weight is stored `(out, in)` (as `eqx.nn.Linear` stores it) rather than
    `(in, out)`. `stacked`: the number of leading axes along which the parameter is stacked (a
    weight sliced per layer by `lax.scan`); both factors then carry these axes too, one factor
    pair per slice.

    **Fields:** `inputs`, `outputs`, `transposed` (default False), `stacked` (default 0), as
    above.

    **Raises:** nothing: a record of the statistics, built by [pcjax.fisher_statistics][]; its
    fields are not checked.

    **Example** ([setup][examples-setup]): the factors of `w2`, from
    [pcjax.fisher_statistics][].

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> factors = pc.fisher_statistics(fn, params, {"h": start["h"]}, x, {"y": y})["w2"]
    >>> bool(jnp.allclose(factors.inputs, start["h"].T @ start["h"] / 2))  # E[h h^T]
    True
    >>> factors.outputs  # unit precision
    Array([[1., 0.],
           [0., 1.]], dtype=float32)

    ```
    """

    inputs: Array
    outputs: Array
    transposed: bool = eqx.field(static=True, default=False)
    stacked: int = eqx.field(static=True, default=0)

    def rows_cols(self) -> tuple[Array, Array]:
        """The factors acting on the parameter's rows and columns (its last two axes; a bias
        is one row)."""
        return (self.outputs, self.inputs) if self.transposed else (self.inputs, self.outputs)

    @property
    def diagonal(self) -> bool:
        return self.inputs.ndim - self.stacked == 1


class FisherOperator(eqx.Module):
    """$v \\mapsto G v = \\frac1B J^\\top P J v$ at fixed states (`"matrix_free"` statistics).

    `covered[i]` says whether the predictions depend on the `i`-th floating-point leaf of the
    parameters (in `jax.tree.leaves` order); the Fisher rows and columns of the others are
    exactly zero. None: every leaf is covered.

    **Fields:** `jvp` ($v \\mapsto J v$), `vjp` ($u \\mapsto J^\\top u$), `precision` (the
    node precisions), `batch_size` ($B$), `covered` (above). Made by
    [pcjax.fisher_statistics][]`(..., mode="matrix_free")`; call it on a pytree like the
    parameters' floating-point leaves.

    **Raises:** nothing when built; called on a tree that does not match the parameters'
    floating-point leaves, JAX's shape errors.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> G = pc.fisher_statistics(fn, params, {"h": start["h"]}, x, {"y": y}, mode="matrix_free")
    >>> isinstance(G, pc.FisherOperator), G.batch_size
    (True, 2)

    ```
    """

    jvp: Callable
    vjp: Callable
    precision: dict
    batch_size: int = eqx.field(static=True)
    covered: tuple[bool, ...] | None = eqx.field(static=True, default=None)

    def __call__(self, tangent: Any) -> Any:
        return self.apply(tangent)[0]

    def apply(self, tangent: Any) -> tuple[Any, frozenset]:
        """$G v$, and the mesh axes that $J v$ varies over (inside `jax.shard_map`)."""
        outputs = self.jvp(tangent)
        weighted = {
            k: weigh(self.precision[k], v) if k in self.precision else v for k, v in outputs.items()
        }
        (product,) = self.vjp(weighted)
        return jax.tree.map(lambda p: p / self.batch_size, product), varying_axes(outputs)


@traces_once
def fisher_statistics(
    fn: Callable[..., Any] | EnergyModel,
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    precision: Precision | None = None,
    mode: str = "kronecker",
) -> Any:
    """The statistics `natural_gradient(mode)` needs, at the given (relaxed) states.

    - `"diagonal"` / `"kronecker"`: a pytree with the structure of the floating-point leaves of
      `params`, holding `KroneckerFactors` for the weights and biases of the dense layers
      and None elsewhere (those leaves are not preconditioned).
    - `"matrix_free"`: a `FisherOperator` for the whole tagged function.

    Pass the result to the optimizer as `optimizer.update(grads, state, params, fisher=...)`
    when you call it yourself; inside [pcjax.make_train_step][], [pcjax.natural_gradient][]
    computes them from the step's `context` instead.

    `fn` may be an energy transformation: the statistics are those of the underlying
    function's predictions, taken where the transformation linearises them (the given states
    for [pcjax.preconditioned][] and [pcjax.error_parameterised][], the feedforward pass for
    [pcjax.fixed_predictions][], as in a training step's [pcjax.Context][]).

    **Arguments:** as [pcjax.energy][] (`fn`, `params`, the relaxed free `states`, `x`,
    `observed`, `precision`), plus `mode`: `"diagonal"`, `"kronecker"` (default) or
    `"matrix_free"`.

    **Returns:** the statistics above.

    **Raises:** `ValueError` for an unknown `mode`, nodes with a custom energy or an in-graph
    precision, and [pcjax.bidirectional][] networks (their top-down network would be left out).

    **Example** ([setup][examples-setup]): `w2` feeds the node `y` directly, `w1` does not
    (a `tanh` comes between), so only `w2` has factors.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> fisher = pc.fisher_statistics(fn, params, {"h": start["h"]}, x, {"y": y})
    >>> fisher["w1"] is None, fisher["w2"].inputs.shape, fisher["w2"].outputs.shape
    (True, (4, 4), (2, 2))

    ```
    """
    if mode not in MODES:
        raise ValueError(f"pcjax: unknown Fisher mode {mode!r}; choose one of {MODES}.")
    model = as_model(fn, "pcjax.fisher_statistics")
    if isinstance(model.base, Bidirectional):
        raise ValueError(
            "pcjax.fisher_statistics: the Fisher statistics of a bidirectional (bPC) network "
            "are not implemented: they would leave out its top-down network."
        )
    fn = model.fn
    values, checked = checked_values(fn, params, dict(states), x, observed, precision)
    values = {**model.linearisation_point(params, values, x), **(observed or {})}
    in_graph = in_graph_nodes(checked)
    if in_graph:
        raise ValueError(
            f"pcjax.fisher_statistics: node(s) {in_graph} compute their precision in the "
            "function (pcjax.node(..., precision=...)); the Fisher here needs precisions that "
            "do not depend on the states, so natural gradients do not support them."
        )
    custom = sorted(k for k, v in checked.items() if isinstance(v, CustomEnergy))
    if custom:
        raise ValueError(
            f"pcjax.fisher_statistics: node(s) {custom} have a custom energy; the Fisher here is "
            "that of Gaussian nodes (precision P), so natural gradients need Gaussian nodes."
        )
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    if mode == "matrix_free":

        def predict(d):
            return predictions(fn, eqx.combine(d, static), values, x)

        _, jvp = jax.linearize(predict, diff)
        vjp = jax.linear_transpose(jvp, diff)
        covered = tuple(_live_inputs(jax.make_jaxpr(jvp)(diff).jaxpr))
        batch = batch_size(values, scan_depths(fn, params, x))
        return FisherOperator(jvp, vjp, checked, batch, covered)
    return _kronecker_statistics(fn, params, values, x, checked, diagonal=mode == "diagonal")


def fisher_mask(fn: Callable[..., Any] | EnergyModel, params: Any, x: Any) -> Any:
    """Which parameters the `"diagonal"` and `"kronecker"` modes precondition.

    **Arguments:**

    - `fn`: the tagged forward function (or an energy transformation of it).
    - `params`: its parameters.
    - `x`: an input of `fn` (only its shapes and dtypes matter).

    **Raises:** `TypeError` if `fn` is neither a tagged forward function nor an energy
    transformation of one.

    **Example** ([setup][examples-setup]): `w1`'s output passes through `tanh` before it is
    tagged, so it is not a dense layer of a node; `w2`'s output is the node `y`.

    ```pycon
    >>> mask = pc.fisher_mask(fn, params, x)
    >>> mask
    {'w1': False, 'w2': True}
    >>> natural = pc.natural_gradient("kronecker", ema_decay=0.9, mask=mask)

    ```

    **Returns:** a pytree with the structure of the floating-point leaves of `params`
    (`eqx.filter(params, eqx.is_inexact_array)`): True for the weights and biases of the dense
    layers whose outputs are tagged as nodes ([pcjax.dense][], `eqx.nn.Linear`, `h @ w + b`,
    also under `jax.vmap` and in `lax.scan` bodies), False elsewhere. Pass it as
    `natural_gradient(..., mask=...)` to keep running factors for those leaves only. Found from
    a trace of `fn(params, x)`: no computation is run. For an energy transformation, the dense
    layers of the underlying function (of `up` for `pcjax.bidirectional(up, down)`).
    """
    fn = as_model(fn, "pcjax.fisher_mask").fn
    leaves, treedef = jax.tree.flatten(eqx.filter(params, eqx.is_inexact_array))
    mask = [False] * len(leaves)
    for site in dense_sites(fn, params, x).values():
        for origin in (site.weight, site.bias):
            if origin is not None:
                mask[origin.leaf] = True
    return jax.tree.unflatten(treedef, mask)


def _kronecker_statistics(fn, params, values, x, precision, *, diagonal: bool):
    leaves, treedef = jax.tree.flatten(eqx.filter(params, eqx.is_inexact_array))
    stats: list[KroneckerFactors | None] = [None] * len(leaves)
    sites, inputs, depths = dense_inputs(fn, params, x, values)
    batch = batch_size(values, depths)
    for name, site in sites.items():
        weight = leaves[site.weight.leaf]
        dtype = weight.dtype
        out_dim = weight.shape[-2] if site.transposed else weight.shape[-1]
        p = dense_matrix(precision.get(name), out_dim, dtype)
        # h stacked along the enclosing scans: keep the axes of the scans that slice the weight
        # (one factor per slice), sum over the others and over every position.
        kept = [axis for axis, sliced in enumerate(site.weight.sliced) if sliced]
        # mu = scale * h W + ...: the Jacobian of a scaled layer is that of the layer on scale * h.
        h = jnp.moveaxis(site.scale * inputs[name].astype(dtype), kept, range(len(kept)))
        lead = h.shape[: len(kept)]
        h = h.reshape(*lead, -1, h.shape[-1])
        # > 1 when the layer is applied along a sequence, say; times the squared bias factor.
        positions = site.bias_scale**2 * h.shape[-2] / batch
        if diagonal:
            a = jnp.sum(h * h, -2) / batch
            p = jnp.broadcast_to(jnp.diag(p), (*lead, out_dim))
            count = jnp.full((*lead, 1), positions, dtype)
        else:
            a = jnp.swapaxes(h, -1, -2) @ h / batch
            p = jnp.broadcast_to(p, (*lead, out_dim, out_dim))
            count = jnp.full((*lead, 1, 1), positions, dtype)
        stats[site.weight.leaf] = KroneckerFactors(a, p, site.transposed, len(kept))
        if site.bias is not None:
            stats[site.bias.leaf] = KroneckerFactors(count, p, False, len(kept))
    return jax.tree.unflatten(treedef, stats)


# ---------------------------------------------------------------- which leaves are covered

# Primitives that call a jaxpr once on their own operands: liveness passes through positionally.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call")


def _live_inputs(jaxpr: jex.Jaxpr, used_outputs: list[bool] | None = None) -> list[bool]:
    """Which inputs of `jaxpr` the (used) outputs depend on, structurally.

    A backward liveness pass: an equation's operands are live when one of its results is.
    Call-like equations are entered; any other equation (scan, while, ...) counts all its
    operands live, which can only mark more leaves covered than needed.
    """
    if used_outputs is None:
        used_outputs = [True] * len(jaxpr.outvars)
    live = {v for v, u in zip(jaxpr.outvars, used_outputs) if u and isinstance(v, jex.Var)}
    for eqn in reversed(jaxpr.eqns):
        used = [isinstance(v, jex.Var) and v in live for v in eqn.outvars]
        if not any(used):
            continue
        body = _call_body(eqn)
        needed = [True] * len(eqn.invars) if body is None else _live_inputs(body, used)
        live.update(v for v, n in zip(eqn.invars, needed) if n and isinstance(v, jex.Var))
    return [v in live for v in jaxpr.invars]


def _call_body(eqn: Any) -> jex.Jaxpr | None:
    if eqn.primitive.name not in _CALLS:
        return None
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    body = getattr(body, "jaxpr", body)
    fits = (
        isinstance(body, jex.Jaxpr)
        and len(body.invars) == len(eqn.invars)
        and len(body.outvars) == len(eqn.outvars)
    )
    return body if fits else None


# ---------------------------------------------------------------- devices


def varying_axes(tree: Any) -> frozenset:
    """The manual mesh axes (inside `jax.shard_map` with `check_vma=True`) that any array of
    `tree` varies over; empty elsewhere."""
    axes: set = set()
    for leaf in jax.tree.leaves(tree):
        aval = jax.typeof(leaf)
        kind = getattr(aval, "manual_axis_type", None)
        axes |= set(getattr(kind, "varying", None) or getattr(aval, "vma", None) or ())
    return frozenset(axes)


def _check_replicated(stat_axes: frozenset, update_axes: frozenset, axis_name: str | None) -> None:
    """Statistics that vary over mesh axes where the updates do not would precondition each
    device's replica differently: report them."""
    extra = stat_axes - update_axes
    if extra:
        names = ", ".join(repr(a) for a in sorted(extra, key=str))
        given = "" if axis_name is None else f" (after averaging over `axis_name`={axis_name!r})"
        raise ValueError(
            f"pcjax.natural_gradient: the Fisher statistics vary over the mesh axis {names} "
            f"(each device computed them from its shard of the batch) but the gradients do "
            f"not{given}; pass natural_gradient(..., axis_name={names}) so that every device "
            "preconditions with the statistics of the whole batch."
        )


# ---------------------------------------------------------------- the optax transforms


class NaturalGradientState(NamedTuple):
    """`count` of updates; running `factors` (EMA) and their cached `inverse` forms per leaf
    (None without a `mask`, and for the leaves the mask leaves out); for `"matrix_free"`, the
    conjugate-gradient iterations of the last update and the relative residual
    $\\lVert (G + \\lambda I) u - g \\rVert / \\lVert g \\rVert$ they reached (its
    convergence report; None in the other modes).

    **Fields:** `count`, `factors`, `inverse`, `cg_iterations`, `cg_residual`, as above.

    **Example:**

    ```pycon
    >>> state = pc.natural_gradient("diagonal").init(params)
    >>> int(state.count), state.factors
    (0, None)

    ```
    """

    count: Array
    factors: Any
    inverse: Any
    cg_iterations: Array | None = None
    cg_residual: Array | None = None


def _is_stat(value: Any) -> bool:
    return value is None or isinstance(value, KroneckerFactors)


def _empty_factors(leaf: Array, diagonal: bool, path: str) -> KroneckerFactors:
    """Zero row and column factors for the last two axes of a weight (stacked along any leading
    axes) or for a bias `(out,)`, as the optimizer state keeps them (`_canonical`)."""
    if leaf.ndim == 0:
        raise ValueError(
            f"pcjax.natural_gradient: `mask` marks {path}, which is a scalar; only the weights "
            "and biases of dense layers have Kronecker factors."
        )
    *lead, rows, cols = (1, *leaf.shape) if leaf.ndim == 1 else leaf.shape
    if diagonal:
        rows_factor = jnp.zeros((*lead, rows), leaf.dtype)
        return KroneckerFactors(rows_factor, jnp.zeros((*lead, cols), leaf.dtype), False, len(lead))
    return KroneckerFactors(
        jnp.zeros((*lead, rows, rows), leaf.dtype),
        jnp.zeros((*lead, cols, cols), leaf.dtype),
        False,
        len(lead),
    )


def _canonical(factors: KroneckerFactors, ndim: int) -> KroneckerFactors:
    """The factors acting on the rows and columns of the parameter's last two axes (a 1-D bias
    is one row), the form the optimizer state keeps for a leaf of `ndim` axes.

    A bias stacked along scans, `(*S, L, out)` with one `count` x `P` pair per slice, has the
    same Fisher as the weight-shaped `(L, out)` pair `diag(counts) (x) P` per slice of `S`
    (its `P` is the same on every slice).
    """
    rows, cols = factors.rows_cols()
    stacked = factors.stacked
    if ndim == 1 or ndim == stacked + 2:
        return KroneckerFactors(rows, cols, False, stacked)
    counts = rows[..., 0] if factors.diagonal else rows[..., 0, 0]
    if factors.diagonal:
        return KroneckerFactors(counts, cols[..., 0, :], False, stacked - 1)
    eye = jnp.eye(counts.shape[-1], dtype=counts.dtype)
    return KroneckerFactors(counts[..., :, None] * eye, cols[..., 0, :, :], False, stacked - 1)


def _initial_inverse(factors: KroneckerFactors) -> tuple[Array, Array, Array, Array]:
    """The eigendecomposition of zero factors: zero eigenvalues, identity eigenvectors."""
    rows, cols = factors.inputs, factors.outputs

    def eye_like(matrix):
        return jnp.broadcast_to(jnp.eye(matrix.shape[-1], dtype=matrix.dtype), matrix.shape)

    return (
        jnp.zeros(rows.shape[:-1], rows.dtype),
        eye_like(rows),
        jnp.zeros(cols.shape[:-1], cols.dtype),
        eye_like(cols),
    )


def _eig(factors: KroneckerFactors) -> tuple[Array, Array, Array, Array]:
    """Eigendecompositions of the row and column factors (batched over stacked axes)."""
    ev_rows, vec_rows = jnp.linalg.eigh(factors.inputs)
    ev_cols, vec_cols = jnp.linalg.eigh(factors.outputs)
    return ev_rows, vec_rows, ev_cols, vec_cols


def _clamped(eigenvalues: Array) -> Array:
    r"""Eigenvalues of a positive semidefinite factor with those below its numerical rank
    cutoff set to 0: $\lambda_k < n\, \epsilon \max_j \lambda_j$ ($n$ the factor's size,
    $\epsilon$ its dtype's machine epsilon, NumPy's `matrix_rank` tolerance).

    `eigh` of a rank-deficient $\mathbb{E}[h h^\top]$ (a batch smaller than the layer's inputs)
    returns the zero eigenvalues as noise of either sign of that size; a negative product with
    the other factor's eigenvalue would cancel the damping, and a positive one, times a large
    precision, would swamp it (float32: relative error 2.3 at $P = 100$ before this, batch 16,
    512 inputs)."""
    size = eigenvalues.shape[-1]
    largest = jnp.max(jnp.abs(eigenvalues), axis=-1, keepdims=True)
    cutoff = size * jnp.finfo(eigenvalues.dtype).eps * largest
    return jnp.where(eigenvalues > cutoff, eigenvalues, 0)


def _kronecker_solve(grad: Array, inverse, damping: Array) -> Array:
    r"""$(R \otimes C + \lambda I)^{-1} g$ through the eigenbases of the row and column factors
    (per slice of a stacked parameter)."""
    ev_rows, vec_rows, ev_cols, vec_cols = inverse
    matrix = grad.reshape(*vec_rows.shape[:-1], vec_cols.shape[-1])
    rotated = jnp.swapaxes(vec_rows, -1, -2) @ matrix @ vec_cols
    # Both factors are positive semidefinite: their numerically zero eigenvalues are set to 0
    # before the product is formed (see `_clamped`).
    ev_rows, ev_cols = _clamped(ev_rows), _clamped(ev_cols)
    rotated = rotated / (ev_rows[..., :, None] * ev_cols[..., None, :] + damping)
    return (vec_rows @ rotated @ jnp.swapaxes(vec_cols, -1, -2)).reshape(grad.shape)


def _diagonal_solve(grad: Array, factors: KroneckerFactors, damping: Array) -> Array:
    curvature = factors.inputs[..., :, None] * factors.outputs[..., None, :]
    return (grad.reshape(curvature.shape) / (curvature + damping)).reshape(grad.shape)


def context_statistics(context: Any, mode: str) -> Any:
    """`fisher_statistics` of the given mode at the linearisation point of a training step's
    [pcjax.Context][]."""
    if isinstance(context.model.base, Bidirectional):
        raise ValueError(
            "pcjax: Fisher statistics (natural_gradient, precision_weighted_gradient) of a "
            "bidirectional (bPC) network are not implemented: they would leave out its "
            "top-down network; use a first-order optimizer such as optax.adam."
        )
    states, observed = context.linearisation_point()
    return fisher_statistics(
        context.model.fn,
        context.params,
        states,
        context.x,
        observed,
        precision=context.precision,
        mode=mode,
    )


def _statistics(fisher: Any, context: Any, mode: str, name: str) -> Any:
    """The statistics to use: those passed, else those of the step's `context`."""
    if fisher is None and context is not None:
        fisher = context_statistics(context, mode)
    _check_fisher(fisher, mode, name)
    return fisher


def _check_fisher(fisher: Any, mode: str, name: str) -> None:
    if fisher is None:
        raise ValueError(
            f"pcjax.{name}: no Fisher statistics: use it inside a pcjax.make_train_step "
            "optimizer (which passes the step's `context`), or pass "
            f"fisher=pcjax.fisher_statistics(..., mode={mode!r}) to update()."
        )
    if mode == "matrix_free":
        if not isinstance(fisher, FisherOperator):
            raise ValueError(
                f"pcjax.{name}('matrix_free') needs a FisherOperator from "
                f"fisher_statistics(..., mode='matrix_free'), got {type(fisher).__name__}."
            )
        return
    for factors in jax.tree.leaves(fisher, is_leaf=_is_stat):
        if isinstance(factors, KroneckerFactors):
            if factors.diagonal != (mode == "diagonal"):
                raise ValueError(
                    f"pcjax.{name}({mode!r}) got statistics of the other mode; pass "
                    f"fisher_statistics(..., mode={mode!r})."
                )
        elif factors is not None:
            raise ValueError(
                f"pcjax.{name}({mode!r}) needs fisher_statistics(..., mode={mode!r}), "
                f"got {type(fisher).__name__}."
            )


def _check_hyperparameters(mode, damping, ema_decay, refresh_every, cg_iters, mask) -> None:
    """Validate the hyperparameters that are concrete (traced ones, as
    `optax.inject_hyperparams` passes to `update`, and schedules are taken as they come)."""
    if mode not in MODES:
        raise ValueError(f"pcjax.natural_gradient: unknown mode {mode!r}; choose one of {MODES}.")
    value = concrete_value(damping)
    if value is not None and not (value.shape == () and value > 0):
        raise ValueError(f"pcjax.natural_gradient: `damping` must be positive, got {damping!r}.")
    value = concrete_value(ema_decay)
    if value is not None and not (value.shape == () and 0.0 <= value < 1.0):
        raise ValueError(
            f"pcjax.natural_gradient: `ema_decay` must be in [0, 1), got {ema_decay!r}."
        )
    for name, number in (("refresh_every", refresh_every), ("cg_iters", cg_iters)):
        value = concrete_value(number)
        if value is not None and (
            isinstance(number, bool)
            or value.shape != ()
            or not np.issubdtype(value.dtype, np.integer)
            or value < 1
        ):
            raise ValueError(
                f"pcjax.natural_gradient: `{name}` must be a positive int, got {number!r}."
            )
    if mode == "matrix_free":
        if mask is not None:
            raise ValueError(
                "pcjax.natural_gradient: `mask` is not used by 'matrix_free', which covers the "
                "parameters the predictions depend on and keeps no running factors."
            )
        return
    if mask is None:
        for name, number, neutral in (
            ("ema_decay", ema_decay, 0),
            ("refresh_every", refresh_every, 1),
        ):
            value = concrete_value(number)
            if value is not None and value != neutral:
                raise ValueError(
                    f"pcjax.natural_gradient: `{name}`={number!r} keeps running Fisher factors "
                    "in the optimizer state, which needs `mask`: the parameters to keep them "
                    "for, e.g. mask=pcjax.fisher_mask(fn, params, x)."
                )


def _mask_leaves(mask: Any, trainable: Any) -> list[tuple[str, Array, bool]]:
    """(path, leaf, masked) for every floating-point leaf of the parameters."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(trainable)
    mask_leaves, mask_def = jax.tree_util.tree_flatten_with_path(mask)
    if mask_def != treedef:
        raise ValueError(
            "pcjax.natural_gradient: `mask` must have the structure of the floating-point "
            "leaves of the parameters (as pcjax.fisher_mask(fn, params, x) returns); got "
            f"{mask_def}, the parameters have {treedef}."
        )
    result = []
    for (path, leaf), (_, flag) in zip(paths_leaves, mask_leaves):
        key = jax.tree_util.keystr(path)
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(
                f"pcjax.natural_gradient: `mask` entry {key} must be a bool, got {flag!r}."
            )
        result.append((key, leaf, bool(flag)))
    return result


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _per_leaf(updates: Any, tree: Any, what: str) -> list[Any]:
    """The entries of `tree` (statistics or state) at the leaves of `updates`."""
    treedef = jax.tree.structure(updates)
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"pcjax.natural_gradient: the {what} do not have the structure of the gradients "
            f"({treedef}): {error}"
        ) from None


def _check_shapes(path: str, grad: Array, factors: KroneckerFactors) -> None:
    rows, cols = factors.rows_cols()
    lead = rows.shape[: factors.stacked]
    expected = (*lead, rows.shape[factors.stacked], cols.shape[factors.stacked])
    if grad.size != np.prod(expected) or grad.shape[: factors.stacked] != lead:
        raise ValueError(
            f"pcjax.natural_gradient: the gradient of {path} has shape {tuple(grad.shape)} but "
            f"its Fisher factors are for {expected} (stacked axes, rows, columns); pass the "
            "statistics of these parameters."
        )


def natural_gradient(
    mode: str = "kronecker",
    *,
    damping: float | Callable[[Array], Array] = 1e-3,
    ema_decay: float = 0.0,
    refresh_every: int = 1,
    cg_iters: int = 20,
    cg_tol: float = 1e-6,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Precondition gradients by the inverse Fisher of the PC model: $(G + \\lambda I)^{-1} g$.

    An optax transform that takes its statistics from the extra argument `context` (passed by
    [pcjax.make_train_step][]) or `fisher` (from [pcjax.fisher_statistics][]); chain it with a
    learning rate, e.g.
    `optax.chain(pcjax.natural_gradient("kronecker"), optax.scale_by_learning_rate(0.1))`.

    **Main arguments:**

    - `mode`: `"diagonal"`, `"kronecker"` (default) or `"matrix_free"` (see the module
      docstring).
      The first two precondition the weights and biases of dense layers (`fisher_mask`);
      `"matrix_free"` the parameters the predictions depend on. Other gradients (a learned
      precision's, say, whose Fisher block here is zero) pass through unchanged.
    - `damping`: $\\lambda > 0$, added to the Fisher; a number or a schedule, a function of the
      update count (0 at the first update). Default 1e-3.

    **Other arguments:**

    - `ema_decay`: running average of the Kronecker/diagonal factors,
      $\\bar G \\leftarrow \\beta \\bar G + (1 - \\beta) G$ (0: this batch's only; the first step
      uses its own statistics). Needs `mask`. Not used by `"matrix_free"`.
    - `refresh_every`: recompute the eigendecompositions (kronecker) or curvature (diagonal)
      every k steps, reusing them in between. Needs `mask` unless 1.
    - `cg_iters`, `cg_tol`: the most conjugate-gradient iterations of `"matrix_free"`, and the
      relative residual at which they stop.
    - `mask`: for `"diagonal"`/`"kronecker"`, a pytree of bools with the structure of the
      floating-point leaves of the parameters, True where running factors are kept (from
      `pcjax.fisher_mask(fn, params, x)`). Statistics for a leaf it leaves out, or none for a
      leaf it marks, raise an error.
    - `axis_name`: inside `jax.shard_map` (or `pmap`) over a batch split into equal shards, the
      mesh axis to average the Fisher statistics over, so that every device preconditions with
      those of the whole batch. Required there: under `check_vma=True` statistics that vary
      over devices are reported; with `check_vma=False` they cannot be detected.

    **State:** the update count; with a `mask`, per marked weight `(in, out)`, factors and
    their eigenbases of about $2 (\\text{in}^2 + \\text{out}^2)$ numbers (kronecker) or
    $2 (\\text{in} + \\text{out})$ (diagonal), and nothing for other leaves. Without a mask
    (`ema_decay=0`, `refresh_every=1`) each step uses its own statistics and nothing is kept.

    Numeric hyperparameters are checked when they are concrete, so
    `optax.inject_hyperparams(pcjax.natural_gradient)(...)` works.

    **Returns:** an `optax.GradientTransformationExtraArgs`; its `update(grads, state,
    params, context=...)` (in [pcjax.make_train_step][]) or `update(..., fisher=...)` (from
    [pcjax.fisher_statistics][]) returns the preconditioned gradients and the new
    [pcjax.NaturalGradientState][].

    **Raises:** `ValueError` for an unknown `mode`, a damping that is not positive, an
    `ema_decay` outside $[0, 1)$, `refresh_every` or `cg_iters` not a positive int, running
    factors without a `mask`; at update time for missing statistics, statistics that do not
    fit the mask, and the networks [pcjax.fisher_statistics][] refuses.

    **Example** ([setup][examples-setup]): the output layer's gradient is whitened by its
    inputs' second moments, $(\\mathbb{E}[h h^\\top] + \\lambda I)^{-1} g$ (unit precision).

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> free = {"h": start["h"]}
    >>> grads = pc.param_grads(fn, params, free, x, {"y": y})
    >>> fisher = pc.fisher_statistics(fn, params, free, x, {"y": y}, mode="kronecker")
    >>> natural = pc.natural_gradient("kronecker", damping=1e-3)
    >>> updates, state = natural.update(grads, natural.init(params), params, fisher=fisher)
    >>> h = start["h"]
    >>> expected = jnp.linalg.solve(h.T @ h / 2 + 1e-3 * jnp.eye(4), grads["w2"])
    >>> bool(jnp.allclose(updates["w2"], expected, rtol=1e-3))  # measured: 2e-4
    True
    >>> optimizer = optax.chain(natural, optax.scale_by_learning_rate(0.1))  # for a step

    ```
    """
    _check_hyperparameters(mode, damping, ema_decay, refresh_every, cg_iters, mask)
    diagonal = mode == "diagonal"
    stateful = mask is not None

    def init(params):
        count = jnp.zeros((), jnp.int32)
        if mode == "matrix_free":
            return NaturalGradientState(count, None, None, count, jnp.zeros((), jnp.float32))
        if not stateful:
            return NaturalGradientState(count, None, None)
        trainable = eqx.filter(params, eqx.is_inexact_array)
        entries = _mask_leaves(mask, trainable)
        factors = [_empty_factors(leaf, diagonal, key) if on else None for key, leaf, on in entries]
        inverse = [f if diagonal or f is None else _initial_inverse(f) for f in factors]
        treedef = jax.tree.structure(trainable)
        return NaturalGradientState(
            count, jax.tree.unflatten(treedef, factors), jax.tree.unflatten(treedef, inverse)
        )

    def update(updates, state, params=None, *, fisher=None, context=None, **extra_args):
        del params, extra_args
        fisher = _statistics(fisher, context, mode, "natural_gradient")
        lam = damping(state.count) if callable(damping) else damping
        if mode == "matrix_free":
            solution, iterations, residual = _matrix_free_solve(
                updates, fisher, lam, cg_iters, cg_tol, axis_name
            )
            return solution, NaturalGradientState(state.count + 1, None, None, iterations, residual)
        if axis_name is not None:
            fisher = jax.lax.pmean(fisher, axis_name)  # mean of the shards' means
        _check_replicated(varying_axes(fisher), varying_axes(updates), axis_name)
        paths = _paths(updates)
        grads = jax.tree.leaves(updates)
        stats = _per_leaf(updates, fisher, "Fisher statistics")
        for path, grad, stat in zip(paths, grads, stats):
            if stat is not None:
                _check_shapes(path, grad, stat)
        stats = [None if s is None else _canonical(s, g.ndim) for s, g in zip(stats, grads)]
        if stateful:
            factors, inverse = _running(
                state, updates, paths, stats, diagonal, ema_decay, refresh_every
            )
            solved = [
                g if f is None else _solve(g, inv, lam, diagonal)
                for g, f, inv in zip(grads, factors, inverse)
            ]
            treedef = jax.tree.structure(updates)
            new_state = NaturalGradientState(
                state.count + 1,
                jax.tree.unflatten(treedef, factors),
                jax.tree.unflatten(treedef, inverse),
            )
        else:
            solved = [
                g if s is None else _solve(g, s if diagonal else _eig(s), lam, diagonal)
                for g, s in zip(grads, stats)
            ]
            new_state = NaturalGradientState(state.count + 1, None, None)
        return jax.tree.unflatten(jax.tree.structure(updates), solved), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _solve(grad: Array, inverse: Any, damping: Array, diagonal: bool) -> Array:
    damping = jnp.asarray(damping, grad.dtype)  # a float64 schedule keeps float32 updates
    if diagonal:
        return _diagonal_solve(grad, inverse, damping)
    return _kronecker_solve(grad, inverse, damping)


def _running(state, updates, paths, stats, diagonal, ema_decay, refresh_every):
    """The running factors (EMA) and their inverse forms, refreshed every `refresh_every`
    updates, for the leaves the mask marks (None elsewhere)."""
    old = _per_leaf(updates, state.factors, "optimizer state's factors")
    old_inverse = _per_leaf(updates, state.inverse, "optimizer state's factors")
    for path, stat, previous in zip(paths, stats, old):
        if stat is not None and previous is None:
            raise ValueError(
                f"pcjax.natural_gradient: Fisher statistics for {path} arrived but the "
                "optimizer state has no factors for it (no state: `mask` leaves it out); "
                "mark it True in `mask` (pcjax.fisher_mask(fn, params, x) marks every "
                "dense-layer parameter)."
            )
        if stat is None and previous is not None:
            raise ValueError(
                f"pcjax.natural_gradient: `mask` marks {path} but the Fisher statistics have "
                "no statistics for it (it is not a parameter of a dense layer tagged as a node); "
                "mark it False."
            )
        if stat is not None and _layout(stat) != _layout(previous):
            raise ValueError(
                f"pcjax.natural_gradient: the Fisher statistics of {path} have (row factor, "
                f"column factor, stacked axes) shapes {_layout(stat)} but the optimizer state "
                f"holds {_layout(previous)}."
            )
    first = state.count == 0

    def average(new, previous):
        if new is None:
            return None

        def blend(n, o):
            return jnp.where(first, n, ema_decay * o + (1 - ema_decay) * n)

        return KroneckerFactors(
            blend(new.inputs, previous.inputs),
            blend(new.outputs, previous.outputs),
            False,
            new.stacked,
        )

    factors = [average(s, o) for s, o in zip(stats, old)]

    def refresh():
        return [f if f is None or diagonal else _eig(f) for f in factors]

    inverse = jax.lax.cond(state.count % refresh_every == 0, refresh, lambda: old_inverse)
    return factors, inverse


def _layout(factors: KroneckerFactors) -> tuple:
    return (factors.inputs.shape, factors.outputs.shape, factors.stacked)


def _matrix_free_solve(updates, fisher, damping, cg_iters, cg_tol, axis_name):
    """$(G + \\lambda I)^{-1} g$ by conjugate gradients over the covered leaves; the others
    (zero Fisher rows) pass through."""
    leaves, treedef = jax.tree.flatten(updates)
    covered = fisher.covered or (True,) * len(leaves)
    if len(covered) != len(leaves):
        raise ValueError(
            f"pcjax.natural_gradient: the FisherOperator covers parameters with {len(covered)} "
            f"floating-point leaves but the gradients have {len(leaves)}; compute the "
            "statistics for the parameters being updated."
        )
    if not any(covered):
        return updates, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    own_axes = varying_axes(updates)

    def embed(sub: list[Array]) -> Any:
        parts = iter(sub)
        full = [next(parts) if c else jnp.zeros_like(g) for g, c in zip(leaves, covered)]
        return jax.tree.unflatten(treedef, full)

    def matvec(sub: list[Array]) -> list[Array]:
        product, jvp_axes = fisher.apply(embed(sub))
        _check_replicated(jvp_axes - {axis_name}, own_axes, axis_name)
        if axis_name is not None:
            # Device-local products, or (check_vma=True) their sum, which the transpose of the
            # replicated parameters' broadcast makes: either way the mean over the devices.
            product = device_mean(product, axis_name, None)
        product = _per_leaf(updates, product, "Fisher-vector products")
        products = [p for p, c in zip(product, covered) if c]
        return [p + jnp.asarray(damping, s.dtype) * s for p, s in zip(products, sub)]

    sub = [g for g, c in zip(leaves, covered) if c]
    solved, iterations, residual = _conjugate_gradients(matvec, sub, cg_iters, cg_tol)
    parts = iter(solved)
    solution = [next(parts) if c else g for g, c in zip(leaves, covered)]
    return jax.tree.unflatten(treedef, solution), iterations, residual.astype(jnp.float32)


def _conjugate_gradients(
    matvec: Callable[[list[Array]], list[Array]], b: list[Array], maxiter: Any, tol: Any
) -> tuple[list[Array], Array, Array]:
    r"""Solve $M u = b$ for symmetric positive definite $M$, from $u_0 = 0$, until
    $\lVert r \rVert \le \text{tol} \lVert b \rVert$ or `maxiter` iterations; returns $u$,
    the iterations made and the relative residual $\lVert r \rVert / \lVert b \rVert$.

    pcjax's one CG (`pcjax._cg`), written out rather than `jax.scipy.sparse.linalg.cg`, whose
    `custom_linear_solve` marks the solution device-varying inside `shard_map` when `matvec`
    closes over device-varying values: a replicated right-hand side and operator give a
    replicated solution.
    """
    bb = dots(b, b, None)[0]
    u, k, rr = conjugate_gradients(matvec, b, maxiter, tol**2 * bb, early_stop=True)
    return u, k, jnp.sqrt(rr[0] / jnp.where(bb > 0, bb, 1.0))


class PrecisionWeightedState(NamedTuple):
    """The (empty) state of `precision_weighted_gradient`."""


def precision_weighted_gradient() -> optax.GradientTransformationExtraArgs:
    """The literal "multiply the gradient by the precision" update, for comparison.

    For a dense layer predicting a node of precision $P$ it returns $g P$ (weights,
    shape `(in, out)`) and $P g$ (bias): the gradient multiplied by the output factor of the
    Fisher rather than divided by it. It is *not* a natural gradient (see the module
    docstring); other gradients pass through. Takes `fisher` statistics of the
    `"kronecker"` or `"diagonal"` mode, or the `context` of [pcjax.make_train_step][].

    **Arguments:** none.

    **Returns:** an `optax.GradientTransformationExtraArgs`, used as
    [pcjax.natural_gradient][] is.

    **Raises:** `ValueError` at update time without statistics, or with those of the
    `"matrix_free"` mode.

    **Example** ([setup][examples-setup]): with the output precision 4, the output layer's
    gradient is multiplied by 4.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> free, precision = {"h": start["h"]}, {"y": 4.0 * jnp.ones(2)}
    >>> grads = pc.param_grads(fn, params, free, x, {"y": y}, precision=precision)
    >>> fisher = pc.fisher_statistics(
    ...     fn, params, free, x, {"y": y}, precision=precision, mode="diagonal"
    ... )
    >>> weighted = pc.precision_weighted_gradient()
    >>> updates, _ = weighted.update(grads, weighted.init(params), params, fisher=fisher)
    >>> bool(jnp.allclose(updates["w2"], 4.0 * grads["w2"]))
    True

    ```
    """

    def init(params):
        del params
        return PrecisionWeightedState()

    def update(updates, state, params=None, *, fisher=None, context=None, **extra_args):
        del params, extra_args
        if fisher is None and context is not None:
            fisher = context_statistics(context, "kronecker")
        if fisher is None or isinstance(fisher, FisherOperator):
            raise ValueError(
                "pcjax.precision_weighted_gradient needs fisher_statistics(..., "
                "mode='kronecker' or 'diagonal')."
            )

        def scale(grad, factors):
            if factors is None:
                return grad
            rows, cols = factors.rows_cols()
            matrix = grad.reshape(*rows.shape[: factors.stacked + 1], cols.shape[factors.stacked])
            p = factors.outputs
            if factors.transposed:  # P g: the precision acts on the rows
                weighted = p[..., :, None] * matrix if factors.diagonal else p @ matrix
            else:  # g P
                weighted = matrix * p[..., None, :] if factors.diagonal else matrix @ p
            return weighted.reshape(grad.shape)

        return jax.tree.map(scale, updates, fisher, is_leaf=_is_stat), state

    return optax.GradientTransformationExtraArgs(init, update)
