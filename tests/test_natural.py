"""Fisher statistics and the natural-gradient transforms, against dense solves, Monte Carlo
estimates of the Fisher, the reparameterisation invariance of the natural gradient, a
hand-computed training step, and the single-device update when sharded over devices.

Test data come from NumPy and the computations run under `jax.jit` with module-level functions:
op-by-op dispatch (and `jax.random`) would compile every operation for every shape."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import trees_equal
from jax.flatten_util import ravel_pytree

import pcjax as pc
from pcjax._natural import fisher_mask

DAMPING = 1e-2


def linear(params, h):
    return pc.node("v", pc.dense(h, params["w"], params["b"]))


def spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.5 * np.eye(dim)


def max_rel(actual, expected) -> float:
    """max |actual - expected| / max |expected| over all leaves of two pytrees."""
    pairs = list(zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    return diff / max(float(jnp.max(jnp.abs(b))) for _, b in pairs)


@jax.jit
def _layer(h, w, v, p):
    params = {"w": w, "b": jnp.zeros(3, w.dtype)}
    precision = {"v": pc.FullPrecision(p)}
    grads = pc.param_grads(linear, params, {}, h, {"v": v}, precision=precision)
    grads = jax.tree.map(lambda g: g / 32, grads)  # batch mean, as the training step uses
    return params, h, v, precision, grads


@pytest.fixture
def layer():
    """A linear-Gaussian layer v = h W + b with a full output precision, and its gradients
    (built inside the test, so in float64 under the `x64` marker)."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(32, 4)) * np.array([1.0, 3.0, 0.3, 1.0]) + 0.5
    w, v, p = rng.normal(size=(4, 3)), rng.normal(size=(32, 3)), spd(rng, 3)
    return _layer(*(jnp.asarray(a) for a in (h, w, v, p)))


@functools.partial(jax.jit, static_argnames="mode")
def layer_statistics(layer, mode="kronecker"):
    params, h, v, precision, _ = layer
    return pc.fisher_statistics(linear, params, {}, h, {"v": v}, precision=precision, mode=mode)


def apply(transform, grads, params, fisher):
    """One update from a fresh state, jitted."""

    @eqx.filter_jit
    def update(grads, params, fisher):
        return transform.update(grads, transform.init(params), params, fisher=fisher)[0]

    return update(grads, params, fisher)


@jax.jit
def kronecker_solve(layer, damping):
    """The dense solves $(A \\otimes P + \\lambda I)^{-1} g_W$, $(P + \\lambda I)^{-1} g_b$."""
    _, h, _, precision, grads = layer
    a = h.T @ h / h.shape[0]
    p = precision["v"].matrix()
    g_w = jnp.kron(a, p)  # row-major vec of W (in, out)
    eye = jnp.eye(g_w.shape[0])
    w = jnp.linalg.solve(g_w + damping * eye, grads["w"].ravel()).reshape(grads["w"].shape)
    b = jnp.linalg.solve(p + damping * jnp.eye(p.shape[0]), grads["b"])
    return {"w": w, "b": b}


@pytest.mark.x64
def test_kronecker_mode_equals_dense_solve(layer):
    params, _, _, _, grads = layer
    fisher = layer_statistics(layer)
    natural = apply(pc.natural_gradient("kronecker", damping=DAMPING), grads, params, fisher)
    assert max_rel(natural, kronecker_solve(layer, DAMPING)) < 2e-14  # measured 4.0e-15


@pytest.mark.x64
def test_diagonal_mode_divides_by_diagonal_fisher(layer):
    params, h, _, precision, grads = layer
    fisher = layer_statistics(layer, mode="diagonal")
    natural = apply(pc.natural_gradient("diagonal", damping=DAMPING), grads, params, fisher)
    p_diag = jnp.diag(precision["v"].matrix())
    expected_w = grads["w"] / (jnp.mean(h**2, 0)[:, None] * p_diag[None, :] + DAMPING)
    expected_b = grads["b"] / (p_diag + DAMPING)
    assert max_rel(natural, {"w": expected_w, "b": expected_b}) < 1e-15  # measured 1.2e-16


