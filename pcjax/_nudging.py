"""Output nudging: the targets pull on free output nodes with strength beta.

As in equilibrium propagation (Scellier & Bengio 2017) and the PCX benchmark of PC networks
(Pinchetti et al. 2024, "Benchmarking predictive coding networks -- made simple"), the output
nodes are left free, with their own Gaussian energy, and the targets $y$ enter as an extra term

$$F_\\beta(x) = F(x) + \\beta \\sum_{k} \\ell_k(y_k, x_k),$$

where $\\ell_k$ is the output node's declared energy (Gaussian $\\tfrac12\\|y - x\\|^2_P$, or e.g.
`pcjax.cross_entropy` of the logits $x_k$). Without nudging ($\\beta = 0$) the equilibrium is the
feedforward pass and $\\partial F / \\partial \\theta = 0$, so the parameter gradient estimates are

- positive: $\\partial_\\theta F(x^*_{\\beta}) / \\beta$;
- negative: $-\\partial_\\theta F(x^*_{-\\beta}) / \\beta$;
- centred: $(\\partial_\\theta F(x^*_{\\beta}) - \\partial_\\theta F(x^*_{-\\beta})) / (2\\beta)$,
  whose bias is $O(\\beta^2)$ instead of $O(\\beta)$ (Laborieux et al. 2021).

All three tend to the backprop gradient of $\\sum_k \\ell_k$ as $\\beta \\to 0$.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ._energy import CustomEnergy, node_energy, node_term
from ._inference import relax

Array = jax.Array
NUDGING = ("positive", "negative", "centred")


def nudged_grads(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    nodes: Mapping[str, Array],
    targets: Mapping[str, Array],
    spec: Mapping[str, Any],
    *,
    nudging: str,
    beta: float,
    steps: int,
    optimizer: optax.GradientTransformation,
    tol: float | None,
    param_grads: Callable[[Mapping[str, Array], Mapping[str, Any]], tuple[Array, Any]],
    unroll: int | bool | None = None,
) -> tuple[Array, Any, Array]:
    """The nudged parameter-gradient estimate; returns `(energy, grads, inference steps)`.

    `nodes` are the feedforward values of every node (the initial states, outputs included),
    `targets` the observed values of the output nodes, `spec` the checked node specs, and
    `param_grads(states, spec)` the energy and parameter gradient at given states.
    """
    if nudging not in NUDGING:
        raise ValueError(f"pcjax: `nudging` must be one of {NUDGING}, got {nudging!r}.")
    if not beta > 0:
        raise ValueError(f"pcjax: the nudging strength `nudge` must be positive, got {beta!r}.")
    # Free outputs keep a Gaussian energy of their own; their declared energy scores the target.
    internal = {
        k: None if isinstance(v, CustomEnergy) else v for k, v in spec.items() if v is not None
    }

    def relaxed_grads(sign: float):
        def energy(states):
            pull = sum(node_term(spec.get(k), y, states[k]) for k, y in targets.items())
            return node_energy(fn, params, states, x, internal) + sign * beta * pull

        states, taken, _ = relax(
            jax.value_and_grad(energy),
            dict(nodes),
            steps=steps,
            optimizer=optimizer,
            tol=tol,
            record_energy=False,
            unroll=unroll,
        )
        return (*param_grads(states, internal), taken)

    if nudging == "positive":
        value, grads, taken = relaxed_grads(1.0)
        return value, jax.tree.map(lambda g: g / beta, grads), taken
    if nudging == "negative":
        value, grads, taken = relaxed_grads(-1.0)
        return value, jax.tree.map(lambda g: -g / beta, grads), taken
    value, plus, taken = relaxed_grads(1.0)
    _, minus, taken_minus = relaxed_grads(-1.0)
    grads = jax.tree.map(lambda a, b: (a - b) / (2 * beta), plus, minus)
    return value, grads, jnp.maximum(taken, taken_minus)
