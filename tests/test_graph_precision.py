"""Precisions computed by the network itself: `pcjax.node(name, mu, precision=p)`.

A heteroscedastic regression network, x -> h = tanh(x W1) -> (mu = h W2, log p = h V + c):

    F(h, y) = 1/2 |h - tanh(x W1)|^2 + 1/2 sum p (y - mu)^2 - 1/2 sum log p,

checked against this hand-written energy, its `jax.grad` (states and parameters, the
precision's dependence on h included), and, for fixed predictions, against backprop of the
Gaussian negative log-likelihood L = 1/2 sum p(x) (y - mu(x))^2 - 1/2 sum log p(x).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcjax as pc

B, DX, DH, DY = 6, 4, 5, 3


def net(params, x):
    h = pc.node("h", jnp.tanh(x @ params["w1"]))
    log_p = h @ params["v"] + params["c"]
    return pc.node("y", h @ params["w2"], precision=jnp.exp(log_p))


def energy_by_hand(params, x, h, y):
    log_p = h @ params["v"] + params["c"]
    hidden = 0.5 * jnp.sum((h - jnp.tanh(x @ params["w1"])) ** 2)
    output = 0.5 * jnp.sum(jnp.exp(log_p) * (y - h @ params["w2"]) ** 2) - 0.5 * jnp.sum(log_p)
    return hidden + output


def loss_by_hand(params, x, y):
    """Backprop's objective: the output energy at the feedforward pass."""
    h = jnp.tanh(x @ params["w1"])
    return energy_by_hand(params, x, h, y)


@pytest.fixture(scope="module")
def problem():
    keys = jax.random.split(jax.random.PRNGKey(3), 7)
    params = {
        "w1": jax.random.normal(keys[0], (DX, DH)) / 2,
        "w2": jax.random.normal(keys[1], (DH, DY)) / 2,
        "v": jax.random.normal(keys[2], (DH, DY)) / 2,
        "c": jax.random.normal(keys[3], (DY,)) / 4,
    }
    x = jax.random.normal(keys[4], (B, DX))
    y = jax.random.normal(keys[5], (B, DY))
    h = jnp.tanh(x @ params["w1"]) + 0.3 * jax.random.normal(keys[6], (B, DH))
    return params, x, y, h