def two_layer(params, x):
    h = pc.node("h", jnp.tanh(x @ params["w1"]) + params["b1"])
    return pc.node("y", jnp.sin(h) @ params["w2"])


@pytest.mark.x64
def test_matrix_free_mode_solves_over_covered_leaves_and_passes_the_rest_through():
    """The Fisher block of a learned precision (and of an unused leaf) is exactly zero:
    those gradients pass through unchanged, not multiplied by 1 / damping; the leaves the
    predictions depend on get the dense solve over their block."""
    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 4))),
        "b1": jnp.zeros(4),
        "w2": jnp.asarray(rng.normal(size=(4, 2))),
        "precision": pc.DiagonalPrecision(jnp.array([0.5, 1.0, 2.0, 4.0])),
        "unused": jnp.ones(2),
    }
    x = jnp.asarray(rng.normal(size=(6, 3)))
    observed = {"y": jnp.asarray(rng.normal(size=(6, 2)))}
    states = {"h": jax.jit(pc.forward_init, static_argnums=0)(two_layer, params, x)["h"] + 0.1}

    def precision(p):
        return {"h": p["precision"], "y": 3.0}

    covered = {k: params[k] for k in ("w1", "b1", "w2")}
    flat, unravel = ravel_pytree(covered)
    transform = pc.natural_gradient(
        "matrix_free", damping=DAMPING, cg_iters=3 * flat.size, cg_tol=1e-13
    )
    found = []

    @jax.jit
    def natural_gradient(params):
        grads = pc.param_grads(two_layer, params, states, x, observed, precision=precision)
        grads["unused"] = jnp.array([0.5, -2.0])  # a gradient from elsewhere, say weight decay
        fisher = pc.fisher_statistics(
            two_layer, params, states, x, observed, precision=precision, mode="matrix_free"
        )
        found.append(fisher.covered)
        return grads, transform.update(grads, transform.init(params), params, fisher=fisher)[0]

    grads, natural = natural_gradient(params)
    # Leaves in the order of jax.tree.leaves: b1, precision, unused, w1, w2.
    assert found == [(True, False, False, True, True)]

    def flat_predictions(flat):
        mu = pc.prediction_errors(two_layer, {**params, **unravel(flat)}, states, x, observed)
        return {k: -e for k, e in mu.items()}  # minus the errors: the predictions up to a shift

    jac = jax.jit(jax.jacobian(flat_predictions))(flat)
    p_h = jnp.diag(jnp.array([0.5, 1.0, 2.0, 4.0]))
    g = (
        jnp.einsum("bip,ij,bjq->pq", jac["h"], p_h, jac["h"])
        + 3.0 * jnp.einsum("bip,biq->pq", jac["y"], jac["y"])
    ) / 6
    flat_grads = ravel_pytree({k: grads[k] for k in covered})[0]
    expected = unravel(jnp.linalg.solve(g + DAMPING * jnp.eye(flat.size), flat_grads))
    assert max_rel({k: natural[k] for k in covered}, expected) < 5e-14  # measured 9.9e-15
    # Unchanged, bit for bit (before the fix: multiplied by 1 / damping = 100).
    np.testing.assert_array_equal(natural["unused"], grads["unused"])
    np.testing.assert_array_equal(natural["precision"].log_values, grads["precision"].log_values)


def mean_only(params, n):
    return pc.node("v", jnp.broadcast_to(params["mu"], (n.shape[0], 3)))


def weights_only(params, h):
    return pc.node("v", pc.dense(h, params["w"]))


