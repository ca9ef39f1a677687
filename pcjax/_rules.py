r"""Learning rules and the training step that composes them.

A training step is a composition (DESIGN.md §6): an energy (`fn`, or a transformation of it:
[pcjax.fixed_predictions][], [pcjax.preconditioned][]), a learning rule that relaxes the states and
produces the parameter gradient, and an optax optimizer that turns it into an update:

```python
step = pcjax.make_train_step(fn, pcjax.Equilibrium(pcjax.GradientDescent(20)), optax.adam(1e-3))
params, opt_state, info = step(params, opt_state, x, observed)
```

Rules:

- `Equilibrium(solver)`: relax the free states from the feedforward pass with `solver`, then
  take $\partial F / \partial \theta$ at the relaxed states (standard PC; FPA with
  `fixed_predictions`).
- `Nudged(solver, beta, mode)`: leave the outputs free and pull them towards their targets with
  strength $\beta$ (equilibrium propagation; three estimates, `Nudged`'s `mode`).
- `Amortised(solver, amortiser)`: hybrid PC: relax from an amortisation network's proposal,
  learn at the relaxed states, and train the amortiser to predict them.
- `Incremental(steps, optimizer)`: incremental PC (iPC; Salvatori et al. 2024): states and
  parameters descend the energy together, one joint backward pass and one parameter update per
  step.

The optimizer receives the extra argument `context` (a [pcjax.Context][]) when it takes extra
arguments (any `optax.chain`, `optax.inject_hyperparams`, ...): [pcjax.natural_gradient][]
computes its Fisher statistics from it; other transforms ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._checks import check_no_python_floats, check_optimizer_state
from ._energy import Precision, checked_values
from ._harvest import traces_once
from ._models import (
    Bidirectional,
    Context,
    EnergyModel,
    ErrorParameterised,
    FixedPredictions,
    as_model,
)
from ._nudging import MODES, nudged_gradients
from ._solvers import (
    DIVERGED_MESSAGE,
    RELATIVE_TOL,
    AbstractSolver,
    InferInfo,
    check_descends,
    check_key,
    check_solver_fits,
    check_steps,
    per_sample_norms,
    real,
    relative_norms,
    rose,
    sample_axes,
    scan_unroll,
)
from ._tagging import Nodes, forward_init, scan_depths

Array = jax.Array
#: `apply(params, opt_state, grads, states) -> (params, opt_state)`: the optimizer update.
Apply = Callable[[Any, Any, Any, Nodes], tuple[Any, Any]]


class TrainInfo(NamedTuple):
    """What a training step reports.

    **Fields** (scalar arrays; None where the rule does not report one):

    - `energy`: the energy at the relaxed states, before the parameter update (iPC: at the
      last joint step, before its update; nudging: the network's own energy, without the
      nudge, at the nudged states).
    - `diverged`: True if that energy or the state gradient there is non-finite; under
      [pcjax.guarded][] also if the update produced a non-finite parameter or optimizer state
      (that update was then not applied; with a `fallback`, the fallback's was, see
      `skipped`).
    - `inference_steps`: state updates (or accepted ODE steps) made.
    - `grad_norm`, `converged`, `evaluations`: as in [pcjax.InferInfo][] (iPC: the state
      gradient of its last step; centred nudging: the larger norm of its two relaxations and
      the evaluations of both).
    - `initial_energy`, `energy_rose`: as in [pcjax.InferInfo][]: the energy inference
      descended, at its start, and whether it ended above it (a finite run whose steps are
      too large; iPC: the energy of its first and last joint steps; nudging: the nudged
      energy, of either relaxation).
    - `relative_grad_norm`, `initial_grad_norm`: the equilibrium certificate, as in
      [pcjax.InferInfo][] (iPC: the field of its last joint step relative to its first).
    - `skipped`: under [pcjax.guarded][], 1 if this step's update was not applied (non-finite),
      else 0; sum it over a run to count the skipped steps.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> step = pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(4)), optax.sgd(0.1))
    >>> _, _, info = step(params, optax.sgd(0.1).init(params), x, {"y": y})
    >>> int(info.inference_steps), bool(info.diverged), info.grad_norm.shape
    (4, False, ())

    ```
    """

    energy: Array
    diverged: Array
    inference_steps: Array
    grad_norm: Array | None = None
    converged: Array | None = None
    evaluations: Array | None = None
    initial_energy: Array | None = None
    energy_rose: Array | None = None
    relative_grad_norm: Array | None = None
    initial_grad_norm: Array | None = None
    skipped: Array | None = None


class Problem(NamedTuple):
    """One training step's network, data and checked node specs (internal)."""

    model: EnergyModel
    x: Any
    observed: Nodes
    spec: dict
    precision: Precision | None
    sample_axes: dict
    feedforward: Nodes

    def free(self, values: Nodes) -> Nodes:
        return {k: v for k, v in values.items() if k not in self.observed}


class AbstractRule(eqx.Module):
    """A learning rule: `train(problem, params, opt_state, apply, key)` returns the updated
    parameters and optimizer state and an `InferInfo` whose `energy` is the step's energy."""

    def check(self, model: EnergyModel) -> None:
        """Raise if this rule cannot learn with `model` (called at construction)."""

    def train(
        self, problem: Problem, params: Any, opt_state: Any, apply: Apply, key: Array | None
    ) -> tuple[Any, Any, InferInfo]:
        raise NotImplementedError


def _check_solver(solver: Any, rule: str) -> AbstractSolver:
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"pcjax.{rule}: `solver` must be a pcjax solver (pcjax.GradientDescent(steps), "
            "pcjax.Backtracking(steps), pcjax.ODE(), pcjax.ConjugateGradient(steps), "
            f"pcjax.GaussNewton(steps), pcjax.LevenbergMarquardt(steps)), got "
            f"{type(solver).__name__}."
        )
    return solver


class Equilibrium(AbstractRule):
    r"""Learn at the relaxed states: relax with `solver` from the feedforward pass, then
    $\partial F / \partial \theta$ there (standard PC; the fixed-prediction gradient when the
    network is `pcjax.fixed_predictions(fn)`).

    **Arguments:**

    - `solver`: the inference solver ([pcjax.GradientDescent][], [pcjax.Backtracking][],
      [pcjax.ODE][] or [pcjax.ConjugateGradient][]).

    **Raises:** `TypeError` if `solver` is not a pcjax solver.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> rule = pc.Equilibrium(pc.GradientDescent(4))
    >>> step = pc.make_train_step(fn, rule, optax.sgd(0.1))
    >>> params, opt_state, info = step(params, optax.sgd(0.1).init(params), x, {"y": y})
    >>> int(info.inference_steps)
    4

    ```
    """

    solver: AbstractSolver

    def __init__(self, solver: AbstractSolver):
        self.solver = _check_solver(solver, "Equilibrium")

    def train(self, problem, params, opt_state, apply, key):
        start = problem.free(problem.feedforward)
        states, param_grads, info = _relax(self.solver, problem, params, start, key)
        params, opt_state = apply(params, opt_state, param_grads, states)
        return params, opt_state, info


def _relax(
    solver: AbstractSolver, problem: Problem, params: Any, start: Nodes, key: Array | None
) -> tuple[Nodes, Any, InferInfo]:
    """Relax the free states from `start` with `solver` (in the model's inference variables),
    then `(relaxed states, dF/dparams there, the solver's report)`."""
    model, observed, x = problem.model, problem.observed, problem.x
    check_solver_fits(
        solver, model, "pcjax.make_train_step", {**start, **observed}, problem.sample_axes
    )
    field = model.field(params, x, observed, problem.spec)
    variables, steps, evaluations, energies, initial = solver.run(
        field,
        model.to_variables(params, x, observed, start),
        key=key,
        sample_axes=problem.sample_axes,
    )
    states = model.to_states(params, x, observed, variables)
    value, param_grads, field_grads = model.gradients(
        params, states, observed, x, problem.spec, problem.precision
    )
    states, info = solver.report(
        states, value, field_grads, steps, evaluations, energies, initial, problem.sample_axes
    )
    return states, param_grads, info


class Nudged(AbstractRule):
    r"""Output nudging (equilibrium propagation, the PCX benchmark's PC): the observed output
    nodes stay free, pulled towards their targets with strength `beta`.

    `mode`: `"positive"` $(G(\beta) - G(0))/\beta$, `"negative"` $(G(0) - G(-\beta))/\beta$ or
    `"centred"` $(G(\beta) - G(-\beta))/2\beta$ (bias $O(\beta^2)$), with
    $G(\beta) = \partial_\theta F_\beta$ at the nudged equilibrium; all tend to the gradient of
    the output loss at the free equilibrium as $\beta \to 0$.
    Needs an energy (standard, or preconditioned): the fixed-prediction field is not a
    gradient, so [pcjax.fixed_predictions][] is refused.

    **Arguments:**

    - `solver`: the inference solver of each (nudged) relaxation.
    - `beta`: the nudging strength $\beta > 0$; default 0.1 (a number or a traced value).
    - `mode`: `"positive"`, `"negative"` or `"centred"` (default; two relaxations).

    **Raises:** `TypeError` if `solver` is not a pcjax solver; `ValueError` for an unknown
    `mode` or a `beta` that is not positive, and in [pcjax.make_train_step][] for
    [pcjax.fixed_predictions][], [pcjax.error_parameterised][], [pcjax.bidirectional][] or
    no observed node.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> rule = pc.Nudged(pc.GradientDescent(20), beta=0.05, mode="centred")
    >>> step = pc.make_train_step(fn, rule, optax.sgd(0.1))
    >>> params, opt_state, info = step(params, optax.sgd(0.1).init(params), x, {"y": y})
    >>> bool(info.diverged)
    False

    ```
    """

    solver: AbstractSolver
    beta: Any
    mode: str = eqx.field(static=True)

    def __init__(self, solver: AbstractSolver, beta: Any = 0.1, mode: str = "centred"):
        self.solver = _check_solver(solver, "Nudged")
        if mode not in MODES:
            raise ValueError(f"pcjax.Nudged: `mode` must be one of {MODES}, got {mode!r}.")
        if not isinstance(beta, jax.core.Tracer) and not real(beta) > 0:
            raise ValueError(f"pcjax.Nudged: `beta` must be a positive number, got {beta!r}.")
        self.beta, self.mode = beta, mode

    def check(self, model):
        if isinstance(model.base, ErrorParameterised):
            raise ValueError(
                "pcjax.Nudged: nudging with error-parameterised inference (ePC) is not "
                "implemented; use pcjax.Equilibrium or pcjax.Incremental with it."
            )
        if isinstance(model.base, Bidirectional):
            raise ValueError(
                "pcjax.Nudged: nudging a bidirectional (bPC) network is not implemented; use "
                "pcjax.Equilibrium or pcjax.Incremental with it."
            )
        if isinstance(model.base, FixedPredictions):
            raise ValueError(
                "pcjax.Nudged: nudging estimates the gradient of the loss at the equilibrium of "
                "an energy, and the fixed-prediction field is not the gradient of one; use "
                "pcjax.Equilibrium with pcjax.fixed_predictions, or nudge the standard energy."
            )

    def train(self, problem, params, opt_state, apply, key):
        if not problem.observed:
            raise ValueError("pcjax.Nudged: nudging needs observed (target) nodes.")
        grads, info = nudged_gradients(
            problem.model,
            params,
            problem.x,
            problem.feedforward,
            problem.observed,
            problem.spec,
            problem.precision,
            mode=self.mode,
            beta=self.beta,
            solver=self.solver,
            key=key,
            sample_axes=problem.sample_axes,
        )
        # The estimate is the gradient at the free equilibrium: the feedforward pass.
        params, opt_state = apply(params, opt_state, grads, problem.free(problem.feedforward))
        return params, opt_state, info


class Incremental(AbstractRule):
    r"""Incremental PC (iPC; Salvatori et al. 2024, "A stable, fast, and fully automatic
    learning algorithm for predictive coding networks").

    For `steps` steps from the feedforward pass: one backward pass gives
    $\partial F / \partial x$ and $\partial F / \partial \theta$ at the current states and
    parameters; the states take a step of `optimizer` (default `optax.sgd(step_size)`;
    [pcjax.langevin][] with a key) and the parameters one of the training step's optimizer.
    With [pcjax.fixed_predictions][] the predictions are frozen at the feedforward pass of the
    current parameters at each step; with [pcjax.preconditioned][] the state step is
    preconditioned.

    **Arguments:**

    - `steps`: joint steps (each one state and one parameter update); a positive int.
    - `optimizer`: the optax transform of the states; default `optax.sgd(step_size)`.
    - `step_size`: the states' SGD step size when `optimizer` is None; default 0.1.
    - `unroll`: unrolling of the steps' `lax.scan` (None: fully unrolled up to 16).

    **Raises:** `ValueError` for `steps` not a positive int or a step size that is not
    positive; `TypeError` for an `optimizer` that is not an optax transform.

    **Example** ([setup][examples-setup]): four joint steps make four parameter updates.

    ```pycon
    >>> step = pc.make_train_step(fn, pc.Incremental(4), optax.sgd(0.1))
    >>> new, opt_state, info = step(params, optax.sgd(0.1).init(params), x, {"y": y})
    >>> int(info.inference_steps), bool(jnp.any(new["w1"] != params["w1"]))
    (4, True)

    ```
    """

    steps: int = eqx.field(static=True)
    optimizer: optax.GradientTransformation
    unroll: int | bool | None = eqx.field(static=True)

    def __init__(
        self,
        steps: int,
        optimizer: optax.GradientTransformation | None = None,
        *,
        step_size: Any = 0.1,
        unroll: int | bool | None = None,
    ):
        self.steps = check_steps(steps)
        if optimizer is None:
            if not isinstance(step_size, jax.core.Tracer) and not real(step_size) > 0:
                raise ValueError(
                    f"pcjax.Incremental: `step_size` must be positive, got {step_size!r}."
                )
            optimizer = optax.sgd(step_size)
        elif not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "pcjax.Incremental: `optimizer` (of the states) must be an optax "
                f"GradientTransformation, got {type(optimizer).__name__}."
            )
        else:
            check_descends(optimizer, "pcjax.Incremental")
        scan_unroll(self.steps, unroll)
        self.optimizer, self.unroll = optimizer, unroll

    def train(self, problem, params, opt_state, apply, key):
        model, observed, x = problem.model, problem.observed, problem.x
        state_opt = self.optimizer
        if key is not None:
            state_opt = optax.with_extra_args_support(state_opt)
        diff, static = eqx.partition(params, eqx.is_inexact_array)

        def body(carry, i):
            # `variables`: the free states, or ePC's errors (states of the current params).
            diff, opt_state, variables, state_opt_state = carry
            params = eqx.combine(diff, static)
            states = model.to_states(params, x, observed, variables)
            value, param_grads, field = model.gradients(
                params, states, observed, x, problem.spec, problem.precision
            )
            extra = {} if key is None else {"key": jax.random.fold_in(key, i)}
            updates, state_opt_state = state_opt.update(field, state_opt_state, variables, **extra)
            params, opt_state = apply(params, opt_state, param_grads, states)
            variables = optax.apply_updates(variables, updates)
            carry = (
                eqx.filter(params, eqx.is_inexact_array),
                opt_state,
                variables,
                state_opt_state,
            )
            return carry, (value, per_sample_norms(field, problem.sample_axes))

        start = model.to_variables(params, x, observed, problem.free(problem.feedforward))
        init = (diff, opt_state, start, state_opt.init(start))
        (diff, opt_state, _, _), (values, norms) = jax.lax.scan(
            body, init, jnp.arange(self.steps), unroll=scan_unroll(self.steps, self.unroll)
        )
        # The field before the last update (iPC moves states and parameters together).
        value, norm = values[-1], jnp.max(norms[-1])
        diverged = ~jnp.isfinite(value) | ~jnp.isfinite(norm)
        steps = jnp.asarray(self.steps, jnp.int32)
        initial = values[0]
        relative = relative_norms(norms[-1], norms[0])
        converged = (relative <= RELATIVE_TOL) & ~diverged
        info = InferInfo(
            value,
            diverged,
            steps,
            None,
            norm,
            converged,
            steps,
            initial,
            rose(initial, value),
            relative,
            jnp.max(norms[0]),
        )
        return eqx.combine(diff, static), opt_state, info


class Amortised(AbstractRule):
    r"""Amortised (hybrid) PC (Tschantz et al. 2023, "Hybrid predictive coding: inferring,
    fast and slow"): a bottom-up amortisation network proposes the free states, `solver`
    refines them, and the network learns to predict the refined states.

    `amortiser(params, x, observed)` returns a dict with a state for every free node (the
    amortisation network's parameters live in `params` next to the generative ones). The step
    relaxes from that proposal (instead of the feedforward pass), takes
    $\partial F / \partial \theta$ at the relaxed states $x^*$ as `Equilibrium` does, and adds
    `weight` times the gradient of the amortisation loss
    $\tfrac12 \sum_i \lVert \operatorname{sg}(x_i^*) - q_i(\text{params}, x, \text{observed})
    \rVert^2$ (summed over the batch; `sg`: the relaxed states are targets, not functions of the
    parameters). One optimizer update applies both. A well-trained amortiser starts inference
    near the equilibrium, so fewer steps reach it.

    **Arguments:**

    - `solver`: the inference solver that refines the proposal.
    - `amortiser`: `(params, x, observed) -> dict` of a state for every free node, each of
      its node's shape and dtype.
    - `weight`: the weight of the amortisation loss, $\ge 0$; default 1.

    **Raises:** `TypeError` for a `solver` that is not a pcjax solver or an `amortiser`
    that is not callable; `ValueError` for a negative `weight`, and in the step for an
    amortiser that misses a free node or returns the wrong shape or dtype.

    **Example** ([setup][examples-setup]): `params["q"]` maps the input to the hidden node.

    ```pycon
    >>> def amortiser(params, x, observed):
    ...     return {"h": jnp.tanh(x @ params["q"])}
    >>> both = {**params, "q": jnp.zeros((3, 4))}
    >>> rule = pc.Amortised(pc.GradientDescent(2), amortiser)
    >>> step = pc.make_train_step(fn, rule, optax.sgd(0.1))
    >>> new, opt_state, info = step(both, optax.sgd(0.1).init(both), x, {"y": y})
    >>> bool(jnp.any(new["q"] != 0))  # the amortiser learned from the relaxed states
    True

    ```
    """

    solver: AbstractSolver
    amortiser: Callable[..., Mapping[str, Array]] = eqx.field(static=True)
    weight: Any = 1.0

    def __init__(
        self,
        solver: AbstractSolver,
        amortiser: Callable[..., Mapping[str, Array]],
        weight: Any = 1.0,
    ):
        self.solver = _check_solver(solver, "Amortised")
        if not callable(amortiser):
            raise TypeError(
                "pcjax.Amortised: `amortiser` must be a function (params, x, observed) -> dict "
                f"of initial states, got {type(amortiser).__name__}."
            )
        if not isinstance(weight, jax.core.Tracer) and not real(weight) >= 0:
            raise ValueError(f"pcjax.Amortised: `weight` must be >= 0, got {weight!r}.")
        self.amortiser, self.weight = amortiser, weight

    def proposal(self, params: Any, problem: Problem) -> Nodes:
        """The amortiser's states, checked against the free nodes (names, shapes, dtypes)."""
        proposed = self.amortiser(params, problem.x, problem.observed)
        free = problem.free(problem.feedforward)
        if not isinstance(proposed, Mapping) or set(proposed) != set(free):
            got = sorted(proposed) if isinstance(proposed, Mapping) else type(proposed).__name__
            raise ValueError(
                f"pcjax.Amortised: the amortiser must return a state for every free node "
                f"{sorted(free)}, got {got}."
            )
        for name, value in proposed.items():
            if jnp.shape(value) != free[name].shape or jnp.result_type(value) != free[name].dtype:
                raise ValueError(
                    f"pcjax.Amortised: the amortiser's state for node {name!r} has shape "
                    f"{jnp.shape(value)} and dtype {jnp.result_type(value)}; the node's is "
                    f"{free[name].shape} {free[name].dtype}."
                )
        return dict(proposed)

    def train(self, problem, params, opt_state, apply, key):
        x, observed = problem.x, problem.observed
        start = self.proposal(params, problem)
        states, param_grads, info = _relax(self.solver, problem, params, start, key)
        targets = jax.lax.stop_gradient(states)
        diff, static = eqx.partition(params, eqx.is_inexact_array)

        def amortisation_loss(diff):
            proposed = self.amortiser(eqx.combine(diff, static), x, observed)
            return 0.5 * sum(jnp.sum((targets[k] - proposed[k]) ** 2) for k in targets)

        amortiser_grads = jax.grad(amortisation_loss)(diff)
        grads = jax.tree.map(lambda g, a: g + self.weight * a, param_grads, amortiser_grads)
        params, opt_state = apply(params, opt_state, grads, states)
        return params, opt_state, info


def make_train_step(
    fn: Callable[..., Any] | EnergyModel,
    rule: AbstractRule,
    optimizer: optax.GradientTransformation,
    *,
    precision: Precision | None = None,
    mean_over_batch: bool = True,
    throw: bool = False,
) -> Callable[..., tuple[Any, Any, TrainInfo]]:
    """A PC training step: `step(params, opt_state, x, observed, key=None)`.

    **Main arguments:**

    - `fn`: the tagged forward function, or an energy transformation of it
      ([pcjax.fixed_predictions][], [pcjax.preconditioned][], ...).
    - `rule`: the learning rule: [pcjax.Equilibrium][]`(solver)`,
      [pcjax.Nudged][]`(solver, beta, mode)`, [pcjax.Incremental][]`(steps, optimizer)` or
      [pcjax.Amortised][]`(solver, amortiser)`.
    - `optimizer`: the optax optimizer of the parameters; it receives the extra argument
      `context` ([pcjax.Context][]) when it takes extra arguments, which is how
      [pcjax.natural_gradient][] gets its statistics.

    **Other arguments:**

    - `precision`: the node precisions (see [pcjax.energy][]); a function of the parameters
      (`lambda p: p["precision"]`) makes them learned by `optimizer` with the rest. Default
      None (1 for every node).
    - `mean_over_batch`: divide the parameter gradient (a sum over the batch) by the batch
      size, so that the learning rate does not depend on it: the axis the nodes share after
      any stacked scan axes; a per-example step under `jax.vmap`, whose nodes have no batch
      axis, is one sample. Default True.
    - `throw`: raise at run time (`eqx.error_if`) when the energy diverges: an
      `equinox.EquinoxRuntimeError` with the message eagerly or under `eqx.filter_jit`; under
      plain `jax.jit` a `JaxRuntimeError` "INTERNAL: CpuCallback error" that holds the message
      in a traceback. Default False.

    The step starts the free states (every tagged node not in `observed`) at the feedforward
    pass. It is a pure function: jit it with `eqx.filter_jit` (or `jax.jit`), and wrap it in
    [pcjax.guarded][] to make it all-or-nothing. Initialise the optimizer state with
    `optimizer.init(eqx.filter(params, eqx.is_inexact_array))`.

    **Returns:** `step(params, opt_state, x, observed, key=None)`, returning
    `(params, opt_state, info)`: the updated parameters and optimizer state and a
    [pcjax.TrainInfo][]. `x` is the input of `fn`, `observed` the dict of clamped node values
    (batch first), `key` a random key for stochastic state optimizers ([pcjax.langevin][]):
    pass a new one every step.

    **Raises:** `TypeError` for a `rule` that is not a learning rule or an `optimizer` that
    is not an optax transform; `ValueError` for a combination the rule cannot learn with
    (e.g. [pcjax.Nudged][] with [pcjax.fixed_predictions][]). The step raises `TypeError` for
    a Python float among the parameters, an `observed` that is not a dict or an optimizer
    state that does not fit, and `ValueError` for unknown or missing nodes and shapes.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> optimizer = optax.adam(1e-2)
    >>> step = pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(4)), optimizer)
    >>> opt_state = optimizer.init(params)
    >>> for i in range(3):
    ...     params, opt_state, info = step(params, opt_state, x, {"y": y})
    ...     print(round(float(info.energy), 3))
    0.473
    0.441
    0.411

    ```
    """
    model = as_model(fn, "pcjax.make_train_step")
    if not isinstance(rule, AbstractRule):
        raise TypeError(
            "pcjax.make_train_step: `rule` must be a learning rule (pcjax.Equilibrium(solver), "
            f"pcjax.Nudged(solver), pcjax.Incremental(steps)), got {type(rule).__name__}."
        )
    rule.check(model)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "pcjax.make_train_step: `optimizer` must be an optax GradientTransformation (e.g. "
            f"optax.adam(1e-3)), got {type(optimizer).__name__}."
        )
    takes_context = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    @traces_once
    def step(
        params: Any,
        opt_state: optax.OptState,
        x: Any,
        observed: Mapping[str, Array],
        key: Array | None = None,
    ) -> tuple[Any, optax.OptState, TrainInfo]:
        check_no_python_floats(params)
        check_optimizer_state(optimizer, opt_state, eqx.filter(params, eqx.is_inexact_array))
        if not isinstance(observed, Mapping):
            raise TypeError(
                "pcjax: `observed` must be a dict mapping node names to arrays, got "
                f"{type(observed).__name__}."
            )
        observed = dict(observed)
        key = check_key(key, "pcjax.make_train_step's step")
        feedforward = forward_init(model.fn, params, x)
        free = {k: v for k, v in feedforward.items() if k not in observed}
        _, spec = checked_values(model.fn, params, free, x, observed, precision)
        layout = sample_axes({**feedforward, **observed}, scan_depths(model.fn, params, x))
        problem = Problem(model, x, observed, spec, precision, layout, feedforward)
        scale = 1.0 / layout.size if mean_over_batch else 1.0

        def apply(params, opt_state, grads, states):
            grads = jax.tree.map(lambda g: g * scale, grads)
            extra = {}
            if takes_context:
                extra["context"] = Context(model, params, states, x, observed, precision)
            updates, opt_state = optimizer.update(
                grads, opt_state, eqx.filter(params, eqx.is_inexact_array), **extra
            )
            return eqx.apply_updates(params, updates), opt_state

        params, opt_state, info = rule.train(problem, params, opt_state, apply, key)
        if throw:
            params = eqx.error_if(params, info.diverged, DIVERGED_MESSAGE)
        return (
            params,
            opt_state,
            TrainInfo(
                info.energy,
                info.diverged,
                info.steps,
                info.grad_norm,
                info.converged,
                info.evaluations,
                info.initial_energy,
                info.energy_rose,
                info.relative_grad_norm,
                info.initial_grad_norm,
                jnp.asarray(0, jnp.int32),
            ),
        )

    return step


def guarded(
    step: Callable[..., tuple[Any, Any, TrainInfo]],
    fallback: Callable[..., tuple[Any, Any, TrainInfo]] | None = None,
) -> Callable[..., tuple[Any, Any, TrainInfo]]:
    r"""Make a training step all-or-nothing, and optionally retry a failed step with a safer one.

    A step *fails* when its energy diverged (`info.diverged`) or any updated parameter or
    optimizer-state entry is non-finite. A failed update is never applied: `params` and
    `opt_state` come back as they went in, so one bad batch cannot poison a run.

    **Why a fallback.** Without one, a failed step is only skipped: training moves on only if
    the next call differs (the next batch). When the failure comes from the state solver rather
    than the data (a fixed state step that has become too large for the curvature of the energy,
    about $1 + p\,\lVert W \rVert^2$ for a node of precision $p$ feeding a layer $W$, once
    learned precisions or weights have grown), the same step fails again on every later call
    with the same inputs, and a run over a fixed batch freezes. With `fallback`, a failed step
    is retried once from the original `params` and `opt_state` with `fallback` (a step of the
    same signature, e.g. the same [pcjax.make_train_step][] with a [pcjax.Backtracking][] solver,
    whose kept state steps never raise the energy, so that a finite start stays finite), and
    the fallback's update is applied if it does not fail. Under `jax.jit` the fallback runs
    only when the step failed (`lax.cond`; under `jax.vmap` both run). Fallbacks compose:
    `guarded(a, guarded(b, c))` tries `a`, then `b`, then `c`.

    **Arguments:**

    - `step`: a training step `step(params, opt_state, *args, **kwargs) -> (params,
      opt_state, info)` with a [pcjax.TrainInfo][] (from [pcjax.make_train_step][]).
    - `fallback`: None (skip a failed step), or a step with the same signature and the same
      `TrainInfo` layout, called with the same arguments when `step` fails.

    **Returns:** the guarded step, returning `(params, opt_state, info)`:

    - `step` succeeded: its results, `info.skipped` 0.
    - `step` failed, no fallback or the fallback failed too: the original `params` and
      `opt_state`, `info.diverged` True and `info.skipped` 1 (`info` is the last attempt's).
    - `step` failed and the fallback succeeded: the fallback's `params`, `opt_state` and
      `info` (energy, certificate: what the applied update learned from), with
      `info.diverged` True (the step itself failed: watch it) and `info.skipped` 0.

    Sum `info.skipped` over a run to count the steps that changed nothing, and
    `info.diverged` to count those that needed the fallback or were skipped.

    **Raises:** `TypeError` if `fallback` is not callable, or (at trace time) if its
    `TrainInfo` does not have the layout of `step`'s.

    **Example** ([setup][examples-setup]): a batch with a NaN leaves the parameters as they
    were.

    ```pycon
    >>> step = pc.guarded(
    ...     pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(4)), optax.sgd(0.1))
    ... )
    >>> opt_state = optax.sgd(0.1).init(params)
    >>> new, _, info = step(params, opt_state, x.at[0, 0].set(jnp.nan), {"y": y})
    >>> int(info.skipped), bool(jnp.all(new["w1"] == params["w1"]))
    (1, True)

    ```
    """
    if fallback is not None and not callable(fallback):
        raise TypeError(
            "pcjax.guarded: `fallback` must be a training step (a callable like `step`), got "
            f"{type(fallback).__name__}."
        )

    def guarded_step(params, opt_state, *args, **kwargs):
        new_params, new_state, info = step(params, opt_state, *args, **kwargs)
        failed = _failed(info, new_params, new_state)
        first = _keep_if_failed(failed, params, opt_state, new_params, new_state, info)
        if fallback is None:
            return first

        # `lax.cond` carries arrays only: the other leaves (an equinox module's activation
        # functions, ...) are the first attempt's, which the fallback's must equal.
        dynamic, static = eqx.partition(first, eqx.is_array)

        def retry(_):
            out = fallback(params, opt_state, *args, **kwargs)
            again = _failed(out[2], out[0], out[1])
            kept = _keep_if_failed(again, params, opt_state, *out)
            kept = (kept[0], kept[1], kept[2]._replace(diverged=jnp.asarray(True)))
            return eqx.filter(kept, eqx.is_array)

        try:
            dynamic = jax.lax.cond(failed, retry, lambda _: dynamic, None)
        except (TypeError, ValueError) as error:
            raise TypeError(
                "pcjax.guarded: `fallback` must return parameters, optimizer state and a "
                "TrainInfo of the same structure, shapes and dtypes as `step`'s (build both "
                f"with pcjax.make_train_step and the same optimizer): {error}"
            ) from error
        return eqx.combine(dynamic, static)

    return guarded_step


def _failed(info: TrainInfo, params: Any, opt_state: Any) -> Array:
    """Whether a step's energy diverged or its update is non-finite (a scalar bool)."""
    return jnp.asarray(info.diverged) | ~_all_finite((params, opt_state))


def _keep_if_failed(
    failed: Array, params: Any, opt_state: Any, new_params: Any, new_state: Any, info: TrainInfo
) -> tuple[Any, Any, TrainInfo]:
    """The old `(params, opt_state)` if `failed`, else the new; `info` marked accordingly."""
    params, opt_state = _select(failed, (params, opt_state), (new_params, new_state))
    return params, opt_state, info._replace(diverged=failed, skipped=failed.astype(jnp.int32))


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
