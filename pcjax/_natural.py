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
  with $G v = \\frac1B J^\\top P J v$ from `jax.linearize` and its transpose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._energy import CustomEnergy, Precision, batch_size, checked_values
from ._precision import dense_matrix, weigh
from ._tagging import _Tape, predictions, run_tagged

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
    """$v \\mapsto G v = \\frac1B J^\\top P J v$ at fixed states (`"matrix_free"` statistics)."""

    jvp: Callable
    vjp: Callable
    precision: dict
    batch_size: int = eqx.field(static=True)

    def __call__(self, tangent: Any) -> Any:
        outputs = self.jvp(tangent)
        weighted = {
            k: weigh(self.precision[k], v) if k in self.precision else v for k, v in outputs.items()
        }
        (product,) = self.vjp(weighted)
        return jax.tree.map(lambda p: p / self.batch_size, product)


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
        return FisherOperator(jvp, vjp, checked, batch_size(values))
    return _kronecker_statistics(fn, params, values, x, checked, diagonal=mode == "diagonal")


def _kronecker_statistics(fn, params, values, x, precision, *, diagonal: bool):
    leaves, treedef = jax.tree.flatten(eqx.filter(params, eqx.is_inexact_array))
    position = {id(leaf): i for i, leaf in enumerate(leaves)}
    tape = _Tape(values, record_dense=True)
    run_tagged(fn, params, x, values, tape)
    stats: list[KroneckerFactors | None] = [None] * len(leaves)
    batch = batch_size(values)
    for use in tape.dense:
        node = tape.node_of.get(id(use.output))
        if node is None:
            raise ValueError(
                "pcjax.fisher_statistics: a pcjax.dense output of shape "
                f"{use.output.shape} is not tagged directly as a node; write "
                "pcjax.node(name, pcjax.dense(h, w, b))."
            )
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
        for array, entry in ((use.weight, factors), (use.bias, bias)):
            if array is None:
                continue
            index = position.get(id(array))
            if index is None:
                raise ValueError(
                    f"pcjax.fisher_statistics: the parameter of shape {array.shape} given to "
                    f"pcjax.dense for node {node!r} is not a leaf of `params`; pass the "
                    "parameter array itself, not a transformed copy."
                )
            if stats[index] is not None:
                raise ValueError(
                    f"pcjax.fisher_statistics: the parameter of shape {array.shape} is used by "
                    "more than one pcjax.dense call; shared weights have no Kronecker factors "
                    "here, use mode='matrix_free'."
                )
            stats[index] = entry
    return jax.tree.unflatten(treedef, stats)


# ---------------------------------------------------------------- the optax transforms


class NaturalGradientState(NamedTuple):
    """`count` of updates; running `factors` (EMA) and their cached `inverse` forms per leaf."""

    count: Array
    factors: Any
    inverse: Any


def _is_stat(value: Any) -> bool:
    return value is None or isinstance(value, KroneckerFactors)


def _empty_factors(leaf: Array, diagonal: bool) -> KroneckerFactors | None:
    """Zero factors for a leaf that may be a dense weight (2-D) or bias (1-D)."""
    if leaf.ndim == 2:
        d_in, d_out = leaf.shape
    elif leaf.ndim == 1:
        d_in, d_out = 1, leaf.shape[0]
    else:
        return None
    if diagonal:
        return KroneckerFactors(jnp.zeros((d_in,), leaf.dtype), jnp.zeros((d_out,), leaf.dtype))
    return KroneckerFactors(
        jnp.zeros((d_in, d_in), leaf.dtype), jnp.zeros((d_out, d_out), leaf.dtype)
    )


def _eig(factors: KroneckerFactors) -> tuple[Array, Array, Array, Array]:
    """Eigendecompositions of both Kronecker factors."""
    ev_in, vec_in = jnp.linalg.eigh(factors.inputs)
    ev_out, vec_out = jnp.linalg.eigh(factors.outputs)
    return ev_in, vec_in, ev_out, vec_out


def _kronecker_solve(grad: Array, inverse, damping: float) -> Array:
    """$(A \\otimes P + \\lambda I)^{-1} g$ through the eigenbases of A and P."""
    ev_in, vec_in, ev_out, vec_out = inverse
    matrix = grad.reshape(vec_in.shape[0], vec_out.shape[0])
    rotated = vec_in.T @ matrix @ vec_out
    rotated = rotated / (ev_in[:, None] * ev_out[None, :] + damping)
    return (vec_in @ rotated @ vec_out.T).reshape(grad.shape)


