r"""Learning: parameter gradients of the energy at the relaxed states; pcjax 0.1's
`train_step`, now a thin wrapper over `pcjax.make_train_step`.

At relaxed states the gradient of $F$ with respect to the parameters $\theta_i$ of node
$i$'s prediction is local: $\partial F / \partial \theta_i =
-(\partial \mu_i / \partial \theta_i)^\top P_i e_i$, which for a dense layer
$\mu = W f(x) + b$ is the Hebbian rule $\partial F / \partial W = -P e\, f(x)^\top$.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from ._energy import Precision, checked_values, node_dicts
from ._harvest import traces_once
from ._models import EnergyModel, as_model, fixed_predictions, preconditioned
from ._natural import uses_fisher, with_statistics
from ._nudging import MODES as NUDGING_MODES
from ._rules import Equilibrium, Incremental, Nudged, TrainInfo, guarded, make_train_step
from ._solvers import GradientDescent, real

Array = jax.Array


@traces_once
def param_grads(
    fn: Callable[..., Any] | EnergyModel,
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    precision: Precision | None = None,
    fixed_predictions: bool = False,
) -> Any:
    r"""Gradient of the energy with respect to the parameters, at the given (relaxed) states.

    $$\frac{\partial F}{\partial \theta} = -\sum_i
    \Big(\frac{\partial \mu_i}{\partial \theta}\Big)^{\!\top} P_i e_i .$$

    The energy is summed over the batch, so are these gradients (divide by the batch size for a
    mean). Works with any pytree of parameters, equinox modules included: the result has the
    structure of `params`, with None at leaves that are not floating-point arrays (as
    `eqx.filter_grad`). For `pcjax.fixed_predictions(fn)` the predictions and their Jacobians
    are those of the feedforward pass (the fixed-prediction assumption); the keyword
    `fixed_predictions=True` (pcjax 0.1) does the same.
    """
    check_no_python_floats(params)
    model = as_model(fn, "pcjax.param_grads")
    if fixed_predictions:
        model = _fixed(model)
    states, observed = node_dicts(states, observed)
    values, spec = checked_values(model.fn, params, states, x, observed, precision)
    free = {k: v for k, v in values.items() if k not in observed}
    return model.gradients(params, free, observed, x, spec, precision)[1]


def _fixed(model: EnergyModel) -> EnergyModel:
    return fixed_predictions(model)


def _nudged(solver: GradientDescent, nudge: Any, nudging: str) -> Nudged:
    """pcjax 0.1's `nudging=`/`nudge=`, checked under those names."""
    if nudging not in NUDGING_MODES:
        raise ValueError(f"pcjax: `nudging` must be one of {NUDGING_MODES}, got {nudging!r}.")
    if not isinstance(nudge, jax.core.Tracer) and not real(nudge) > 0:
        raise ValueError(f"pcjax: the nudging strength `nudge` must be positive, got {nudge!r}.")
    return Nudged(solver, nudge, nudging)


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
    """Deprecated (pcjax 0.1): one training step configured by flags.

    Builds the composition `pcjax.make_train_step` takes and runs it once: the network
    (`fixed_predictions` -> `pcjax.fixed_predictions(fn)`, `precondition` ->
    `pcjax.preconditioned`), the rule (`pcjax.Equilibrium(pcjax.GradientDescent(steps,
    state_optimizer, step_size=..., tol=..., unroll=...))`; `nudging=mode, nudge=beta` ->
    `pcjax.Nudged(solver, beta, mode)`; `incremental=True` -> `pcjax.Incremental(steps,
    state_optimizer)`), `fisher=mode` (statistics of that mode handed to the optimizer as
    `fisher=`; new code lets `pcjax.natural_gradient` compute them from the step's `context`),
    `guard=True` -> `pcjax.guarded`, `raise_on_divergence` -> `throw=True`. See the README's
    migration table. Emits a `DeprecationWarning`.
    """
    warnings.warn(
        "pcjax.train_step is deprecated: build the step once with pcjax.make_train_step(fn, "
        "rule, optimizer) (see the README's migration table).",
        DeprecationWarning,
        stacklevel=2,
    )
    model = as_model(fn, "pcjax.train_step")
    if fixed_predictions:
        model = _fixed(model)
    if precondition:
        model = preconditioned(model)
    if incremental:
        if tol is not None:
            raise ValueError(
                "pcjax.train_step: `incremental` together with `tol` is not supported: iPC "
                "makes a fixed number of joint steps (pcjax.Incremental(steps))."
            )
        if nudging is not None:
            raise ValueError(
                "pcjax.train_step: `incremental` together with `nudging` is not supported: "
                "they are two learning rules (pcjax.Incremental, pcjax.Nudged)."
            )
        rule = Incremental(steps, state_optimizer, step_size=step_size, unroll=unroll)
    else:
        solver = GradientDescent(
            steps, state_optimizer, step_size=step_size, tol=tol, unroll=unroll
        )
        rule = Equilibrium(solver) if nudging is None else _nudged(solver, nudge, nudging)
    if fisher is not None:
        if not uses_fisher(opt_state):
            raise ValueError(
                f"pcjax.train_step: fisher={fisher!r} passes statistics to the optimizer, which "
                "must contain a transform that takes them: e.g. optax.chain(pcjax."
                "natural_gradient(...), optax.scale_by_learning_rate(lr))."
            )
        optimizer = with_statistics(optimizer, fisher)
    step = make_train_step(
        model,
        rule,
        optimizer,
        precision=precision,
        mean_over_batch=mean_over_batch,
        throw=raise_on_divergence,
    )
    if guard:
        step = guarded(step)
    return step(params, opt_state, x, observed, key)
