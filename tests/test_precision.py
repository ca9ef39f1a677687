"""Precision modules: parameterisation, energy with the log-det term, validation, learning
(gradient fixed point and closed-form EMA), and preconditioned inference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp

import pcjax as pc


def spd(key, dim):
    a = jax.random.normal(key, (dim, dim))
    return a @ a.T / dim + 0.5 * jnp.eye(dim)


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "full"])
def test_modules_weigh_solve_logdet(kind):
    dim = 4
    key = jax.random.PRNGKey(0)
    dense = {
        "scalar": 2.5 * jnp.eye(dim),
        "diagonal": jnp.diag(jnp.array([0.5, 1.0, 2.0, 4.0])),
        "full": spd(key, dim),
    }[kind]
    module = {
        "scalar": pc.ScalarPrecision(2.5),
        "diagonal": pc.DiagonalPrecision(jnp.diag(dense)),
        "full": pc.FullPrecision(dense),
    }[kind]
    e = jax.random.normal(jax.random.PRNGKey(1), (6, dim))
    np.testing.assert_allclose(module.dense(dim), dense, rtol=1e-10)
    np.testing.assert_allclose(module.weigh(e), e @ dense, rtol=1e-10)
    np.testing.assert_allclose(module.solve(e), jnp.linalg.solve(dense, e.T).T, rtol=1e-10)
    per_block = jnp.linalg.slogdet(dense)[1] / (dim if kind == "scalar" else 1)
    np.testing.assert_allclose(module.logdet(), per_block, rtol=1e-10)


def test_energy_includes_logdet_for_modules_only(problem):
    params, x, observed, latent = problem
    shifted = {k: v + 0.1 for k, v in latent.items()}
    p1 = spd(jax.random.PRNGKey(2), 4)
    errors = pc.prediction_errors(mlp, params, shifted, x, observed)
    expected = (
        0.5 * jnp.sum(errors["h0"] ** 2) * 2.0
        + 0.5 * jnp.einsum("bi,ij,bj->", errors["h1"], p1, errors["h1"])
        - 0.5 * 8 * jnp.linalg.slogdet(p1)[1]
        + 0.5 * jnp.sum(errors["h2"] ** 2 * jnp.array([1.0, 2.0, 3.0]))
        - 0.5 * 8 * jnp.sum(jnp.log(jnp.array([1.0, 2.0, 3.0])))
    )
    precision = {
        "h0": 2.0,  # a fixed array: no log-det term
        "h1": pc.FullPrecision(p1),
        "h2": pc.DiagonalPrecision(jnp.array([1.0, 2.0, 3.0])),
    }
    value = pc.energy(mlp, params, shifted, x, observed, precision=precision)
    np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_user_precisions_must_be_spd_and_fit_their_node(problem):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match="symmetric"):
        pc.FullPrecision(jnp.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"positive definite.*smallest eigenvalue is -1"):
        pc.FullPrecision(jnp.array([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="DiagonalPrecision"):
        pc.DiagonalPrecision(jnp.array([1.0, 0.0]))
    with pytest.raises(
        ValueError, match=r"node 'h1' is a FullPrecision of size \(3, 3\).*\(8, 4\)"
    ):
        pc.energy(mlp, params, latent, x, observed, precision={"h1": pc.FullPrecision(jnp.eye(3))})
    with pytest.raises(ValueError, match=r"node 'h2' is a DiagonalPrecision of shape \(4,\)"):
        pc.infer(
            mlp,
            params,
            latent,
            x,
            observed,
            steps=1,
            precision={"h2": pc.DiagonalPrecision(jnp.ones(4))},
        )
    with pytest.raises(ValueError, match=r"node 'h1' has shape \(4, 4\).*FullPrecision"):
        pc.energy(mlp, params, latent, x, observed, precision={"h1": jnp.eye(4)})


def test_gradient_vanishes_at_the_error_covariance():
    """dF/dP = 1/2 sum e e^T - N/2 P^{-1} = 0 at P^{-1} = E[e e^T], for every kind."""
    e = jax.random.normal(jax.random.PRNGKey(3), (50, 3)) @ jnp.array(
        [[1.0, 0.3, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 0.7]]
    )

    def fn(params, x):
        return pc.node("v", jnp.zeros((50, 3)))

    for module in [
        pc.ScalarPrecision(1.0),
        pc.DiagonalPrecision(jnp.ones(3)),
        pc.FullPrecision(jnp.eye(3)),
    ]:
        fitted = module.from_moments(module.moments(e))
        grad = jax.grad(lambda p: pc.energy(fn, None, {}, None, {"v": e}, precision={"v": p}))(
            fitted
        )
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) < 1e-8
        grad_away = jax.grad(lambda p: pc.energy(fn, None, {}, None, {"v": e}, precision={"v": p}))(
            module
        )
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_away)) > 1.0


def regression(params, x):
    return pc.node("v", pc.dense(x, params["w"], params["b"]))


@pytest.fixture(scope="module")
def noisy_regression():
    """v = x W + b + noise with a known full noise covariance."""
    kx, kw, kn = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(kx, (4000, 5))
    w = jax.random.normal(kw, (5, 3))
    chol = jnp.array([[0.3, 0.0, 0.0], [0.4, 1.0, 0.0], [-0.2, 0.1, 2.0]])
    covariance = chol @ chol.T
    v = x @ w + 1.0 + jax.random.normal(kn, (4000, 3)) @ chol.T
    return x, v, covariance


def test_learned_precisions_recover_noise_covariance(noisy_regression):
    """Gradient learning (train_step with precisions inside params) reaches P^{-1} = Sigma."""
    x, v, covariance = noisy_regression
    for kind, target, read in [
        ("diagonal", jnp.diag(covariance), lambda p: 1.0 / p.values()),
        ("full", covariance, lambda p: jnp.linalg.inv(p.matrix())),
    ]:
        prec = (
            pc.DiagonalPrecision(jnp.ones(3))
            if kind == "diagonal"
            else pc.FullPrecision(jnp.eye(3))
        )
        params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3), "precision": prec}
        optimizer = optax.adam(0.05)
        step = jax.jit(
            functools.partial(
                pc.train_step,
                regression,
                optimizer=optimizer,
                steps=1,
                precision=lambda p: {"v": p["precision"]},
            )
        )
        opt_state = optimizer.init(params)
        for _ in range(600):
            params, opt_state, _info = step(params, opt_state, x, {"v": v})
        np.testing.assert_allclose(read(params["precision"]), target, rtol=0.05, atol=0.02)


def test_closed_form_ema_estimate_recovers_noise_covariance(noisy_regression):
    x, v, covariance = noisy_regression
    w, *_ = jnp.linalg.lstsq(jnp.c_[x, jnp.ones(len(x))], v)
    params = {"w": w[:5], "b": w[5]}
    precision = {"v": pc.FullPrecision(jnp.eye(3))}
    ema = None
    for batch in jnp.split(jnp.arange(4000), 20):
        errors = pc.prediction_errors(regression, params, {}, x[batch], {"v": v[batch]})
        precision, ema = pc.update_precision_ema(precision, errors, ema, decay=0.9, damping=0.0)
    np.testing.assert_allclose(
        jnp.linalg.inv(precision["v"].matrix()), covariance, rtol=0.1, atol=0.05
    )


def test_preconditioned_inference_scales_by_inverse_precision(problem):
    params, x, observed, latent = problem
    start = {k: v + 0.3 for k, v in latent.items()}
    p1 = spd(jax.random.PRNGKey(5), 4)
    precision = {"h0": 3.0, "h1": pc.FullPrecision(p1)}
    states, _ = pc.infer(
        mlp,
        params,
        start,
        x,
        observed,
        steps=1,
        step_size=0.1,
        precision=precision,
        precondition=True,
    )
    grads = jax.grad(lambda s: pc.energy(mlp, params, s, x, observed, precision=precision))(start)
    np.testing.assert_allclose(states["h0"], start["h0"] - 0.1 * grads["h0"] / 3.0, rtol=1e-10)
    expected_h1 = start["h1"] - 0.1 * jnp.linalg.solve(p1, grads["h1"].T).T
    np.testing.assert_allclose(states["h1"], expected_h1, rtol=1e-10)
