r"""Inference solvers: how the free states descend the energy.

A solver integrates a state field $g(x) = \partial F / \partial x$ (or its fixed-prediction or
preconditioned form: the energy transformations, [pcjax.fixed_predictions][] and
[pcjax.preconditioned][]) from the initial states:

- `GradientDescent`: $x_{t+1} = x_t + \text{optimizer}(g(x_t))$ for a fixed number of steps, or
  until every sample's gradient norm is at most `tol`; any optax optimizer, [pcjax.langevin][]
  included (Monte Carlo PC: pass a key).
- `ODE`: the gradient flow $\dot x = -g(x)$ integrated by a diffrax solver with adaptive step
  sizes, stopped by a steady-state event $\max_n \lVert g_n(x) \rVert \le$ `tol`.
- `ConjugateGradient`: Newton-CG, conjugate gradients per sample on the energy's local
  quadratic model (Hessian-vector products by `jax.linearize`).

All report an `InferInfo` (steps, final energy and per-sample gradient norm, converged,
diverged, field evaluations) and, with `throw=True`, raise at run time (`eqx.error_if`) when
the energy diverges or `tol` is not reached, as lineax's solvers do.

**Samples.** A node value is `(scan axes..., batch, features...)`, or one sample's
`(features...)` (a per-example function under `jax.vmap`); `sample_axes` decides which from all
the nodes together. Per-sample norms, `tol` and the training step's `mean_over_batch` use it, so
a vmapped per-example run reports each example's Euclidean norm.

**What `throw=True` raises.** The check runs inside the compiled program (equinox's
`error_if`), so what reaches the user depends on how the program is compiled (equinox 0.13):

- eagerly or under `eqx.filter_jit`: an `equinox.EquinoxRuntimeError` whose message is
  pcjax's (e.g. "pcjax: the energy became non-finite ..."), after equinox's note on
  `EQX_ON_ERROR`. Use `eqx.filter_jit` to read these errors.
- under plain `jax.jit`: a `jax.errors.JaxRuntimeError` whose text starts
  `INTERNAL: CpuCallback error` (on GPU a similar callback error) and contains pcjax's message
  inside a Python traceback, and a "jax.pure_callback failed" traceback printed to stderr;
  JAX gives equinox no way to shorten it.
- `EQX_ON_ERROR=nan` (environment variable, read at trace time) returns NaN states instead of
  raising; `EQX_ON_ERROR=breakpoint` opens a debugger at the failing check.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._cg import conjugate_gradients

Array = jax.Array
Nodes = dict[str, Array]
StateField = Callable[[Nodes], tuple[Array, Nodes]]
UNROLL_LIMIT = 16
_LOOP_KIND = "checkpointed"  # of the `tol` loop (eqxi.while_loop); see GradientDescent

DIVERGED_MESSAGE = (
    "pcjax: the energy became non-finite (NaN/inf) during inference; lower the state step "
    "size, check the inputs for NaN/inf, or use a more stable state optimizer."
)
NOT_CONVERGED_MESSAGE = (
    "pcjax: inference stopped before every sample's state gradient norm reached `tol` "
    "(GradientDescent: `steps` exhausted; ODE: `max_steps` or `t1` reached; "
    "ConjugateGradient: more `steps` or `newton_steps` needed, or non-positive curvature)."
)


class InferInfo(NamedTuple):
    r"""What inference reports besides the relaxed states.

    **Fields** (scalar arrays, unless said otherwise):

    - `energy`: the energy at the returned states.
    - `diverged`: True if the energy or the state gradient at the returned states is non-finite
      (a NaN or inf reached at any step persists in the states).
    - `steps`: state updates made (gradient descent), accepted ODE steps, or conjugate-gradient
      iterations (`ConjugateGradient`, all rounds).
    - `energies`: with `GradientDescent(record_energy=True)`, the energy before each update,
      shape `(steps,)` (NaN after an early stop); otherwise None.
    - `grad_norm`: the largest per-sample norm of the state field at the returned states.
    - `converged`: with a `tol`, whether `grad_norm <= tol`; without one, whether
      `relative_grad_norm <= 1e-3` (`RELATIVE_TOL`: every sample's field fell to a thousandth
      of its start); never True for a diverged run.
    - `evaluations`: how many times the state field (a forward and backward pass) was
      evaluated, the final evaluation included (`ConjugateGradient` counts each
      Hessian-vector product as one).
    - `initial_energy`: the energy the solver descends, at its start.
    - `energy_rose`: True if that energy ended above its start (by more than a relative
      1e-5): the steps are too large for the landscape. Such a run can stay finite, so
      `diverged` does not catch it (measured: heavy-ball momentum 0.9 with state step 0.9 on a
      trained 128-block residual network left the energy 600-1000 times its start).
    - `relative_grad_norm`: the equilibrium certificate, comparable across models:
      $\\max_n \\lVert g_n(x_\text{end}) \rVert / \\lVert g_n(x_\text{start}) \rVert$ over
      the samples $n$, $g = \\partial F / \\partial x$ (1 at step 0; a sample whose start field
      is exactly 0 is at equilibrium and counts 0). For smooth networks a small value means
      the states are near a stationary point; for non-smooth ones (ReLU, max pooling) the field
      need not vanish at the minimum: use [pcjax.equilibrium_gap][].
    - `initial_grad_norm`: the largest per-sample field norm at the start.

    Solvers fill every field but `energies`; a field a solver does not report is None.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> solver = pc.GradientDescent(5, record_energy=True)
    >>> _, info = pc.infer(fn, params, {"h": start["h"]}, x, {"y": y}, solver=solver)
    >>> info.energies.shape, bool(jnp.all(jnp.diff(info.energies) < 0))
    ((5,), True)
    >>> int(info.evaluations), float(info.relative_grad_norm) < 1.0
    (6, True)

    ```
    """

    energy: Array
    diverged: Array
    steps: Array
    energies: Array | None = None
    grad_norm: Array | None = None
    converged: Array | None = None
    evaluations: Array | None = None
    initial_energy: Array | None = None
    energy_rose: Array | None = None
    relative_grad_norm: Array | None = None
    initial_grad_norm: Array | None = None


class SampleAxes(dict):
    """Each node's sample axis (an int), or None for a node without one; `size` is the number
    of samples. Built by `sample_axes` from what the node values are."""

    size: int = 1


def sample_axes(nodes: Mapping[str, Array], depths: Mapping[str, int] | None = None) -> SampleAxes:
    r"""Where the samples are: each node's sample axis and the number of samples.

    A node value is `(stacked scan axes..., [samples,] features...)`: `depths[name]` leading
    axes for a node inside `lax.scan`s (none by default), then the batch axis, then the
    sample's own axes. Whether the batch axis is there is decided from every node together
    (free and observed): the nodes with at least two axes after their scan axes must agree on
    the length $B$ of the first one, the batch; a one-axis node of length $B$ is a batch of
    scalar features, and a node without that axis is shared by the samples. When no node has
    two axes (e.g. a per-example MLP under `jax.vmap`: `(hidden,)` and `(outputs,)` states),
    or those that do disagree (a per-example CNN's `(height, width, channels)` maps of several
    sizes), the nodes hold ONE sample and no node has a sample axis.
    """
    depths = depths or {}
    leading, wide = {}, set()
    for name, value in nodes.items():
        depth, ndim = depths.get(name, 0), jnp.ndim(value)
        if ndim > depth:
            leading[name] = jnp.shape(value)[depth]
            if ndim >= depth + 2:
                wide.add(leading[name])
    layout = SampleAxes()
    size = wide.pop() if len(wide) == 1 else None
    if size is not None:
        layout.size = size
    for name in nodes:
        layout[name] = (
            depths.get(name, 0) if size is not None and leading.get(name) == size else None
        )
    return layout


def resolve_sample_axes(states: Mapping[str, Array], axes: Mapping[str, Any] | None) -> SampleAxes:
    """`axes` if it is a `SampleAxes` already, else the layout of `states` with `axes` as the
    scan depths."""
    if isinstance(axes, SampleAxes):
        return axes
    return sample_axes(states, axes)


def check_solver_fits(
    solver: AbstractSolver,
    model: Any,
    where: str,
    nodes: Mapping[str, Array],
    layout: Mapping[str, Any] | None,
) -> None:
    """Raise if `solver` cannot run on `model`'s field over these node values (free and
    observed): a solver that needs a gradient field gets one, and one that works per sample
    of a batch finds the batch axis in every node."""
    if solver.needs_gradient_field and not getattr(model, "field_is_gradient", True):
        raise ValueError(
            f"{where}: {type(solver).__name__} needs the state field to be the gradient of an "
            f"energy (a symmetric Hessian), and the field of {type(model).__name__} is not; use "
            "pcjax.GradientDescent or pcjax.ODE with it."
        )
    if not getattr(solver, "per_sample", False):
        return
    layout = resolve_sample_axes(nodes, layout)
    if layout.size > 1 and any(layout.get(name) is None for name in nodes):
        shapes = {name: tuple(jnp.shape(v)) for name, v in nodes.items()}
        raise ValueError(
            f"{where}: {type(solver).__name__}(per_sample=True) runs one solve per sample, and "
            f"not every node has the batch axis of {layout.size} samples: shapes {shapes}. "
            "Every node needs the batch axis; or use per_sample=False."
        )


def rose(initial: Array, final: Array) -> Array:
    """Whether the energy ended above its start by more than a relative 1e-5 (rounding)."""
    return final - initial > 1e-5 * jnp.abs(initial)


def per_sample_norms(grads: Nodes, sample_axes: Mapping[str, Any] | None = None) -> Array:
    r"""Each sample's norm of the state gradient, $\|\partial F / \partial x_{n}\|$ (shape
    `(samples,)`; one entry when the nodes hold one sample). Nodes without a sample axis count
    as shared by every sample."""
    axes = resolve_sample_axes(grads, sample_axes)
    squares, shared = jnp.zeros((axes.size,), jnp.float32), 0.0
    for name, g in grads.items():
        wide = jnp.promote_types(g.dtype, jnp.float32)
        axis = axes.get(name)
        if axis is None:
            shared = shared + jnp.sum(jnp.square(g.astype(wide)))
        else:
            per_sample = jnp.moveaxis(g.astype(wide), axis, 0).reshape(g.shape[axis], -1)
            squares = squares + jnp.sum(jnp.square(per_sample), axis=1)
    return jnp.sqrt(squares + shared)


def per_sample_grad_norm(grads: Nodes, sample_axes: Mapping[str, Any] | None = None) -> Array:
    r"""The largest per-sample norm of the state gradient, $\max_n \|\partial F / \partial
    x_{n}\|$ over the samples $n$ (see `sample_axes` for where they are: a per-example state
    under `jax.vmap` is one sample, whose norm is its Euclidean norm).

    Each sample's states see only their own energy, so this stopping criterion does not depend
    on which other samples share the batch.
    """
    return jnp.max(per_sample_norms(grads, sample_axes))


def check_steps(steps: Any, name: str = "steps") -> int:
    """`steps` as a Python int (integer scalars of any kind accepted)."""
    try:
        if isinstance(steps, (bool, np.bool_)) or np.ndim(steps) != 0:
            raise TypeError
        count = operator.index(steps)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        count = None
    if count is None or count < 1:
        raise ValueError(
            f"pcjax: `{name}` must be a positive int (a concrete integer scalar), got {steps!r}."
        )
    return count


def real(value: Any) -> float:
    """`value` as a float if it is a concrete real scalar (not a bool or str), else NaN."""
    if isinstance(value, (bool, str, bytes)):
        return float("nan")
    try:
        return float(value)
    except Exception:  # non-numbers, arrays of several values, traced values
        return float("nan")


def check_tol(tol: Any) -> Any:
    """None or a non-negative number (traced values pass: validated only when concrete)."""
    if tol is None or isinstance(tol, jax.core.Tracer):
        return tol
    if not real(tol) >= 0:  # NaN and non-numbers compare False
        raise ValueError(f"pcjax: `tol` must be None or a non-negative float, got {tol!r}.")
    return tol


def check_positive(value: Any, name: str, where: str, *, allow_none: bool = False) -> Any:
    """`value` if it is a positive finite number (or None when allowed; traced values pass)."""
    if (allow_none and value is None) or isinstance(value, jax.core.Tracer):
        return value
    if not 0 < real(value) < math.inf:
        none = "None or " if allow_none else ""
        raise ValueError(
            f"{where}: `{name}` must be {none}a positive finite number, got {value!r}."
        )
    return value


def check_key(key: Any, where: str) -> Any:
    """`key` if it is None or a `jax.random` key: a typed key (`jax.random.key`) or a legacy
    `uint32[2]` key (`jax.random.PRNGKey`); a clear error naming `key` otherwise."""
    if key is None:
        return None
    dtype, shape = getattr(key, "dtype", None), jnp.shape(key) if hasattr(key, "shape") else None
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return key
    if dtype == jnp.uint32 and shape == (2,):
        return key
    described = f"{type(key).__name__}" if dtype is None else f"an array {dtype}{list(shape)}"
    raise TypeError(
        f"{where}: `key` must be a jax.random key (jax.random.key(0) or "
        f"jax.random.PRNGKey(0)), one per call, got {described}: {key!r}."
    )


def check_descends(optimizer: optax.GradientTransformation, where: str) -> None:
    """Refuse a state optimizer whose first update ascends the gradient (a negative learning
    rate): probed once on a constant gradient, at construction. Optimizers whose step size is
    traced (built inside `jit`) or that need other arguments are not probed."""
    gradient = {"x": jnp.full((2,), 1e3, jnp.float32)}
    try:
        with jax.ensure_compile_time_eval():
            probe = optax.with_extra_args_support(optimizer)
            state = probe.init({"x": jnp.zeros((2,), jnp.float32)})
            updates, _ = probe.update(
                gradient, state, {"x": jnp.zeros((2,), jnp.float32)}, key=jax.random.PRNGKey(0)
            )
            slope = float(jnp.vdot(updates["x"], gradient["x"]))
    except Exception:  # a traced step size, or an optimizer that needs more than a gradient
        return
    if slope > 0:
        raise ValueError(
            f"{where}: the state optimizer moves the states UP the energy gradient (its first "
            f"update on a gradient of ones has inner product {slope:.3g} > 0 with it): a "
            "negative learning rate? optax optimizers take the step size as a positive number "
            "(optax.sgd(0.1)) and descend."
        )


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


#: `converged` without a `tol`: the field's per-sample norm fell to this fraction of its start.
RELATIVE_TOL = 1e-3


class Start(NamedTuple):
    """What a solver's `run` reports about its starting point: the energy there and each
    sample's field norm (`per_sample_norms`)."""

    energy: Array
    norms: Array


def relative_norms(end: Array, start: Array) -> Array:
    r"""$\max_n \lVert g_n(\text{end}) \rVert / \lVert g_n(\text{start}) \rVert$: how far
    the states are from equilibrium relative to where they began. A sample whose start field is
    exactly 0 started at equilibrium: its ratio is 0 if its end field is 0 too, inf otherwise."""
    ratio = jnp.where(
        start > 0, end / jnp.where(start > 0, start, 1), jnp.where(end > 0, jnp.inf, 0)
    )
    return jnp.max(ratio)


class AbstractSolver(eqx.Module):
    """An inference solver. `run` integrates a state field; `report` turns the final field
    evaluation into an `InferInfo`, raising when `throw` is set."""

    tol: eqx.AbstractVar[Any]
    throw: eqx.AbstractVar[bool]
    # Whether `run` relies on the field being the gradient of the energy (a symmetric Jacobian).
    needs_gradient_field: ClassVar[bool] = False

    def run(
        self,
        field: StateField,
        states: Nodes,
        *,
        key: Array | None,
        sample_axes: Mapping[str, int] | None,
    ) -> tuple[Nodes, Array, Array, Array | None, Array]:
        """Returns `(states, steps, evaluations, energies or None, initial energy)`;
        `evaluations` counts the field evaluations made (not the final one the caller
        makes)."""
        raise NotImplementedError

    def report(
        self,
        states: Nodes,
        value: Array,
        grads: Nodes,
        steps: Array,
        evaluations: Array,
        energies: Array | None,
        initial_energy: Array,
        sample_axes: Mapping[str, int] | None,
    ) -> tuple[Nodes, InferInfo]:
        """The `InferInfo` of `states`, given the field `(value, grads)` there; `initial_energy`
        is a `Start` (or the energy alone, without the relative norm)."""
        norms = per_sample_norms(grads, sample_axes)
        norm = jnp.max(norms)
        relative = start_norm = None
        if isinstance(initial_energy, Start):
            initial_energy, start_norms = initial_energy
            relative, start_norm = relative_norms(norms, start_norms), jnp.max(start_norms)
        diverged = ~jnp.isfinite(value) | ~jnp.isfinite(norm)
        if self.tol is not None:
            converged = (norm <= self.tol) & ~diverged
        elif relative is not None:
            converged = (relative <= RELATIVE_TOL) & ~diverged
        else:
            converged = jnp.asarray(False)
        if self.throw:
            states = eqx.error_if(states, diverged, DIVERGED_MESSAGE)
            if self.tol is not None:
                states = eqx.error_if(states, ~converged, NOT_CONVERGED_MESSAGE)
        info = InferInfo(
            value,
            diverged,
            steps,
            energies,
            norm,
            converged,
            evaluations + 1,
            initial_energy,
            rose(initial_energy, value),
            relative,
            start_norm,
        )
        return states, info

    def uses_key(self) -> bool:
        return False


class GradientDescent(AbstractSolver):
    r"""Gradient descent on the states with an optax optimizer.

    $x_{t+1} = x_t + \text{optimizer}(\partial F / \partial x_t)$, inside `lax.scan` (exactly
    `steps` updates), or with `tol` a bounded while loop of at most `steps` updates: a sample
    whose state-gradient norm is at most `tol` is frozen (its updates masked along its sample
    axis), so each sample stops at the same step, with the same states, in any batch, and the
    loop ends when every sample has stopped. The loop is equinox's checkpointed while loop:
    `jax.grad` through a `tol` run works (the stopping step is piecewise constant, so the
    gradient is that of the unrolled steps taken); forward mode (`jax.jvp`) does not (use
    `tol=None`). On a 64-128-128-10 tanh MLP (batch 32, 116 of at most 500 steps, CPU) it
    took 7-11 ms against 15-21 ms for `lax.while_loop` and 73-103 ms for a fixed scan of the
    500 steps (what a masked `lax.scan` costs): the early exit is kept.

    Optimizers whose first update ascends the gradient (a negative learning rate) are refused
    at construction (probed on a constant gradient when the step size is concrete).

    **Arguments:**

    - `steps`: number of updates (the maximum with `tol`); a positive int.
    - `optimizer`: an optax transform for the states; default `optax.sgd(step_size)`.
      `pcjax.langevin(step_size)` makes Monte Carlo PC: the caller must then pass a `key`.
    - `step_size`: the SGD step size when `optimizer` is None (a number or a traced value).
    - `tol`: the per-sample gradient-norm tolerance, or None for a fixed number of steps.
    - `record_energy`: keep the energy before each update (`InferInfo.energies`).
    - `unroll`: unrolling of the `lax.scan` (ignored with `tol`); None: fully unrolled up to 16
      steps (convolutions in rolled loops are slow on CPU), rolled beyond.
    - `throw`: raise at run time if the energy diverges or `tol` is not reached (see "What
      `throw=True` raises" at the top of this page for what `jax.jit` and `eqx.filter_jit` show).

    **Raises:** `ValueError` for `steps` not a positive int, a step size that is not a
    positive finite number, or an optimizer whose first update ascends the gradient.

    **Example** ([setup][examples-setup]): stop each sample at a field norm of 0.01.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> solver = pc.GradientDescent(200, step_size=0.2, tol=1e-2)
    >>> states, info = pc.infer(fn, params, {"h": start["h"]}, x, {"y": y}, solver=solver)
    >>> bool(info.converged), bool(info.grad_norm <= 1e-2), int(info.steps) < 200
    (True, True, True)
    >>> momentum = pc.GradientDescent(20, optax.sgd(0.1, momentum=0.5))  # any optax optimizer

    ```
    """

    steps: int = eqx.field(static=True)
    optimizer: optax.GradientTransformation
    tol: Any
    record_energy: bool = eqx.field(static=True)
    unroll: int | bool | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        steps: int,
        optimizer: optax.GradientTransformation | None = None,
        *,
        step_size: Any = 0.1,
        tol: Any = None,
        record_energy: bool = False,
        unroll: int | bool | None = None,
        throw: bool = False,
    ):
        self.steps = check_steps(steps)
        if optimizer is None:
            if not isinstance(step_size, jax.core.Tracer) and not 0 < real(step_size) < math.inf:
                raise ValueError(
                    f"pcjax: `step_size` must be a positive finite number, got {step_size!r}."
                )
            optimizer = optax.sgd(step_size)
        elif not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "pcjax.GradientDescent: `optimizer` must be an optax GradientTransformation "
                f"(e.g. optax.sgd(0.1)), got {type(optimizer).__name__}."
            )
        else:
            check_descends(optimizer, "pcjax.GradientDescent")
        self.optimizer = optimizer
        self.tol = check_tol(tol)
        self.record_energy = bool(record_energy)
        scan_unroll(self.steps, unroll)  # validates it
        self.unroll = unroll
        self.throw = bool(throw)

    def uses_key(self) -> bool:
        return True  # a stochastic optimizer (pcjax.langevin) takes one; others ignore it

    def run(self, field, states, *, key, sample_axes):
        key = check_key(key, "pcjax.GradientDescent")
        optimizer = self.optimizer
        if key is not None:
            optimizer = optax.with_extra_args_support(optimizer)
        opt_state = optimizer.init(states)

        def update(i, states, opt_state, grads):
            extra = {} if key is None else {"key": jax.random.fold_in(key, i)}
            updates, opt_state = optimizer.update(grads, opt_state, states, **extra)
            return optax.apply_updates(states, updates), opt_state

        steps, record = self.steps, self.record_energy
        if self.tol is None:
            layout = resolve_sample_axes(states, sample_axes)

            def body(carry, i):
                states, opt_state = carry
                value, grads = field(states)
                # The per-sample norms are an output, not a carry: a carry initialised here
                # would not carry the axes a shard_map varies over, and its type would change.
                return update(i, states, opt_state, grads), (value, per_sample_norms(grads, layout))

            # The energy and per-sample field norms before each update: the first are the start's.
            (states, _), (energies, norms) = jax.lax.scan(
                body, (states, opt_state), jnp.arange(steps), unroll=scan_unroll(steps, self.unroll)
            )
            count = jnp.asarray(steps, jnp.int32)
            start = Start(energies[0], norms[0])
            return states, count, count, energies if record else None, start

        value, grads = field(states)
        energies = jnp.full((steps,), jnp.nan, value.dtype) if record else None
        layout = resolve_sample_axes(states, sample_axes)
        initial = Start(value, per_sample_norms(grads, layout))
        active = initial.norms > self.tol
        init = (jnp.asarray(0, jnp.int32), states, opt_state, value, grads, active, energies)

        def cond(carry):
            i, _, _, _, _, active, _ = carry
            return (i < steps) & jnp.any(active)

        def while_body(carry):
            i, states, opt_state, value, grads, active, energies = carry
            if record:
                energies = energies.at[i].set(value)
            moved, opt_state = update(i, states, opt_state, grads)
            # A sample whose norm reached `tol` is frozen: its states keep their values, and
            # since its field depends on its own states only, it stays frozen (its result is
            # the one it has alone, whatever the batch; the optimizer's per-element moments of
            # a frozen sample are never used again).
            states = {
                name: jnp.where(_sample_mask(active, layout.get(name), x.ndim), moved[name], x)
                for name, x in states.items()
            }
            value, grads = field(states)
            active = active & (per_sample_norms(grads, layout) > self.tol)
            return i + 1, states, opt_state, value, grads, active, energies

        # A bounded loop: it stops once every sample is frozen, and (unlike lax.while_loop)
        # reverse-mode differentiation through it works (jax.grad of a `tol` run).
        i, states, _, _, _, _, energies = eqxi.while_loop(
            cond, while_body, init, max_steps=steps, kind=_LOOP_KIND
        )
        return states, i, i + 1, energies, initial


def _sample_mask(active: Array, axis: int | None, ndim: int) -> Array:
    """`active` (one flag per sample) broadcast against a state with its sample axis at `axis`;
    a state without one (shared by the samples, or the only sample) moves while any does."""
    if axis is None:
        return jnp.any(active)
    shape = [1] * ndim
    shape[axis] = active.shape[0]
    return active.reshape(shape)


def _evaluations_per_step(solver: Any) -> tuple[int, int]:
    """(field evaluations per attempted step, evaluations at the start) of an explicit
    Runge-Kutta solver: its stages, less one when the last stage is reused (FSAL)."""
    tableau = getattr(solver, "tableau", None)
    if tableau is None:
        import diffrax

        if isinstance(solver, diffrax.Euler):
            return 1, 0
        raise ValueError(
            f"pcjax.ODE: cannot count the field evaluations of {type(solver).__name__}; use an "
            "explicit Runge-Kutta solver (diffrax.Euler, Heun, Midpoint, Bosh3, Tsit5, Dopri5)."
        )
    if tableau.fsal:
        return tableau.num_stages - 1, 1
    return tableau.num_stages, 0


class ODE(AbstractSolver):
    r"""Inference as the gradient flow $\dot x = -\partial F / \partial x$, integrated by diffrax.

    Integrates from $t = 0$ with an explicit solver and adaptive step sizes until the
    steady-state event $\max_n \lVert \partial F / \partial x_n \rVert \le$ `tol` (every
    sample at equilibrium) or $t_1$ or `max_steps`. At a fixed point of the flow the states
    are where gradient descent converges too, so any step rule reaches the same equilibrium;
    the adaptive controller takes large steps where the flow is slow.

    **Main arguments:**

    - `solver`: an explicit diffrax solver; default None (`diffrax.Heun()`, two evaluations
      a step).
    - `tol`: the steady-state tolerance on the per-sample gradient norm; default 1e-3; None
      integrates to `t1` (which must then be finite).
    - `dtmax`: the largest step of the default `diffrax.PIDController`; default 0.5 (see
      *Stiffness* below).

    **Other arguments** (keyword-only):

    - `t1`: the end time (default infinity: stop at the event).
    - `dt0`: the first step size; default 0.1.
    - `rtol`, `atol`: the tolerances of the default `diffrax.PIDController`; default 1e-3
      and 1e-4.
    - `stepsize_controller`: replaces the default controller (e.g.
      `diffrax.ConstantStepSize()`, which makes `diffrax.Euler` gradient descent with step
      `dt0`); default None.
    - `max_steps`: the most solver steps; default 4096.
    - `throw`: raise at run time if the energy diverges or `tol` is not reached (read it under
      `eqx.filter_jit`: see "What `throw=True` raises" at the top of this page).

    **Stiffness.** An explicit solver is stable only for steps below $c / \lambda_{\max}$,
    $\lambda_{\max}$ the largest eigenvalue of the energy's Hessian in the states ($c = 2$
    for Heun, about 3.5 for Tsit5). Error control alone does not keep it there near
    equilibrium: the stiff components are then tiny, the controller grows the step to the
    stability edge, and they stop decaying (measured on the demo MLP: Tsit5 without `dtmax`
    hovered at $\Delta t \approx 0.9$ for 4096 steps with the gradient norm stuck near 0.2).
    `dtmax` bounds the step; the default 0.5 suits Hessians with $\lambda_{\max} < 4$ (unit
    precisions, weights of norm below about 1.7). Lower it for larger weights or precisions;
    an unconverged run reports `converged=False` (or raises with `throw=True`).

    Every step also evaluates the field once for the event; `InferInfo.evaluations` counts
    every evaluation (stages of accepted and rejected steps, event checks, the final report).

    **Raises:** `TypeError` for a `solver` or `stepsize_controller` that is not diffrax's;
    `ValueError` for a `tol` of None with an infinite `t1`, an implicit solver, or a `t1`,
    `dt0` or tolerance that is not positive.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> solver = pc.ODE(tol=1e-3)  # Heun with adaptive steps, up to the steady state
    >>> states, info = pc.infer(fn, params, {"h": start["h"]}, x, {"y": y}, solver=solver)
    >>> bool(info.converged), bool(info.grad_norm <= 1e-3)
    (True, True)

    ```
    """

    solver: Any
    tol: Any
    t1: float
    dt0: float
    stepsize_controller: Any
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        solver: Any = None,
        *,
        tol: Any = 1e-3,
        t1: float = math.inf,
        dt0: float = 0.1,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        dtmax: float | None = 0.5,
        stepsize_controller: Any = None,
        max_steps: int = 4096,
        throw: bool = False,
    ):
        try:
            import diffrax
        except ImportError as error:  # pragma: no cover - diffrax is a dependency
            raise ImportError("pcjax.ODE needs diffrax: pip install diffrax") from error
        self.solver = diffrax.Heun() if solver is None else solver
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(
                f"pcjax.ODE: `solver` must be a diffrax solver, got {type(solver).__name__}."
            )
        _evaluations_per_step(self.solver)  # an explicit solver whose cost we can count
        self.tol = check_tol(tol)
        if not real(t1) > 0:
            raise ValueError(f"pcjax.ODE: `t1` must be positive, got {t1!r}.")
        if tol is None and real(t1) == math.inf:
            raise ValueError("pcjax.ODE: with tol=None the integration needs a finite `t1`.")
        if not 0 < real(dt0) < math.inf:
            raise ValueError(f"pcjax.ODE: `dt0` must be a positive number, got {dt0!r}.")
        self.t1, self.dt0 = float(t1), float(dt0)
        if stepsize_controller is None:
            check_positive(rtol, "rtol", "pcjax.ODE")
            check_positive(atol, "atol", "pcjax.ODE")
            check_positive(dtmax, "dtmax", "pcjax.ODE", allow_none=True)
            stepsize_controller = diffrax.PIDController(rtol=rtol, atol=atol, dtmax=dtmax)
        elif not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
            raise TypeError(
                "pcjax.ODE: `stepsize_controller` must be a diffrax step-size controller, got "
                f"{type(stepsize_controller).__name__}."
            )
        self.stepsize_controller = stepsize_controller
        self.max_steps = check_steps(max_steps, "max_steps")
        self.throw = bool(throw)

    def run(self, field, states, *, key, sample_axes):
        import diffrax

        del key  # the flow is deterministic

        def flow(t, y, args):
            return jax.tree.map(jnp.negative, field(y)[1])

        value, grads = field(states)  # one evaluation, counted below
        initial = Start(value, per_sample_norms(grads, sample_axes))
        event = None
        if self.tol is not None:

            def at_equilibrium(t, y, args, **kwargs):
                return per_sample_grad_norm(field(y)[1], sample_axes) <= self.tol

            event = diffrax.Event(at_equilibrium)
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(flow),
            self.solver,
            t0=0.0,
            t1=self.t1,
            dt0=self.dt0,
            y0=states,
            stepsize_controller=self.stepsize_controller,
            event=event,
            max_steps=self.max_steps,
            saveat=diffrax.SaveAt(t1=True),
            throw=False,
        )
        states = jax.tree.map(lambda y: y[-1], solution.ys)
        accepted = solution.stats["num_accepted_steps"]
        attempted = solution.stats["num_steps"]
        per_step, first = _evaluations_per_step(self.solver)
        checks = 0 if event is None else attempted + 1  # tested after every step and at t0
        evaluations = attempted * per_step + first + checks + 1
        return states, accepted.astype(jnp.int32), evaluations.astype(jnp.int32), None, initial


def _per_sample_axes(states: Nodes, sample_axes: Mapping[str, Any] | None) -> dict | None:
    """Each state's sample axis for one CG per sample (None: the states hold one sample, one CG);
    an error if a state has none in a batch (a state shared by the samples)."""
    layout = resolve_sample_axes(states, sample_axes)
    if layout.size == 1:
        return None
    for name, leaf in states.items():
        if layout.get(name) is None:
            raise ValueError(
                f"pcjax.ConjugateGradient(per_sample=True): state {name!r} of shape "
                f"{jnp.shape(leaf)} has no axis of the batch's {layout.size} samples; use "
                "per_sample=False for states shared by the batch."
            )
    return {name: layout[name] for name in states}


class ConjugateGradient(AbstractSolver):
    r"""Newton-CG on the states: conjugate gradients on the energy's local quadratic model.

    At the states $x_k$ it solves the Newton system $H(x_k)\, \delta = -g(x_k)$, $g =
    \partial F / \partial x$ and $H$ its Jacobian (the energy's Hessian in the states), by
    `steps` conjugate-gradient iterations from $\delta = 0$, and moves to $x_{k+1} = x_k +
    \delta$; `newton_steps` such rounds. Each CG iteration costs one Hessian-vector product
    ($H$ applied by `jax.linearize` of the field: forward-over-reverse differentiation, no
    Hessian is formed; on the demo's MLP 50 iterations took 1.2 times as long as 50
    gradient-descent steps, 200 iterations 1.05 times).

    By default one CG runs over all the states together: valid for any energy, and under
    `jax.vmap` over samples it becomes one CG per sample. `per_sample=True` runs one CG per
    sample of a batch, with its own step lengths $\alpha_n = r_n^\top r_n / p_n^\top H p_n$,
    so that a sample's states do not depend on which other samples share the batch and each
    sample's Krylov space holds its own problem only (fewer iterations for the same
    accuracy). It requires what the batch axis means everywhere in pcjax: every node has the
    batch axis (the leading one, after any stacked scan axes) and the energy is a sum of
    per-sample terms, so that $H$ is block diagonal. pcjax checks that the nodes agree on
    the number of samples; it cannot check that an axis is really the batch (states without
    one, e.g. under `jax.vmap` with unbatched samples, would be split by their features into
    wrong "samples"; the default has no such requirement).

    **Why.** A gradient step moves information one node per field evaluation, and its
    error on the slowest mode shrinks by $1 - \eta \lambda_{\min}$ a step (heavy-ball
    momentum: $1 - 2/\sqrt{\kappa}$ with a step and momentum tuned to the spectrum). On a
    quadratic, CG's error after $k$ iterations is at most that of *any* polynomial method of
    degree $k$ (heavy-ball with the best fixed constants included), without knowing the
    spectrum: in exact arithmetic it is exact after as many iterations as $H$ has distinct
    eigenvalues excited by $g$. For a chain of $L$ nodes with identity Jacobians that is $L$
    iterations, where gradient descent needs $O(L^2)$ (the condition number of a chain grows
    like $L^2$). In float32 on deep networks the iterations lose conjugacy: on a 128-block
    residual network 200 iterations did not beat 320 tuned heavy-ball steps (measured; see
    the solvers how-to). Near equilibrium with a weak output error (small output precision,
    the regime in which PC's learning signal approaches backprop's) the energy is nearly
    quadratic and one Newton round suffices.

    **Validity.** CG needs a symmetric positive definite $H$: the field must be the
    gradient of an energy (standard PC or [pcjax.error_parameterised][]; not
    [pcjax.fixed_predictions][] or [pcjax.preconditioned][], which [pcjax.infer][] and the
    training rules reject). Where a CG meets non-positive curvature ($p^\top H p \le 0$:
    the PC energy's Hessian is indefinite when errors are large) it stops there and keeps
    the step made so far; if that happens at its first iteration it makes no step, and
    further rounds start from the same point (relax first with `GradientDescent` there).
    There is no line search: a round ends at its (truncated) Newton step whatever the
    energy does there, and `InferInfo.energy_rose` reports a run that ended above its start.

    **Arguments:**

    - `steps`: CG iterations per Newton round; a positive int.
    - `newton_steps`: Newton rounds (relinearisations); a positive int, default 1.
    - `per_sample`: one CG per sample (see above) instead of one over everything.
    - `tol`: a CG stops updating once its residual norm ($\|r_n\|$ per sample, or the
      whole residual's) is at most `tol`; the iterations still run (a fixed-length
      `lax.scan`), so it saves no time. `InferInfo.converged` checks the true field at the
      returned states against `tol`.
    - `unroll`: unrolling of the CG `lax.scan`.
    - `throw`: raise at run time if the energy diverges or `tol` is not reached (read it under
      `eqx.filter_jit`: see "What `throw=True` raises" at the top of this page).

    `InferInfo.steps` is the scheduled CG iterations, `steps * newton_steps`;
    `evaluations` counts one per linearisation and one per Hessian-vector product, plus
    the final report.

    **Raises:** `ValueError` for `steps` or `newton_steps` not a positive int; with
    `per_sample=True`, in [pcjax.infer][], for a state without the batch's sample axis.

    **Example** ([setup][examples-setup]): a few Newton-CG rounds relax the states far
    below the tolerance that gradient descent reaches in as many field evaluations.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> solver = pc.ConjugateGradient(4, newton_steps=3)
    >>> states, info = pc.infer(fn, params, {"h": start["h"]}, x, {"y": y}, solver=solver)
    >>> bool(info.relative_grad_norm < 1e-3), int(info.steps)
    (True, 12)

    ```
    """

    needs_gradient_field: ClassVar[bool] = True
    steps: int = eqx.field(static=True)
    newton_steps: int = eqx.field(static=True)
    per_sample: bool = eqx.field(static=True)
    tol: Any
    unroll: int | bool | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        steps: int,
        *,
        newton_steps: int = 1,
        per_sample: bool = False,
        tol: Any = None,
        unroll: int | bool | None = None,
        throw: bool = False,
    ):
        self.steps = check_steps(steps)
        self.newton_steps = check_steps(newton_steps, "newton_steps")
        self.per_sample = bool(per_sample)
        self.tol = check_tol(tol)
        scan_unroll(self.steps, unroll)  # validates it
        self.unroll = unroll
        self.throw = bool(throw)

    def run(self, field, states, *, key, sample_axes):
        del key  # deterministic
        axes = _per_sample_axes(states, sample_axes) if self.per_sample else None

        layout = resolve_sample_axes(states, sample_axes)

        def newton_round(states, _):
            return self._newton_round(field, states, axes, layout)

        # Each round reports the energy at its start: the first is the run's initial energy.
        states, starts = jax.lax.scan(newton_round, states, None, length=self.newton_steps)
        count = jnp.asarray(self.steps * self.newton_steps, jnp.int32)
        evaluations = jnp.asarray((self.steps + 1) * self.newton_steps, jnp.int32)
        return states, count, evaluations, None, Start(starts[0][0], starts[1][0])

    def _newton_round(
        self,
        field: StateField,
        states: Nodes,
        axes: Mapping[str, int] | None,
        layout: SampleAxes,
    ) -> tuple[Nodes, tuple[Array, Array]]:
        """(`states` + the CG approximation of the Newton step, (the energy and the per-sample
        field norms at `states`))."""
        (value, grads), tangent = jax.linearize(field, states)
        names = list(states)
        # Without `tol` a CG runs every iteration (a negative bound never stops it; NaN
        # compares False, so it stops then too).
        bound = -1.0 if self.tol is None else jnp.square(self.tol)

        def matvec(direction: list[Array]) -> list[Array]:
            hp = tangent(dict(zip(names, direction)))[1]
            return [hp[name] for name in names]

        rhs = [-grads[name] for name in names]  # r = -g - H delta, at delta = 0
        delta, _, _ = conjugate_gradients(
            matvec,
            rhs,
            self.steps,
            bound,
            axes=None if axes is None else [axes[name] for name in names],
            unroll=scan_unroll(self.steps, self.unroll),
        )
        moved = {name: states[name] + d for name, d in zip(names, delta)}
        return moved, (value, per_sample_norms(grads, layout))
