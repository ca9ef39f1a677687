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
  eigendecompositions of $A$ and $P$ (layers built with `pcjax.dense`);
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

from ._energy import CustomEnergy, Precision, batch_size, checked_values
from ._precision import dense_matrix, weigh
from ._sharding import _device_mean
from ._tagging import DenseUse, _Tape, predictions, run_tagged

Array = jax.Array
MODES = ("diagonal", "kronecker", "matrix_free")


class KroneckerFactors(NamedTuple):
    """Fisher factors of one dense parameter: $G = A \\otimes P$.

    `inputs` is $A = \\mathbb{E}[h h^\\top]$ (or its diagonal, `"diagonal"` mode; a 1 x 1 count of
    positions for a bias), `outputs` is the node's precision $P$ (or its diagonal).
    """

    inputs: Array
    outputs: Array


class FisherOperator(eqx.Module):
    """$v \\mapsto G v = \\frac1B J^\\top P J v$ at fixed states (`"matrix_free"` statistics).

    `covered[i]` says whether the predictions depend on the `i`-th floating-point leaf of the
    parameters (in `jax.tree.leaves` order); the Fisher rows and columns of the others are
    exactly zero. None: every leaf is covered.
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


def fisher_statistics(
    fn: Callable[..., Any],
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
      `params`, holding `KroneckerFactors` for the weights and biases of `pcjax.dense` layers
      and None elsewhere (those leaves are not preconditioned).
    - `"matrix_free"`: a `FisherOperator` for the whole tagged function.

    Pass the result to the optimizer as `optimizer.update(grads, state, params, fisher=...)`;
    `pcjax.train_step(..., fisher=mode)` does this for you.
    """
    if mode not in MODES:
        raise ValueError(f"pcjax: unknown Fisher mode {mode!r}; choose one of {MODES}.")
    values, checked = checked_values(fn, params, dict(states), x, observed, precision)
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
        return FisherOperator(jvp, vjp, checked, batch_size(values), covered)
    return _kronecker_statistics(fn, params, values, x, checked, diagonal=mode == "diagonal")


def fisher_mask(fn: Callable[..., Any], params: Any, x: Any) -> Any:
    """Which parameters the `"diagonal"` and `"kronecker"` modes precondition.

    **Returns:** a pytree with the structure of the floating-point leaves of `params`
    (`eqx.filter(params, eqx.is_inexact_array)`): True for the weights and biases of
    `pcjax.dense` layers tagged as nodes, False elsewhere. Pass it as
    `natural_gradient(..., mask=...)` to keep running factors for those leaves only. Found by an
    abstract trace of `fn(params, x)`: no computation is run.
    """
    found: list[Any] = []

    def trace(diff, x):
        params_traced = eqx.combine(diff, static)
        leaves, treedef = jax.tree.flatten(eqx.filter(params_traced, eqx.is_inexact_array))
        mask = [False] * len(leaves)
        for _use, _node, indices in _dense_layers(fn, params_traced, x, None, leaves):
            for index in indices:
                if index is not None:
                    mask[index] = True
        found.append(jax.tree.unflatten(treedef, mask))

    diff, static = eqx.partition(params, eqx.is_inexact_array)
    eqx.filter_eval_shape(trace, diff, x)
    return found[0]


def _dense_layers(
    fn: Callable[..., Any], params: Any, x: Any, values: Any, leaves: list[Array]
) -> list[tuple[DenseUse, str, tuple[int | None, int | None]]]:
    """Every `pcjax.dense` call of `fn`: its use, its node and the leaf indices of its weight
    and bias among `leaves` (the floating-point leaves of `params`)."""
    position = {id(leaf): i for i, leaf in enumerate(leaves)}
    tape = _Tape(values, record_dense=True)
    run_tagged(fn, params, x, values, tape)
    layers = []
    seen: set[int] = set()
    for use in tape.dense:
        node = tape.node_of.get(id(use.output))
        if node is None:
            raise ValueError(
                "pcjax.fisher_statistics: a pcjax.dense output of shape "
                f"{use.output.shape} is not tagged directly as a node; write "
                "pcjax.node(name, pcjax.dense(h, w, b))."
            )
        indices = []
        for array in (use.weight, use.bias):
            if array is None:
                indices.append(None)
                continue
            index = position.get(id(array))
            if index is None:
                raise ValueError(
                    f"pcjax.fisher_statistics: the parameter of shape {array.shape} given to "
                    f"pcjax.dense for node {node!r} is not a leaf of `params`; pass the "
                    "parameter array itself, not a transformed copy."
                )
            if index in seen:
                raise ValueError(
                    f"pcjax.fisher_statistics: the parameter of shape {array.shape} is used by "
                    "more than one pcjax.dense call; shared weights have no Kronecker factors "
                    "here, use mode='matrix_free'."
                )
            seen.add(index)
            indices.append(index)
        layers.append((use, node, (indices[0], indices[1])))
    return layers


