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


@pytest.mark.x64
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
    rtol = 4e-15  # measured 7.2e-16 (full; exact for scalar and diagonal)
    np.testing.assert_allclose(module.dense(dim), dense, rtol=rtol)
    np.testing.assert_allclose(module.weigh(e), e @ dense, rtol=rtol)
    np.testing.assert_allclose(module.solve(e), jnp.linalg.solve(dense, e.T).T, rtol=rtol)
    per_block = jnp.linalg.slogdet(dense)[1] / (dim if kind == "scalar" else 1)
    np.testing.assert_allclose(module.logdet(), per_block, rtol=rtol)


def test_energy_includes_logdet_for_modules_only(problem64):
    params, x, observed, latent = problem64
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
    np.testing.assert_allclose(value, expected, rtol=2e-15)  # measured 2.0e-16


def test_user_precisions_must_be_spd_and_fit_their_node(problem):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match="symmetric"):
        pc.FullPrecision(jnp.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"positive definite.*smallest eigenvalue is -1"):
        pc.FullPrecision(jnp.array([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="DiagonalPrecision"):
        pc.DiagonalPrecision(jnp.array([1.0, 0.0]))
    with pytest.raises(
        ValueError, match=r"FullPrecision: `dtype` must be a floating-point dtype, got int32"
    ):
        pc.FullPrecision(jnp.eye(2), dtype=jnp.int32)
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
            precision={"h2": pc.DiagonalPrecision(jnp.ones(4))},
            solver=pc.GradientDescent(1),
        )
    with pytest.raises(ValueError, match=r"node 'h1' has shape \(4, 4\).*FullPrecision"):
        pc.energy(mlp, params, latent, x, observed, precision={"h1": jnp.eye(4)})


@pytest.mark.x64
def test_gradient_vanishes_at_the_error_covariance():
    """dF/dP = 1/2 sum e e^T - N/2 P^{-1} = 0 at P^{-1} = E[e e^T], for every kind."""
    e = jax.random.normal(jax.random.PRNGKey(3), (50, 3)) @ jnp.array(
        [[1.0, 0.3, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 0.7]]
    )

    def fn(params, x):
        return pc.node("v", jnp.zeros((50, 3)))

    grad_fn = jax.jit(
        jax.grad(lambda p: pc.energy(fn, None, {}, None, {"v": e}, precision={"v": p}))
    )
    for module in [
        pc.ScalarPrecision(1.0),
        pc.DiagonalPrecision(jnp.ones(3)),
        pc.FullPrecision(jnp.eye(3)),
    ]:
        grad = grad_fn(module.from_moments(module.moments(e)))
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) < 1e-13  # 1.4e-14
        grad_away = grad_fn(module)
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_away)) > 10.0  # 86


def regression(params, x):
    return pc.node("v", pc.dense(x, params["w"], params["b"]))


