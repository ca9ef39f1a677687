r"""Energy transformations: what inference descends and what learning differentiates.

A tagged forward function `fn(params, x)` defines the energy $F(x; \theta)$ ([pcjax.energy][]).
Everywhere pcjax takes `fn` it also takes a transformation of it:

- `pcjax.fixed_predictions(fn)`: the fixed-prediction assumption (FPA). The predictions and their
  Jacobians are frozen at the feedforward pass $\hat x$ of `fn(params, x)`: inference follows
  $P_i e_i - \sum_c J_c(\hat x)^\top P_c e_c$ with $e = x - \mu(\hat x)$, and learning takes
  $\partial F / \partial \theta = -\sum_i (\partial \mu_i(\hat x) / \partial \theta)^\top P_i
  e_i$. At equilibrium its precision-weighted errors $P_i e_i$ are exactly the backprop gradients
  of the output energy, on any graph. The field is not the gradient of a scalar function.
- `pcjax.error_parameterised(fn)`: error-parameterised PC (ePC; Goemaere et al. 2025). Inference
  runs over the prediction errors $\varepsilon_i$ instead of the states: the states are the
  forward pass in which every free node adds its error to its prediction,
  $x_i(\varepsilon) = \mu_i(x_{\text{parents}}(\varepsilon)) + \varepsilon_i$, and the field is
  $\partial F(x(\varepsilon)) / \partial \varepsilon$, which carries an output error to every
  layer in one step (standard PC moves it one layer per step). The map $\varepsilon \mapsto x$
  is triangular with unit diagonal, so the fixed points are those of the standard energy;
  learning takes $\partial F / \partial \theta$ at the relaxed states, as standard PC does.
- `pcjax.preconditioned(model)`: "natural" inference, each node's state gradient multiplied by
  the inverse of its own precision, $P_i^{-1} \partial F / \partial x_i$, so that its own error
  relaxes at a rate independent of $P_i$. It changes the path, not the fixed points, and leaves
  learning unchanged; it composes with either of the above.

A plain function is the standard energy. Each object answers four questions for given
parameters, input, observed nodes and node specs (checked precisions and custom energies):
the variables inference runs over (the free states, or ePC's errors: `to_variables`,
`to_states`), the field `variables -> (energy, field)` inference integrates, the joint gradient
learning takes at the relaxed states, and where the predictions are linearised (the point at
which natural gradients take the Fisher information).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ._energy import (
    CustomEnergy,
    Precision,
    check_partition,
    checked_values,
    current_spec,
    in_graph_nodes,
    merge_nodes,
    node_energy,
    node_residuals,
    total_energy,
)
from ._harvest import traces_once
from ._precision import solve
from ._tagging import (
    Nodes,
    node_energies,
    offset_predictions,
    predicted_with_precisions,
    predictions,
)
from ._tagging import forward_init as feedforward_states

Array = jax.Array
StateField = Callable[[Nodes], tuple[Array, Nodes]]


class LeastSquaresField:
    r"""A state field `variables -> (energy, field)` that also knows the energy as a
    least-squares problem: `residuals(variables)` is a dict of arrays $r$ with
    $F = \tfrac12 \lVert r \rVert^2 + c$, $c$ independent of the variables (the residual of
    node $i$ is $R_i^\top e_i$, $R_i R_i^\top = P_i$). The least-squares solvers
    (`pcjax.GaussNewton`, `pcjax.LevenbergMarquardt`) use it; other solvers call it as a
    plain field. `residuals` raises (naming the node) where a node's energy is not a
    least-squares term."""

    def __init__(self, value_and_grad: StateField, residuals: Callable[[Nodes], Nodes]):
        self.value_and_grad = value_and_grad
        self.residuals = residuals

    def __call__(self, variables: Nodes) -> tuple[Array, Nodes]:
        return self.value_and_grad(variables)


class EnergyModel(eqx.Module):
    """Base class of the energy transformations: the standard energy of `fn`."""

    fn: Callable[..., Any] = eqx.field(static=True)
    # Whether `field` is the gradient of an energy (solvers such as ConjugateGradient rely on it).
    field_is_gradient: ClassVar[bool] = True

    def to_variables(self, params: Any, x: Any, observed: Nodes, states: Nodes) -> Nodes:
        """The inference variables of the free `states` (the states themselves here)."""
        del params, x, observed
        return states

    def to_states(self, params: Any, x: Any, observed: Nodes, variables: Nodes) -> Nodes:
        """The free states of the inference `variables` (the inverse of `to_variables`)."""
        del params, x, observed
        return variables

    def field(self, params: Any, x: Any, observed: Nodes, spec: Mapping[str, Any]) -> StateField:
        """`variables -> (energy, field)` at fixed parameters: the standard energy's
        `states -> (energy, dF/dstates)` (a `LeastSquaresField`: it also gives the residuals)."""
        return LeastSquaresField(
            jax.value_and_grad(lambda states: self.energy(params, {**states, **observed}, x, spec)),
            lambda states: self.residuals(params, {**states, **observed}, x, spec),
        )

    def residuals(self, params: Any, values: Nodes, x: Any, spec: Mapping[str, Any]) -> Nodes:
        r"""The least-squares residuals of `energy` at the given node values:
        $\tfrac12 \lVert r \rVert^2$ is the energy up to terms that do not depend on the
        values (`pcjax._energy.node_residuals`; it raises for non-Gaussian nodes)."""
        predicted, _ = predicted_with_precisions(self.fn, params, values, x)
        return node_residuals(values, predicted, spec, "pcjax (least squares)")

    def energy(self, params: Any, values: Nodes, x: Any, spec: Mapping[str, Any]) -> Array:
        """The energy at the given node values."""
        return node_energy(self.fn, params, values, x, spec)

    def errors(self, params: Any, values: Nodes, x: Any) -> Nodes:
        r"""The prediction errors $e_i = x_i - \mu_i$ that `energy` weighs, at the given node
        values (free and observed); names and shapes are validated."""
        predicted = predictions(self.fn, params, values, x)
        check_partition(predicted, values)
        return {name: values[name] - mu for name, mu in predicted.items()}

    def gradients(
        self,
        params: Any,
        states: Nodes,
        observed: Nodes,
        x: Any,
        spec: Mapping[str, Any],
        learnable: Precision | None,
    ) -> tuple[Array, Any, Nodes]:
        """`(energy, dF/dparams, field)` at the free `states`, the field in the inference
        variables' coordinates (here `dF/dstates`), in one backward pass; the parameter
        gradient has the structure of `params` with None at leaves that are not floating-point
        arrays.
        `learnable` (the `precision` argument) is re-read from the parameters when it is a
        function of them, so that learned precisions get gradients."""
        diff, static = eqx.partition(params, eqx.is_inexact_array)

        def joint(diff, states):
            params = eqx.combine(diff, static)
            spec_now = current_spec(learnable, params, spec)
            return self.energy(params, {**states, **observed}, x, spec_now)

        value, (param_grads, state_grads) = jax.value_and_grad(joint, (0, 1))(diff, states)
        return value, param_grads, state_grads

    def linearisation_point(self, params: Any, values: Nodes, x: Any) -> Nodes:
        """The node values at which the predictions' parameter Jacobians are taken."""
        del params, x
        return values

    @property
    def base(self) -> EnergyModel:
        return self