@jax.jit
def monte_carlo_and_analytic(mu, w, h, noise, p):
    """Second moments of the scores (minus pcjax's per-sample energy gradients) of data sampled
    from the model, and the analytic Fisher: of the mean (matrix-free operator) and of the
    weights (Kronecker factors)."""
    precision = {"v": pc.FullPrecision(p)}

    def score(fn, params, x, vi):
        grads = pc.param_grads(fn, params, {}, x[None], {"v": vi[None]}, precision=precision)
        return -ravel_pytree(grads)[0]

    def second_moment(scores):
        return scores.T @ scores / scores.shape[0]

    # Activity: v ~ N(mu, P^-1); the score w.r.t. mu is P (v - mu).
    v = mu["mu"] + noise
    empty = jnp.zeros((noise.shape[0], 0))
    mc_mean = second_moment(jax.vmap(lambda e, vi: score(mean_only, mu, e, vi))(empty, v))
    operator = pc.fisher_statistics(
        mean_only, mu, {}, empty, {"v": v}, precision=precision, mode="matrix_free"
    )
    analytic_mean = jax.vmap(lambda e: operator({"mu": e})["mu"])(jnp.eye(3))

    # Weights: v ~ N(h W, P^-1); the score w.r.t. W is h (P e)^T.
    params = {"w": w, "b": None}
    v = h @ w + noise
    mc_weights = second_moment(jax.vmap(lambda hi, vi: score(weights_only, params, hi, vi))(h, v))
    fisher = pc.fisher_statistics(weights_only, params, {}, h, {"v": v}, precision=precision)
    analytic_weights = jnp.kron(fisher["w"].inputs, fisher["w"].outputs)
    return mc_mean, analytic_mean, mc_weights, analytic_weights


@pytest.mark.x64
def test_monte_carlo_fisher_matches_analytic_for_activities_and_weights():
    """The Fisher is the covariance of the score: P for a mean, E[hh^T] (x) P for weights."""
    samples = 40000
    rng = np.random.default_rng(2)
    p = spd(rng, 3)
    noise = rng.multivariate_normal(np.zeros(3), np.linalg.inv(p), size=samples)
    h = rng.normal(size=(samples, 2)) * np.array([2.0, 0.5]) + np.array([1.0, 0.0])
    mu = {"mu": jnp.array([0.5, -1.0, 2.0])}
    mc_mean, analytic_mean, mc_weights, analytic_weights = monte_carlo_and_analytic(
        mu, jnp.asarray(rng.normal(size=(2, 3))), jnp.asarray(h), jnp.asarray(noise), p
    )
    weights_by_hand = np.kron(h.T @ h / samples, p)
    assert max_rel(analytic_mean, p) < 1e-15  # measured 1.4e-16
    assert max_rel(analytic_weights, weights_by_hand) < 1e-14  # measured 1.2e-15
    # Monte Carlo error relative to the largest entry (a wrong Fisher is off by O(1)).
    assert max_rel(mc_mean, p) < 0.02  # measured 0.0096
    assert max_rel(mc_weights, weights_by_hand) < 0.04  # measured 0.021


@pytest.mark.x64
def test_natural_gradient_is_invariant_to_input_rescaling_and_sgd_is_not(layer):
    params, h, v, precision, _ = layer
    scale = jnp.array([10.0, 0.1, 3.0, 1.0])
    rescaled = {"w": params["w"] / scale[:, None], "b": params["b"]}  # same function of h*scale
    assert max_rel(linear(rescaled, h * scale), linear(params, h)) < 1e-15  # measured 1.7e-16

    @functools.partial(jax.jit, static_argnums=(0, 3))
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
    assert max_rel(after_rescaled, after) < 1e-10  # measured 1.9e-11 (the damping breaks it)
    sgd = optax.identity()
    plain = linear(step(sgd, params, h, None), h)
    plain_rescaled = linear(step(sgd, rescaled, h * scale, None), h * scale)
    assert max_rel(plain_rescaled, plain) > 1.0  # measured 4.9


# ---------------------------------------------------------------- state only for covered layers


def embedded(params, tokens):
    """An embedding and a scale (no Kronecker factors) in front of a pcjax.dense layer."""
    e = params["embedding"][tokens] * params["scale"]
    return pc.node("v", pc.dense(e, params["w"], params["b"]))


@jax.jit
def _grads_and_statistics(params, tokens, observed):
    grads = pc.param_grads(embedded, params, {}, tokens, observed)
    fisher = pc.fisher_statistics(embedded, params, {}, tokens, observed)
    return jax.tree.map(lambda g: g / 16, grads), fisher