def _kronecker_statistics(fn, params, values, x, precision, *, diagonal: bool):
    leaves, treedef = jax.tree.flatten(eqx.filter(params, eqx.is_inexact_array))
    stats: list[KroneckerFactors | None] = [None] * len(leaves)
    batch = batch_size(values)
    for use, node, indices in _dense_layers(fn, params, x, values, leaves):
        out_dim = use.weight.shape[1]
        p = dense_matrix(precision.get(node), out_dim, use.output.dtype)
        h = use.inputs.reshape(-1, use.inputs.shape[-1])
        positions = h.shape[0] / batch  # > 1 when the layer is applied along a sequence, say
        if diagonal:
            factors = KroneckerFactors(jnp.sum(h * h, 0) / batch, jnp.diag(p))
            bias = KroneckerFactors(jnp.full((1,), positions, p.dtype), jnp.diag(p))
        else:
            factors = KroneckerFactors(h.T @ h / batch, p)
            bias = KroneckerFactors(jnp.full((1, 1), positions, p.dtype), p)
        for index, entry in zip(indices, (factors, bias)):
            if index is not None:
                stats[index] = entry
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
    (None without a `mask`, and for the leaves the mask leaves out)."""

    count: Array
    factors: Any
    inverse: Any


def _is_stat(value: Any) -> bool:
    return value is None or isinstance(value, KroneckerFactors)


def _empty_factors(leaf: Array, diagonal: bool, path: str) -> KroneckerFactors:
    """Zero factors for a dense weight `(in, out)` or bias `(out,)`."""
    if leaf.ndim == 2:
        d_in, d_out = leaf.shape
    elif leaf.ndim == 1:
        d_in, d_out = 1, leaf.shape[0]
    else:
        raise ValueError(
            f"pcjax.natural_gradient: `mask` marks {path}, which has shape "
            f"{tuple(leaf.shape)}; only the 2-D weights and 1-D biases of pcjax.dense layers "
            "have Kronecker factors."
        )
    if diagonal:
        return KroneckerFactors(jnp.zeros((d_in,), leaf.dtype), jnp.zeros((d_out,), leaf.dtype))
    return KroneckerFactors(
        jnp.zeros((d_in, d_in), leaf.dtype), jnp.zeros((d_out, d_out), leaf.dtype)
    )


def _initial_inverse(factors: KroneckerFactors) -> tuple[Array, Array, Array, Array]:
    """The eigendecomposition of zero factors: zero eigenvalues, identity eigenvectors."""
    d_in, d_out = factors.inputs.shape[0], factors.outputs.shape[0]
    dtype = factors.inputs.dtype
    return (
        jnp.zeros((d_in,), dtype),
        jnp.eye(d_in, dtype=dtype),
        jnp.zeros((d_out,), dtype),
        jnp.eye(d_out, dtype=dtype),
    )


def _eig(factors: KroneckerFactors) -> tuple[Array, Array, Array, Array]:
    """Eigendecompositions of both Kronecker factors."""
    ev_in, vec_in = jnp.linalg.eigh(factors.inputs)
    ev_out, vec_out = jnp.linalg.eigh(factors.outputs)
    return ev_in, vec_in, ev_out, vec_out


def _kronecker_solve(grad: Array, inverse, damping: Array) -> Array:
    """$(A \\otimes P + \\lambda I)^{-1} g$ through the eigenbases of A and P."""
    ev_in, vec_in, ev_out, vec_out = inverse
    matrix = grad.reshape(vec_in.shape[0], vec_out.shape[0])
    rotated = vec_in.T @ matrix @ vec_out
    rotated = rotated / (ev_in[:, None] * ev_out[None, :] + damping)
    return (vec_in @ rotated @ vec_out.T).reshape(grad.shape)


def _diagonal_solve(grad: Array, factors: KroneckerFactors, damping: Array) -> Array:
    curvature = factors.inputs[:, None] * factors.outputs[None, :]
    return (grad.reshape(curvature.shape) / (curvature + damping)).reshape(grad.shape)


def _check_fisher(fisher: Any, mode: str, name: str) -> None:
    if fisher is None:
        raise ValueError(
            f"pcjax.{name}: `fisher` statistics are missing; pass "
            f"fisher=pcjax.fisher_statistics(..., mode={mode!r}) to update(), or use "
            f"pcjax.train_step(..., fisher={mode!r})."
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
            want = 1 if mode == "diagonal" else 2
            if factors.inputs.ndim != want:
                raise ValueError(
                    f"pcjax.{name}({mode!r}) got statistics of the other mode; pass "
                    f"fisher_statistics(..., mode={mode!r})."
                )
        elif factors is not None:
            raise ValueError(
                f"pcjax.{name}({mode!r}) needs fisher_statistics(..., mode={mode!r}), "
                f"got {type(fisher).__name__}."
            )


def _concrete(value: Any) -> Any:
    """`value` as a NumPy value when it is known now (not traced), else None."""
    if isinstance(value, jax.core.Tracer) or callable(value):
        return None
    return np.asarray(value)


def _check_hyperparameters(mode, damping, ema_decay, refresh_every, cg_iters, mask) -> None:
    """Validate the hyperparameters that are concrete (traced ones, as
    `optax.inject_hyperparams` passes to `update`, and schedules are taken as they come)."""
    if mode not in MODES:
        raise ValueError(f"pcjax.natural_gradient: unknown mode {mode!r}; choose one of {MODES}.")
    value = _concrete(damping)
    if value is not None and not (value.shape == () and value > 0):
        raise ValueError(f"pcjax.natural_gradient: `damping` must be positive, got {damping!r}.")
    value = _concrete(ema_decay)
    if value is not None and not (value.shape == () and 0.0 <= value < 1.0):
        raise ValueError(
            f"pcjax.natural_gradient: `ema_decay` must be in [0, 1), got {ema_decay!r}."
        )
    for name, number in (("refresh_every", refresh_every), ("cg_iters", cg_iters)):
        value = _concrete(number)
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
            value = _concrete(number)
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
    d_in, d_out = factors.inputs.shape[0], factors.outputs.shape[0]
    if grad.size != d_in * d_out:
        raise ValueError(
            f"pcjax.natural_gradient: the gradient of {path} has shape {tuple(grad.shape)} but "
            f"its Fisher factors are {d_in} x {d_out}; pass the statistics of these parameters."
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

    An optax transform taking the extra argument `fisher` (from `pcjax.fisher_statistics`, or
    passed by `pcjax.train_step(..., fisher=mode)`); chain it with a learning rate, e.g.
    `optax.chain(pcjax.natural_gradient("kronecker"), optax.scale_by_learning_rate(0.1))`.

    **Arguments:**

    - `mode`: `"diagonal"`, `"kronecker"` or `"matrix_free"` (see the module docstring).
      The first two precondition the weights and biases of `pcjax.dense` layers;
      `"matrix_free"` the parameters the predictions depend on. Other gradients (a learned
      precision's, say, whose Fisher block here is zero) pass through unchanged.
    - `damping`: $\\lambda > 0$, added to the Fisher; a number or a schedule, a function of the
      update count (0 at the first update).
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
    """
    _check_hyperparameters(mode, damping, ema_decay, refresh_every, cg_iters, mask)
    diagonal = mode == "diagonal"
    stateful = mask is not None

    def init(params):
        count = jnp.zeros((), jnp.int32)
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

    def update(updates, state, params=None, *, fisher=None, **extra_args):
        del params, extra_args
        _check_fisher(fisher, mode, "natural_gradient")
        lam = damping(state.count) if callable(damping) else damping
        if mode == "matrix_free":
            solution = _matrix_free_solve(updates, fisher, lam, cg_iters, cg_tol, axis_name)
            return solution, NaturalGradientState(state.count + 1, None, None)
        if axis_name is not None:
            fisher = jax.lax.pmean(fisher, axis_name)  # mean of the shards' means
        _check_replicated(varying_axes(fisher), varying_axes(updates), axis_name)
        paths = _paths(updates)
        grads = jax.tree.leaves(updates)
        stats = _per_leaf(updates, fisher, "Fisher statistics")
        for path, grad, stat in zip(paths, grads, stats):
            if stat is not None:
                _check_shapes(path, grad, stat)
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
                "pcjax.dense parameter)."
            )
        if stat is None and previous is not None:
            raise ValueError(
                f"pcjax.natural_gradient: `mask` marks {path} but the Fisher statistics have "
                "no statistics for it (it is not a pcjax.dense parameter of a tagged node); "
                "mark it False."
            )
        if stat is not None and jax.tree.map(jnp.shape, stat) != jax.tree.map(jnp.shape, previous):
            raise ValueError(
                f"pcjax.natural_gradient: the Fisher statistics of {path} have shapes "
                f"{jax.tree.map(jnp.shape, stat)} but the optimizer state holds "
                f"{jax.tree.map(jnp.shape, previous)}."
            )
    first = state.count == 0

    def average(new, previous):
        if new is None:
            return None
        return jax.tree.map(
            lambda n, o: jnp.where(first, n, ema_decay * o + (1 - ema_decay) * n), new, previous
        )

    factors = [average(s, o) for s, o in zip(stats, old)]

    def refresh():
        return [f if f is None or diagonal else _eig(f) for f in factors]

    inverse = jax.lax.cond(state.count % refresh_every == 0, refresh, lambda: old_inverse)
    return factors, inverse


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
        return updates
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
            product = _device_mean(product, axis_name, None)
        product = _per_leaf(updates, product, "Fisher-vector products")
        products = [p for p, c in zip(product, covered) if c]
        return [p + jnp.asarray(damping, s.dtype) * s for p, s in zip(products, sub)]

    sub = [g for g, c in zip(leaves, covered) if c]
    solved = _conjugate_gradients(matvec, sub, cg_iters, cg_tol)
    parts = iter(solved)
    return jax.tree.unflatten(treedef, [next(parts) if c else g for g, c in zip(leaves, covered)])