class FixedPredictions(EnergyModel):
    """The fixed-prediction assumption: predictions and Jacobians frozen at the feedforward
    pass (see the module docstring). Made by `pcjax.fixed_predictions(fn)`."""

    field_is_gradient: ClassVar[bool] = False

    def field(self, params: Any, x: Any, observed: Nodes, spec: Mapping[str, Any]) -> StateField:
        feedforward = feedforward_states(self.fn, params, x)
        frozen, vjp = jax.vjp(
            lambda v: predicted_with_precisions(self.fn, params, v, x), feedforward
        )

        def value_and_grad(states: Nodes) -> tuple[Array, Nodes]:
            # dF/dx_i = (own term)_i + sum_c J_c(x_hat)^T dF_c/dmu_c, with mu (and in-graph
            # precisions) frozen at x_hat.
            value, (own, cotangent) = jax.value_and_grad(
                lambda v, mu: total_energy(v, mu[0], spec, mu[1]), (0, 1)
            )({**states, **observed}, frozen)
            (back,) = vjp(cotangent)
            return value, {name: own[name] + back[name] for name in states}

        return value_and_grad

    def energy(self, params: Any, values: Nodes, x: Any, spec: Mapping[str, Any]) -> Array:
        mu, in_graph = predicted_with_precisions(
            self.fn, params, feedforward_states(self.fn, params, x), x
        )
        return total_energy(values, mu, spec, in_graph)

    def errors(self, params: Any, values: Nodes, x: Any) -> Nodes:
        r"""$e_i = x_i - \mu_i(\hat x)$, against the predictions of the feedforward pass $\hat x$
        (which are $\hat x$ itself)."""
        node_energies(self.fn, params, values, x)  # validates names and shapes
        mu = feedforward_states(self.fn, params, x)  # mu(x_hat) = x_hat
        check_partition(mu, values)
        return {name: values[name] - m for name, m in mu.items()}

    def gradients(self, params, states, observed, x, spec, learnable):
        diff, static = eqx.partition(params, eqx.is_inexact_array)
        feedforward = feedforward_states(self.fn, params, x)
        # One linearisation at the feedforward pass serves the parameters and the states.
        frozen, vjp = jax.vjp(
            lambda d, v: predicted_with_precisions(self.fn, eqx.combine(d, static), v, x),
            diff,
            feedforward,
        )

        def terms(values, mu, diff):  # learned precisions also enter the energy directly
            spec_now = current_spec(learnable, eqx.combine(diff, static), spec)
            return total_energy(values, mu[0], spec_now, mu[1])

        value, (own, cotangent, direct) = jax.value_and_grad(terms, (0, 1, 2))(
            {**states, **observed}, frozen, diff
        )
        through_mu, back = vjp(cotangent)
        param_grads = jax.tree.map(jnp.add, through_mu, direct)
        return value, param_grads, {name: own[name] + back[name] for name in states}

    def linearisation_point(self, params: Any, values: Nodes, x: Any) -> Nodes:
        feedforward = feedforward_states(self.fn, params, x)
        return {**feedforward, **{k: v for k, v in values.items() if k not in feedforward}}


