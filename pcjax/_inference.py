r"""Inference (relaxation): gradient descent of the energy with respect to the free states.

Standard PC differentiates the energy with `jax.grad`:

$$\frac{\partial F}{\partial x_i} = P_i e_i - \sum_{c \in \text{children}(i)}
\Big(\frac{\partial \mu_c}{\partial x_i}\Big)^{\!\top} P_c e_c.$$

Under the fixed-prediction assumption (FPA) the predictions $\mu$ and their Jacobians are
frozen at the feedforward values $\hat x$, so the state gradient is
$P_i e_i - \sum_c J_c(\hat x)^\top P_c e_c$ with $e = x - \mu(\hat x)$: one fixed
vector-Jacobian product per step. Its equilibrium errors are exactly the backprop gradients of the
output energy, on any graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._energy import (
    CustomEnergy,
    Precision,
    checked_values,
    node_dicts,
    node_energy,
    total_energy,
)
from ._precision import solve
from ._tagging import Nodes, forward_init, predictions, scan_depths

Array = jax.Array
StateGradFn = Callable[[Nodes], tuple[Array, Nodes]]


class InferInfo(NamedTuple):
    """What `pcjax.infer` reports besides the relaxed states.

    - `energy`: the energy at the returned states.
    - `diverged`: True if the energy at the returned states is non-finite (NaN/inf). A NaN or
      inf reached at any step persists in the states, so this catches divergence anywhere.
    - `steps`: number of state updates made (`steps`, or fewer when `tol` stopped early).
    - `energies`: with `record_energy=True`, the energy before each update, shape `(steps,)`
      (entries after an early stop are NaN); otherwise None.
    """

    energy: Array
    diverged: Array
    steps: Array
    energies: Array | None = None


def check_steps(steps: Any, tol: float | None) -> int:
    """`steps` as a Python int (integer scalars of any kind accepted); validates `tol` too."""
    try:
        if isinstance(steps, (bool, np.bool_)) or np.ndim(steps) != 0:
            raise TypeError
        count = operator.index(steps)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        count = None
    if count is None or count < 1:
        raise ValueError(
            f"pcjax: `steps` must be a positive int (a concrete integer scalar), got {steps!r}."
        )
    if tol is not None and not _real(tol) >= 0:  # NaN and non-numbers compare False
        raise ValueError(f"pcjax: `tol` must be None or a non-negative float, got {tol!r}.")
    return count


def _real(value: Any) -> float:
    """`value` as a float if it is a concrete real scalar (not a bool or str), else NaN."""
    if isinstance(value, (bool, str, bytes)):
        return float("nan")
    try:
        return float(value)
    except Exception:  # non-numbers, arrays of several values, traced values
        return float("nan")


def fpa_state_grad_fn(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    observed: Mapping[str, Array],
    precision: Mapping[str, Array],
) -> StateGradFn:
    """State gradient under the fixed-prediction assumption (linearised at the feedforward pass)."""
    feedforward = forward_init(fn, params, x)
    frozen, vjp = jax.vjp(lambda v: predictions(fn, params, v, x), feedforward)

    def value_and_grad(states: Nodes) -> tuple[Array, Nodes]:
        # dF/dx_i = (own term)_i + sum_c J_c(x_hat)^T dF_c/dmu_c, with mu frozen at x_hat.
        values = {**states, **observed}
        value, (own, cotangent) = jax.value_and_grad(
            lambda v, mu: total_energy(v, mu, precision), (0, 1)
        )(values, frozen)
        (back,) = vjp(cotangent)
        return value, {name: own[name] + back[name] for name in states}

    return value_and_grad


def state_grad_fn(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    observed: Mapping[str, Array],
    precision: Mapping[str, Array],
    fixed_predictions: bool,
    precondition: bool = False,
) -> StateGradFn:
    """`states -> (energy, dF/dstates)` for standard PC or the fixed-prediction assumption.

    With `precondition`, each node's gradient is multiplied by its precision's inverse.
    """
    if fixed_predictions:
        grad_fn = fpa_state_grad_fn(fn, params, x, observed, precision)
    else:
        grad_fn = jax.value_and_grad(
            lambda states: node_energy(fn, params, {**states, **observed}, x, precision)
        )
    if not precondition:
        return grad_fn

    def preconditioned(states: Nodes) -> tuple[Array, Nodes]:
        value, grads = grad_fn(states)
        return value, precondition_grads(precision, grads)

    return preconditioned


def precondition_grads(spec: Mapping[str, Any], grads: Nodes) -> Nodes:
    r"""$P_i^{-1} \partial F / \partial x_i$ for every node with a precision; nodes with a
    custom energy (no precision) and unit-precision nodes keep their gradient."""
    return {
        k: solve(spec[k], g)
        if spec.get(k) is not None and not isinstance(spec[k], CustomEnergy)
        else g
        for k, g in grads.items()
    }


UNROLL_LIMIT = 16


def scan_unroll(steps: int, unroll: int | bool | None) -> int | bool:
    """The `unroll` argument for `lax.scan`: None means fully unrolled up to 16 steps.

    Unrolling matters on XLA:CPU, where a convolution inside a loop body runs several times
    slower than the same convolution outside a loop (VGG-style CNN, T = 8: 2.5-6x faster
    unrolled); for dense layers it makes no measurable difference. Long loops stay rolled to
    bound compilation time.
    """
    if unroll is None:
        return True if steps <= UNROLL_LIMIT else 1
    if isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1):
        return unroll
    raise ValueError(f"pcjax: `unroll` must be None, a bool or a positive int, got {unroll!r}.")


def per_sample_grad_norm(grads: Nodes, sample_axes: Mapping[str, int] | None = None) -> Array:
    r"""The largest per-sample norm of the state gradient, $\max_n \|\partial F / \partial
    x_{n}\|$ over the samples $n$: axis `sample_axes[name]` of each state (default 0; a node
    stacked along scans has its sample axis after the stacked axes). Scalar states count as
    shared by every sample.

    Each sample's states see only their own energy, so this stopping criterion does not depend
    on which other samples share the batch.
    """
    axes = sample_axes or {}
    squares, shared = 0.0, 0.0
    for name, g in grads.items():
        axis = axes.get(name, 0)
        if jnp.ndim(g) > axis:
            per_sample = jnp.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)
            squares = squares + jnp.sum(jnp.square(per_sample), axis=1)
        else:
            shared = shared + jnp.sum(jnp.square(g))
    return jnp.sqrt(jnp.max(squares + shared))


def relax(
    value_and_grad: StateGradFn,
    states: Nodes,
    *,
    steps: int,
    optimizer: optax.GradientTransformation,
    tol: float | None,
    record_energy: bool,
    unroll: int | bool | None = None,
    key: Array | None = None,
    sample_axes: Mapping[str, int] | None = None,
) -> tuple[Nodes, Array, Array | None]:
    """Run the state optimizer on the energy.

    Returns the new states, the number of updates and the per-step energies (or None). With
    `tol`, stops once every sample's state gradient has a norm of at most `tol`
    (`per_sample_grad_norm` over `sample_axes`; a `lax.while_loop`, which a NaN gradient stops
    too); otherwise
    makes exactly `steps` updates (`lax.scan`, memory independent of `steps` unless energies
    are recorded; `unroll` as in `scan_unroll`). With a `key`, update `t` receives
    `key=fold_in(key, t)` as an extra argument (for `pcjax.langevin`).

    The energy itself is only evaluated when it is recorded: divergence is judged by the
    caller from the energy at the returned states, since a NaN or inf in the states persists.
    """
    if key is not None:
        optimizer = optax.with_extra_args_support(optimizer)
    opt_state = optimizer.init(states)

    def update(i, states, opt_state, grads):
        extra = {} if key is None else {"key": jax.random.fold_in(key, i)}
        updates, opt_state = optimizer.update(grads, opt_state, states, **extra)
        return optax.apply_updates(states, updates), opt_state

    if tol is None:

        def body(carry, i):
            states, opt_state = carry
            value, grads = value_and_grad(states)  # value is dead code unless recorded
            return update(i, states, opt_state, grads), value if record_energy else None

        (states, _), energies = jax.lax.scan(
            body, (states, opt_state), jnp.arange(steps), unroll=scan_unroll(steps, unroll)
        )
        return states, jnp.asarray(steps, jnp.int32), energies

    value, grads = value_and_grad(states)
    energies = jnp.full((steps,), jnp.nan, value.dtype) if record_energy else None
    init = (jnp.asarray(0, jnp.int32), states, opt_state, value, grads, energies)

    def cond(carry):
        i, _, _, _, grads, _ = carry
        return (i < steps) & (per_sample_grad_norm(grads, sample_axes) > tol)

    def while_body(carry):
        i, states, opt_state, value, grads, energies = carry
        if record_energy:
            energies = energies.at[i].set(value)
        states, opt_state = update(i, states, opt_state, grads)
        value, grads = value_and_grad(states)
        return i + 1, states, opt_state, value, grads, energies

    i, states, _, _, _, energies = jax.lax.while_loop(cond, while_body, init)
    return states, i, energies


def default_state_optimizer(
    optimizer: optax.GradientTransformation | None, step_size: float
) -> optax.GradientTransformation:
    if optimizer is not None:
        return optimizer
    if not 0 < _real(step_size) < float("inf"):
        raise ValueError(f"pcjax: `step_size` must be a positive finite number, got {step_size!r}.")
    return optax.sgd(step_size)


DIVERGED_MESSAGE = (
    "pcjax: the energy became non-finite (NaN/inf) during inference; lower the state step "
    "size, check the inputs for NaN/inf, or use a more stable state optimizer."
)


def infer(
    fn: Callable[..., Any],
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    steps: int,
    optimizer: optax.GradientTransformation | None = None,
    step_size: float = 0.1,
    precision: Precision | None = None,
    fixed_predictions: bool = False,
    precondition: bool = False,
    tol: float | None = None,
    record_energy: bool = False,
    raise_on_divergence: bool = False,
    unroll: int | bool | None = None,
    key: Array | None = None,
) -> tuple[Nodes, InferInfo]:
    r"""Relax the free node states by gradient descent on the energy.

    Each step computes $\partial F / \partial x$ for the free states (see `pcjax.energy`)
    and applies `optimizer` to it, inside `lax.scan` (or `lax.while_loop` with `tol`).

    **Arguments** (as for `pcjax.energy`, plus):

    - `steps`: number of updates (the maximum when `tol` is given); a positive int.
    - `optimizer`: any optax optimizer for the states; default `optax.sgd(step_size)`.
    - `step_size`: the SGD step size when `optimizer` is None.
    - `fixed_predictions`: the fixed-prediction assumption: predictions and their Jacobians
      frozen at the feedforward pass of `fn(params, x)`. With the states initialised by
      `forward_init`, `step_size=1` and at least as many steps as the graph is deep, the errors
      equal the backprop gradients of the output energy exactly.
    - `precondition`: "natural" inference: scale each node's state gradient by the inverse of
      its own precision, $P_i^{-1} \partial F / \partial x_i$, so that the node's own error
      term relaxes at a rate independent of $P_i$.
    - `tol`: stop once every sample's state gradient has a norm of at most `tol` (the largest
      per-sample norm, so the same sample stops at the same step in any batch).
    - `record_energy`: also return the energy before each update (`info.energies`).
    - `raise_on_divergence`: raise a runtime error (`eqx.error_if`) instead of only reporting
      a non-finite energy in `info.diverged`.
    - `unroll`: how far to unroll the `lax.scan` over steps (ignored with `tol`); default None:
      fully unrolled when `steps <= 16`, else rolled. Unrolled CNN steps run several times
      faster on CPU; long unrolled loops compile slowly.
    - `key`: a `jax.random` key for stochastic state optimizers (`pcjax.langevin`); update `t`
      uses `jax.random.fold_in(key, t)`, so the same key replays the same run and a new key
      (e.g. `jax.random.fold_in(key, training_step)`) draws fresh noise.

    **Returns:** `(states, info)`: the relaxed states and an `InferInfo`.
    """
    steps = check_steps(steps, tol)
    scan_unroll(steps, unroll)  # validates `unroll`
    optimizer = default_state_optimizer(optimizer, step_size)
    states, observed = node_dicts(states, observed)
    _, checked = checked_values(fn, params, states, x, observed, precision)
    grad_fn = state_grad_fn(fn, params, x, observed, checked, fixed_predictions, precondition)
    states, taken, energies = relax(
        grad_fn,
        states,
        steps=steps,
        optimizer=optimizer,
        tol=tol,
        record_energy=record_energy,
        unroll=unroll,
        key=key,
        sample_axes=None if tol is None else scan_depths(fn, params, x),
    )
    if fixed_predictions:
        final = grad_fn(states)[0]  # the FPA energy uses the frozen predictions
    else:
        final = node_energy(fn, params, {**states, **observed}, x, checked)
    diverged = ~jnp.isfinite(final)
    if raise_on_divergence:
        states = eqx.error_if(states, diverged, DIVERGED_MESSAGE)
    return states, InferInfo(final, diverged, taken, energies)
