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

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._energy import CustomEnergy, Precision, current_spec, node_energy, node_term
from ._inference import relax
from ._tagging import scan_depths

Array = jax.Array
NUDGING = ("positive", "negative", "centred")


def nudged_grads(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    feedforward: Mapping[str, Array],
    targets: Mapping[str, Array],
    checked: Mapping[str, Any],
    learnable: Precision | None,
    *,
    nudging: str,
    beta: float,
    steps: int,
    optimizer: optax.GradientTransformation,
    tol: float | None,
    unroll: int | bool | None = None,
    key: Array | None = None,
) -> tuple[Array, Any, Array]:
    """The nudged parameter-gradient estimate; returns `(energy, grads, inference steps)`.

    `feedforward` holds the feedforward value of every node (the initial states, outputs
    included), `targets` the observed values of the output nodes, `checked` the checked node
    specs and `learnable` the `precision` argument (a function of the parameters for learned
    precisions). The energy returned is the network's own energy $F$ at the nudged states.
    """
    if nudging not in NUDGING:
        raise ValueError(f"pcjax: `nudging` must be one of {NUDGING}, got {nudging!r}.")
    if not beta > 0:
        raise ValueError(f"pcjax: the nudging strength `nudge` must be positive, got {beta!r}.")
    diff, static = eqx.partition(params, eqx.is_inexact_array)

    def energies(diff: Any, states: Mapping[str, Array], sign: float) -> tuple[Array, Array]:
        r"""$F_{\text{sign} \cdot \beta}$ and $F$ at the given states and parameters."""
        params = eqx.combine(diff, static)
        spec = current_spec(learnable, params, checked)
        # Free outputs have a Gaussian energy of their own (with their precision, if any);
        # their declared energy scores the target. Hidden nodes keep their energies.
        internal = {
            **spec,
            **{k: None if isinstance(spec.get(k), CustomEnergy) else spec.get(k) for k in targets},
        }
        own = node_energy(fn, params, states, x, internal)
        pull = sum(node_term(spec.get(k), y, states[k]) for k, y in targets.items())
        return own + sign * beta * pull, own

    def grads_at(states: Mapping[str, Array], sign: float) -> tuple[Array, Any]:
        r"""$G(\text{sign} \cdot \beta)$ at the given states, and $F$ there."""
        (_, own), grads = jax.value_and_grad(energies, has_aux=True)(diff, states, sign)
        return own, grads

    def relaxed(sign: float, key: Array | None) -> tuple[Mapping[str, Array], Array]:
        states, taken, _ = relax(
            jax.value_and_grad(lambda s: energies(diff, s, sign)[0]),
            dict(feedforward),
            steps=steps,
            optimizer=optimizer,
            tol=tol,
            record_energy=False,
            unroll=unroll,
            key=key,
            sample_axes=None if tol is None else scan_depths(fn, params, x),
        )
        return states, taken

    plus_key, minus_key = (None, None) if key is None else tuple(jax.random.split(key))
    if nudging == "centred":
        plus, taken = relaxed(1.0, plus_key)
        minus, taken_minus = relaxed(-1.0, minus_key)
        value, g_plus = grads_at(plus, 1.0)
        _, g_minus = grads_at(minus, -1.0)
        grads = jax.tree.map(lambda a, b: (a - b) / (2 * beta), g_plus, g_minus)
        return value, grads, jnp.maximum(taken, taken_minus)
    sign = 1.0 if nudging == "positive" else -1.0
    nudged, taken = relaxed(sign, plus_key)
    value, g_nudged = grads_at(nudged, sign)
    _, g_free = grads_at(feedforward, 0.0)
    grads = jax.tree.map(lambda a, b: sign * (a - b) / beta, g_nudged, g_free)
    return value, grads, taken