class Preconditioned(EnergyModel):
    """Inference preconditioned by each node's inverse precision; learning as `model`'s. Made
    by `pcjax.preconditioned(model)`."""

    field_is_gradient: ClassVar[bool] = False
    model: EnergyModel

    def __init__(self, model: EnergyModel):
        self.model = model
        self.fn = model.fn

    def field(self, params, x, observed, spec):
        inner = self.model.field(params, x, observed, spec)

        def value_and_grad(states: Nodes) -> tuple[Array, Nodes]:
            value, grads = inner(states)
            return value, precondition_grads(spec, grads)

        residuals = getattr(inner, "residuals", None)
        if residuals is None:
            return value_and_grad
        # The energy is the inner model's: the same least-squares problem (a Gauss-Newton
        # step is invariant under the linear change of variables that preconditioning is).
        return LeastSquaresField(value_and_grad, residuals)

    def to_variables(self, params, x, observed, states):
        return self.model.to_variables(params, x, observed, states)

    def to_states(self, params, x, observed, variables):
        return self.model.to_states(params, x, observed, variables)

    def energy(self, params, values, x, spec):
        return self.model.energy(params, values, x, spec)

    def errors(self, params, values, x):
        return self.model.errors(params, values, x)

    def gradients(self, params, states, observed, x, spec, learnable):
        value, param_grads, state_grads = self.model.gradients(
            params, states, observed, x, spec, learnable
        )
        return (
            value,
            param_grads,
            precondition_grads(current_spec(learnable, params, spec), state_grads),
        )

    def linearisation_point(self, params, values, x):
        return self.model.linearisation_point(params, values, x)

    @property
    def base(self) -> EnergyModel:
        return self.model.base


class ErrorParameterised(EnergyModel):
    r"""Inference over the prediction errors of the free nodes (ePC), learning as standard PC.
    Made by `pcjax.error_parameterised(fn)`; see the module docstring."""

    def to_variables(self, params, x, observed, states):
        mu = predictions(self.fn, params, {**states, **observed}, x)
        return {k: v - mu[k].astype(v.dtype) for k, v in states.items()}

    def to_states(self, params, x, observed, variables):
        mu = offset_predictions(self.fn, params, x, variables, observed)
        return {k: mu[k].astype(e.dtype) + e for k, e in variables.items()}

    def field(self, params, x, observed, spec):
        def energy_of_errors(errors: Nodes) -> Array:
            # One forward pass: each free node hands on mu + e, each observed node its value.
            mu, in_graph = predicted_with_precisions(self.fn, params, observed, x, errors)
            states = {k: mu[k].astype(e.dtype) + e for k, e in errors.items()}
            return total_energy({**states, **observed}, mu, spec, in_graph)

        def residuals_of_errors(errors: Nodes) -> Nodes:
            mu, _ = predicted_with_precisions(self.fn, params, observed, x, errors)
            states = {k: mu[k].astype(e.dtype) + e for k, e in errors.items()}
            return node_residuals({**states, **observed}, mu, spec, "pcjax (least squares)")

        return LeastSquaresField(jax.value_and_grad(energy_of_errors), residuals_of_errors)

    def gradients(self, params, states, observed, x, spec, learnable):
        value, param_grads, _ = super().gradients(params, states, observed, x, spec, learnable)
        errors = self.to_variables(params, x, observed, states)
        _, field = self.field(params, x, observed, current_spec(learnable, params, spec))(errors)
        return value, param_grads, field


