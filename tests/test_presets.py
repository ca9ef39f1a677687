"""`pcjax.preset`: the named configurations do what their docstrings say, checked against a
hand-written ePC step on a two-layer tanh network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import pcjax as pc

B, DX, DH, DY = 6, 5, 4, 3


def net(params, x):
    h = pc.node("h", jnp.tanh(x @ params["w1"]))
    return pc.node("y", h @ params["w2"])


def hand_written_fast_gradients(params, x, y):
    """One ePC step of size 1 from epsilon = 0, then dF/dparams at the resulting states."""

    def energy(params, epsilon):
        h = jnp.tanh(x @ params["w1"]) + epsilon
        return 0.5 * jnp.sum(epsilon**2) + 0.5 * jnp.sum((y - h @ params["w2"]) ** 2)

    epsilon = -jax.grad(energy, 1)(params, jnp.zeros((B, DH)))
    h = jnp.tanh(x @ params["w1"]) + epsilon

    def energy_at_states(params):
        return 0.5 * jnp.sum((h - jnp.tanh(x @ params["w1"])) ** 2) + 0.5 * jnp.sum(
            (y - h @ params["w2"]) ** 2
        )

    return jax.grad(energy_at_states)(params)


def test_fast_preset_is_one_error_step_then_learning():
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {
        "w1": jax.random.normal(keys[0], (DX, DH)),
        "w2": jax.random.normal(keys[1], (DH, DY)),
    }
    x, y = jax.random.normal(keys[2], (B, DX)), jax.random.normal(keys[3], (B, DY))
    model, rule = pc.preset("fast", net)
    lr = 0.1
    step = jax.jit(pc.make_train_step(model, rule, optax.sgd(lr)))
    new, _, _ = step(params, optax.sgd(lr).init(params), x, {"y": y})
    expected = hand_written_fast_gradients(params, x, y)
    for k in params:  # the step averages over the batch
        moved = (params[k] - new[k]) / lr * B
        error = jnp.linalg.norm(moved - expected[k]) / jnp.linalg.norm(expected[k])
        assert error < 1e-5, (k, float(error))  # measured 1.5e-6 (w1), 5.7e-8 (w2)


def test_preset_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'quick'; known: \['fast', 'standard'\]"):
        pc.preset("quick", net)
    with pytest.raises(TypeError, match="a preset chooses the energy transformation itself"):
        pc.preset("fast", pc.error_parameterised(net))
    model, rule = pc.preset("standard", net)
    assert model is net and isinstance(rule, pc.Equilibrium) and rule.solver.steps == 8