@pytest.fixture(scope="module")
def embedding_problem():
    """Parameters with a 300 x 4 embedding, their gradients and Kronecker statistics."""
    rng = np.random.default_rng(5)
    params = {
        "embedding": jnp.asarray(rng.normal(size=(300, 4)), jnp.float32),
        "scale": jnp.ones(4),
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.zeros(3),
    }
    tokens = jnp.asarray(rng.integers(0, 300, size=16))
    observed = {"v": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
    return params, tokens, *_grads_and_statistics(params, tokens, observed)


def state_size(state) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(state))


def test_state_holds_factors_only_for_the_masked_layers(embedding_problem):
    params, tokens, grads, fisher = embedding_problem
    # The default keeps no running factors: its state is the step count alone (before the fix
    # a 300 x 300 factor for the embedding and 4 x 4 for the scale, 181,000 floats in all).
    stateless = pc.natural_gradient("kronecker", damping=DAMPING)
    assert state_size(stateless.init(params)) == 1
    expected = apply(stateless, grads, params, fisher)

    mask = fisher_mask(embedded, params, tokens)
    assert mask == {"embedding": False, "scale": False, "w": True, "b": True}
    running = pc.natural_gradient("kronecker", damping=DAMPING, ema_decay=0.5, mask=mask)
    state = running.init(params)
    # Kronecker factors and eigenbases (eigenvalues + vectors) for w (4 x 4, 3 x 3) and b
    # (1 x 1, 3 x 3), and the count.
    factors = (16 + 9) + (1 + 9)
    eigen = (4 + 16 + 3 + 9) + (1 + 1 + 3 + 9)
    assert state_size(state) == factors + eigen + 1
    assert state.factors["embedding"] is None and state.factors["scale"] is None
    updates = apply(running, grads, params, fisher)
    assert trees_equal(updates, expected)  # first step: this batch's factors, same solve
    np.testing.assert_array_equal(updates["embedding"], grads["embedding"])

    diagonal = pc.natural_gradient("diagonal", damping=DAMPING, refresh_every=3, mask=mask)
    assert state_size(diagonal.init(params)) == 2 * ((4 + 3) + (1 + 3)) + 1


def test_mask_errors_name_the_leaf(embedding_problem):
    params, tokens, grads, fisher = embedding_problem
    mask = fisher_mask(embedded, params, tokens)
    with pytest.raises(ValueError, match=r"`ema_decay`.*`mask`"):
        pc.natural_gradient("kronecker", ema_decay=0.9)
    with pytest.raises(ValueError, match=r"`refresh_every`.*`mask`"):
        pc.natural_gradient("diagonal", refresh_every=5)
    no_w = pc.natural_gradient("kronecker", ema_decay=0.5, mask={**mask, "w": False})
    with pytest.raises(ValueError, match=r"statistics for \['w'\].*no state"):
        no_w.update(grads, no_w.init(params), params, fisher=fisher)
    extra = pc.natural_gradient("kronecker", ema_decay=0.5, mask={**mask, "scale": True})
    with pytest.raises(ValueError, match=r"\['scale'\].*no statistics"):
        extra.update(grads, extra.init(params), params, fisher=fisher)
    scalar = {"w": jnp.ones(())}  # (a 3-D leaf is a weight stacked by lax.scan: allowed)
    with pytest.raises(ValueError, match=r"marks \['w'\], which is a scalar"):
        pc.natural_gradient("kronecker", ema_decay=0.5, mask={"w": True}).init(scalar)
    with pytest.raises(ValueError, match="structure"):
        pc.natural_gradient("kronecker", ema_decay=0.5, mask={"w": True}).init(params)
    with pytest.raises(ValueError, match=r"\['w'\] must be a bool"):
        pc.natural_gradient("kronecker", ema_decay=0.5, mask={**mask, "w": 1.0}).init(params)