class Bidirectional(EnergyModel):
    r"""Bidirectional PC (bPC): the bottom-up energy of `fn` plus top-down prediction errors.
    Made by `pcjax.bidirectional(up, down)`; see its docstring."""

    down: Callable[..., Any] = eqx.field(static=True)
    up_weight: float
    down_weight: float

    def top_down_energy(self, params: Any, values: Nodes) -> Array:
        r"""$\tfrac12 \sum_i \lVert x_i - \nu_i \rVert^2$ over the nodes that `down`
        predicts (unweighted)."""
        predicted = self.down(params, dict(values))
        if not isinstance(predicted, Mapping) or not predicted:
            raise ValueError(
                "pcjax.bidirectional: `down(params, values)` must return a non-empty dict "
                f"mapping node names to top-down predictions, got {type(predicted).__name__}."
            )
        terms = []
        for name, nu in predicted.items():
            if name not in values:
                raise ValueError(
                    f"pcjax.bidirectional: `down` predicts {name!r}, which is not a node of the "
                    f"bottom-up function (nodes: {sorted(values)}); tag the input as a node to "
                    "predict it."
                )
            if jnp.shape(nu) != jnp.shape(values[name]):
                raise ValueError(
                    f"pcjax.bidirectional: `down`'s prediction of node {name!r} has shape "
                    f"{jnp.shape(nu)}, the node's value has shape {jnp.shape(values[name])}."
                )
            terms.append(0.5 * jnp.sum(jnp.square(values[name] - nu)))
        return sum(terms[1:], terms[0])

    def energy(self, params, values, x, spec):
        up = node_energy(self.fn, params, values, x, spec)
        return self.up_weight * up + self.down_weight * self.top_down_energy(params, values)

    def residuals(self, params, values, x, spec):
        r"""$\sqrt{\alpha_{\text{up}}}\, r_{\text{up}}$ and
        $\sqrt{\alpha_{\text{down}}}\,(x_i - \nu_i)$ (keys `"down:" + name`)."""
        up = super().residuals(params, values, x, spec)
        self.top_down_energy(params, values)  # validates `down`'s predictions
        down = self.down(params, dict(values))
        root_up, root_down = self.up_weight**0.5, self.down_weight**0.5
        out = {name: root_up * r for name, r in up.items()}
        out.update({f"down:{k}": root_down * (values[k] - nu) for k, nu in down.items()})
        return out


def bidirectional(
    up: Callable[..., Any],
    down: Callable[..., Any],
    *,
    up_weight: float = 1.0,
    down_weight: float = 1.0,
) -> Bidirectional:
    r"""Bidirectional predictive coding (bPC; Oliviers, Tang & Bogacz 2025, "Bidirectional
    predictive coding"): a discriminative (bottom-up) and a generative (top-down) network
    sharing their nodes.

    $$F = \alpha_{\text{up}}\, F_{\text{up}}(x) + \alpha_{\text{down}} \sum_{i \in
    \text{down}} \tfrac12 \lVert x_i - \nu_i(x) \rVert^2,$$

    where $F_{\text{up}}$ is the energy of the tagged function `up(params, x)` (its node
    precisions and custom energies included) and $\nu = $ `down(params, values)` are top-down
    predictions computed from the dict of every node's value (free and observed), e.g.
    $\nu_l = V_l\, f(x_{l+1})$ from the layer above. Inference relaxes all free nodes on both
    terms (initialised by `up`'s feedforward pass, bPC's bottom-up sweep) and learning takes
    $\partial F / \partial \theta$ for the parameters of both networks, which may share one
    pytree. To predict the data itself, tag the input as a node in `up` with a zero energy,
    `img = pcjax.node("image", x, energy=lambda state, mu: 0.0)`, and let `down` predict
    `"image"`: observed, it is clamped to the data (classification); free, it is inferred
    (generation from a clamped label).

    **Arguments:**

    - `up`: the tagged bottom-up function `up(params, x)`.
    - `down`: `(params, values) -> dict` of top-down predictions for some of `up`'s nodes,
      each of its node's shape; `values` holds every node's value (free and observed).
    - `up_weight`, `down_weight`: $\alpha_{\text{up}}, \alpha_{\text{down}} \geq 0$ (bPC's
      $\alpha_{\text{disc}}, \alpha_{\text{gen}}$); default 1 each.

    **Returns:** the energy model, used in place of a tagged function.

    **Raises:** `TypeError` for an `up` that is not a plain tagged function or a `down` that
    is not callable; `ValueError` for a negative weight, and where it is used for a `down`
    that returns no dict, or a prediction of an unknown node or of the wrong shape.

    Works with [pcjax.infer][], [pcjax.energy][], [pcjax.param_grads][], [pcjax.Equilibrium][],
    [pcjax.Incremental][], [pcjax.Amortised][] and [pcjax.preconditioned][] (each node's whole field
    times the inverse of its `up` precision). [pcjax.fixed_predictions][],
    [pcjax.error_parameterised][], [pcjax.Nudged][] and the Fisher statistics of
    [pcjax.natural_gradient][] / `precision_weighted_gradient` refuse it.

    **Example** ([setup][examples-setup]): `params["v"]` predicts the hidden node from the
    output node.

    ```pycon
    >>> def down(params, values):
    ...     return {"h": jnp.tanh(values["y"]) @ params["v"]}
    >>> both = {**params, "v": jnp.zeros((2, 4))}
    >>> bpc = pc.bidirectional(fn, down, down_weight=0.5)
    >>> start = pc.forward_init(bpc, both, x)
    >>> float(pc.energy(bpc, both, {"h": start["h"]}, x, {"y": y})) > float(
    ...     pc.energy(fn, params, {"h": start["h"]}, x, {"y": y}))
    True

    ```
    """
    if isinstance(up, EnergyModel) or not callable(up):
        raise TypeError(
            "pcjax.bidirectional: `up` must be a tagged forward function fn(params, x), got "
            f"{type(up).__name__}; transform the bidirectional model instead "
            "(pcjax.preconditioned(pcjax.bidirectional(up, down)))."
        )
    if not callable(down):
        raise TypeError(
            f"pcjax.bidirectional: `down` must be a function (params, values) -> dict, got "
            f"{type(down).__name__}."
        )
    for name, weight in (("up_weight", up_weight), ("down_weight", down_weight)):
        if not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(
                f"pcjax.bidirectional: `{name}` must be a non-negative number, got {weight!r}."
            )
    return Bidirectional(up, down, float(up_weight), float(down_weight))


