r"""Gradient descent on the states that cannot raise the energy: a backtracking step size."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp

from ._solvers import (
    AbstractSolver,
    Start,
    check_steps,
    check_tol,
    per_sample_norms,
    real,
    resolve_sample_axes,
    scan_unroll,
)

Array = jax.Array
#: Energy rises up to this many machine epsilons of |F| count as rounding (see `Backtracking`).
ROUNDING_SLACK = 64


def _check_range(value: Any, name: str, low: float, high: float, closed_high: bool) -> float:
    """`value` as a float in `(low, high)` (`(low, high]` when `closed_high`), else a clear
    error naming `name`."""
    number = real(value)
    inside = low < number and (number <= high if closed_high else number < high)
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(
            f"pcjax.Backtracking: `{name}` must be a number in ({low:g}, {high:g}{bracket}, "
            f"got {value!r}."
        )
    return number


class Backtracking(AbstractSolver):
    r"""Gradient descent on the states whose kept steps never raise the energy: the step size
    backtracks on a rise and grows back after a success.

    With $x_t$ the states, $F$ the energy, $g_t = \partial F / \partial x_t$ and $\eta_t$ the
    current step size, each of the `steps` iterations proposes

    $$x' = x_t - \eta\, g_t, \qquad \eta = \eta_t, \eta_t s, \eta_t s^2, \dots$$

    ($s$ = `shrink`), at most `max_tries` proposals, until one is acceptable: $F(x')$ is
    finite and either

    - $F(x') \le F(x_t)$ (the energy did not rise), or
    - $F(x') \le F(x_t) + 64\,\epsilon\,\lvert F(x_t) \rvert$ ($\epsilon$ the machine epsilon of
      the energy's dtype: a rise within rounding) and $g(x') \cdot g_t > 0$ (the energy is
      still decreasing along $-g_t$ at $x'$: the step did not overshoot the line minimum).

    The first acceptable proposal is kept, $x_{t+1} = x'$, and the next iteration starts from
    $\eta_{t+1} = \min(\gamma \eta, \eta_{\max})$ ($\gamma$ = `grow`, $\eta_{\max}$ =
    `max_step_size`). If none is acceptable the states stay, $x_{t+1} = x_t$, and the next
    iteration starts one shrink below the smallest step tried, at $\eta_t
    s^{\text{max\_tries}}$.

    **Guarantee.** The energies at the iterates are non-increasing up to rounding,
    $F(x_{t+1}) \le F(x_t) + 64\,\epsilon\,\lvert F(x_t) \rvert$ for every $t$, whatever the
    step size: a step that raises the energy beyond rounding, or makes it NaN/inf, is never
    kept, so the run cannot blow up (a finite start ends finite). Since $F(x - \eta g) = F(x)
    - \eta \lVert g \rVert^2 + O(\eta^2)$, a small enough step lowers the energy where $g \ne
    0$, so on a smooth energy a rejected proposal is followed by an acceptable one after
    finitely many shrinks. Why the second clause: near equilibrium the decrease $\eta \lVert g
    \rVert^2$ falls below float32's resolution of $F$, the computed $F(x')$ exceeds $F(x_t)$ by
    rounding noise about half the time, and with the plain test alone the step size shrinks
    to nothing and the states stall (measured on the stiff linear-Gaussian case of
    `tests/test_backtracking.py`: stuck at 5e-3 from the dense-solve equilibrium after 1500 or
    3000 iterations; with the slope clause 2e-6). For the same reason the test is not Armijo's
    sufficient decrease $F(x') \le F(x) - c \eta \lVert g \rVert^2$.

    **Stiff energies.** With precisions spanning a large ratio the largest stable fixed step is
    $2 / \lambda_{\max}$ of the Hessian; a larger `step_size` makes plain gradient descent
    diverge, here it is shrunk to what lowers the energy (the step then settles near that
    bound, so the run takes about as many iterations as gradient descent at its best fixed
    step, plus the rejected proposals).

    **One step size for the batch.** The state field gives the total energy $F = \sum_n F_n$,
    not the per-sample terms, so accept/reject and $\eta$ are shared by the samples of a batch
    (a sample's trajectory depends on the batch it is in; its energy need not fall at every
    step, their sum does). Under `jax.vmap` over a per-example function each example has its
    own step size.

    **Validity.** The test compares energies along $-g$, so the field must be the gradient of
    the energy that is reported: standard PC or [pcjax.error_parameterised][]. With
    [pcjax.fixed_predictions][] or [pcjax.preconditioned][] the field is not $\partial F /
    \partial x$ and its direction need not lower $F$ at any step size; [pcjax.infer][] and the
    learning rules refuse them (use [pcjax.GradientDescent][] or [pcjax.ODE][] there).

    **Cost.** One field evaluation (energy and gradient together) per proposal, a rejected
    one included, plus one at the start; `InferInfo.evaluations` counts them all (and the
    caller's final evaluation). `InferInfo.steps` is `steps` (iterations, accepted or not).

    **Arguments:**

    - `steps`: iterations; a positive int.
    - `step_size`: the first proposal's $\eta_0$; a positive number (or a traced value).
    - `shrink`: the factor applied to $\eta$ after a rejected proposal, in $(0, 1)$.
    - `grow`: the factor applied after an accepted one, $\ge 1$ (1: never grows back).
    - `max_tries`: proposals per iteration, a positive int.
    - `max_step_size`: the cap $\eta_{\max}$ on a grown step; None: `step_size` itself (a
      step grows back to the first one, never past it).
    - `tol`: the per-sample field-norm tolerance that `InferInfo.converged` checks at the
      returned states (the iterations still all run).
    - `record_energy`: keep the energy before each iteration (`InferInfo.energies`; it is
      non-increasing).
    - `unroll`: unrolling of the iterations' `lax.scan` (None: fully unrolled up to 16).
    - `throw`: raise at run time if the energy diverges or `tol` is not reached.

    **Raises:** `ValueError` for `steps` or `max_tries` not a positive int, `shrink` outside
    $(0, 1)$, `grow` below 1, or a step size that is not a positive finite number.

    **Example** ([setup][examples-setup]): a step size far too large for a stiff output
    precision is shrunk until the energy falls.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> solver = pc.Backtracking(10, step_size=5.0, record_energy=True)
    >>> states, info = pc.infer(
    ...     fn, params, {"h": start["h"]}, x, {"y": y}, solver=solver, precision={"y": 50.0}
    ... )
    >>> bool(jnp.all(jnp.diff(info.energies) <= 0)), bool(info.energy_rose)
    (True, False)

    ```
    """

    needs_gradient_field: ClassVar[bool] = True
    steps: int = eqx.field(static=True)
    step_size: Any
    shrink: float = eqx.field(static=True)
    grow: float = eqx.field(static=True)
    max_tries: int = eqx.field(static=True)
    max_step_size: Any
    tol: Any
    record_energy: bool = eqx.field(static=True)
    unroll: int | bool | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        steps: int,
        *,
        step_size: Any = 0.1,
        shrink: float = 0.5,
        grow: float = 1.1,
        max_tries: int = 20,
        max_step_size: Any = None,
        tol: Any = None,
        record_energy: bool = False,
        unroll: int | bool | None = None,
        throw: bool = False,
    ):
        self.steps = check_steps(steps)
        self.step_size = _check_step(step_size, "step_size")
        self.shrink = _check_range(shrink, "shrink", 0.0, 1.0, closed_high=False)
        if not 1.0 <= real(grow) < math.inf:
            raise ValueError(
                f"pcjax.Backtracking: `grow` must be a finite number >= 1, got {grow!r}."
            )
        self.grow = float(grow)
        self.max_tries = check_steps(max_tries, "max_tries")
        self.max_step_size = (
            self.step_size if max_step_size is None else _check_step(max_step_size, "max_step_size")
        )
        self.tol = check_tol(tol)
        self.record_energy = bool(record_energy)
        scan_unroll(self.steps, unroll)  # validates it
        self.unroll = unroll
        self.throw = bool(throw)

    def run(self, field, states, *, key, sample_axes):
        del key  # deterministic
        layout = resolve_sample_axes(states, sample_axes)
        value, grads = field(states)
        initial = Start(value, per_sample_norms(grads, layout))
        wide = jnp.result_type(jnp.float32, value)
        eta0 = jnp.asarray(self.step_size, wide)
        cap = jnp.asarray(self.max_step_size, wide)

        def iteration(carry, _):
            states, value, grads, eta, tries = carry
            proposal = self._search(field, states, value, grads, eta)
            accepted, moved, new_value, new_grads, eta_last, used = proposal
            keep = lambda new, old: jnp.where(accepted, new, old)  # noqa: E731
            states = jax.tree.map(keep, moved, states)
            grads = jax.tree.map(keep, new_grads, grads)
            next_value = jnp.where(accepted, new_value, value)
            eta = jnp.where(accepted, jnp.minimum(eta_last * self.grow, cap), eta_last)
            return (states, next_value, grads, eta, tries + used), value

        init = (states, value, grads, eta0, jnp.asarray(0, jnp.int32))
        (states, _, _, _, tries), energies = jax.lax.scan(
            iteration, init, None, length=self.steps, unroll=scan_unroll(self.steps, self.unroll)
        )
        count = jnp.asarray(self.steps, jnp.int32)
        return states, count, tries + 1, energies if self.record_energy else None, initial

    def _search(self, field, states, value, grads, eta):
        """Proposals $x - \\eta s^k g$, $k = 0, 1, \\dots$, until one has a finite energy at
        most `value` or `max_tries` are made. Returns (accepted, its states, energy and
        gradient (the last proposal's if none was accepted), the step size it used (when
        rejected: the next one to try), proposals made)."""

        def propose(eta):
            def step(x, g):
                return (x - eta.astype(x.dtype) * g).astype(x.dtype)

            moved = jax.tree.map(step, states, grads)
            new_value, new_grads = field(moved)
            return moved, new_value, new_grads

        slack = ROUNDING_SLACK * jnp.finfo(value.dtype).eps * jnp.abs(value)
        names = list(grads)

        def ok(new_value, new_grads):
            # Still descending at x': the slope of F along -g there, -g(x') . g(x), is negative.
            slope = sum(
                jnp.vdot(new_grads[n].astype(value.dtype), grads[n].astype(value.dtype))
                for n in names
            )
            lower = new_value <= value
            within_rounding = (new_value <= value + slack) & (slope > 0)
            return jnp.isfinite(new_value) & (lower | within_rounding)

        moved, new_value, new_grads = propose(eta)
        first = (
            ok(new_value, new_grads),
            moved,
            new_value,
            new_grads,
            eta,
            jnp.asarray(1, jnp.int32),
        )

        def cond(carry):
            accepted, _, _, _, _, used = carry
            return ~accepted & (used < self.max_tries)

        def body(carry):
            _, _, _, _, eta, used = carry
            eta = eta * self.shrink
            moved, new_value, new_grads = propose(eta)
            return ok(new_value, new_grads), moved, new_value, new_grads, eta, used + 1

        # Bounded and checkpointed: reverse-mode differentiation through a run works.
        accepted, moved, new_value, new_grads, eta, used = eqxi.while_loop(
            cond, body, first, max_steps=self.max_tries, kind="checkpointed"
        )
        # All rejected: the next iteration starts one shrink below the last step tried.
        eta = jnp.where(accepted, eta, eta * self.shrink)
        return accepted, moved, new_value, new_grads, eta, used


def _check_step(value: Any, name: str) -> Any:
    """`value` if it is a positive finite number (traced values pass)."""
    if isinstance(value, jax.core.Tracer):
        return value
    if not 0 < real(value) < math.inf:
        raise ValueError(
            f"pcjax.Backtracking: `{name}` must be a positive finite number, got {value!r}."
        )
    return value