@pytest.mark.x64
def test_ema_and_refresh_every(layer):
    params, h, v, precision, grads = layer
    mask = {"w": True, "b": True}
    transform = pc.natural_gradient(
        "kronecker", damping=DAMPING, ema_decay=0.75, refresh_every=2, mask=mask
    )
    state = transform.init(params)
    stats = [layer_statistics((params, h * s, v, precision, grads)) for s in (1.0, 2.0)]
    update = jax.jit(lambda state, fisher: transform.update(grads, state, params, fisher=fisher))
    _, state1 = update(state, stats[0])
    _, state2 = update(state1, stats[1])
    np.testing.assert_array_equal(state1.factors["w"].inputs, stats[0]["w"].inputs)
    expected = 0.75 * stats[0]["w"].inputs + 0.25 * stats[1]["w"].inputs
    assert max_rel(state2.factors["w"].inputs, expected) < 1e-15  # measured 1.3e-16
    # Step 2 is not a refresh step: the eigendecomposition of step 1 is reused.
    for a, b in zip(jax.tree.leaves(state2.inverse["w"]), jax.tree.leaves(state1.inverse["w"])):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- hyperparameters


@pytest.mark.x64
def test_inject_hyperparams_and_a_damping_schedule(layer):
    params, _, _, _, grads = layer
    fisher = layer_statistics(layer)
    injected = optax.inject_hyperparams(pc.natural_gradient)("kronecker", damping=DAMPING)
    state = injected.init(params)
    state.hyperparams["damping"] = jnp.asarray(0.5)
    update = jax.jit(lambda g, s, f: injected.update(g, s, params, fisher=f))
    updates, _ = update(grads, state, fisher)
    assert max_rel(updates, kronecker_solve(layer, 0.5)) < 1e-14  # measured 8.7e-16
    assert max_rel(updates, kronecker_solve(layer, DAMPING)) > 0.2  # measured 0.40: it mattered

    # A schedule: the damping of update k (counted from 0) is 0.5 / (1 + k).
    scheduled = pc.natural_gradient("kronecker", damping=lambda count: 0.5 / (1 + count))
    step = jax.jit(lambda g, s, f: scheduled.update(g, s, params, fisher=f))
    first, state = step(grads, scheduled.init(params), fisher)
    second, _ = step(grads, state, fisher)
    assert max_rel(first, kronecker_solve(layer, 0.5)) < 1e-14  # measured 8.7e-16
    assert max_rel(second, kronecker_solve(layer, 0.25)) < 1e-14  # measured 1.1e-15