def _diagonal_solve(grad: Array, factors: KroneckerFactors, damping: float) -> Array:
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


def natural_gradient(
    mode: str = "kronecker",
    *,
    damping: float = 1e-3,
    ema_decay: float = 0.0,
    refresh_every: int = 1,
    cg_iters: int = 20,
    cg_tol: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    """Precondition gradients by the inverse Fisher of the PC model: $(G + \\lambda I)^{-1} g$.

    An optax transform taking the extra argument `fisher` (from `pcjax.fisher_statistics`, or
    passed by `pcjax.train_step(..., fisher=mode)`); chain it with a learning rate, e.g.
    `optax.chain(pcjax.natural_gradient("kronecker"), optax.scale_by_learning_rate(0.1))`.

    **Arguments:**

    - `mode`: `"diagonal"`, `"kronecker"` or `"matrix_free"` (see the module docstring).
      The first two precondition the weights and biases of `pcjax.dense` layers and pass other
      gradients through unchanged; `"matrix_free"` preconditions every parameter (apply it
      only to parameters that the predictions depend on, e.g. with `optax.masked`).
    - `damping`: $\\lambda > 0$, added to the Fisher.
    - `ema_decay`: running average of the Kronecker/diagonal factors,
      $\\bar G \\leftarrow \\beta \\bar G + (1 - \\beta) G$ (0: this batch's only; the first step
      uses its own statistics). Not used by `"matrix_free"`, which always uses this batch's.
    - `refresh_every`: recompute the eigendecompositions (kronecker) or curvature (diagonal)
      every k steps, reusing them in between.
    - `cg_iters`, `cg_tol`: the most conjugate-gradient iterations of `"matrix_free"`, and the
      relative residual at which they stop.

    Its state stores, per 2-D or 1-D parameter, factors of size in^2 + out^2 (kronecker).
    """
    if mode not in MODES:
        raise ValueError(f"pcjax.natural_gradient: unknown mode {mode!r}; choose one of {MODES}.")
    if not damping > 0:
        raise ValueError(f"pcjax.natural_gradient: `damping` must be positive, got {damping}.")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"pcjax.natural_gradient: `ema_decay` must be in [0, 1), got {ema_decay}.")
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(
            "pcjax.natural_gradient: `refresh_every` must be a positive int, "
            f"got {refresh_every!r}."
        )
    diagonal = mode == "diagonal"

    def init(params):
        count = jnp.zeros((), jnp.int32)
        if mode == "matrix_free":
            return NaturalGradientState(count, None, None)
        factors = jax.tree.map(lambda p: _empty_factors(p, diagonal), params)
        inverse = (
            factors
            if diagonal
            else jax.tree.map(lambda f: None if f is None else _eig(f), factors, is_leaf=_is_stat)
        )
        return NaturalGradientState(count, factors, inverse)

    def update(updates, state, params=None, *, fisher=None, **extra_args):
        del params, extra_args
        _check_fisher(fisher, mode, "natural_gradient")
        count = state.count + 1
        if mode == "matrix_free":
            solution, _ = jax.scipy.sparse.linalg.cg(
                lambda v: jax.tree.map(lambda a, b: a + damping * b, fisher(v), v),
                updates,
                maxiter=cg_iters,
                tol=cg_tol,
            )
            return solution, NaturalGradientState(count, None, None)

        def average(new, old):
            if new is None:
                return old
            return jax.tree.map(
                lambda n, o: jnp.where(state.count == 0, n, ema_decay * o + (1 - ema_decay) * n),
                new,
                old,
            )

        factors = jax.tree.map(average, fisher, state.factors, is_leaf=_is_stat)

        def refresh():
            if diagonal:
                return factors
            return jax.tree.map(
                lambda new, f, old: old if new is None else _eig(f),
                fisher,
                factors,
                state.inverse,
                is_leaf=_is_stat,
            )

        inverse = jax.lax.cond(state.count % refresh_every == 0, refresh, lambda: state.inverse)

        def precondition(grad, new, inv):
            if new is None:  # not a pcjax.dense parameter: unchanged
                return grad
            if diagonal:
                return _diagonal_solve(grad, inv, damping)
            return _kronecker_solve(grad, inv, damping)

        preconditioned = jax.tree.map(precondition, updates, fisher, inverse, is_leaf=_is_stat)
        return preconditioned, NaturalGradientState(count, factors, inverse)

    return optax.GradientTransformationExtraArgs(init, update)


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