def exact_noise(rng: np.random.Generator, regressors: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """Gaussian noise, made orthogonal to `regressors` and whitened, times `chol`: its mean
    second moment is exactly $L L^\\top$ and a least-squares fit on `regressors` leaves it as the
    residual, so the maximum-likelihood noise covariance is exactly $L L^\\top$."""
    z = rng.standard_normal((len(regressors), chol.shape[0]))
    basis, _ = np.linalg.qr(regressors)
    z -= basis @ (basis.T @ z)
    z = np.linalg.solve(np.linalg.cholesky(z.T @ z / len(z)), z.T).T
    return z @ chol.T


BATCHES = 4


@pytest.fixture(scope="module")
def noisy_regression():
    """v = x W + 1 + noise, float32, 4 batches of 100, with a known full noise covariance that
    each batch's noise has exactly (built in float64 NumPy, whatever JAX's dtype setting)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4 * 100, 5))
    w = rng.standard_normal((5, 3))
    chol = np.array([[0.3, 0.0, 0.0], [0.4, 1.0, 0.0], [-0.2, 0.1, 2.0]])
    noise = np.concatenate(
        [exact_noise(rng, np.c_[xb, np.ones(len(xb))], chol) for xb in np.split(x, BATCHES)]
    )
    v = x @ w + 1.0 + noise
    return jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32), w, chol @ chol.T


def two_regressions(params, x):
    """Two independent linear nodes, one per precision kind, learned in one compiled step."""
    for name in ("diagonal", "full"):
        pc.node(name, pc.dense(x, params[name]["w"], params[name]["b"]))


def test_learned_precisions_recover_noise_covariance(noisy_regression):
    """Gradient learning (a training step with precisions inside params) reaches
    P^{-1} = Sigma."""
    x, v, _, covariance = noisy_regression
    start = {
        "diagonal": pc.DiagonalPrecision(jnp.ones(3)),
        "full": pc.FullPrecision(jnp.eye(3)),
    }
    params = {
        k: {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3), "precision": p} for k, p in start.items()
    }
    optimizer = optax.adam(0.05)
    step = jax.jit(
        pc.make_train_step(
            two_regressions,
            pc.Equilibrium(pc.GradientDescent(1)),
            optimizer,
            precision=lambda p: {k: p[k]["precision"] for k in start},
        )
    )
    opt_state = optimizer.init(params)
    for _ in range(400):
        params, opt_state, _info = step(params, opt_state, x, {"diagonal": v, "full": v})
    rtol = 1e-5  # measured 1.1e-6 (diagonal) and 1.0e-6 (full)
    np.testing.assert_allclose(
        1.0 / params["diagonal"]["precision"].values(), np.diag(covariance), rtol=rtol
    )
    np.testing.assert_allclose(
        jnp.linalg.inv(params["full"]["precision"].matrix()), covariance, rtol=rtol
    )


def test_closed_form_ema_estimate_recovers_noise_covariance(noisy_regression):
    x, v, w, covariance = noisy_regression
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.ones(3)}
    precision = {"v": pc.FullPrecision(jnp.eye(3))}
    ema = None
    for xb, vb in zip(jnp.split(x, BATCHES), jnp.split(v, BATCHES)):
        errors = pc.prediction_errors(regression, params, {}, xb, {"v": vb})
        precision, ema = pc.update_precision_ema(precision, errors, ema, decay=0.9, damping=0.0)
    fitted = jnp.linalg.inv(precision["v"].matrix())
    np.testing.assert_allclose(fitted, covariance, rtol=1e-5)  # measured 1.7e-6
    # One more batch with twice the noise (moments 4 Sigma), from running moments Sigma:
    # M = 0.75 Sigma + 0.25 (4 Sigma) = 1.75 Sigma, and P = (M + 0.1 I)^{-1}.
    doubled = 2.0 * errors["v"]
    precision, _ = pc.update_precision_ema(
        {"d": pc.DiagonalPrecision(jnp.ones(3)), "f": pc.FullPrecision(jnp.eye(3))},
        {"d": doubled, "f": doubled},
        {"d": jnp.diag(jnp.asarray(covariance, jnp.float32)), "f": ema["v"]},
        decay=0.75,
        damping=0.1,
    )
    rtol = 2e-6  # measured 3.9e-7 (full) and 6.1e-8 (diagonal)
    expected = np.linalg.inv(1.75 * covariance + 0.1 * np.eye(3))
    np.testing.assert_allclose(precision["f"].matrix(), expected, rtol=rtol)
    expected = 1.0 / (1.75 * np.diag(covariance) + 0.1)
    np.testing.assert_allclose(precision["d"].values(), expected, rtol=rtol)


def test_preconditioned_inference_scales_by_inverse_precision(problem64):
    params, x, observed, latent = problem64
    start = {k: v + 0.3 for k, v in latent.items()}
    p1 = spd(jax.random.PRNGKey(5), 4)
    precision = {"h0": 3.0, "h1": pc.FullPrecision(p1)}
    states, _ = pc.infer(
        pc.preconditioned(mlp),
        params,
        start,
        x,
        observed,
        precision=precision,
        solver=pc.GradientDescent(1, step_size=0.1),
    )
    grads = jax.grad(lambda s: pc.energy(mlp, params, s, x, observed, precision=precision))(start)
    rtol = 1e-14  # measured 7.1e-16 (h0) and 1.9e-15 (h1)
    np.testing.assert_allclose(states["h0"], start["h0"] - 0.1 * grads["h0"] / 3.0, rtol=rtol)
    expected_h1 = start["h1"] - 0.1 * jnp.linalg.solve(p1, grads["h1"].T).T
    np.testing.assert_allclose(states["h1"], expected_h1, rtol=rtol)


# ---------------------------------------------------------------- dtypes (issue 10, item 9)


@pytest.mark.x64
def test_modules_keep_the_dtype_of_their_values():
    """A float32 array gives float32 parameters even with float64 on; `dtype=` overrides;
    Python numbers take JAX's default float (float64 here); `from_moments` keeps the dtype."""
    f32, f64 = jnp.float32, jnp.float64
    cases = [
        (pc.ScalarPrecision(jnp.float32(2.0)), f32),
        (pc.ScalarPrecision(2.0), f64),
        (pc.ScalarPrecision(2.0, dtype=f32), f32),
        (pc.DiagonalPrecision(jnp.ones(3, f32)), f32),
        (pc.DiagonalPrecision(np.ones(3, np.float32)), f32),
        (pc.DiagonalPrecision(jnp.ones(3, f32), dtype=f64), f64),
        (pc.DiagonalPrecision([1, 2, 3]), f64),
        (pc.FullPrecision(jnp.eye(3, dtype=f32)), f32),
        (pc.FullPrecision(jnp.eye(3), dtype=f32), f32),
    ]
    for module, dtype in cases:
        assert [leaf.dtype for leaf in jax.tree.leaves(module)] == [dtype], module
        shape = jnp.shape(module.moments(jnp.ones((2, 3))))
        moments = 0.5 * (jnp.eye(3) if len(shape) == 2 else jnp.ones(shape))  # float64
        refit = module.from_moments(moments)
        assert [leaf.dtype for leaf in jax.tree.leaves(refit)] == [dtype], refit
        assert refit.dense(3).dtype == dtype
        np.testing.assert_allclose(refit.dense(3), 2.0 * np.eye(3), rtol=1e-6)  # measured 1.2e-7


F32 = {jnp.dtype(jnp.float32)}


def _dtypes(thunk) -> set:
    """The dtypes of the leaves `thunk()` returns; dtypes are fixed when JAX traces, so
    `jax.eval_shape` finds them (and trace-time errors) without compiling anything."""
    return {leaf.dtype for leaf in jax.tree.leaves(jax.eval_shape(thunk))}


def _float32_precisions() -> dict:
    """Precision modules built from float32 arrays (and a Python float with `dtype=`)."""
    return {
        "h0": pc.ScalarPrecision(2.0, dtype=jnp.float32),
        "h1": pc.FullPrecision(jnp.eye(4, dtype=jnp.float32)),
        "h2": pc.DiagonalPrecision(jnp.ones(3, jnp.float32)),
    }


@pytest.mark.x64
def test_float32_model_with_float32_precisions_stays_float32_under_x64(problem):
    """With float64 on, a float32 model and float32 precision modules give a float32 energy,
    float32 learned precisions, and a matrix-free Fisher (whose transpose needs cotangents of
    the predictions' dtype) that runs."""
    params, x, observed, latent = problem
    precision = _float32_precisions()
    assert _dtypes(lambda: pc.energy(mlp, params, latent, x, observed, precision=precision)) == F32
    learned = {"net": params, "precision": precision}
    optimizer = optax.sgd(0.01)
    step = pc.make_train_step(
        lambda p, x: mlp(p["net"], x),
        pc.Equilibrium(pc.GradientDescent(2)),
        optimizer,
        precision=lambda p: p["precision"],
    )
    new, _, info = jax.eval_shape(lambda: step(learned, optimizer.init(learned), x, observed))
    assert info.energy.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(new)} == F32
    fisher = functools.partial(pc.fisher_statistics, mlp, params, latent, x, observed)
    assert _dtypes(lambda: fisher(precision=precision, mode="matrix_free")(params)) == F32


@pytest.mark.x64
def test_precisions_of_another_dtype_keep_the_errors_dtype(problem):
    """float64 precisions (built from float64 arrays, or from Python floats with float64 on)
    weigh float32 errors in float32: the products, solves and log-det terms, hence the energy,
    are float32, and the matrix-free Fisher (whose transpose needs cotangents of the
    predictions' dtype) runs."""
    params, x, observed, latent = problem
    precision = {
        "h0": np.full(5, 2.0),  # a fixed float64 array
        "h1": pc.FullPrecision(np.eye(4)),
        "h2": pc.DiagonalPrecision(np.ones(3)),
    }
    for name, dim in (("h1", 4), ("h2", 3)):
        errors = jnp.ones((8, dim), jnp.float32)
        assert precision[name].weigh(errors).dtype == jnp.float32, name
        assert precision[name].solve(errors).dtype == jnp.float32, name
    assert _dtypes(lambda: pc.energy(mlp, params, latent, x, observed, precision=precision)) == F32
    fisher = functools.partial(pc.fisher_statistics, mlp, params, latent, x, observed)
    assert _dtypes(lambda: fisher(precision=precision, mode="matrix_free")(params)) == F32