def test_hyperparameters_are_checked_when_concrete():
    for bad, message in [
        ({"damping": 0.0}, "`damping` must be positive"),
        ({"ema_decay": 1.0, "mask": {}}, r"`ema_decay` must be in \[0, 1\)"),
        ({"refresh_every": 0, "mask": {}}, "`refresh_every` must be a positive int"),
        ({"refresh_every": 1.5, "mask": {}}, "`refresh_every` must be a positive int"),
        ({"cg_iters": 0}, "`cg_iters` must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=message):
            pc.natural_gradient("kronecker", **bad)
    # Concrete arrays (as inject_hyperparams passes them) are checked too.
    with pytest.raises(ValueError, match="`damping` must be positive"):
        pc.natural_gradient("kronecker", damping=jnp.asarray(-1.0))
    pc.natural_gradient("kronecker", refresh_every=jnp.asarray(2), mask={})


# ---------------------------------------------------------------- in a training step


def classifier(params, x):
    h = pc.node("h0", pc.dense(x, params[0][0], params[0][1]))
    return pc.node("h1", pc.dense(jnp.tanh(h), params[1][0], params[1][1]))


def natural_by_hand(mode, inputs, p, g_w, g_b, damping=DAMPING):
    """The natural gradient of one dense layer from its inputs, precision and gradients:
    Kronecker $(A \\otimes P + \\lambda I)^{-1}$, its diagonal, or the exact Gauss-Newton block
    of the weight and bias together (inputs augmented by a 1), as matrix_free solves."""
    batch, d_in = inputs.shape
    d_out = p.shape[0]
    if mode == "matrix_free":
        aug = jnp.concatenate([inputs, jnp.ones((batch, 1))], axis=1)
        fisher = jnp.kron(aug.T @ aug / batch, p)
        vec = jnp.concatenate([g_w, g_b[None]]).ravel()
        solved = jnp.linalg.solve(fisher + damping * jnp.eye(vec.size), vec)
        solved = solved.reshape(d_in + 1, d_out)
        return solved[:-1], solved[-1]
    a = inputs.T @ inputs / batch
    if mode == "diagonal":
        curvature = jnp.diag(a)[:, None] * jnp.diag(p)[None, :]
        return g_w / (curvature + damping), g_b / (jnp.diag(p) + damping)
    w = jnp.linalg.solve(jnp.kron(a, p) + damping * jnp.eye(d_in * d_out), g_w.ravel())
    return w.reshape(d_in, d_out), jnp.linalg.solve(p + damping * jnp.eye(d_out), g_b)


TRAIN_LR, TRAIN_STEPS = 0.3, 4


@pytest.fixture(scope="module")
def hand_computed():
    """A 5-8-3 classifier with fixed precisions, and for each mode the parameter change of one
    training step built by hand: the relaxed states of pc.infer, the gradients of
    pc.param_grads, the Fisher from the layers' inputs and precisions (float64)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 5)) * np.array([5.0, 1.0, 0.2, 1.0, 1.0])
    y = np.eye(3)[rng.integers(0, 3, size=16)]
    w0, w1, p1 = rng.normal(size=(5, 8)) / 3, rng.normal(size=(8, 3)) / 3, spd(rng, 3)
    with jax.enable_x64(True):

        @jax.jit
        def build(x, y, w0, w1, p1):
            params = [(w0, 0.1 * jnp.ones(8)), (w1, jnp.zeros(3))]
            p0 = jnp.linspace(0.5, 2.0, 8)
            precision = {"h0": p0, "h1": pc.FullPrecision(p1)}
            latent = {"h0": pc.forward_init(classifier, params, x)["h0"]}
            states, _ = pc.infer(
                classifier,
                params,
                latent,
                x,
                {"h1": y},
                precision=precision,
                solver=pc.GradientDescent(TRAIN_STEPS),
            )
            grads = pc.param_grads(classifier, params, states, x, {"h1": y}, precision=precision)
            layers = [(x, jnp.diag(p0)), (jnp.tanh(states["h0"]), p1)]
            moves = {}
            for mode in ("diagonal", "kronecker", "matrix_free"):
                moves[mode] = [
                    tuple(-TRAIN_LR * n for n in natural_by_hand(mode, h, p, g_w / 16, g_b / 16))
                    for (g_w, g_b), (h, p) in zip(grads, layers)
                ]
            return (params, x, y, precision), moves

        return build(*(jnp.asarray(a) for a in (x, y, w0, w1, p1)))


@pytest.mark.x64
@pytest.mark.parametrize("mode", ["diagonal", "kronecker", "matrix_free"])
def test_train_step_applies_the_hand_computed_natural_gradient(hand_computed, mode):
    """One training step with pc.natural_gradient(mode) and optax.scale(-lr) moves the
    parameters by -lr times the natural gradient built by hand from the relaxed states of
    pc.infer (the transform computes its statistics from the step's context)."""
    (params, x, y, precision), moves = hand_computed
    optimizer = optax.chain(
        pc.natural_gradient(mode, damping=DAMPING, cg_iters=200, cg_tol=1e-14),
        optax.scale(-TRAIN_LR),
    )
    rule = pc.Equilibrium(pc.GradientDescent(TRAIN_STEPS))
    step = pc.make_train_step(classifier, rule, optimizer, precision=precision)
    new_params, _, _ = jax.jit(step)(params, optimizer.init(params), x, {"h1": y})
    moved = jax.tree.map(lambda a, b: a - b, new_params, params)
    tolerance = {"diagonal": 1e-15, "kronecker": 5e-14, "matrix_free": 3e-12}[mode]
    # measured 1.9e-16 (diagonal), 9.1e-15 (kronecker), 5.5e-13 (matrix_free: CG)
    assert max_rel(moved, moves[mode]) < tolerance


# ---------------------------------------------------------------- errors


def test_misuse_is_reported(layer):
    params, h, v, _precision, grads = layer
    transform = pc.natural_gradient("kronecker")
    with pytest.raises(ValueError, match="no Fisher statistics"):
        transform.update(grads, transform.init(params), params)
    diagonal = layer_statistics(layer, mode="diagonal")
    with pytest.raises(ValueError, match="other mode"):
        transform.update(grads, transform.init(params), params, fisher=diagonal)
    with pytest.raises(ValueError, match="unknown mode"):
        pc.natural_gradient("exact")
    with pytest.raises(ValueError, match="`mask` is not used by 'matrix_free'"):
        pc.natural_gradient("matrix_free", mask={"w": True, "b": True})

    def untagged(params, h):  # (a constant factor, `2.0 * pc.dense(...)`, is a scaled layer)
        return pc.node("v", jnp.tanh(pc.dense(h, params["w"], params["b"])))

    with pytest.raises(ValueError, match="not tagged directly"):
        pc.fisher_statistics(untagged, params, {}, h, {"v": v})

    def copied(params, h):
        return pc.node("v", pc.dense(h, params["w"] * 1.0, params["b"]))

    with pytest.raises(ValueError, match="not a leaf of `params`"):
        pc.fisher_statistics(copied, params, {}, h, {"v": v})

    fisher = layer_statistics(layer)
    wrong = {"w": grads["w"][:2], "b": grads["b"]}
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(2, 3\)"):
        transform.update(wrong, transform.init(params), params, fisher=fisher)


# ---------------------------------------------------------------- on several devices

# Runs on 2 simulated CPU devices (JAX fixes the device count at start-up, hence a
# subprocess). Each device holds half of the batch; with `axis_name` every device must apply the
# single-device update of the full batch, in both `shard_map` modes. Without it, device-varying
# statistics must be reported. Results go to argv[1] as JSON.
SHARDED_SCRIPT = textwrap.dedent(
    """
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    import pcjax as pc

    def net(params, x):
        h = pc.node("h", pc.dense(x, params["w1"], params["b1"]))
        return pc.node("y", pc.dense(jnp.tanh(h), params["w2"], params["b2"]))

    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
    params = {
        "w1": f32(4, 5) / 2, "b1": np.full(5, 0.1, np.float32),
        "w2": f32(5, 3) / 2, "b2": np.zeros(3, np.float32),
    }
    x, y = f32(8, 4) * np.array([3.0, 1.0, 0.3, 1.0], np.float32), f32(8, 3)
    h = np.asarray(jax.jit(pc.forward_init, static_argnums=0)(net, params, x)["h"]) + f32(8, 5)
    precision = {"h": jnp.linspace(0.5, 2.0, 5), "y": 2.0}
    mask = {"w1": True, "b1": True, "w2": True, "b2": True}
    transforms = {
        "diagonal": lambda axis: pc.natural_gradient("diagonal", damping=0.1, axis_name=axis),
        "kronecker (running factors)": lambda axis: pc.natural_gradient(
            "kronecker", damping=0.1, ema_decay=0.5, refresh_every=2, mask=mask, axis_name=axis
        ),
        "matrix_free": lambda axis: pc.natural_gradient(
            "matrix_free", damping=0.1, cg_iters=60, cg_tol=1e-7, axis_name=axis
        ),
    }

    def updates(name, axis, params, x, h, y):
        transform = transforms[name](axis)
        if axis is not None:
            transform = optax.chain(pc.cross_device_mean(axis), transform)
        mode = name.split()[0]
        grads = pc.param_grads(net, params, {"h": h}, x, {"y": y}, precision=precision)
        grads = jax.tree.map(lambda g: g / x.shape[0], grads)
        fisher = pc.fisher_statistics(
            net, params, {"h": h}, x, {"y": y}, precision=precision, mode=mode
        )
        state = transform.init(params)
        first, state = transform.update(grads, state, params, fisher=fisher)
        second, _ = transform.update(grads, state, params, fisher=fisher)
        return first, second

    mesh = pc.data_mesh()
    results = {"devices": mesh.shape["data"], "max_rel": {}, "errors": {}}
    specs = (P(), P("data"), P("data"), P("data"))
    for name in transforms:
        expected = jax.jit(functools.partial(updates, name, None))(params, x, h, y)
        scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(expected))
        for check_vma in (True, False):
            sharded = jax.jit(jax.shard_map(
                functools.partial(updates, name, "data"), mesh=mesh, in_specs=specs,
                out_specs=P(), check_vma=check_vma,
            ))(params, x, h, y)
            results["max_rel"][f"{name} check_vma={check_vma}"] = max(
                float(np.abs(np.asarray(shard.data) - np.asarray(ref)).max()) / scale
                for leaf, ref in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected))
                for shard in leaf.addressable_shards
            )
        try:  # the device-local statistics, without axis_name
            jax.jit(jax.shard_map(
                functools.partial(updates, name, None), mesh=mesh, in_specs=specs,
                out_specs=P(), check_vma=True,
            ))(params, x, h, y)
            results["errors"][name] = None
        except Exception as error:
            results["errors"][name] = f"{type(error).__name__}: {error}"

    # A training step (the transform takes its statistics from the step's context): the same
    # parameters as one device after two steps.
    optimizer = optax.chain(
        pc.cross_device_mean("data"), transforms["kronecker (running factors)"]("data"),
        optax.sgd(0.2),
    )
    single = optax.chain(transforms["kronecker (running factors)"](None), optax.sgd(0.2))
    def train(optimizer):
        rule = pc.Equilibrium(pc.GradientDescent(3))
        return pc.make_train_step(net, rule, optimizer, precision=precision)

    reference, state = params, single.init(params)
    single_step = jax.jit(train(single))
    for _ in range(2):
        reference, state, _ = single_step(reference, state, x, {"y": y})

    def local(params, state, x, y):
        params, state, _ = train(optimizer)(params, state, x, {"y": y})
        return params, state

    for check_vma in (True, False):
        step = jax.jit(jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P()), check_vma=check_vma,
        ))
        got, state = params, optimizer.init(params)
        for _ in range(2):
            got, state = step(got, state, x, y)
        results["max_rel"][f"make_train_step check_vma={check_vma}"] = max(
            float(np.abs(np.asarray(shard.data) - np.asarray(ref)).max())
            / float(np.abs(np.asarray(ref) - np.asarray(start)).max())
            for leaf, ref, start in zip(
                jax.tree.leaves(got), jax.tree.leaves(reference), jax.tree.leaves(params)
            )
            for shard in leaf.addressable_shards
        )
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """Run SHARDED_SCRIPT once on 2 simulated devices: (the finished process, its JSON)."""
    tmp_path = tmp_path_factory.mktemp("natural_sharded")
    out = tmp_path / "results.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env.pop("JAX_ENABLE_X64", None)
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    return done, json.loads(out.read_text()) if out.exists() else {}


def test_sharded_natural_gradient_is_the_single_device_update(sharded_results):
    done, results = sharded_results
    assert "max_rel" in results, done.stderr[-3000:]
    assert results["devices"] == 2
    # float32 rounding (the reductions run in another order), relative to the largest update
    # entry (make_train_step: to the largest parameter change); measured 1.6e-7 (diagonal), 3.5e-6
    # (kronecker: float32 eigh), 4.4e-7 (matrix_free), 1.3e-6 (make_train_step). Before the fix,
    # with each device's own statistics, the training step's parameters were 6.8 steps apart.
    tolerances = {
        "diagonal": 1e-6,
        "kronecker (running factors)": 1e-5,
        "matrix_free": 2e-6,
        "make_train_step": 5e-6,
    }
    assert set(results["max_rel"]) == {
        f"{name} check_vma={check}" for name in tolerances for check in (True, False)
    }
    for key, error in results["max_rel"].items():
        assert error < tolerances[key.split(" check_vma")[0]], (key, error)


def test_sharded_natural_gradient_without_axis_name_is_reported(sharded_results):
    done, results = sharded_results
    assert "errors" in results, done.stderr[-3000:]
    assert set(results["errors"]) == {"diagonal", "kronecker (running factors)", "matrix_free"}
    for name, error in results["errors"].items():
        assert error is not None, name
        assert error.startswith("ValueError: pcjax.natural_gradient"), (name, error)
        assert "axis_name" in error and "'data'" in error, (name, error)
