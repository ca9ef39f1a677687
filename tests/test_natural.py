"""Fisher statistics and the natural-gradient transforms, against dense solves, Monte Carlo
estimates of the Fisher, and the reparameterisation invariance of the natural gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import pcjax as pc

DAMPING = 1e-2


def linear(params, h):
    return pc.node("v", pc.dense(h, params["w"], params["b"]))


def spd(key, dim):
    a = jax.random.normal(key, (dim, dim))
    return a @ a.T / dim + 0.5 * jnp.eye(dim)


@pytest.fixture(scope="module")
def layer():
    """A linear-Gaussian layer v = h W + b with a full output precision, and its gradients."""
    kh, kw, kv, kp = jax.random.split(jax.random.PRNGKey(0), 4)
    h = jax.random.normal(kh, (32, 4)) * jnp.array([1.0, 3.0, 0.3, 1.0]) + 0.5
    params = {"w": jax.random.normal(kw, (4, 3)), "b": jnp.zeros(3)}
    v = jax.random.normal(kv, (32, 3))
    precision = {"v": pc.FullPrecision(spd(kp, 3))}
    grads = pc.param_grads(linear, params, {}, h, {"v": v}, precision=precision)
    grads = jax.tree.map(lambda g: g / 32, grads)  # batch mean, as train_step uses
    return params, h, v, precision, grads


def apply(transform, grads, params, fisher):
    state = transform.init(params)
    return transform.update(grads, state, params, fisher=fisher)[0]


def test_kronecker_mode_equals_dense_solve(layer):
    params, h, v, precision, grads = layer
    fisher = pc.fisher_statistics(linear, params, {}, h, {"v": v}, precision=precision)
    natural = apply(pc.natural_gradient("kronecker", damping=DAMPING), grads, params, fisher)
    a = h.T @ h / 32
    p = precision["v"].matrix()
    g_w = jnp.kron(a, p)  # row-major vec of W (in, out)
    expected_w = jnp.linalg.solve(g_w + DAMPING * jnp.eye(12), grads["w"].ravel()).reshape(4, 3)
    expected_b = jnp.linalg.solve(p + DAMPING * jnp.eye(3), grads["b"])
    np.testing.assert_allclose(natural["w"], expected_w, rtol=1e-5)
    np.testing.assert_allclose(natural["b"], expected_b, rtol=1e-5)


def test_diagonal_mode_divides_by_diagonal_fisher(layer):
    params, h, v, precision, grads = layer
    fisher = pc.fisher_statistics(
        linear, params, {}, h, {"v": v}, precision=precision, mode="diagonal"
    )
    natural = apply(pc.natural_gradient("diagonal", damping=DAMPING), grads, params, fisher)
    p_diag = jnp.diag(precision["v"].matrix())
    expected = grads["w"] / (jnp.mean(h**2, 0)[:, None] * p_diag[None, :] + DAMPING)
    np.testing.assert_allclose(natural["w"], expected, rtol=1e-10)
    np.testing.assert_allclose(natural["b"], grads["b"] / (p_diag + DAMPING), rtol=1e-10)


def two_layer(params, x):
    h = pc.node("h", jnp.tanh(x @ params["w1"]) + params["b1"])
    return pc.node("y", jnp.sin(h) @ params["w2"])


def test_matrix_free_mode_equals_dense_solve_on_nonlinear_network():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
    params = {
        "w1": jax.random.normal(k1, (3, 4)),
        "b1": jnp.zeros(4),
        "w2": jax.random.normal(k2, (4, 2)),
    }
    x = jax.random.normal(k3, (6, 3))
    observed = {"y": jax.random.normal(k4, (6, 2))}
    states = {"h": pc.forward_init(two_layer, params, x)["h"] + 0.1}
    precision = {"h": pc.DiagonalPrecision(jnp.array([0.5, 1.0, 2.0, 4.0])), "y": 3.0}
    grads = pc.param_grads(two_layer, params, states, x, observed, precision=precision)
    fisher = pc.fisher_statistics(
        two_layer, params, states, x, observed, precision=precision, mode="matrix_free"
    )
    flat_params, unravel = ravel_pytree(params)
    n = flat_params.size
    natural = apply(
        pc.natural_gradient("matrix_free", damping=DAMPING, cg_iters=3 * n, cg_tol=1e-13),
        grads,
        params,
        fisher,
    )

    def flat_predictions(flat):
        mu = pc.prediction_errors(two_layer, unravel(flat), states, x, observed)
        return {k: -e for k, e in mu.items()}  # minus the errors: the predictions up to a shift

    jac = jax.jacobian(flat_predictions)(flat_params)
    p_h = jnp.diag(jnp.array([0.5, 1.0, 2.0, 4.0]))
    g = (
        jnp.einsum("bip,ij,bjq->pq", jac["h"], p_h, jac["h"])
        + 3.0 * jnp.einsum("bip,biq->pq", jac["y"], jac["y"])
    ) / 6
    expected = jnp.linalg.solve(g + DAMPING * jnp.eye(n), ravel_pytree(grads)[0])
    np.testing.assert_allclose(ravel_pytree(natural)[0], expected, rtol=1e-6, atol=1e-9)


def test_monte_carlo_fisher_matches_analytic_for_activities_and_weights():
    """Outer products of the model's scores (minus pcjax's per-sample energy gradients, with
    data sampled from the model) average to P for a mean and to E[hh^T] (x) P for weights."""
    samples = 40000
    kp, kh, kw, ke = jax.random.split(jax.random.PRNGKey(2), 4)
    p = spd(kp, 3)
    noise = jax.random.multivariate_normal(ke, jnp.zeros(3), jnp.linalg.inv(p), (samples,))
    precision = {"v": pc.FullPrecision(p)}

    # Activity: v ~ N(mu, P^-1); the score w.r.t. mu is P (v - mu).
    def mean_only(params, n):
        return pc.node("v", jnp.broadcast_to(params["mu"], (n.shape[0], 3)))

    mu = {"mu": jnp.array([0.5, -1.0, 2.0])}
    v = mu["mu"] + noise

    def score(fn, params, x, vi):
        grads = pc.param_grads(fn, params, {}, x[None], {"v": vi[None]}, precision=precision)
        return -ravel_pytree(grads)[0]

    scores = jax.vmap(lambda vi: score(mean_only, mu, jnp.zeros((1, 0))[0], vi))(v)
    mc = scores.T @ scores / samples
    np.testing.assert_allclose(mc, p, atol=0.05 * float(jnp.linalg.norm(p)))
    operator = pc.fisher_statistics(
        mean_only,
        mu,
        {},
        jnp.zeros((samples, 0)),
        {"v": v},
        precision=precision,
        mode="matrix_free",
    )
    analytic = jax.vmap(lambda e: operator({"mu": e})["mu"])(jnp.eye(3))
    np.testing.assert_allclose(analytic, p, rtol=1e-10)

    # Weights: v ~ N(h W, P^-1); the score w.r.t. W is h (P e)^T.
    params = {"w": jax.random.normal(kw, (2, 3)), "b": None}
    h = jax.random.normal(kh, (samples, 2)) * jnp.array([2.0, 0.5]) + jnp.array([1.0, 0.0])
    v = h @ params["w"] + noise

    def weights_only(params, h):
        return pc.node("v", pc.dense(h, params["w"]))

    scores = jax.vmap(lambda hi, vi: score(weights_only, params, hi, vi))(h, v)
    mc = scores.T @ scores / samples
    fisher = pc.fisher_statistics(weights_only, params, {}, h, {"v": v}, precision=precision)
    analytic = jnp.kron(fisher["w"].inputs, fisher["w"].outputs)
    np.testing.assert_allclose(analytic, jnp.kron(h.T @ h / samples, p), rtol=1e-10)
    np.testing.assert_allclose(mc, analytic, atol=0.05 * float(jnp.linalg.norm(analytic)))


def test_natural_gradient_is_invariant_to_input_rescaling_and_sgd_is_not(layer):
    params, h, v, precision, _ = layer
    scale = jnp.array([10.0, 0.1, 3.0, 1.0])
    rescaled = {"w": params["w"] / scale[:, None], "b": params["b"]}  # same function of h*scale
    np.testing.assert_allclose(linear(params, h), linear(rescaled, h * scale), rtol=1e-10)

    def step(transform, params, inputs, fisher_mode):
        grads = pc.param_grads(linear, params, {}, inputs, {"v": v}, precision=precision)
        grads = jax.tree.map(lambda g: g / 32, grads)
        extra = {}
        if fisher_mode:
            extra["fisher"] = pc.fisher_statistics(
                linear, params, {}, inputs, {"v": v}, precision=precision, mode=fisher_mode
            )
        updates, _ = transform.update(grads, transform.init(params), params, **extra)
        return optax.apply_updates(params, jax.tree.map(lambda u: -0.5 * u, updates))

    natural = pc.natural_gradient("kronecker", damping=1e-12)
    after = linear(step(natural, params, h, "kronecker"), h)
    after_rescaled = linear(step(natural, rescaled, h * scale, "kronecker"), h * scale)
    np.testing.assert_allclose(after, after_rescaled, rtol=1e-7, atol=1e-9)
    sgd = optax.identity()
    plain = linear(step(sgd, params, h, None), h)
    plain_rescaled = linear(step(sgd, rescaled, h * scale, None), h * scale)
    assert float(jnp.max(jnp.abs(plain - plain_rescaled))) > 0.1


def test_ema_and_refresh_every(layer):
    params, h, v, precision, grads = layer
    transform = pc.natural_gradient("kronecker", damping=DAMPING, ema_decay=0.75, refresh_every=2)
    state = transform.init(params)
    stats = [
        pc.fisher_statistics(linear, params, {}, h * s, {"v": v}, precision=precision)
        for s in (1.0, 2.0)
    ]
    _, state1 = transform.update(grads, state, params, fisher=stats[0])
    _, state2 = transform.update(grads, state1, params, fisher=stats[1])
    np.testing.assert_allclose(state1.factors["w"].inputs, stats[0]["w"].inputs, rtol=1e-12)
    expected = 0.75 * stats[0]["w"].inputs + 0.25 * stats[1]["w"].inputs
    np.testing.assert_allclose(state2.factors["w"].inputs, expected, rtol=1e-12)
    # Step 2 is not a refresh step: the eigendecomposition of step 1 is reused.
    for a, b in zip(jax.tree.leaves(state2.inverse["w"]), jax.tree.leaves(state1.inverse["w"])):
        np.testing.assert_array_equal(a, b)


def test_precision_weighted_gradient_multiplies_by_precision(layer):
    params, h, v, precision, grads = layer
    fisher = pc.fisher_statistics(linear, params, {}, h, {"v": v}, precision=precision)
    weighted = apply(pc.precision_weighted_gradient(), grads, params, fisher)
    p = precision["v"].matrix()
    np.testing.assert_allclose(weighted["w"], grads["w"] @ p, rtol=1e-10)
    np.testing.assert_allclose(weighted["b"], p @ grads["b"], rtol=1e-10)


def classifier(params, x):
    h = pc.node("h0", pc.dense(x, params[0][0], params[0][1]))
    return pc.node("h1", pc.dense(jnp.tanh(h), params[1][0], params[1][1]))


@pytest.mark.parametrize("mode", ["diagonal", "kronecker", "matrix_free"])
def test_train_step_with_natural_gradient_learns(mode):
    kx, k1, k2 = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (64, 5)) * jnp.array([5.0, 1.0, 0.2, 1.0, 1.0])
    y = jax.nn.one_hot((x[:, 0] > 0).astype(int) + (x[:, 2] > 0), 3)
    params = [
        (jax.random.normal(k1, (5, 8)) / 3, jnp.zeros(8)),
        (jax.random.normal(k2, (8, 3)) / 3, jnp.zeros(3)),
    ]
    optimizer = optax.chain(
        pc.natural_gradient(mode, damping=1e-2), optax.scale_by_learning_rate(0.2)
    )
    step = jax.jit(
        functools.partial(pc.train_step, classifier, optimizer=optimizer, steps=5, fisher=mode)
    )
    opt_state = optimizer.init(params)
    first = None
    for _ in range(40):
        params, opt_state, info = step(params, opt_state, x, {"h1": y})
        first = float(info.energy) if first is None else first
    assert float(info.energy) < 0.3 * first


def test_misuse_is_reported(layer):
    params, h, v, _precision, grads = layer
    with pytest.raises(ValueError, match="must contain a transform that takes them"):
        pc.train_step(
            linear,
            params,
            optax.adam(0.1).init(params),
            h,
            {"v": v},
            optimizer=optax.adam(0.1),
            steps=1,
            fisher="kronecker",
        )
    transform = pc.natural_gradient("kronecker")
    with pytest.raises(ValueError, match="statistics are missing"):
        transform.update(grads, transform.init(params), params)
    diagonal = pc.fisher_statistics(linear, params, {}, h, {"v": v}, mode="diagonal")
    with pytest.raises(ValueError, match="other mode"):
        transform.update(grads, transform.init(params), params, fisher=diagonal)
    with pytest.raises(ValueError, match="unknown mode"):
        pc.natural_gradient("exact")

    def untagged(params, h):
        return pc.node("v", pc.dense(h, params["w"], params["b"]) * 2.0)

    with pytest.raises(ValueError, match="not tagged directly"):
        pc.fisher_statistics(untagged, params, {}, h, {"v": v})

    def copied(params, h):
        return pc.node("v", pc.dense(h, params["w"] * 1.0, params["b"]))

    with pytest.raises(ValueError, match="not a leaf of `params`"):
        pc.fisher_statistics(copied, params, {}, h, {"v": v})
