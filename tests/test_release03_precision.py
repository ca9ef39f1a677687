"""Regression tests of issue 29 (release 0.3): precisions, checkpoints, presets, energy
transformations in every function that takes `fn`, the Kronecker solve."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcjax as pc


def test_plain_array_precision_in_params_stays_fixed():
    # Issue 29 item 5: a plain array returned by `precision=lambda p: ...` is a fixed
    # precision; before the fix SGD trained it without its log-det term (here it went
    # negative: "the precision of node 'y' must be positive; its smallest entry is -0.057").
    def fn(params, x):
        return pc.node("y", x @ params["w"])

    params = {"w": jnp.ones((3, 2)), "prec": jnp.array([2.0, 1.0])}
    x = jnp.arange(12.0).reshape(4, 3) / 10
    observed = {"y": jnp.ones((4, 2)) * 3.0}
    step = pc.make_train_step(
        fn,
        pc.Equilibrium(pc.GradientDescent(2)),
        optax.sgd(0.05),
        precision=lambda p: {"y": p["prec"]},
    )
    opt_state = optax.sgd(0.05).init(params)
    for _ in range(40):
        params, opt_state, _ = step(params, opt_state, x, observed)
    np.testing.assert_array_equal(params["prec"], [2.0, 1.0])


def test_kronecker_solve_rank_deficient_float32_matches_float64_dense():
    # Issue 29 item 11: E[h h^T] of a batch of 8 over 64 inputs has rank 8; float32 eigh gives
    # its zero eigenvalues as noise of either sign, which (times P = 1e4) swamped the damping:
    # relative error 1.96 before the fix (9.8 at batch 16, 512 inputs), 6.1e-7 after.
    rng = np.random.default_rng(0)
    h = rng.standard_normal((8, 64))
    inputs, outputs = h.T @ h / 8, 1e4 * np.eye(2)
    grad = rng.standard_normal((64, 2))
    damping = 1e-3
    factors = pc.KroneckerFactors(
        jnp.asarray(inputs, jnp.float32), jnp.asarray(outputs, jnp.float32)
    )
    optimizer = pc.natural_gradient("kronecker", damping=damping)
    params = {"w": jnp.zeros((64, 2), jnp.float32)}
    update, _ = optimizer.update(
        {"w": jnp.asarray(grad, jnp.float32)}, optimizer.init(params), fisher={"w": factors}
    )
    # float64 dense solve of (A (x) P + lambda I) vec(V) = vec(g), with G[V] = A V P
    dense = np.kron(inputs, outputs) + damping * np.eye(128)
    expected = np.linalg.solve(dense, grad.reshape(-1)).reshape(64, 2)
    error = np.linalg.norm(np.asarray(update["w"], np.float64) - expected) / np.linalg.norm(
        expected
    )
    assert error < 1e-5  # measured 6.1e-7


@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_exponential_precision_update_does_not_underflow_float32(kind):
    # Issue 29 item 12: errors of std 30, eta 0.5, P = 1: exp(0.5 (1 - 900)) underflowed to
    # P = 0 (log det -inf) in float32.
    errors = {"y": 30.0 * jax.random.normal(jax.random.key(0), (256, 2), jnp.float32)}
    module = (
        pc.DiagonalPrecision(jnp.ones(2, jnp.float32))
        if kind == "diagonal"
        else pc.FullPrecision(jnp.eye(2, dtype=jnp.float32))
    )
    new = pc.update_precision_natural({"y": module}, errors, step_size=0.5, method="exponential")[
        "y"
    ]
    logdet = float(new.logdet())
    assert np.isfinite(logdet)
    # the floor: no eigenvalue shrinks by more than sqrt(tiny) = 1.08e-19 in one step
    smallest = 0.5 * np.log(np.finfo(np.float32).tiny)
    assert logdet >= 2 * smallest - 1e-3 * abs(smallest)
    assert np.all(np.linalg.eigvalsh(np.asarray(new.dense(2), np.float64)) > 0)
    # and the flow recovers towards the fixed point P = 1/900 from there
    step = jax.jit(
        lambda m: pc.update_precision_natural({"y": m}, errors, step_size=0.5, method="exponential")
    )
    for _ in range(200):
        new = step(new)["y"]
    moments = np.asarray(jnp.mean(errors["y"] ** 2, axis=0))
    np.testing.assert_allclose(np.diag(np.asarray(new.dense(2))), 1 / moments, rtol=0.05)


def test_update_precision_ema_refuses_plain_array_clearly():
    # Issue 29 item 13: a plain array raised a raw AttributeError ('ArrayImpl' ... 'moments').
    errors = {"y": jnp.ones((4, 2))}
    with pytest.raises(
        TypeError, match=r"node .y. has a fixed precision \(ArrayImpl\).*not a precision"
    ):
        pc.update_precision_ema({"y": jnp.ones(2)}, errors)
    with pytest.raises(TypeError, match=r"node 'y' has a fixed precision \(float\)"):
        pc.error_moments({"y": 2.0}, errors)


def test_diagonal_precision_shape_one_broadcasts_over_features():
    # Issue 29 item 13: DiagonalPrecision of shape (1,) on a (4, 2) node was refused although
    # its docstring says the values broadcast.
    def fn(params, x):
        return pc.node("y", x @ params)

    w = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    x = jnp.array([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5], [2.0, 2.0]])
    y = jnp.array([[0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [0.5, 0.0]])
    p = 2.5
    value = pc.energy(fn, w, {}, x, {"y": y}, precision={"y": pc.DiagonalPrecision(jnp.array([p]))})
    e = y - x @ w
    expected = 0.5 * p * jnp.sum(e**2) - 0.5 * 8 * jnp.log(p)  # 8 entries, each its own p
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    # its closed-form estimate averages e^2 over every entry it covers
    new, _ = pc.update_precision_ema(
        {"y": pc.DiagonalPrecision(jnp.array([p]))}, {"y": e}, damping=0.0
    )
    np.testing.assert_allclose(new["y"].values(), [1 / jnp.mean(e**2)], rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        pc.energy(fn, w, {}, x, {"y": y}, precision={"y": pc.DiagonalPrecision(jnp.ones(3))})