def refuse_non_standard(
    model: EnergyModel, where: str, what: str, allowed: tuple[type, ...] = ()
) -> None:
    """Raise unless `model` (under preconditioning) is the standard energy of its function
    (or one of the `allowed` transformations)."""
    if type(model.base) not in (EnergyModel, *allowed):
        raise ValueError(
            f"{where}: the network is transformed by {type(model.base).__name__}; {what}."
        )


def precondition_grads(spec: Mapping[str, Any], grads: Nodes) -> Nodes:
    r"""$P_i^{-1} \partial F / \partial x_i$ for every node with a precision; nodes with a
    custom energy (no precision) and unit-precision nodes keep their gradient."""
    in_graph = in_graph_nodes(spec)
    if in_graph:
        raise ValueError(
            f"pcjax.preconditioned: node(s) {in_graph} compute their precision in the "
            "function (pcjax.node(..., precision=...)); preconditioning by it is not supported."
        )
    return {
        k: solve(spec[k], g)
        if spec.get(k) is not None and not isinstance(spec[k], CustomEnergy)
        else g
        for k, g in grads.items()
    }


def as_model(fn: Any, where: str = "pcjax") -> EnergyModel:
    """`fn` as an energy model: energy transformations pass through, functions get the
    standard energy."""
    if isinstance(fn, EnergyModel):
        return fn
    if not callable(fn):
        raise TypeError(
            f"{where}: the network must be a tagged forward function fn(params, x) or an energy "
            f"transformation of one (pcjax.fixed_predictions(fn), ...), got {type(fn).__name__}."
        )
    return EnergyModel(fn)


@traces_once
def energy(
    fn: Callable[..., Any] | EnergyModel,
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    precision: Precision | None = None,
) -> Array:
    """Variational free energy of the PC network `fn` at the given node states.

    $$F = \\sum_i \\Big[\\tfrac12 \\sum_n e_{i,n}^\\top P_i\\, e_{i,n}
          - \\tfrac{N_i}{2}\\log\\det P_i\\Big], \\qquad e_i = x_i - \\mu_i,\\quad
          \\mu_i = g_i(\\text{states of the parents of } i),$$

    where the predictions $\\mu_i$ are the values tagged by [pcjax.node][] when `fn(params, x)`
    runs with every tagged node replaced by its state, and the log-det term is present for
    precision modules only.

    **Arguments:**

    - `fn`: the tagged forward function `fn(params, x)`, or an energy transformation of it
      ([pcjax.fixed_predictions][], [pcjax.bidirectional][], ...: its energy at these states).
    - `params`: its parameters (any pytree, e.g. an equinox module).
    - `states`: dict of the free (latent) node states.
    - `x`: the input of `fn` (any pytree, or None).
    - `observed`: dict of the clamped node values (e.g. the label node during training).
      Every tagged node must be in exactly one of `states` and `observed`.
    - `precision`: dict mapping node names to precisions (default 1 for every node): fixed
      positive arrays (scalar or per feature) or precision modules ([pcjax.ScalarPrecision][],
      `DiagonalPrecision`, `FullPrecision`); or a function `params -> dict` for precisions
      stored in (and learned with) the parameters. Only the modules it returns are learned: a
      plain array it returns is fixed (it gets a zero gradient, having no log-det term; an
      optimizer with weight decay would still shrink it, so keep such arrays out of the
      parameters or wrap them in a module).

    **Returns:** the scalar energy, summed over nodes and batch.

    **Raises:** `ValueError` naming the node for an unknown or missing node name, a state
    whose shape or dtype is not the node's, or a precision that does not fit its node.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> states = pc.forward_init(fn, params, x)
    >>> free = {"h": states["h"]}  # the feedforward pass: only the output node has error
    >>> energy = pc.energy(fn, params, free, x, {"y": y})
    >>> bool(jnp.isclose(energy, 0.5 * jnp.sum((y - states["y"]) ** 2)))
    True
    >>> pc.energy(fn, params, free, x, {"y": y}, precision={"y": 2.0}).round(3)
    Array(..., dtype=float32)

    ```
    """
    model = as_model(fn, "pcjax.energy")
    values, checked = checked_values(model.fn, params, states, x, observed, precision)
    return model.energy(params, values, x, checked)