def _conjugate_gradients(
    matvec: Callable[[list[Array]], list[Array]], b: list[Array], maxiter: Any, tol: Any
) -> list[Array]:
    r"""Solve $M u = b$ for symmetric positive definite $M$, from $u_0 = 0$, until
    $\lVert r \rVert \le \text{tol} \lVert b \rVert$ or `maxiter` iterations.

    Written out (rather than `jax.scipy.sparse.linalg.cg`, whose `custom_linear_solve` marks the
    solution device-varying inside `shard_map` when `matvec` closes over device-varying
    values) so that a replicated right-hand side and operator give a replicated solution.
    """

    def dot(u, v):
        return sum(jnp.vdot(a, c) for a, c in zip(u, v))

    def axpy(alpha, u, v):  # alpha u + v
        return [alpha * a + c for a, c in zip(u, v)]

    bound = tol**2 * dot(b, b)

    def condition(carry):
        _, _, _, rr, k = carry
        return (k < maxiter) & (rr > bound)

    def body(carry):
        u, r, p, rr, k = carry
        mp = matvec(p)
        alpha = rr / dot(p, mp)
        u, r = axpy(alpha, p, u), axpy(-alpha, mp, r)
        rr_new = dot(r, r)
        return u, r, axpy(rr_new / rr, p, r), rr_new, k + 1

    zeros = [jnp.zeros_like(a) for a in b]
    start = (zeros, b, b, dot(b, b), jnp.zeros((), jnp.int32))
    return jax.lax.while_loop(condition, body, start)[0]


