"""Core API: tagging, energy, state gradients, inference, parameter gradients."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_mlp, mlp, rel_error

import pcjax as pc


def test_node_is_identity_outside_pcjax():
    value = jnp.arange(3.0)
    assert pc.node("a", value) is value


def test_forward_init_records_every_node(problem):
    params, x, _, _ = problem
    nodes = pc.forward_init(mlp, params, x)
    assert sorted(nodes) == ["h0", "h1", "h2"]
    np.testing.assert_allclose(nodes["h2"], mlp(params, x))
    np.testing.assert_allclose(nodes["h1"], jnp.tanh(nodes["h0"]) @ params[1][0] + params[1][1])


def test_energy_matches_formula_with_precisions(problem):
    params, x, observed, latent = problem
    shifted = {k: v + 0.3 for k, v in latent.items()}
    precision = {"h0": 2.0, "h1": jnp.array([0.5, 1.0, 2.0, 3.0]), "h2": 0.25}
    mu0 = x @ params[0][0] + params[0][1]
    mu1 = jnp.tanh(shifted["h0"]) @ params[1][0] + params[1][1]
    mu2 = jnp.tanh(shifted["h1"]) @ params[2][0] + params[2][1]
    expected = 0.5 * (
        2.0 * jnp.sum((shifted["h0"] - mu0) ** 2)
        + jnp.sum(precision["h1"] * (shifted["h1"] - mu1) ** 2)
        + 0.25 * jnp.sum((observed["h2"] - mu2) ** 2)
    )
    value = pc.energy(mlp, params, shifted, x, observed, precision=precision)
    np.testing.assert_allclose(value, expected, rtol=1e-6)  # float32; measured 0
    errors = pc.prediction_errors(mlp, params, shifted, x, observed)
    np.testing.assert_allclose(errors["h1"], shifted["h1"] - mu1, rtol=1e-6)  # measured 0
    # At the feedforward states only the clamped output carries error.
    at_ff = pc.energy(mlp, params, latent, x, observed)
    np.testing.assert_allclose(at_ff, 0.5 * jnp.sum((observed["h2"] - mlp(params, x)) ** 2))


def test_state_gradient_matches_finite_differences_and_formula(problem64):
    params, x, observed, latent = problem64
    states = {k: v + 0.2 * jnp.cos(v) for k, v in latent.items()}
    precision = {"h0": 1.5, "h1": jnp.array([0.5, 1.0, 2.0, 3.0]), "h2": 0.7}

    def f(s):
        return pc.energy(mlp, params, s, x, observed, precision=precision)

    grads = jax.grad(f)(states)
    # Central finite differences on a few coordinates of each state.
    eps = 1e-6
    for name in states:
        for index in [(0, 0), (3, 1), (7, 2)]:
            bump = jnp.zeros_like(states[name]).at[index].set(eps)
            plus = f({**states, name: states[name] + bump})
            minus = f({**states, name: states[name] - bump})
            np.testing.assert_allclose(
                grads[name][index], (plus - minus) / (2 * eps), rtol=1e-8
            )  # 1.7e-9
    # dF/dx_i = P_i e_i - J_c^T P_c e_c with J_c the Jacobian of the child's prediction.
    e = pc.prediction_errors(mlp, params, states, x, observed)
    pe = {k: precision[k] * e[k] for k in e}
    w1, w2 = params[1][0], params[2][0]
    child_h1 = (pe["h1"] @ w1.T) * (1 - jnp.tanh(states["h0"]) ** 2)
    child_h2 = (pe["h2"] @ w2.T) * (1 - jnp.tanh(states["h1"]) ** 2)
    np.testing.assert_allclose(grads["h0"], pe["h0"] - child_h1, rtol=1e-13)  # measured 2.7e-15
    np.testing.assert_allclose(grads["h1"], pe["h1"] - child_h2, rtol=1e-13)  # measured 2.5e-16


def backprop_grads(params, x, y, gamma=1.0):
    return jax.grad(lambda p: 0.5 * gamma * jnp.sum((y - mlp(p, x)) ** 2))(params)


@pytest.mark.parametrize(
    "dtype, rtol",
    [
        pytest.param(jnp.float64, 1e-15, marks=pytest.mark.x64),  # measured 1.6e-16
        (jnp.float32, 1e-6),  # measured 1.1e-7
    ],
)
def test_fixed_predictions_equal_backprop(dtype, rtol):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    params = init_mlp(k1, [12, 10, 8, 6, 4], dtype)
    x = jax.random.normal(k2, (16, 12), dtype)
    y = jax.random.normal(k3, (16, 4), dtype)
    observed = {"h3": y}

    @jax.jit  # pcjax's side, compiled once rather than op by op
    def fixed_predictions(params, x, observed):
        ff = pc.forward_init(mlp, params, x)
        latent = {k: v for k, v in ff.items() if k != "h3"}
        # Step size 1 reaches the exact equilibrium in as many steps as the graph is deep.
        states, info = pc.infer(
            pc.fixed_predictions(mlp),
            params,
            latent,
            x,
            observed,
            solver=pc.GradientDescent(3, step_size=1.0),
        )
        grads = pc.param_grads(pc.fixed_predictions(mlp), params, states, x, observed)
        return ff, states, info, grads

    @jax.jit  # the ground truth: backprop's parameter and node gradients
    def backprop(params, x, y, h1):
        node_grads = jax.grad(lambda h: 0.5 * jnp.sum((y - mlp_from(params, h)) ** 2))(h1)
        return backprop_grads(params, x, y), node_grads

    ff, states, info, grads = fixed_predictions(params, x, observed)
    assert info.energy.dtype == dtype and states["h0"].dtype == dtype
    expected, node_grads = backprop(params, x, y, ff["h1"])
    assert rel_error(grads, expected) < rtol
    # The equilibrium errors are minus the backprop gradients w.r.t. each node.
    errors = {k: states[k] - ff[k] for k in states}
    assert rel_error(errors["h1"], -node_grads) < rtol


def mlp_from(params, h1):
    """The tail of the 4-layer MLP from node h1 on (for node-wise backprop gradients)."""
    h = h1
    for w, b in params[2:]:
        h = jnp.tanh(h) @ w + b
    return h


def test_standard_pc_approaches_backprop_as_output_precision_shrinks(problem64):
    params, x, observed, latent = problem64
    reference = backprop_grads(params, x, observed["h2"])

    @jax.jit  # the precision is an argument: one compile serves every gamma
    def scaled_grads(gamma):
        states, info = pc.infer(
            mlp,
            params,
            latent,
            x,
            observed,
            precision={"h2": gamma},
            solver=pc.GradientDescent(3000, step_size=0.2, tol=1e-13),
        )
        grads = pc.param_grads(mlp, params, states, x, observed, precision={"h2": gamma})
        return jax.tree.map(lambda g: g / gamma, grads), info.steps

    errors = []
    for gamma in [1.0, 0.1, 0.01, 0.001]:
        grads, steps = scaled_grads(jnp.asarray(gamma))
        assert int(steps) < 3000  # reached the equilibrium, not the step cap
        errors.append(rel_error(grads, reference))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1 and errors[-1] < 0.03, errors


@pytest.mark.x64
def test_linear_gaussian_chain_reaches_closed_form_posterior():
    """z ~ N(m, 1/p0), h = A z + noise (P1), v = B h + noise (P2): posterior mean of (z, h)."""
    kz, _kh, ka, kb, kv = jax.random.split(jax.random.PRNGKey(2), 5)
    dz, dh, dv, batch = 3, 4, 5, 6
    params = {
        "m": jax.random.normal(kz, (dz,)),
        "A": jax.random.normal(ka, (dz, dh)) / 2,
        "B": jax.random.normal(kb, (dh, dv)) / 2,
    }
    p0, p1, p2 = 2.0, jnp.array([1.0, 3.0, 0.5, 2.0]), 4.0

    def chain(params, batch_size):
        z = pc.node("z", jnp.broadcast_to(params["m"], (batch_size, dz)))
        h = pc.node("h", z @ params["A"])
        return pc.node("v", h @ params["B"])

    v = jax.random.normal(kv, (batch, dv))
    precision = {"z": p0, "h": p1, "v": p2}
    init = {k: jnp.zeros_like(val) for k, val in pc.forward_init(chain, params, batch).items()}
    del init["v"]
    states, info = pc.infer(
        chain,
        params,
        init,
        batch,
        {"v": v},
        precision=precision,
        solver=pc.GradientDescent(5000, step_size=0.1, tol=1e-12),
    )
    assert not info.diverged and int(info.steps) < 5000
    # Dense solve of the quadratic energy: Lambda [z; h] = eta for each sample.
    a, b = params["A"], params["B"]
    d1 = jnp.diag(p1)
    lam = jnp.block(
        [
            [p0 * jnp.eye(dz) + a @ d1 @ a.T, -a @ d1],
            [-d1 @ a.T, d1 + p2 * b @ b.T],
        ]
    )
    eta = jnp.concatenate([jnp.broadcast_to(p0 * params["m"], (batch, dz)), p2 * v @ b.T], axis=1)
    posterior = jnp.linalg.solve(lam, eta.T).T
    np.testing.assert_allclose(states["z"], posterior[:, :dz], atol=1e-9)
    np.testing.assert_allclose(states["h"], posterior[:, dz:], atol=1e-9)


def test_state_updates_do_not_depend_on_batch_size(problem):
    params, x, observed, latent = problem
    full, _ = pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(5))
    one = {k: v[:1] for k, v in latent.items()}
    single, _ = pc.infer(
        mlp, params, one, x[:1], {"h2": observed["h2"][:1]}, solver=pc.GradientDescent(5)
    )
    for name in full:
        np.testing.assert_allclose(single[name], full[name][:1], rtol=5e-6)  # float32: 9.5e-7


def test_inference_lowers_energy_and_records_it(problem):
    params, x, observed, latent = problem
    states, info = pc.infer(
        mlp, params, latent, x, observed, solver=pc.GradientDescent(20, record_energy=True)
    )
    assert info.energies.shape == (20,)
    assert np.all(np.diff(np.asarray(info.energies)) < 0)
    assert float(info.energy) < float(info.energies[-1])
    assert not bool(info.diverged) and int(info.steps) == 20
    np.testing.assert_allclose(info.energy, pc.energy(mlp, params, states, x, observed))


def test_tolerance_stop_and_any_optax_optimizer(problem):
    params, x, observed, latent = problem
    states, info = pc.infer(
        mlp,
        params,
        latent,
        x,
        observed,
        solver=pc.GradientDescent(500, optax.adam(0.05), tol=1e-6, record_energy=True),
    )
    taken = int(info.steps)
    assert 0 < taken < 500
    # The stop: every sample's state gradient has a norm of at most tol.
    grads = jax.grad(lambda s: pc.energy(mlp, params, s, x, observed))(states)
    per_sample = jnp.sqrt(sum(jnp.sum(g**2, axis=1) for g in grads.values()))
    assert float(jnp.max(per_sample)) <= 1e-6
    assert np.all(np.isnan(np.asarray(info.energies[taken:])))
    assert np.all(np.isfinite(np.asarray(info.energies[:taken])))


def test_divergence_is_reported_and_can_raise(problem):
    params, x, observed, latent = problem
    _, info = pc.infer(
        mlp, params, latent, x, observed, solver=pc.GradientDescent(200, step_size=10.0)
    )
    assert bool(info.diverged)
    bad = {"h2": observed["h2"].at[0, 0].set(jnp.nan)}
    _, info = pc.infer(mlp, params, latent, x, bad, solver=pc.GradientDescent(2))
    assert bool(info.diverged)
    with pytest.raises(Exception, match="non-finite"):
        states, _ = pc.infer(mlp, params, latent, x, bad, solver=pc.GradientDescent(2, throw=True))
        jax.block_until_ready(states)


def test_memory_does_not_grow_with_steps(problem):
    params, x, observed, latent = problem

    def temp_bytes(steps, unroll=None):
        run = jax.jit(
            lambda s: pc.infer(
                mlp, params, s, x, observed, solver=pc.GradientDescent(steps, unroll=unroll)
            )[0]
        )
        analysis = run.lower(latent).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    # A rolled loop (the default past 16 steps) needs the same memory for any number of steps.
    assert temp_bytes(1000) == temp_bytes(17) == temp_bytes(10, unroll=1)