def fixed_predictions(fn: Callable[..., Any] | EnergyModel) -> FixedPredictions:
    r"""The fixed-prediction assumption (FPA) as a transformation of the energy of `fn`.

    Inference and learning use the predictions $\mu(\hat x)$ and Jacobians of the feedforward
    pass $\hat x$: the state field is $P_i e_i - \sum_c J_c(\hat x)^\top P_c e_c$ with
    $e = x - \mu(\hat x)$.

    **Equilibrium (any precisions):** the field vanishes where
    $P_i e_i = \sum_c J_c(\hat x)^\top P_c e_c$ for every free node, the backprop recursion:
    the precision-weighted errors $P_i e_i$ equal the backprop gradients
    $-\partial L / \partial x_i$ of the observed nodes' energy $L$ at $\hat x$ exactly, on any
    graph (Millidge et al. 2022; Rosenbaum 2022). With unit hidden precisions these are the
    errors themselves.

    **Reaching it in one pass:** a gradient step of size $\eta$ maps a free node's error to
    $(I - \eta P_i)\, e_i + \eta \sum_c J_c^\top P_c e_c$ (the $e_c$ and $J_c$ of its
    children, frozen $\mu$). This lands on the equilibrium value whatever $e_i$ was only when
    $\eta P_i = I$: then, from the feedforward pass, as many steps as the graph is deep give
    the backprop gradients exactly; that is step size 1 with unit hidden precisions, or
    $1 / p$ when every free node has the same scalar precision $p$. Otherwise the old error
    is carried on, multiplied by $I - \eta P_i$ each step: it converges slowly
    ($0 < \eta P_i < 1$), oscillates ($\eta P_i = 2$: with step size 1 and $P_h = 2$ the
    errors after the depth's steps are off) or diverges ($\eta P_i > 2$). `pcjax.preconditioned(
    pcjax.fixed_predictions(fn))` with step size 1 restores the one-pass property for any
    precisions (scalar, per-feature or full, not computed in the graph): its step sets
    $e_i \leftarrow P_i^{-1} \sum_c J_c^\top P_c e_c$ outright, so
    `pcjax.GradientDescent(depth, step_size=1.0)` gives the backprop gradients exactly.

    Pass the result wherever a tagged function goes: [pcjax.infer][], [pcjax.energy][],
    [pcjax.param_grads][], [pcjax.make_train_step][].

    **Arguments:**

    - `fn`: the tagged forward function `fn(params, x)`, or [pcjax.preconditioned][] of one.

    **Returns:** the transformed energy model, used in place of `fn`.

    **Raises:** `ValueError` for a network already transformed by
    [pcjax.error_parameterised][] or [pcjax.bidirectional][].

    **Example** ([setup][examples-setup]): the equilibrium errors are the backprop gradients.

    ```pycon
    >>> fpa = pc.fixed_predictions(fn)
    >>> start = pc.forward_init(fpa, params, x)
    >>> solver = pc.GradientDescent(2, step_size=1.0)  # the graph's depth, step size 1
    >>> states, info = pc.infer(fpa, params, {"h": start["h"]}, x, {"y": y}, solver=solver)
    >>> def loss(h):  # the output node's energy as a function of the hidden node
    ...     return 0.5 * jnp.sum((y - h @ params["w2"]) ** 2)
    >>> error = states["h"] - start["h"]  # the hidden node's error, against frozen predictions
    >>> bool(jnp.allclose(error, -jax.grad(loss)(start["h"]), atol=1e-6))
    True

    ```
    """
    model = as_model(fn, "pcjax.fixed_predictions")
    if isinstance(model.base, ErrorParameterised):
        raise ValueError(
            "pcjax.fixed_predictions: the network is error-parameterised; with the predictions "
            "fixed at the feedforward pass, states and errors differ by a constant and ePC is "
            "FPA itself: pass the plain function."
        )
    if isinstance(model, Preconditioned):
        return Preconditioned(fixed_predictions(model.model))  # type: ignore[return-value]
    refuse_non_standard(
        model,
        "pcjax.fixed_predictions",
        "FPA transforms the standard energy only",
        allowed=(FixedPredictions,),
    )
    return FixedPredictions(model.fn)


