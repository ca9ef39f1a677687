"""Error-parameterised PC (`pcjax.error_parameterised`, ePC) against hand-written ground truths.

The network: x -> h1 = x W1 -> h2 = tanh(h1) W2 -> h3 = tanh(h2) W3 -> y = tanh(h3) W4, y
observed, unit precisions except `h2` (precision 2). In ePC the free nodes take the values
h_i = mu_i(h_{i-1}) + e_i and inference descends the energy over e; written out by hand below
as a forward pass with additive perturbations.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import optax
import pytest

import pcjax as pc

B, A = 5, 0.1
LR = 0.5  # large enough that the update is not lost to float32 rounding of the parameters
P2 = 2.0
HIDDEN = ("h1", "h2", "h3")


def net(params, x):
    h = x
    for i, name in enumerate(HIDDEN, start=1):
        h = pc.node(name, (jnp.tanh(h) if i > 1 else h) @ params[f"w{i}"])
    return pc.node("y", jnp.tanh(h) @ params["w4"])


PRECISION = {"h2": jnp.asarray(P2)}


@pytest.fixture(scope="module")
def data():
    keys = jax.random.split(jax.random.PRNGKey(7), 6)
    sizes = [3, 6, 5, 4, 2]
    params = {
        f"w{i + 1}": jax.random.normal(keys[i], (a, b)) / jnp.sqrt(a)
        for i, (a, b) in enumerate(itertools.pairwise(sizes))
    }
    return params, jax.random.normal(keys[4], (B, 3)), jax.random.normal(keys[5], (B, 2))


# ---------------------------------------------------------------- ground truths, by hand


def mu(w, i, parent, x):
    return (x if i == 1 else jnp.tanh(parent)) @ w[f"w{i}"]


def energy(w, states, x, y):
    """F = sum_i 1/2 p_i |h_i - mu_i|^2 + 1/2 |y - mu_y|^2 over the states h1, h2, h3."""
    parents = [None, states[0], states[1], states[2]]
    terms = [
        0.5 * (P2 if i == 2 else 1.0) * jnp.sum((states[i - 1] - mu(w, i, parents[i - 1], x)) ** 2)
        for i in (1, 2, 3)
    ]
    return sum(terms) + 0.5 * jnp.sum((y - mu(w, 4, states[2], x)) ** 2)


def states_of_errors(w, errors, x):
    """h_i = mu_i(h_{i-1}) + e_i, in order."""
    states, parent = [], None
    for i in (1, 2, 3):
        parent = mu(w, i, parent, x) + errors[i - 1]
        states.append(parent)
    return states


def energy_of_errors(w, errors, x, y):
    return energy(w, states_of_errors(w, errors, x), x, y)


def feedforward(w, x):
    return states_of_errors(w, [jnp.zeros((B, n)) for n in (6, 5, 4)], x)


def as_dict(states):
    return dict(zip(HIDDEN, states))


def relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------- tests


def test_one_epc_step_moves_every_layer_by_the_backprop_gradient(data):
    w, x, y = data
    zero = [jnp.zeros((B, n)) for n in (6, 5, 4)]
    # At e = 0 the error field is the gradient of the output energy with respect to additive
    # perturbations of the hidden nodes: backprop's.
    backprop = jax.grad(
        lambda e: 0.5 * jnp.sum((y - mu(w, 4, states_of_errors(w, e, x)[2], x)) ** 2)
    )(zero)
    expected = states_of_errors(w, [-A * g for g in backprop], x)
    start = as_dict(feedforward(w, x))
    epc = pc.error_parameterised(net)
    solver = pc.GradientDescent(1, step_size=A)
    states, info = pc.infer(epc, w, start, x, {"y": y}, solver=solver, precision=PRECISION)
    for name, truth in zip(HIDDEN, expected):
        assert relative(states[name], truth) < 1e-6, name  # measured <= 2.1e-9
    # The reported field is the error field at the new errors (measured 1.1e-7 rel.).
    new_errors = [-A * g for g in backprop]
    truth_norm = jnp.sqrt(
        sum(jnp.sum(g**2, axis=1) for g in jax.grad(energy_of_errors, 1)(w, new_errors, x, y))
    )
    assert jnp.allclose(info.grad_norm, jnp.max(truth_norm), rtol=1e-6)
    # Standard PC's first step moves only the last hidden node: the output error travels one
    # layer per step. ePC moves the first one.
    pc_states, _ = pc.infer(net, w, start, x, {"y": y}, solver=solver, precision=PRECISION)
    assert jnp.array_equal(pc_states["h1"], start["h1"])
    assert relative(states["h1"], start["h1"]) > 1e-3  # measured 7.1e-3


@pytest.mark.parametrize(
    "solver",
    [pc.GradientDescent(2000, step_size=0.2, tol=1e-5), pc.ODE(tol=1e-5)],
    ids=["gradient_descent", "ode"],
)
def test_epc_relaxes_to_the_closed_form_equilibrium_of_a_linear_network(solver):
    # Linear x -> h1 -> h2 -> y: the equilibrium of F is a linear solve (float32).
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    w1, w2, w3 = (jax.random.normal(k[i], s) / 2 for i, s in enumerate([(3, 4), (4, 4), (4, 2)]))
    x, y = jax.random.normal(k[3], (2, 3)), jax.random.normal(k[4], (2, 2))

    def linear(p, x):
        h1 = pc.node("h1", x @ p[0])
        h2 = pc.node("h2", h1 @ p[1])
        return pc.node("y", h2 @ p[2])

    # dF/dh = 0 for z = [h1, h2] (row vectors): z M = c, solved densely.
    eye = jnp.eye(4)
    m = jnp.block([[eye + w2 @ w2.T, -w2], [-w2.T, eye + w3 @ w3.T]])
    c = jnp.concatenate([x @ w1, y @ w3.T], axis=1)
    z = jnp.linalg.solve(m.T, c.T).T
    start = pc.forward_init(linear, (w1, w2, w3), x)
    del start["y"]
    states, info = pc.infer(
        pc.error_parameterised(linear), (w1, w2, w3), start, x, {"y": y}, solver=solver
    )
    assert bool(info.converged)
    relaxed = jnp.concatenate([states["h1"], states["h2"]], 1)
    assert relative(relaxed, z) < 2e-5  # measured 2.1e-6 (GD, 35 steps), 2.8e-6 (ODE, 62 steps)


def test_epc_equilibrium_is_a_stationary_point_of_the_standard_energy_in_fewer_steps(data):
    w, x, y = data
    start = as_dict(feedforward(w, x))
    counts = {}
    for name, fn in [("pc", net), ("epc", pc.error_parameterised(net))]:
        solver = pc.GradientDescent(5000, step_size=A, tol=1e-5)
        states, info = pc.infer(fn, w, start, x, {"y": y}, solver=solver, precision=PRECISION)
        assert bool(info.converged), name
        counts[name] = int(info.steps)
        grads = jax.grad(energy, 1)(w, [states[n] for n in HIDDEN], x, y)
        # The hand-written standard-PC field vanishes there (measured 5.6e-6 PC, 5.2e-6 ePC).
        assert max(float(jnp.max(jnp.abs(g))) for g in grads) < 2e-5, name
    # The output error reaches h1 in one ePC step instead of three: fewer steps to tolerance
    # (measured: PC 477 steps, ePC 178).
    assert counts["epc"] < counts["pc"], counts


def test_epc_training_step_matches_a_hand_written_one(data):
    w, x, y = data
    steps = 6
    errors = [jnp.zeros((B, n)) for n in (6, 5, 4)]
    for _ in range(steps):
        g = jax.grad(energy_of_errors, 1)(w, errors, x, y)
        errors = [e - A * gi for e, gi in zip(errors, g)]
    states = states_of_errors(w, errors, x)
    grads = jax.grad(energy)(w, states, x, y)
    expected = jax.tree.map(lambda p, g: p - LR * g / B, w, grads)

    rule = pc.Equilibrium(pc.GradientDescent(steps, step_size=A))
    step = jax.jit(
        pc.make_train_step(pc.error_parameterised(net), rule, optax.sgd(LR), precision=PRECISION)
    )
    new, _, info = step(w, optax.sgd(LR).init(w), x, {"y": y})
    for k in w:
        assert relative(new[k] - w[k], expected[k] - w[k]) < 1e-5, k  # measured <= 1.3e-6
    assert jnp.allclose(info.energy, energy(w, states, x, y), rtol=1e-5)


def test_epc_with_incremental_learning_matches_a_hand_written_loop(data):
    w, x, y = data
    steps = 4
    errors = [jnp.zeros((B, n)) for n in (6, 5, 4)]
    params = w
    for _ in range(steps):
        states = states_of_errors(params, errors, x)
        g_e = jax.grad(energy_of_errors, 1)(params, errors, x, y)
        g_w = jax.grad(energy)(params, states, x, y)
        errors = [e - A * g for e, g in zip(errors, g_e)]
        params = jax.tree.map(lambda p, g: p - LR * g / B, params, g_w)

    rule = pc.Incremental(steps, step_size=A)
    step = pc.make_train_step(pc.error_parameterised(net), rule, optax.sgd(LR), precision=PRECISION)
    new, _, _ = jax.jit(step)(w, optax.sgd(LR).init(w), x, {"y": y})
    for k in w:
        assert relative(new[k] - w[k], params[k] - w[k]) < 1e-5, k  # measured <= 7.4e-7


def test_epc_through_a_scan_over_layers():
    # Nodes stacked by lax.scan: the offsets are sliced per step like states.
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    ws = jax.random.normal(k[0], (3, 4, 4)) / 2
    wo = jax.random.normal(k[1], (4, 2)) / 2
    x, y = jax.random.normal(k[2], (B, 4)), jax.random.normal(k[3], (B, 2))

    def scanned(p, x):
        def layer(h, w):
            h = pc.node("h", jnp.tanh(h) @ w)
            return h, None

        h, _ = jax.lax.scan(layer, x, p[0])
        return pc.node("y", jnp.tanh(h) @ p[1])

    def output_loss(e):
        h = x
        for t in range(3):
            h = jnp.tanh(h) @ ws[t] + e[t]
        return 0.5 * jnp.sum((y - jnp.tanh(h) @ wo) ** 2)

    backprop = jax.grad(output_loss)(jnp.zeros((3, B, 4)))
    start = pc.forward_init(scanned, (ws, wo), x)
    del start["y"]
    states, _ = pc.infer(
        pc.error_parameterised(scanned),
        (ws, wo),
        start,
        x,
        {"y": y},
        solver=pc.GradientDescent(1, step_size=A),
    )
    h, expected = x, []
    for t in range(3):
        h = jnp.tanh(h) @ ws[t] - A * backprop[t]
        expected.append(h)
    assert relative(states["h"], jnp.stack(expected)) < 1e-6  # measured 1.2e-7


def test_epc_combinations_without_a_meaning_are_refused(data):
    epc = pc.error_parameterised(net)
    with pytest.raises(ValueError, match=r"Nudged.*error-parameterised"):
        pc.make_train_step(epc, pc.Nudged(pc.GradientDescent(3)), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"fixed_predictions.*error-parameterised"):
        pc.fixed_predictions(epc)
    with pytest.raises(ValueError, match=r"error_parameterised.*FixedPredictions"):
        pc.error_parameterised(pc.fixed_predictions(net))
    with pytest.raises(ValueError, match=r"error_parameterised.*ErrorParameterised"):
        pc.error_parameterised(epc)
    # Preconditioning composes in either order and keeps the error parameterisation.
    for model in (pc.preconditioned(epc), pc.error_parameterised(pc.preconditioned(net))):
        assert type(model).__name__ == "Preconditioned"
        assert type(model.base).__name__ == "ErrorParameterised"