def _close(a, b, tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def test_energy_and_gradients_equal_the_hand_written_ones(problem):
    params, x, y, h = problem

    @jax.jit  # pcjax's side, compiled once rather than op by op
    def ours(params, h):
        energy = lambda s: pc.energy(net, params, {"h": s}, x, {"y": y})  # noqa: E731
        value, field = jax.value_and_grad(energy)(h)
        return value, field, pc.param_grads(net, params, {"h": h}, x, {"y": y})

    @jax.jit
    def by_hand(params, h):
        value, (grads, field) = jax.value_and_grad(energy_by_hand, (0, 2))(params, x, h, y)
        return value, field, grads

    (value, field, grads), (expected, expected_field, expected_grads) = (
        ours(params, h),
        by_hand(params, h),
    )
    np.testing.assert_allclose(value, expected, rtol=1e-6)  # 0 measured
    # The state field includes d log p / dh: the precision depends on the hidden state.
    _close(field, expected_field, 5e-6)  # 2.4e-7 measured
    _close(grads, expected_grads, 5e-6)  # 3.6e-7 measured


def test_outside_pcjax_the_tag_is_the_identity(problem):
    params, x, _, _ = problem

    def plain(params, x):
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    np.testing.assert_array_equal(net(params, x), plain(params, x))
    g = jax.grad(lambda p: jnp.sum(net(p, x) ** 2))(params)
    g_plain = jax.grad(lambda p: jnp.sum(plain(p, x) ** 2))(params)
    _close({k: g[k] for k in g_plain}, g_plain, 1e-6)
    assert not np.any(np.asarray(g["v"]))  # the precision does not change the output


def _sample_net(params, x):
    """Per sample, under jax.vmap: a per-sample scalar precision (broadcast over features)
    and, in a two-step lax.scan, a constant precision (unbatched under the vmap)."""

    def layer(h, w):
        return pc.node("z", jnp.tanh(h @ w), precision=2.0), None

    h, _ = jax.lax.scan(layer, x, params["ws"])
    scale = jnp.exp(h @ params["u"])  # () per sample
    return pc.node("y", h @ params["w2"], precision=scale)


def test_vmap_and_scan(problem):
    _, _, y, _ = problem
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    params = {
        "ws": jax.random.normal(keys[0], (2, DX, DX)) / 2,
        "u": jax.random.normal(keys[1], (DX,)) / 2,
        "w2": jax.random.normal(keys[2], (DX, DY)) / 2,
    }
    x = jax.random.normal(keys[3], (B, DX))
    fn = jax.vmap(_sample_net, in_axes=(None, 0))
    z = pc.forward_init(fn, params, x)["z"] + 0.1  # (2, B, DX): scan axis first, then batch

    def by_hand(params, z):
        z1 = jnp.tanh(x @ params["ws"][0])
        z2 = jnp.tanh(z[0] @ params["ws"][1])
        # Precision 2: 2/2 |e|^2 - 1/2 log 2 per entry (the log term is kept for every
        # in-graph precision, constant or not).
        hidden = jnp.sum((z[0] - z1) ** 2) + jnp.sum((z[1] - z2) ** 2) - 0.5 * z.size * jnp.log(2.0)
        scale = jnp.exp(z[1] @ params["u"])[:, None]
        output = 0.5 * jnp.sum(scale * (y - z[1] @ params["w2"]) ** 2)
        return hidden + output - 0.5 * DY * jnp.sum(jnp.log(scale))

    # Each side compiled once (eagerly, every operation of the energy and its gradient
    # compiles on its own).
    ours = jax.jit(jax.value_and_grad(lambda s: pc.energy(fn, params, {"z": s}, x, {"y": y})))
    truth = jax.jit(jax.value_and_grad(by_hand, 1))
    (value, field), (expected, expected_field) = ours(z), truth(params, z)
    np.testing.assert_allclose(value, expected, rtol=1e-5)  # 1.5e-6 measured
    _close(field, expected_field, 5e-6)


def test_error_parameterised_relaxes_to_the_same_states(problem):
    params, x, y, _ = problem
    solver = pc.GradientDescent(300, step_size=0.2)

    @jax.jit  # both relaxations in one compile rather than op by op
    def relax(params, x, y):
        start = {"h": pc.forward_init(net, params, x)["h"]}
        states, _ = pc.infer(net, params, start, x, {"y": y}, solver=solver)
        errors_run, _ = pc.infer(
            pc.error_parameterised(net), params, start, x, {"y": y}, solver=solver
        )
        return states, errors_run

    states, errors_run = relax(params, x, y)
    field = jax.grad(energy_by_hand, 2)(params, x, states["h"], y)
    assert float(jnp.max(jnp.abs(field))) < 5e-6  # the standard run converged: 2.7e-7
    _close(errors_run["h"], states["h"], 5e-6)  # 4.8e-7 measured


def test_fixed_predictions_reproduce_backprop_of_the_gaussian_likelihood(problem):
    params, x, y, _ = problem
    model = pc.fixed_predictions(net)
    start = pc.forward_init(net, params, x)
    solver = pc.GradientDescent(40, step_size=0.5)
    states, _ = pc.infer(model, params, {"h": start["h"]}, x, {"y": y}, solver=solver)
    grads = pc.param_grads(model, params, states, x, {"y": y})
    # The precision's path (d log p / dh, d log p / dv, dc) is part of backprop's gradient.
    _close(grads, jax.grad(loss_by_hand)(params, x, y), 5e-6)  # 4.8e-7 measured


def test_training_step_learns_the_precision(problem):
    params, x, y, _ = problem
    optimizer = optax.sgd(0.1)
    step = eqx.filter_jit(
        pc.make_train_step(net, pc.Equilibrium(pc.GradientDescent(4, step_size=0.2)), optimizer)
    )
    new, _, info = step(params, optimizer.init(params), x, {"y": y})
    assert not bool(info.diverged)
    assert float(jnp.max(jnp.abs(new["c"] - params["c"]))) > 1e-3  # the precision learns


def test_bad_input_is_refused(problem):
    params, x, y, h = problem

    def shape_mismatch(params, x):
        return pc.node("y", x @ params["w1"], precision=jnp.ones((B, 2)))

    with pytest.raises(ValueError, match=r"'y'.*\(6, 2\).*\(6, 5\)"):
        pc.forward_init(shape_mismatch, params, x)

    def with_energy(params, x):
        return pc.node("y", x, energy=pc.cross_entropy, precision=1.0)

    with pytest.raises(ValueError, match="custom energy and a precision"):
        pc.forward_init(with_energy, params, x)

    def integer(params, x):
        return pc.node("y", x, precision=jnp.ones(x.shape, jnp.int32))

    with pytest.raises(TypeError, match="floating-point"):
        pc.forward_init(integer, params, x)

    with pytest.raises(ValueError, match=r"\['y'\] compute their precision.*also pass"):
        pc.energy(net, params, {"h": h}, x, {"y": y}, precision={"y": 2.0})
    with pytest.raises(ValueError, match=r"fisher_statistics.*\['y'\]"):
        pc.fisher_statistics(net, params, {"h": h}, x, {"y": y}, mode="matrix_free")
    with pytest.raises(ValueError, match=r"preconditioned.*\['y'\]"):
        pc.infer(
            pc.preconditioned(net), params, {"h": h}, x, {"y": y}, solver=pc.GradientDescent(1)
        )
    nudged = pc.make_train_step(net, pc.Nudged(pc.GradientDescent(2)), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"Nudged.*\['y'\]"):
        nudged(params, optax.sgd(0.1).init(params), x, {"y": y})