def preconditioned(fn: Callable[..., Any] | EnergyModel) -> Preconditioned:
    r"""Inference preconditioned by the nodes' own precisions:
    $\dot x_i = -P_i^{-1} \partial F / \partial x_i$.

    The fixed points (and so the relaxed states and the learning signal) are those of `fn`'s
    energy, standard or [pcjax.fixed_predictions][]; only the path to them changes: each node's
    own error term relaxes at a rate independent of its precision. Nodes without a precision
    module or array keep their gradient.

    **Arguments:**

    - `fn`: the tagged forward function, [pcjax.fixed_predictions][] of one,
      [pcjax.error_parameterised][] or [pcjax.bidirectional][].

    **Returns:** the transformed energy model, used in place of `fn`: the precisions it
    preconditions by are those passed as `precision=` where it is used.

    **Raises:** `ValueError` where it is used for a node whose precision the function computes
    (`pcjax.node(..., precision=)`).

    **Example** ([setup][examples-setup]): a stiff output precision no longer sets the step.

    ```pycon
    >>> net = pc.preconditioned(fn)
    >>> start = pc.forward_init(net, params, x)
    >>> states, info = pc.infer(
    ...     net, params, {"h": start["h"]}, x, {"y": y},
    ...     solver=pc.GradientDescent(20, step_size=0.5), precision={"y": 100.0, "h": 100.0},
    ... )
    >>> bool(info.diverged), float(info.energy) < float(info.initial_energy)
    (False, True)

    ```
    """
    model = as_model(fn, "pcjax.preconditioned")
    if isinstance(model, Preconditioned):
        raise ValueError("pcjax.preconditioned: the model is already preconditioned.")
    return Preconditioned(model)


def error_parameterised(fn: Callable[..., Any] | EnergyModel) -> EnergyModel:
    r"""Error-parameterised PC (ePC; Goemaere et al. 2025, "Error Optimization: Overcoming
    Exponential Signal Decay in Deep Predictive Coding Networks") as a transformation of the
    energy of `fn`.

    Inference descends $F$ over the free nodes' prediction errors $\varepsilon$: the states are
    $x_i = \mu_i(x_{\text{parents}}) + \varepsilon_i$ in topological order (observed nodes
    clamped), and the field $\partial F(x(\varepsilon)) / \partial \varepsilon$ is a backward
    pass through the whole network, so the output error reaches every layer in one step (in
    standard PC it travels one layer per step and decays on the way). At $\varepsilon = 0$
    (the feedforward pass) the field of a free Gaussian node is the backprop gradient of the
    observed nodes' energy with respect to it. The fixed points are standard PC's (the map
    $\varepsilon \mapsto x$ is triangular with identity diagonal blocks), and learning takes
    $\partial F / \partial \theta$ at the relaxed states, as standard PC does.

    [pcjax.infer][] and the learning rules take and return states; the solver runs on the errors
    (start: the given states' errors, zero at the feedforward pass), and `InferInfo.grad_norm`
    and `tol` refer to the error field. Composes with [pcjax.preconditioned][] (each error's
    field times its node's inverse precision). [pcjax.fixed_predictions][] and [pcjax.Nudged][]
    refuse it.

    **Arguments:**

    - `fn`: the tagged forward function `fn(params, x)` (or [pcjax.preconditioned][] of one).

    **Returns:** the transformed energy model, used in place of `fn`.

    **Raises:** `ValueError` for a network already transformed by another energy
    transformation ([pcjax.fixed_predictions][], [pcjax.bidirectional][]); wrap it in
    [pcjax.preconditioned][] after, not before.

    **Example** ([setup][examples-setup]): the output error reaches the hidden node at once.

    ```pycon
    >>> epc = pc.error_parameterised(fn)
    >>> start = pc.forward_init(epc, params, x)
    >>> states, info = pc.infer(
    ...     epc, params, {"h": start["h"]}, x, {"y": y}, solver=pc.GradientDescent(50)
    ... )
    >>> bool(info.energy < info.initial_energy), sorted(states)
    (True, ['h'])

    ```
    """
    model = as_model(fn, "pcjax.error_parameterised")
    if isinstance(model, Preconditioned):
        return Preconditioned(error_parameterised(model.model))
    refuse_non_standard(
        model, "pcjax.error_parameterised", "ePC transforms the standard energy only"
    )
    return ErrorParameterised(model.fn)


