r"""Output nudging: the targets pull on free output nodes with strength beta.

As in equilibrium propagation (Scellier & Bengio 2017) and the PCX benchmark of PC networks
(Pinchetti et al. 2024, "Benchmarking predictive coding networks -- made simple"), the output
nodes are left free, with a Gaussian energy of their own (their precision, if any), and the
targets $y$ enter as an extra term

$$F_\beta(x; \theta) = F(x; \theta) + \beta\, \ell(y, x; \theta), \qquad
\ell = \sum_k \ell_k(y_k, x_k),$$

where $\ell_k$ is the output node's declared energy (Gaussian
$\tfrac12 \|y - x\|^2_P - \tfrac N2 \log\det P$, or e.g. `pcjax.cross_entropy` of the
logits $x_k$). Hidden nodes keep their own energies. With $x^*_\beta$ the minimiser of
$F_\beta$ and $G(\beta) = \partial_\theta F_\beta(x^*_\beta; \theta)$, the gradient of the
loss at the free equilibrium, $L(\theta) = \ell(y, x^*_0)$, is $dL/d\theta = G'(0)$
(the equilibrium-propagation theorem), estimated by

- positive: $(G(\beta) - G(0)) / \beta$;
- negative: $(G(0) - G(-\beta)) / \beta$;
- centred: $(G(\beta) - G(-\beta)) / (2\beta)$, whose bias is $O(\beta^2)$ instead of
  $O(\beta)$ (Laborieux et al. 2021).

The free equilibrium $x^*_0$ is the feedforward pass (every node's energy is minimal where its
state equals its prediction, as the Gaussian's is), so $G(0)$ is taken there. For the weights
$G(0) = 0$; learned precisions have $G(0) \ne 0$ (the $\log\det$ terms), which is why it must
be subtracted rather than assumed zero. All three estimates tend to $dL/d\theta$ as
$\beta \to 0$ (for a learned output precision: the gradient of $\ell$ including its
$\log\det$; for hidden precisions: 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._energy import (
    CustomEnergy,
    Precision,
    current_spec,
    in_graph_nodes,
    node_energy,
    node_term,
)
from ._models import EnergyModel, Preconditioned, precondition_grads
from ._solvers import AbstractSolver, InferInfo, check_solver_fits

Array = jax.Array
MODES = ("positive", "negative", "centred")


def nudged_gradients(
    model: EnergyModel,
    params: Any,
    x: Any,
    feedforward: Mapping[str, Array],
    targets: Mapping[str, Array],
    checked: Mapping[str, Any],
    learnable: Precision | None,
    *,
    mode: str,
    beta: Any,
    solver: AbstractSolver,
    key: Array | None,
    sample_axes: Mapping[str, int],
) -> tuple[Any, InferInfo]:
    """The nudged parameter-gradient estimate and the `InferInfo` of the nudged relaxation
    (its `energy`: the network's own energy $F$ at the nudged states, without the nudge).

    `feedforward` holds the feedforward value of every node (the initial states, outputs
    included), `targets` the observed values of the output nodes, `checked` the checked node
    specs and `learnable` the `precision` argument (a function of the parameters for learned
    precisions). `model` is the standard energy, possibly preconditioned.
    """
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    in_graph = sorted(set(in_graph_nodes(checked)) & set(targets))
    if in_graph:
        raise ValueError(
            f"pcjax.Nudged: output node(s) {in_graph} compute their precision in the function "
            "(pcjax.node(..., precision=...)); nudging them is not supported (use "
            "pcjax.Equilibrium, which clamps them)."
        )

    def internal_spec(spec):
        # Free outputs have a Gaussian energy of their own (with their precision, if any);
        # their declared energy scores the target. Hidden nodes keep their energies.
        outputs = {
            k: None if isinstance(spec.get(k), CustomEnergy) else spec.get(k) for k in targets
        }
        return {**spec, **outputs}

    def energies(diff: Any, states: Mapping[str, Array], sign: float) -> tuple[Array, Array]:
        r"""$F_{\text{sign} \cdot \beta}$ and $F$ at the given states and parameters."""
        params = eqx.combine(diff, static)
        spec = current_spec(learnable, params, checked)
        own = node_energy(model.fn, params, states, x, internal_spec(spec))
        pull = sum(node_term(spec.get(k), y, states[k]) for k, y in targets.items())
        return own + sign * beta * pull, own

    def field(sign: float):
        grad_fn = jax.value_and_grad(lambda s: energies(diff, s, sign)[0])
        if not isinstance(model, Preconditioned):
            return grad_fn

        def preconditioned(states):
            value, grads = grad_fn(states)
            return value, precondition_grads(internal_spec(checked), grads)

        return preconditioned

    def relaxed(sign: float, key: Array | None) -> tuple[Any, Any, InferInfo]:
        r"""The nudged equilibrium, $G(\text{sign} \cdot \beta)$ there and the solver's report."""
        check_solver_fits(solver, model, "pcjax.Nudged", feedforward, sample_axes)
        states, steps, evaluations, energies_, initial = solver.run(
            field(sign), dict(feedforward), key=key, sample_axes=sample_axes
        )
        value, grads = field(sign)(states)
        states, info = solver.report(
            states, value, grads, steps, evaluations, energies_, initial, sample_axes
        )
        (_, own), g = jax.value_and_grad(energies, has_aux=True)(diff, states, sign)
        return g, own, info

    first_key, second_key = (None, None) if key is None else tuple(jax.random.split(key))
    if mode == "centred":
        g_plus, own, info = relaxed(1.0, first_key)
        g_minus, _, info_minus = relaxed(-1.0, second_key)
        grads = jax.tree.map(lambda a, b: (a - b) / (2 * beta), g_plus, g_minus)
        info = _combine(info, info_minus, own)
        return grads, info
    sign = 1.0 if mode == "positive" else -1.0
    g_nudged, own, info = relaxed(sign, first_key)
    g_free = jax.grad(lambda d: energies(d, feedforward, 0.0)[0])(diff)
    grads = jax.tree.map(lambda a, b: sign * (a - b) / beta, g_nudged, g_free)
    return grads, info._replace(energy=own, diverged=info.diverged | ~jnp.isfinite(own))


def _combine(plus: InferInfo, minus: InferInfo, own: Array) -> InferInfo:
    """One report for the two relaxations of the centred estimate."""
    return InferInfo(
        own,
        plus.diverged | minus.diverged | ~jnp.isfinite(own),
        jnp.maximum(plus.steps, minus.steps),
        None,
        jnp.maximum(plus.grad_norm, minus.grad_norm),
        plus.converged & minus.converged,
        plus.evaluations + minus.evaluations,
        plus.initial_energy,
        plus.energy_rose | minus.energy_rose,
        jnp.maximum(plus.relative_grad_norm, minus.relative_grad_norm),
        jnp.maximum(plus.initial_grad_norm, minus.initial_grad_norm),
    )
