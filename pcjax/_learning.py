"""Learning: parameter gradients of the energy at the relaxed states, and training steps.

At relaxed states the gradient of $F$ with respect to the parameters $\\theta_i$ of node
$i$'s prediction is local: $\\partial F / \\partial \\theta_i =
-(\\partial \\mu_i / \\partial \\theta_i)^\\top P_i e_i$, which for a dense layer
$\\mu = W f(x) + b$ is the Hebbian rule $\\partial F / \\partial W = -P e\\, f(x)^\\top$.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._energy import (
    Precision,
    batch_size,
    checked_values,
    current_spec,
    node_energy,
    total_energy,
)
from ._inference import (
    DIVERGED_MESSAGE,
    check_steps,
    default_state_optimizer,
    relax,
    scan_unroll,
    state_grad_fn,
)
from ._natural import fisher_statistics, uses_fisher
from ._nudging import nudged_grads
from ._precision import solve
from ._tagging import Nodes, forward_init, predictions

Array = jax.Array


def _energy_grads(
    fn: Callable[..., Any],
    params: Any,
    values: Nodes,
    x: Any,
    precision: Mapping[str, Any],
    fixed_predictions: bool,
    learnable: Precision | None = None,
) -> tuple[Array, Any]:
    """Energy and its gradient w.r.t. the inexact-array leaves of `params` (None elsewhere).

    `precision` holds the checked precisions; `learnable`, when it is a function of the
    parameters, is called inside the differentiated function so that they get gradients.
    """
    diff, static = eqx.partition(params, eqx.is_inexact_array)

    def spec_of(d):
        return current_spec(learnable, eqx.combine(d, static), precision)

    if not fixed_predictions:
        return jax.value_and_grad(
            lambda d: node_energy(fn, eqx.combine(d, static), values, x, spec_of(d))
        )(diff)
    # FPA: the predictions' parameter Jacobians are taken at the feedforward states; learned
    # precisions also enter the energy directly.
    feedforward = forward_init(fn, params, x)
    frozen, vjp = jax.vjp(lambda d: predictions(fn, eqx.combine(d, static), feedforward, x), diff)
    value, (cotangent, direct) = jax.value_and_grad(
        lambda mu, d: total_energy(values, mu, spec_of(d)), (0, 1)
    )(frozen, diff)
    (grads,) = vjp(cotangent)
    return value, jax.tree.map(jnp.add, grads, direct)


def param_grads(
    fn: Callable[..., Any],
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    precision: Precision | None = None,
    fixed_predictions: bool = False,
) -> Any:
    """Gradient of the energy with respect to the parameters, at the given (relaxed) states.

    $$\\frac{\\partial F}{\\partial \\theta} = -\\sum_i
    \\Big(\\frac{\\partial \\mu_i}{\\partial \\theta}\\Big)^{\\!\\top} P_i e_i .$$

    The energy is summed over the batch, so are these gradients (divide by the batch size for a
    mean). Works with any pytree of parameters, equinox modules included: the result has the
    structure of `params`, with None at leaves that are not floating-point arrays (as
    `eqx.filter_grad`). With `fixed_predictions=True` the predictions and their Jacobians are
    those of the feedforward pass of `fn(params, x)` (the fixed-prediction assumption).
    """
    values, checked = checked_values(fn, params, dict(states), x, observed, precision)
    return _energy_grads(fn, params, values, x, checked, fixed_predictions, precision)[1]


class TrainInfo(NamedTuple):
    """What `pcjax.train_step` reports.

    - `energy`: the energy at the relaxed states (before the parameter update).
    - `diverged`: True if the energy at the relaxed states is non-finite (a NaN or inf reached
      during inference persists to the end); with `guard=True` also if the update produced a
      non-finite parameter or optimizer state, and then the update was not applied.
    - `inference_steps`: the number of state updates made.
    """

    energy: Array
    diverged: Array
    inference_steps: Array


def train_step(
    fn: Callable[..., Any],
    params: Any,
    opt_state: optax.OptState,
    x: Any,
    observed: Mapping[str, Array],
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    state_optimizer: optax.GradientTransformation | None = None,
    step_size: float = 0.1,
    precision: Precision | None = None,
    fixed_predictions: bool = False,
    precondition: bool = False,
    incremental: bool = False,
    fisher: str | None = None,
    nudging: str | None = None,
    nudge: float = 0.1,
    tol: float | None = None,
    mean_over_batch: bool = True,
    raise_on_divergence: bool = False,
    guard: bool = False,
    unroll: int | bool | None = None,
) -> tuple[Any, optax.OptState, TrainInfo]:
    """One PC training step: feedforward initialisation, inference, then a parameter update.

    1. the free states (every tagged node not in `observed`) start at the feedforward pass;
    2. `steps` inference updates with `state_optimizer` (default `optax.sgd(step_size)`);
    3. the parameter gradient of the energy at the relaxed states is handed to `optimizer`.

    With `incremental=True` this is incremental PC (iPC; Salvatori et al. 2024, "A stable,
    fast, and fully automatic learning algorithm for predictive coding networks"): the
    parameters are updated by `optimizer` at every inference step, from the same backward pass
    as the state update, and there is no separate final update.

    `precision` may be a function of the parameters (`lambda p: p["precision"]`) returning
    precision modules stored in them: they are then learned by `optimizer` with the rest.
    `precondition=True` scales each node's state update by its precision's inverse.

    `fisher` (`"diagonal"`, `"kronecker"` or `"matrix_free"`) computes
    `pcjax.fisher_statistics` at the relaxed states and hands them to the optimizer as
    `optimizer.update(..., fisher=stats)`, for `pcjax.natural_gradient` and
    `pcjax.precision_weighted_gradient` (the optimizer must take extra arguments, e.g. an
    `optax.chain` containing one of them).

    `nudging` (`"positive"`, `"negative"` or `"centred"`) leaves the observed nodes free and
    pulls them towards their values with strength `nudge` (beta), as in equilibrium
    propagation and the PCX benchmark; see `pcjax._nudging` for the three estimates.

    With `mean_over_batch=True` (default) the parameter gradients are divided by the batch
    size, the leading axis of the observed nodes, so that the learning rate does not depend on
    it; the state updates never depend on it (the energy is a per-sample sum).

    With `guard=True` the step is all-or-nothing: if the energy at the relaxed states or any
    updated parameter or optimizer-state entry is non-finite, the original `params` and
    `opt_state` are returned unchanged (and `info.diverged` is True), so one bad batch cannot
    poison a run. `raise_on_divergence=True` raises instead.

    `unroll` controls the unrolling of the inference loop as in `pcjax.infer` (default: fully
    unrolled up to 16 steps).

    Initialise the optimizer state with `optimizer.init(eqx.filter(params, eqx.is_inexact_array))`.
    Jit it with the static options bound, e.g.
    `jax.jit(functools.partial(pcjax.train_step, fn, optimizer=opt, steps=20))`
    (`eqx.filter_jit` when `params` holds non-array leaves).

    **Returns:** `(params, opt_state, info)` with a `TrainInfo`.
    """
    check_steps(steps, tol)
    scan_unroll(steps, unroll)  # validates `unroll`
    if incremental and (tol is not None or fisher is not None or nudging is not None):
        raise ValueError(
            "pcjax: `tol`, `fisher` and `nudging` are not supported with `incremental=True`."
        )
    if nudging is not None and (fixed_predictions or fisher is not None or precondition):
        raise ValueError(
            "pcjax: `nudging` does not combine with `fixed_predictions`, `fisher` or "
            "`precondition`."
        )
    if fisher is not None and not uses_fisher(opt_state):
        raise ValueError(
            f"pcjax.train_step: fisher={fisher!r} passes statistics to the optimizer, which must "
            "contain a transform that takes them: e.g. optax.chain(pcjax.natural_gradient(...), "
            "optax.scale_by_learning_rate(lr))."
        )
    state_optimizer = default_state_optimizer(state_optimizer, step_size)
    observed = dict(observed)
    original = (params, opt_state)
    feedforward = forward_init(fn, params, x)
    states = {k: v for k, v in feedforward.items() if k not in observed}
    _, checked = checked_values(fn, params, states, x, observed, precision)
    scale = 1.0 / batch_size(observed) if mean_over_batch else 1.0

    def apply(params, opt_state, grads, **extra_args):
        grads = jax.tree.map(lambda g: g * scale, grads)
        try:
            updates, opt_state = optimizer.update(
                grads, opt_state, eqx.filter(params, eqx.is_inexact_array), **extra_args
            )
        except (ValueError, TypeError) as error:
            raise type(error)(
                "pcjax.train_step: the optimizer could not update the parameters. The gradients "
                "have the structure of `params` with None at non-floating-point leaves: "
                "initialise the optimizer state with "
                "`optimizer.init(eqx.filter(params, eqx.is_inexact_array))`. "
                f"The optimizer said: {error}"
            ) from error
        return eqx.apply_updates(params, updates), opt_state

    if incremental:
        params, opt_state, states = _incremental(
            fn,
            params,
            opt_state,
            states,
            x,
            observed,
            (checked, precision),
            steps,
            state_optimizer,
            apply,
            precondition,
            unroll,
        )
        final_precision = current_spec(precision, params, checked)
        value = node_energy(fn, params, {**states, **observed}, x, final_precision)
        taken = jnp.asarray(steps, jnp.int32)
    elif nudging is not None:
        value, grads, taken = nudged_grads(
            fn,
            params,
            x,
            feedforward,
            observed,
            checked,
            nudging=nudging,
            beta=nudge,
            steps=steps,
            optimizer=state_optimizer,
            tol=tol,
            param_grads=lambda states, spec: _energy_grads(
                fn, params, states, x, spec, False, precision
            ),
            unroll=unroll,
        )
        params, opt_state = apply(params, opt_state, grads)
    else:
        grad_fn = state_grad_fn(fn, params, x, observed, checked, fixed_predictions, precondition)
        states, taken, _ = relax(
            grad_fn,
            states,
            steps=steps,
            optimizer=state_optimizer,
            tol=tol,
            record_energy=False,
            unroll=unroll,
        )
        value, grads = _energy_grads(
            fn, params, {**states, **observed}, x, checked, fixed_predictions, precision
        )
        extra_args = {}
        if fisher is not None:
            extra_args["fisher"] = fisher_statistics(
                fn, params, states, x, observed, precision=precision, mode=fisher
            )
        params, opt_state = apply(params, opt_state, grads, **extra_args)
    diverged = ~jnp.isfinite(value)
    if guard:
        diverged = diverged | ~_all_finite((params, opt_state))
        params, opt_state = _select(diverged, original, (params, opt_state))
    if raise_on_divergence:
        params = eqx.error_if(params, diverged, DIVERGED_MESSAGE)
    return params, opt_state, TrainInfo(value, diverged, taken)


def _all_finite(tree: Any) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(take_first: Array, first: Any, second: Any) -> Any:
    """Leafwise `first if take_first else second` (arrays; other leaves from `second`)."""
    return jax.tree.map(
        lambda a, b: jnp.where(take_first, a, b) if eqx.is_array(b) else b, first, second
    )


def _incremental(
    fn,
    params,
    opt_state,
    states,
    x,
    observed,
    precisions,
    steps,
    state_opt,
    apply,
    precondition,
    unroll,
):
    """iPC: states and parameters descend the energy together, one joint backward pass a step."""
    checked, spec = precisions
    diff, static = eqx.partition(params, eqx.is_inexact_array)

    def joint_energy(diff, states):
        values = {**states, **observed}
        params = eqx.combine(diff, static)
        return node_energy(fn, params, values, x, current_spec(spec, params, checked))

    def body(carry, _):
        diff, opt_state, states, state_opt_state = carry
        param_grads, state_grads = jax.grad(joint_energy, (0, 1))(diff, states)
        if precondition:
            precision = current_spec(spec, eqx.combine(diff, static), checked)
            state_grads = {
                k: solve(precision[k], g) if k in precision else g for k, g in state_grads.items()
            }
        updates, state_opt_state = state_opt.update(state_grads, state_opt_state, states)
        states = optax.apply_updates(states, updates)
        params, opt_state = apply(eqx.combine(diff, static), opt_state, param_grads)
        diff = eqx.filter(params, eqx.is_inexact_array)
        return (diff, opt_state, states, state_opt_state), None

    init = (diff, opt_state, states, state_opt.init(states))
    (diff, opt_state, states, _), _ = jax.lax.scan(
        body, init, length=steps, unroll=scan_unroll(steps, unroll)
    )
    return eqx.combine(diff, static), opt_state, states