class PrecisionWeightedState(NamedTuple):
    """The (empty) state of `precision_weighted_gradient`."""


def uses_fisher(opt_state: Any) -> bool:
    """Whether an optimizer state holds a transform that consumes `fisher` statistics."""
    kinds = (NaturalGradientState, PrecisionWeightedState)
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kinds))
    return any(isinstance(s, kinds) for s in nodes)


def precision_weighted_gradient() -> optax.GradientTransformationExtraArgs:
    """The literal "multiply the gradient by the precision" update, for comparison.

    For a `pcjax.dense` layer predicting a node of precision $P$ it returns $g P$ (weights,
    shape `(in, out)`) and $P g$ (bias): the gradient multiplied by the output factor of the
    Fisher rather than divided by it. It is *not* a natural gradient (see DESIGN notes and the
    module docstring); other gradients pass through. Takes `fisher` statistics of the
    `"kronecker"` or `"diagonal"` mode.
    """

    def init(params):
        del params
        return PrecisionWeightedState()

    def update(updates, state, params=None, *, fisher=None, **extra_args):
        del params, extra_args
        if fisher is None or isinstance(fisher, FisherOperator):
            raise ValueError(
                "pcjax.precision_weighted_gradient needs fisher_statistics(..., "
                "mode='kronecker' or 'diagonal')."
            )

        def scale(grad, factors):
            if factors is None:
                return grad
            p = factors.outputs
            matrix = grad.reshape(-1, p.shape[0])
            weighted = matrix * p[None, :] if p.ndim == 1 else matrix @ p
            return weighted.reshape(grad.shape)

        return jax.tree.map(scale, updates, fisher, is_leaf=_is_stat), state

    return optax.GradientTransformationExtraArgs(init, update)
