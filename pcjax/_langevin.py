"""Langevin dynamics for the states: Monte Carlo predictive coding.

Monte Carlo PC (Oliviers, Bogacz & Meulemans 2024, "Learning probability distributions of sensory
inputs with Monte Carlo predictive coding") replaces gradient descent on the states by the
unadjusted Langevin algorithm

$$x \\leftarrow x - \\eta \\nabla_x F + \\sqrt{2\\eta T}\\,\\xi, \\quad \\xi \\sim N(0, I),$$

whose stationary distribution is $p(x) \\propto e^{-F(x)/T}$: at $T = 1$ the posterior of the
latent states (up to an $O(\\eta)$ discretisation bias), instead of its mode. Learning from the
sampled states then follows the gradient of the marginal likelihood rather than of the joint.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class LangevinState(NamedTuple):
    """The random key of the next step."""

    key: jax.Array


def langevin(
    step_size: float, key: jax.Array, *, temperature: float = 1.0
) -> optax.GradientTransformation:
    """An optax transform for the *states*: a Langevin step on the energy.

    Pass it as the state optimizer, `pcjax.infer(..., optimizer=pcjax.langevin(0.05, key))` or
    `pcjax.train_step(..., state_optimizer=pcjax.langevin(0.05, key))`; every update draws fresh
    noise from the key carried in its state. Each sample of a batch is an independent chain.

    **Arguments:** `step_size` $\\eta > 0$, `key` a `jax.random.PRNGKey`, `temperature`
    $T \\ge 0$ (0 is plain gradient descent).
    """
    if not step_size > 0:
        raise ValueError(f"pcjax.langevin: `step_size` must be positive, got {step_size!r}.")
    if not temperature >= 0:
        raise ValueError(f"pcjax.langevin: `temperature` must be >= 0, got {temperature!r}.")
    scale = (2.0 * step_size * temperature) ** 0.5

    def init(params):
        del params
        return LangevinState(key)

    def update(grads, state, params=None):
        del params
        next_key, draw = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(grads)
        keys = jax.random.split(draw, max(len(leaves), 1))
        updates = [
            -step_size * g + scale * jax.random.normal(k, jnp.shape(g), jnp.result_type(g))
            for g, k in zip(leaves, keys)
        ]
        return jax.tree.unflatten(treedef, updates), LangevinState(next_key)

    return optax.GradientTransformation(init, update)
