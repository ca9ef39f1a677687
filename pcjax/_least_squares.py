r"""Inference as nonlinear least squares: Gauss-Newton and Levenberg-Marquardt on the states,
by optimistix, with lineax's matrix-free conjugate gradients for the inner solves.

The Gaussian energy is a weighted least-squares problem in the states: with residuals
$r_i = R_i^\top e_i$, $R_i R_i^\top = P_i$ (the square root of a scalar or per-feature
precision, the Cholesky factor of a full one),

$$F(x) = \tfrac12 \sum_i e_i^\top P_i e_i + c = \tfrac12 \lVert r(x) \rVert^2 + c,$$

$c$ the log-det terms, which do not depend on the states. A Gauss-Newton step solves the
linearised problem $\min_\delta \lVert r + J \delta \rVert^2$, $J = \partial r / \partial x$,
i.e. $J^\top J\, \delta = -J^\top r = -\partial F / \partial x$: Newton's step with the Hessian
replaced by its positive semi-definite part $J^\top J = \sum_i (\partial e_i / \partial x)^\top
P_i\, (\partial e_i / \partial x)$ (the second derivatives of the predictions dropped). On a
linear-Gaussian network the energy is exactly quadratic and one step lands on the equilibrium.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx

from ._solvers import (
    AbstractSolver,
    Start,
    check_steps,
    check_tol,
    per_sample_norms,
    real,
    resolve_sample_axes,
)

Array = jax.Array
Nodes = dict[str, Array]
__all__ = ["GaussNewton", "LevenbergMarquardt"]

NO_RESIDUALS_MESSAGE = (
    "{where}: the energy being relaxed has no least-squares form here. The least-squares "
    "solvers take the standard energy of a tagged function, pcjax.error_parameterised(fn), "
    "pcjax.preconditioned(...) of either, or pcjax.bidirectional(up, down), under "
    "pcjax.infer, pcjax.Equilibrium or pcjax.Amortised; the field of "
    "pcjax.fixed_predictions(fn) is not the gradient of an energy and pcjax.Nudged's "
    "negative nudge is not a sum of squares (use pcjax.Backtracking or pcjax.GradientDescent "
    "there)."
)


def _check_tolerance(value: Any, name: str, where: str) -> float:
    """`value` as a non-negative float, else a clear error naming `name`."""
    number = real(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{where}: `{name}` must be a finite number >= 0, got {value!r}.")
    return number


def _residual_scale(states: Nodes) -> Array:
    r"""$\sqrt{200\, n}$, $n$ the number of state entries: the constant the residuals are
    multiplied by before optimistix sees them. It changes no Gauss-Newton or
    Levenberg-Marquardt step (they are invariant under scaling the residuals) but keeps
    lineax's CG from declaring a breakdown: it returns NaN where a direction's curvature
    $p^\top A p / r^\top r$ is below $200\, \epsilon\, n$ in absolute terms (measured: NaN
    states with precisions 1e-4 on 12 state entries; with $n = 64{,}000$ float32 entries any
    curvature below 1.5, unit precisions included). Scaled, the test fires only for
    curvatures below $\epsilon$ times the unscaled ones."""
    size = sum(jnp.size(v) for v in jax.tree.leaves(states))
    return jnp.sqrt(jnp.asarray(200.0 * size, jnp.float32))


class _LeastSquares(AbstractSolver):
    """What the Gauss-Newton family shares: validation, the residual form, the run and the
    count of evaluations."""

    steps: int = eqx.field(static=True)
    cg_steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    tol: Any
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        steps: int,
        *,
        cg_steps: int = 20,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        tol: Any = None,
        throw: bool = False,
    ):
        where = f"pcjax.{type(self).__name__}"
        self.steps = check_steps(steps)
        self.cg_steps = check_steps(cg_steps, "cg_steps")
        self.rtol = _check_tolerance(rtol, "rtol", where)
        self.atol = _check_tolerance(atol, "atol", where)
        self.tol = check_tol(tol)
        self.throw = bool(throw)

    def _optimistix(self, linear_solver: lx.AbstractLinearSolver) -> Any:
        raise NotImplementedError

    def _evaluations_per_step(self) -> int:
        """Field evaluations one optimistix step costs (a JVP or a VJP alone counts 1, a
        JVP/VJP pair 2): the linearisation of the residuals at the proposed point (1), the
        right-hand side $J^\\top r$ (1), lineax's CG on $J^\\top J$ (+ damping): its initial
        residual and `cg_steps` iterations, a product $J^\\top (J p)$ each (2 each)."""
        return 2 + 2 * (self.cg_steps + 1)

    def run(self, field, states, *, key, sample_axes):
        del key  # deterministic
        where = f"pcjax.{type(self).__name__}"
        residuals = getattr(field, "residuals", None)
        if residuals is None:
            raise ValueError(NO_RESIDUALS_MESSAGE.format(where=where))
        jax.eval_shape(residuals, states)  # a non-least-squares node raises here, by name
        layout = resolve_sample_axes(states, sample_axes)
        value, grads = field(states)
        initial = Start(value, per_sample_norms(grads, layout))
        scale = _residual_scale(states)

        def scaled(y: Nodes) -> Nodes:
            return jax.tree.map(lambda r: scale.astype(r.dtype) * r, residuals(y))

        # CG with no tolerance runs exactly `cg_steps` iterations (fewer only at an exact
        # solve) and reports success: a truncated (inexact) Gauss-Newton step, of known cost.
        cg = lx.CG(rtol=0.0, atol=0.0, max_steps=self.cg_steps, stabilise_every=None)
        solution = optx.least_squares(
            lambda y, args: scaled(y),
            self._optimistix(lx.Normal(cg)),
            dict(states),
            max_steps=self.steps,
            throw=False,
        )
        steps = jnp.asarray(solution.stats["num_steps"], jnp.int32)
        # optimistix returns the last accepted point; its last step's proposal (computed,
        # not yet tested) is one more Gauss-Newton step: `_finish` decides whether to take it.
        accepted = dict(solution.value)
        chosen, extra = self._finish(scaled, accepted, solution.state)
        # Derivatives (jax.grad through inference) are optimistix's implicit ones, of the
        # accepted point: the final proposal only moves it closer to the same equilibrium.
        moved = {
            name: (accepted[name] + jax.lax.stop_gradient(chosen[name] - accepted[name])).astype(
                v.dtype
            )
            for name, v in states.items()
        }
        evaluations = 1 + steps * self._evaluations_per_step() + extra
        return moved, steps, evaluations, None, initial

    def _finish(self, residuals: Any, accepted: Nodes, state: Any) -> tuple[Nodes, int]:
        """The states to return from optimistix's last accepted point and its final state,
        and the evaluations that decision cost."""
        raise NotImplementedError


class GaussNewton(_LeastSquares):
    r"""Gauss-Newton on the states (`optimistix.GaussNewton`): each step solves
    $J^\top J\, \delta = -J^\top r$ for the least-squares form of the energy
    (residuals $\sqrt{P}\, e$) by `cg_steps` iterations of lineax's matrix-free conjugate
    gradients and takes the full step $x \leftarrow x + \delta$.

    On a linear-Gaussian network (linear predictions) the energy is quadratic in the states
    and one step with an exact inner solve (`cg_steps` at least the number of distinct
    eigenvalues of $J^\top J$, at most the states' size) is the equilibrium. On nonlinear
    networks Gauss-Newton converges fast near the equilibrium but has no safeguard far from
    it: a full step can raise the energy (`InferInfo.energy_rose`). Prefer
    `pcjax.LevenbergMarquardt`, which only keeps steps that lower the energy, unless the
    predictions are (nearly) linear.

    **Stiffness.** $J^\top J$ contains the precisions, so a Gauss-Newton step is indifferent
    to their scale: precisions spanning a ratio of 900, where gradient descent needs a step
    below $2 / \lambda_{\max}$, cost it nothing (in exact arithmetic: CG's iterations grow
    with the condition number when truncated).

    **What it composes with.** The residuals come from the energy model: the standard
    energy, `pcjax.error_parameterised` (residuals as functions of the errors),
    `pcjax.preconditioned` of either (the same least-squares problem: a Gauss-Newton step is
    invariant under that linear change of variables, so the iterates are those of the
    unpreconditioned energy; `InferInfo`'s norms are of the preconditioned field, as for the
    other solvers) and `pcjax.bidirectional`. Precisions: none (unit), fixed arrays (also
    per-sample arrays of the node's shape: precisions that depend on the input), scalar,
    diagonal and full precision modules, learned ones included (their log-det does not
    depend on the states). Refused with a `ValueError` naming the node: a custom energy
    (`pcjax.node(..., energy=...)`, e.g. `pcjax.cross_entropy`) and a precision computed in
    the function (`pcjax.node(..., precision=p)`: its $-\tfrac12 \sum \log p$ depends on the
    states). Refused for the whole model: `pcjax.fixed_predictions` (its field is not the
    gradient of an energy) and `pcjax.Nudged` (its energy is built by the rule, without a
    residual form).

    **Batches.** One least-squares problem over all the states of the batch: the samples
    share the CG's inner products and the step acceptance, so a sample's result depends on
    its batch (slightly: each sample's problem is its own, $J^\top J$ is block diagonal).
    Under `jax.vmap` over a per-example function each example is its own problem.

    **Arguments:**

    - `steps`: the most steps (linearisations, each followed by a linear solve and a
      proposed move); a positive int. `GaussNewton(1)` is one Gauss-Newton step.
    - `cg_steps`: CG iterations per step (the inner solve's accuracy and cost); a positive
      int.
    - `rtol`, `atol`: optimistix's stopping test: stop once a step changes the states by less
      than `atol + rtol |x|` and the residuals by less than `atol + rtol |r|` (max norms;
      the residuals are those of the energy times $\sqrt{200 n}$, $n$ the number of state
      entries, see `_residual_scale`).
    - `tol`: the per-sample field-norm tolerance that `InferInfo.converged` checks (None:
      the relative certificate, `relative_grad_norm <= 1e-3`).
    - `throw`: raise at run time if the energy diverges or `tol` is not reached.

    **Cost.** `InferInfo.steps` is the steps taken (fewer than `steps` when optimistix's
    `rtol`/`atol` test stopped the run); `InferInfo.evaluations`
    counts, with a JVP or VJP alone as 1 and a JVP/VJP pair as 2: one field evaluation at
    the start, per step the linearisation (1), $J^\top r$ (1) and the CG's $J^\top J p$
    products (2 each, `cg_steps + 1` of them: CG's initial residual included), i.e.
    $2\,\text{cg\_steps} + 4$, and the caller's final evaluation.

    **Returns:** a solver for [pcjax.infer][] and the learning rules ([pcjax.Equilibrium][],
    [pcjax.Amortised][]).

    **Raises:** `ValueError` for `steps` or `cg_steps` not a positive int, a negative or
    non-finite `rtol`/`atol`, and (when run) for energies without a least-squares form.

    **Example** ([setup][examples-setup]): on a linear network one step is the equilibrium.

    ```pycon
    >>> def linear(params, x):
    ...     h = pc.node("h", x @ params["w1"])
    ...     return pc.node("y", h @ params["w2"])
    >>> start = {"h": pc.forward_init(linear, params, x)["h"]}
    >>> solver = pc.GaussNewton(1, cg_steps=8)
    >>> states, info = pc.infer(linear, params, start, x, {"y": y}, solver=solver)
    >>> int(info.steps), bool(info.converged)
    (1, True)

    ```
    """

    def _optimistix(self, linear_solver):
        return optx.GaussNewton(rtol=self.rtol, atol=self.atol, linear_solver=linear_solver)

    def _finish(self, residuals, accepted, state):
        del residuals, accepted
        return dict(state.y_eval), 0  # Gauss-Newton takes every full step


class LevenbergMarquardt(_LeastSquares):
    r"""Levenberg-Marquardt on the states (`optimistix.LevenbergMarquardt`): Gauss-Newton
    with a damping $\lambda$ adapted by a trust region, so that only steps that lower the
    energy are kept.

    Each step solves $(J^\top J + \lambda I)\, \delta = -J^\top r$ for the least-squares form
    of the energy (see `pcjax.GaussNewton`) by `cg_steps` iterations of lineax's matrix-free
    conjugate gradients, proposes $x + \delta$ and compares the actual decrease of
    $\tfrac12 \lVert r \rVert^2$ (the energy up to a constant) with the decrease the linear
    model predicts: a ratio below 0.01 rejects the proposal (the states stay) and raises
    $\lambda$ (a shorter step, closer to gradient descent); a good ratio accepts it and
    lowers $\lambda$ (closer to Gauss-Newton). The kept states never raise the energy beyond
    rounding, whatever the precisions: on the stiff diag(1, 30, 900) case where gradient
    descent diverges it reaches the dense-solve equilibrium in a few steps.

    Everything else (what it composes with, what it refuses, batches, arguments, cost) is as
    for `pcjax.GaussNewton`, except that each step also applies $J$ once more to predict
    the decrease (1 evaluation): $2\,\text{cg\_steps} + 5$ per step, and the last step's
    proposal is kept only if it lowers the energy (one more forward evaluation at the end).
    `InferInfo.steps` counts rejected steps too.

    **Arguments:** those of [pcjax.GaussNewton][].

    **Returns:** a solver for [pcjax.infer][] and the learning rules.

    **Raises:** as [pcjax.GaussNewton][].

    **Example** ([setup][examples-setup]): an output precision of 900, where gradient
    descent with a step of 0.1 diverges.

    ```pycon
    >>> start = {"h": pc.forward_init(fn, params, x)["h"]}
    >>> solver = pc.LevenbergMarquardt(20, cg_steps=8)
    >>> states, info = pc.infer(
    ...     fn, params, start, x, {"y": y}, solver=solver, precision={"y": 900.0}
    ... )
    >>> bool(info.converged), bool(info.energy_rose)
    (True, False)

    ```
    """

    def _optimistix(self, linear_solver):
        return optx.LevenbergMarquardt(rtol=self.rtol, atol=self.atol, linear_solver=linear_solver)

    def _evaluations_per_step(self) -> int:
        return super()._evaluations_per_step() + 1

    def _finish(self, residuals, accepted, state):
        # The last proposal is kept only if it lowers 1/2 |r|^2 (one forward evaluation).
        def half_squares(tree):
            return 0.5 * sum(jnp.sum(jnp.square(r)) for r in jax.tree.leaves(tree))

        proposal = dict(state.y_eval)
        lower = half_squares(residuals(proposal)) <= half_squares(state.f_info.residual)
        keep = jax.tree.map(lambda new, old: jnp.where(lower, new, old), proposal, dict(accepted))
        return keep, 1
