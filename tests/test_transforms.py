"""Nodes inside the user's own transformations, through the public API (issue 11): per-sample
equinox layers under `jax.vmap`, RNNs with `lax.scan`, inner `jax.jit` with a warm cache and
`jax.checkpoint`. Ground truths: hand-written energies and `jax.grad` of the loss."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_error

import pcjax as pc


class PerSampleMLP(eqx.Module):
    """An equinox MLP written per sample (as `eqx.nn` layers are), tagged in `__call__`."""

    layers: list

    def __init__(self, sizes, key):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]

    def __call__(self, x):
        h = x
        for i, layer in enumerate(self.layers):
            h = pc.node(f"h{i}", layer(h))
            if i < len(self.layers) - 1:
                h = jnp.tanh(h)
        return h


def batched(model, x):
    return jax.vmap(model)(x)


@pytest.mark.x64
def test_vmapped_equinox_model_energy_and_fpa_gradients():
    model = PerSampleMLP([4, 5, 3], jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    y = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    ff = pc.forward_init(batched, model, x)
    assert ff["h0"].shape == (6, 5) and ff["h1"].shape == (6, 3)
    states = {"h0": ff["h0"] + 0.1}

    def by_hand(m, h0):  # the energy written out
        mu0 = jax.vmap(m.layers[0])(x)
        mu1 = jax.vmap(m.layers[1])(jnp.tanh(h0))
        return 0.5 * jnp.sum((h0 - mu0) ** 2) + 0.5 * jnp.sum((y - mu1) ** 2)

    energy = pc.energy(batched, model, states, x, {"h1": y})
    np.testing.assert_allclose(energy, by_hand(model, states["h0"]), rtol=1e-14)
    relaxed, _ = pc.infer(
        batched, model, {"h0": ff["h0"]}, x, {"h1": y}, steps=1, step_size=1.0,
        fixed_predictions=True,
    )  # fmt: skip
    grads = pc.param_grads(batched, model, relaxed, x, {"h1": y}, fixed_predictions=True)
    reference = eqx.filter_grad(lambda m: 0.5 * jnp.sum((y - batched(m, x)) ** 2))(model)
    assert rel_error(grads, reference) < 1e-15  # measured 7.4e-17


def rnn(params, xs):
    """h_t = tanh(h_{t-1}) W + x_t U, a node per step; the output y = h_T V."""

    def step(h, x):
        h = pc.node("h", jnp.tanh(h) @ params["w"] + x @ params["u"])
        return h, None

    h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], params["w"].shape[0])), xs)
    return pc.node("y", h @ params["v"])


@pytest.mark.x64
def test_scan_rnn_nodes_are_stacked_and_fpa_equals_backprop():
    k = jax.random.split(jax.random.PRNGKey(3), 5)
    params = {
        "w": jax.random.normal(k[0], (4, 4)) / 2,
        "u": jax.random.normal(k[1], (2, 4)),
        "v": jax.random.normal(k[2], (4, 3)),
    }
    xs = jax.random.normal(k[3], (5, 6, 2))  # time, batch, features
    y = jax.random.normal(k[4], (6, 3))
    ff = pc.forward_init(rnn, params, xs)
    assert ff["h"].shape == (5, 6, 4)
    states = {"h": ff["h"] + 0.05 * jnp.cos(ff["h"])}

    def by_hand(h):  # step t predicted from the state of step t - 1
        previous = jnp.concatenate([jnp.zeros((1, 6, 4)), h[:-1]])
        mu = jnp.tanh(previous) @ params["w"] + xs @ params["u"]
        return 0.5 * jnp.sum((h - mu) ** 2) + 0.5 * jnp.sum((y - h[-1] @ params["v"]) ** 2)

    energy = pc.energy(rnn, params, states, xs, {"y": y})
    np.testing.assert_allclose(energy, by_hand(states["h"]), rtol=1e-14)
    relaxed, _ = pc.infer(
        rnn, params, {"h": ff["h"]}, xs, {"y": y}, steps=6, step_size=1.0, fixed_predictions=True
    )
    grads = pc.param_grads(rnn, params, relaxed, xs, {"y": y}, fixed_predictions=True)
    reference = jax.grad(lambda p: 0.5 * jnp.sum((y - rnn(p, xs)) ** 2))(params)
    assert rel_error(grads, reference) < 1e-15  # measured 1.3e-16


@jax.jit
def inner_block(w, h):
    return pc.node("inner", jnp.tanh(h) @ w)


def with_inner_jit_and_checkpoint(params, x):
    h = pc.node("first", x @ params[0])
    h = inner_block(params[1], h)
    return pc.node("out", jax.checkpoint(lambda h: jnp.tanh(h) @ params[2])(h))


def test_inner_jit_with_a_warm_cache_and_checkpoint_keep_their_nodes():
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    params = [jax.random.normal(k, (3, 3)) for k in keys[:3]]
    x = jax.random.normal(keys[3], (5, 3))
    with_inner_jit_and_checkpoint(params, x)  # warms inner_block's cache outside pcjax
    assert sorted(pc.forward_init(with_inner_jit_and_checkpoint, params, x)) == [
        "first", "inner", "out",
    ]  # fmt: skip
    optimizer = optax.sgd(0.1)
    step = jax.jit(
        lambda p, s: pc.train_step(
            with_inner_jit_and_checkpoint, p, s, x, {"out": jnp.zeros((5, 3))},
            optimizer=optimizer, steps=3,
        )
    )  # fmt: skip
    _, _, info = step(params, optimizer.init(params))
    assert not bool(info.diverged)
    states = pc.forward_init(with_inner_jit_and_checkpoint, params, x)
    shifted = {"first": states["first"], "inner": states["inner"] + 1.0}
    by_hand = 0.5 * jnp.sum(1.0**2 * jnp.ones((5, 3))) + 0.5 * jnp.sum(
        (jnp.tanh(shifted["inner"]) @ params[2]) ** 2
    )
    energy = pc.energy(
        with_inner_jit_and_checkpoint, params, shifted, x, {"out": jnp.zeros((5, 3))}
    )
    np.testing.assert_allclose(energy, by_hand, rtol=1e-6)


def test_a_node_in_a_while_loop_or_cond_is_a_clear_error():
    def looped(params, x):
        return jax.lax.while_loop(lambda h: h.sum() > 1e9, lambda h: pc.node("h", h * 2), x)

    def branched(params, x):
        return jax.lax.cond(x.sum() > 0, lambda h: pc.node("h", h), lambda h: h, x)

    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"'h'.*while"):
        pc.forward_init(looped, None, x)
    with pytest.raises(ValueError, match=r"'h'.*cond"):
        pc.forward_init(branched, None, x)