class Context(NamedTuple):
    """What a training step hands its optimizer, as the optax extra argument `context`.

    [pcjax.natural_gradient][] and [pcjax.precision_weighted_gradient][] compute their statistics
    from it, at `linearisation_point()`: the relaxed states (standard PC), the feedforward pass
    ([pcjax.fixed_predictions][]; nudging, whose gradient estimates that of the loss at the free
    equilibrium), or the current states of an incremental step. Other transforms ignore it.

    **Fields:**

    - `model`: the energy model of the step's `fn` (an energy transformation, or the standard
      energy of a plain tagged function).
    - `params`: the parameters the gradient was taken at.
    - `states`: the free nodes' states the gradient was taken at (relaxed, nudged, or the
      current states of an incremental step): dict of arrays, batch axis first.
    - `x`: the step's input.
    - `observed`: the clamped nodes' values.
    - `precision`: the step's `precision` argument (None for unit precisions).

    **Example** ([setup][examples-setup]): an optax transform that reads it.

    ```pycon
    >>> def update(updates, state, params=None, *, context, **extra):
    ...     free, observed = context.linearisation_point()
    ...     print(sorted(free), sorted(observed))
    ...     return updates, state
    >>> spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    >>> optimizer = optax.chain(spy, optax.sgd(0.1))
    >>> step = pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(4)), optimizer)
    >>> params, opt_state, info = step(params, optimizer.init(params), x, {"y": y})
    ['h'] ['y']

    ```
    """

    model: EnergyModel
    params: Any
    states: Nodes
    x: Any
    observed: Nodes
    precision: Precision | None

    def linearisation_point(self) -> tuple[Nodes, Nodes]:
        """`(free states, observed values)` where the predictions are linearised: the
        states, or the feedforward pass under [pcjax.fixed_predictions][]."""
        values = self.model.linearisation_point(
            self.params, {**self.states, **self.observed}, self.x
        )
        free = {k: v for k, v in values.items() if k not in self.observed}
        return free, self.observed


def forward_init(fn: Callable[..., Any] | EnergyModel, params: Any, x: Any) -> Nodes:
    """Feedforward values of every tagged node of `fn(params, x)`.

    These are the usual initial states for inference: with them, every latent prediction error
    is zero and only clamped (observed) nodes carry error. Nodes tagged under `jax.vmap` or in
    a `lax.scan` body come batched / stacked (see [pcjax.node][]). `fn` may be an energy
    transformation (`pcjax.fixed_predictions(fn)`, `pcjax.preconditioned(...)`,
    `pcjax.error_parameterised(fn)`, `pcjax.bidirectional(up, down)`): the feedforward pass is
    that of the underlying function (`up` for bPC).

    **Arguments:**

    - `fn`: the tagged forward function `fn(params, x)`, or an energy transformation of it.
    - `params`: its parameters (any pytree).
    - `x`: its input (any pytree, or None).

    **Returns:** a dict mapping every node's name to its feedforward value (shape: that of
    the tagged value, batch first, after any stacked `lax.scan` axes).

    **Raises:** `ValueError` naming the node for a node tagged twice or in an unsupported
    construct (see [pcjax.node][]).

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> states = pc.forward_init(fn, params, x)
    >>> bool(jnp.allclose(states["y"], fn(params, x)))
    True
    >>> free = {"h": states["h"]}  # start inference with the label node clamped

    ```
    """
    return feedforward_states(as_model(fn, "pcjax.forward_init").fn, params, x)


@traces_once
def prediction_errors(
    fn: Callable[..., Any] | EnergyModel,
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
) -> Nodes:
    r"""Every node's prediction error $e_i = x_i - \mu_i$ (same arguments as [pcjax.energy][]):
    the errors that the energy of `fn` weighs by the precisions.

    For an energy transformation, those of the transformed energy: with
    `pcjax.fixed_predictions(fn)` the errors against the frozen feedforward predictions,
    $x_i - \mu_i(\hat x)$; with [pcjax.error_parameterised][] and [pcjax.preconditioned][], which
    change the inference path but not the energy, those of the energy they transform; with
    `pcjax.bidirectional(up, down)` the bottom-up errors of `up` (its top-down errors are
    $x_i - \nu_i$ with $\nu$ = `down(params, values)`).

    Weigh them by the node's precision for the precision-weighted errors $P_i e_i$.

    **Arguments:** as [pcjax.energy][]: `fn`, `params`, the free `states`, the input `x` and
    the `observed` nodes' values.

    **Returns:** a dict mapping every node's name (free and observed) to its error, of the
    node's shape. Nodes with a custom energy (`pcjax.node(..., energy=)`) are included as
    $x_i - \mu_i$ too.

    **Raises:** `ValueError` for unknown or missing nodes and shape mismatches.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> states = pc.forward_init(fn, params, x)
    >>> errors = pc.prediction_errors(fn, params, {"h": states["h"]}, x, {"y": y})
    >>> errors["h"].round(3)  # zero at the feedforward pass
    Array([[0., 0., 0., 0.],
           [0., 0., 0., 0.]], dtype=float32)
    >>> bool(jnp.allclose(errors["y"], y - fn(params, x)))
    True

    ```
    """
    model = as_model(fn, "pcjax.prediction_errors")
    return model.errors(params, merge_nodes(states, observed), x)
