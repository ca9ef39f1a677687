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
import numpy as np
import optax

from ._energy import (
    Precision,
    batch_size,
    checked_values,
    current_spec,
    node_dicts,
    node_energy,
    total_energy,
)
from ._inference import (
    DIVERGED_MESSAGE,
    check_steps,
    default_state_optimizer,
    precondition_grads,
    relax,
    scan_unroll,
    state_grad_fn,
)
from ._natural import fisher_statistics, uses_fisher
from ._nudging import nudged_grads
from ._tagging import Nodes, forward_init, predictions, scan_depths

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
    check_no_python_floats(params)
    states, observed = node_dicts(states, observed)
    values, checked = checked_values(fn, params, states, x, observed, precision)
    return _energy_grads(fn, params, values, x, checked, fixed_predictions, precision)[1]


def check_no_python_floats(params: Any) -> None:
    """Refuse Python float leaves in `params`: `jax.jit` would trace and train them, while an
    eager call (which keeps them as Python numbers) would leave them fixed."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, (float, complex)) and not isinstance(leaf, np.generic):
            raise TypeError(
                f"pcjax: the parameter at params{jax.tree_util.keystr(path)} is a Python float "
                f"({leaf!r}); `jax.jit` would train it while an eager call leaves it fixed. Make "
                "it an array (jnp.asarray) to train it, or a static field "
                "(eqx.field(static=True)) or a constant of the function to freeze it."
            )


class TrainInfo(NamedTuple):
    """What `pcjax.train_step` reports.

    - `energy`: the energy at the relaxed states, before the parameter update (iPC, which
      updates states and parameters together: at the last joint step, before its update;
      nudging: the network's own energy, without the nudge, at the nudged states).
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
    key: Array | None = None,
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

    Combinations that are not implemented raise a `ValueError` naming both options:
    `incremental` with `fixed_predictions`, `tol`, `fisher` or `nudging`; `nudging` with
    `fixed_predictions`, `fisher` or `precondition`; `fixed_predictions` with `fisher`.

    With `mean_over_batch=True` (default) the parameter gradients are divided by the batch
    size, the leading axis of the observed nodes, so that the learning rate does not depend on
    it; the state updates never depend on it (the energy is a per-sample sum).

    With `guard=True` the step is all-or-nothing: if the energy at the relaxed states or any
    updated parameter or optimizer-state entry is non-finite, the original `params` and
    `opt_state` are returned unchanged (and `info.diverged` is True), so one bad batch cannot
    poison a run. `raise_on_divergence=True` raises instead.

    `unroll` controls the unrolling of the inference loop as in `pcjax.infer` (default: fully
    unrolled up to 16 steps); `key` is the random key of a stochastic state optimizer
    (`pcjax.langevin`), as in `pcjax.infer`: pass a new one every step.

    Initialise the optimizer state with `optimizer.init(eqx.filter(params, eqx.is_inexact_array))`
    (a state of another structure is refused). Parameters that are Python floats are refused:
    make them arrays to train them or static to freeze them. Jit it with the static options
    bound, e.g. `jax.jit(functools.partial(pcjax.train_step, fn, optimizer=opt, steps=20))`
    (`eqx.filter_jit` when `params` holds non-array leaves).

    **Returns:** `(params, opt_state, info)` with a `TrainInfo`.
    """
    steps = check_steps(steps, tol)
    scan_unroll(steps, unroll)  # validates `unroll`
    _check_combination(
        incremental=incremental,
        fixed_predictions=fixed_predictions,
        tol=tol is not None,
        fisher=fisher is not None,
        nudging=nudging is not None,
        precondition=precondition,
    )
    check_no_python_floats(params)
    check_optimizer_state(optimizer, opt_state, eqx.filter(params, eqx.is_inexact_array))
    if fisher is not None and not uses_fisher(opt_state):
        raise ValueError(
            f"pcjax.train_step: fisher={fisher!r} passes statistics to the optimizer, which must "
            "contain a transform that takes them: e.g. optax.chain(pcjax.natural_gradient(...), "
            "optax.scale_by_learning_rate(lr))."
        )
    state_optimizer = default_state_optimizer(state_optimizer, step_size)
    if not isinstance(observed, Mapping):
        raise TypeError(
            "pcjax: `observed` must be a dict mapping node names to arrays, got "
            f"{type(observed).__name__}."
        )
    observed = dict(observed)
    original = (params, opt_state)
    feedforward = forward_init(fn, params, x)
    states = {k: v for k, v in feedforward.items() if k not in observed}
    _, checked = checked_values(fn, params, states, x, observed, precision)
    scale = 1.0 / batch_size(observed, scan_depths(fn, params, x)) if mean_over_batch else 1.0

    def apply(params, opt_state, grads, **extra_args):
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = optimizer.update(
            grads, opt_state, eqx.filter(params, eqx.is_inexact_array), **extra_args
        )
        return eqx.apply_updates(params, updates), opt_state

    if incremental:
        params, opt_state, value = _incremental(
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
            key,
        )
        taken = jnp.asarray(steps, jnp.int32)
    elif nudging is not None:
        value, grads, taken = nudged_grads(
            fn,
            params,
            x,
            feedforward,
            observed,
            checked,
            precision,
            nudging=nudging,
            beta=nudge,
            steps=steps,
            optimizer=state_optimizer,
            tol=tol,
            unroll=unroll,
            key=key,
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
            key=key,
            sample_axes=None if tol is None else scan_depths(fn, params, x),
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


# Pairs of train_step options whose combination is not implemented.
UNSUPPORTED = (
    ("incremental", "fixed_predictions"),
    ("incremental", "tol"),
    ("incremental", "fisher"),
    ("incremental", "nudging"),
    ("nudging", "fixed_predictions"),
    ("nudging", "fisher"),
    ("nudging", "precondition"),
    ("fixed_predictions", "fisher"),
)


def _check_combination(**used: bool) -> None:
    for first, second in UNSUPPORTED:
        if used[first] and used[second]:
            raise ValueError(
                f"pcjax.train_step: `{first}` together with `{second}` is not supported; "
                "use one of them."
            )


def check_optimizer_state(
    optimizer: optax.GradientTransformation, opt_state: Any, trainable: Any
) -> None:
    """`optimizer` must be an optax transform and `opt_state` must have the structure and
    shapes of `optimizer.init(trainable)` (checked abstractly, at no run-time cost)."""
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "pcjax.train_step: `optimizer` must be an optax GradientTransformation (e.g. "
            f"optax.adam(1e-3)), got {type(optimizer).__name__}."
        )
    expected = jax.eval_shape(optimizer.init, trainable)
    hint = (
        "initialise it with `optimizer.init(eqx.filter(params, eqx.is_inexact_array))` for the "
        "same optimizer"
    )
    if jax.tree.structure(expected) != jax.tree.structure(opt_state):
        raise ValueError(
            "pcjax.train_step: `opt_state` does not match `optimizer`: the optimizer's state has "
            f"the structure {jax.tree.structure(expected)}, but `opt_state` has "
            f"{jax.tree.structure(opt_state)}; {hint}."
        )
    paths = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    for (path, leaf), want in zip(paths, jax.tree.leaves(expected)):
        if np.shape(leaf) != tuple(want.shape):
            raise ValueError(
                f"pcjax.train_step: `opt_state` does not match `optimizer`: the entry at "
                f"opt_state{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, but the "
                f"optimizer expects {tuple(want.shape)}; {hint}."
            )


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
    key,
):
    """iPC: states and parameters descend the energy together, one joint backward pass a step.

    Returns the parameters, optimizer state and the energy of the last step, before its update.
    """
    checked, spec = precisions
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    if key is not None:
        state_opt = optax.with_extra_args_support(state_opt)

    def joint_energy(diff, states):
        values = {**states, **observed}
        params = eqx.combine(diff, static)
        return node_energy(fn, params, values, x, current_spec(spec, params, checked))

    def body(carry, i):
        diff, opt_state, states, state_opt_state, _ = carry
        value, (param_grads, state_grads) = jax.value_and_grad(joint_energy, (0, 1))(diff, states)
        if precondition:
            precision = current_spec(spec, eqx.combine(diff, static), checked)
            state_grads = precondition_grads(precision, state_grads)
        extra = {} if key is None else {"key": jax.random.fold_in(key, i)}
        updates, state_opt_state = state_opt.update(state_grads, state_opt_state, states, **extra)
        states = optax.apply_updates(states, updates)
        params, opt_state = apply(eqx.combine(diff, static), opt_state, param_grads)
        diff = eqx.filter(params, eqx.is_inexact_array)
        return (diff, opt_state, states, state_opt_state, value), None

    init_value = jnp.zeros((), jax.eval_shape(joint_energy, diff, states).dtype)
    init = (diff, opt_state, states, state_opt.init(states), init_value)
    (diff, opt_state, _, _, value), _ = jax.lax.scan(
        body, init, jnp.arange(steps), unroll=scan_unroll(steps, unroll)
    )
    return eqx.combine(diff, static), opt_state, value
