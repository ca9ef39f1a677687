"""Regression tests for the reliability pass (issue 10): each of these failed before its fix.

Ground truths are hand-written energies differentiated with `jax.grad`, closed forms, or the
same computation done sample by sample.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp, rel_error, trees_equal

import pcjax as pc


def handwritten_energy(params, latent, x, observed, precision=None):
    """The energy of `conftest.mlp` written out by hand: 1/2 sum_i p_i ||x_i - mu_i||^2."""
    precision = precision or {}
    nodes = {**latent, **observed}
    h, total = x, 0.0
    for i, (w, b) in enumerate(params):
        name = f"h{i}"
        total = total + 0.5 * jnp.sum(precision.get(name, 1.0) * (nodes[name] - (h @ w + b)) ** 2)
        h = jnp.tanh(nodes[name])
    return total


def sgd_update(new, old):
    """The gradient an `optax.sgd(1.0)` step applied: old - new."""
    return jax.tree.map(lambda a, b: b - a, new, old)


# ---------------------------------------------------------------- 1. Langevin keys


def test_langevin_draws_fresh_noise_every_call_and_replays_a_key(problem):
    params, x, observed, latent = problem
    sampler = pc.langevin(0.05)

    def sample(key):
        return pc.infer(
            mlp, params, latent, x, observed, key=key, solver=pc.GradientDescent(3, sampler)
        )[0]

    first, again, other = sample(jax.random.PRNGKey(0)), sample(jax.random.PRNGKey(0)), None
    other = sample(jax.random.PRNGKey(1))
    assert trees_equal(first, again)
    assert not trees_equal(first, other)
    # In training: two steps with different keys draw different noise, the same key the same.
    optimizer = optax.sgd(0.1)
    step = pc.make_train_step(mlp, pc.Equilibrium(pc.GradientDescent(3, sampler)), optimizer)
    opt_state = optimizer.init(params)
    a, b, c = (
        step(params, opt_state, x, observed, key=jax.random.PRNGKey(k))[0] for k in (5, 5, 6)
    )
    assert trees_equal(a, b) and not trees_equal(a, c)


def test_langevin_noise_is_independent_across_steps():
    """With a zero gradient, T Langevin steps of size eta add N(0, 2 eta T I): the sum of T
    independent draws. Replayed noise (the same draw every step) would give variance
    2 eta T^2."""

    def flat(params, batch):
        return pc.node("z", jnp.zeros((batch.shape[0], 4)))

    steps, eta, chains = 16, 0.01, 4000
    start = {"z": jnp.zeros((chains, 4))}
    # A zero precision is not allowed; a tiny one makes the drift negligible (1e-9 per step).
    states, _ = pc.infer(
        flat,
        None,
        start,
        jnp.zeros((chains, 0)),
        precision={"z": 1e-9},
        key=jax.random.PRNGKey(2),
        solver=pc.GradientDescent(steps, pc.langevin(eta)),
    )
    variance = float(jnp.var(states["z"]))
    expected = 2 * eta * steps
    # Standard error of a variance from 16,000 normal draws: sqrt(2/16000) = 1.1% of it.
    assert abs(variance / expected - 1) < 0.05, (variance, expected)


def test_langevin_without_a_key_is_a_clear_error(problem):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match=r"key="):
        pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(2, pc.langevin(0.05)))
    with pytest.raises(TypeError, match=r"key="):
        pc.langevin(0.05, jax.random.PRNGKey(0))


# ---------------------------------------------------------------- 2. combinations

# pcjax 0.1's flags became composable objects (`pcjax.make_train_step`); a combination without
# a meaning cannot be built (iPC has no tolerance, and one step has one rule), or is refused
# when the step is built. The combinations that compose are tested against ground truths in
# tests/test_algorithms.py.


def test_combinations_without_a_meaning_are_rejected(problem):
    with pytest.raises(TypeError, match="tol"):
        pc.Incremental(2, tol=1e-3)  # iPC makes a fixed number of joint steps
    with pytest.raises(TypeError, match="`solver` must be a pcjax solver"):
        pc.Nudged(pc.Incremental(2))  # two learning rules at once
    rule = pc.Nudged(pc.GradientDescent(2), 0.1, "centred")
    with pytest.raises(ValueError, match="fixed-prediction field is not"):
        pc.make_train_step(pc.fixed_predictions(mlp), rule, optax.sgd(0.1))


# ---------------------------------------------------------------- 3./4. nudging


def _two_layer(params, x):
    """x -> h (custom energy: a Gaussian of precision 4 written by hand) -> y (Gaussian)."""
    h = pc.node("h", x @ params["w1"], energy=lambda s, m: 2.0 * jnp.sum((s - m) ** 2))
    return pc.node("y", jnp.tanh(h) @ params["w2"])


def test_nudging_keeps_hidden_custom_energies():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(7), 4)
    params = {"w1": jax.random.normal(k1, (3, 4)) / 2, "w2": jax.random.normal(k2, (4, 2)) / 2}
    x, y = jax.random.normal(k3, (5, 3)), jax.random.normal(k4, (5, 2))
    beta, eta, steps = 0.1, 0.05, 30

    def reference(params, x, y):  # the free network's energy and the nudged run, by hand
        def internal(p, s):
            return 2.0 * jnp.sum((s["h"] - x @ p["w1"]) ** 2) + 0.5 * jnp.sum(
                (s["y"] - jnp.tanh(s["h"]) @ p["w2"]) ** 2
            )

        def nudged(s):
            return internal(params, s) + beta * 0.5 * jnp.sum((y - s["y"]) ** 2)

        states = {"h": x @ params["w1"], "y": jnp.tanh(x @ params["w1"]) @ params["w2"]}
        for _ in range(steps):
            states = jax.tree.map(lambda s, g: s - eta * g, states, jax.grad(nudged)(states))
        return jax.tree.map(lambda g: g / beta, jax.grad(internal)(params, states))

    # The reference in float64: the nudged gradient divides a difference by beta, so float32
    # rounding differs between machines (against a float32 reference: 1.8e-7 on one CPU,
    # 1.5e-6 on another); against float64 the float32 step's own error is what remains.
    with jax.enable_x64(True):
        as64 = functools.partial(jax.tree.map, lambda a: jnp.asarray(np.asarray(a, np.float64)))
        expected = jax.tree.map(np.asarray, reference(as64(params), as64(x), as64(y)))

    optimizer = optax.sgd(1.0)
    rule = pc.Nudged(pc.GradientDescent(steps, step_size=eta), beta, "positive")
    step = pc.make_train_step(_two_layer, rule, optimizer, mean_over_batch=False)
    new, _, _ = step(params, optimizer.init(params), x, {"y": y})
    # measured 4.5e-6 (a float32 reference written by hand: 4.2e-6)
    assert rel_error(sgd_update(new, params), expected) < 1e-5


def _learned_precision_net(params, x):
    h = pc.node("h", x @ params["w1"])
    return pc.node("y", jnp.tanh(h) @ params["w2"])


@pytest.mark.x64
def test_nudged_precision_gradients_converge_to_the_equilibrium_gradient():
    """With learned precisions the nudged estimates tend, as beta -> 0, to the gradient of the
    output energy at the feedforward pass, L = 1/2 p ||y - f(x)||^2 - N/2 log p (N entries),
    hidden precisions included (their gradient there is 0)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(8), 4)
    params = {
        "w1": jax.random.normal(k1, (3, 4)) / 2,
        "w2": jax.random.normal(k2, (4, 2)) / 2,
        "precision": {"h": pc.ScalarPrecision(2.0), "y": pc.ScalarPrecision(3.0)},
    }
    x, y = jax.random.normal(k3, (5, 3)), jax.random.normal(k4, (5, 2))

    def loss(p):
        output = jnp.tanh(x @ p["w1"]) @ p["w2"]
        py = p["precision"]["y"].value()
        return 0.5 * py * jnp.sum((y - output) ** 2) - 0.5 * y.size * jnp.log(py)

    expected = eqx.filter_grad(loss)(params)
    optimizer = optax.sgd(1.0)

    def estimate(nudging, beta):
        solver = pc.GradientDescent(3000, step_size=0.1, tol=1e-12)
        step = pc.make_train_step(
            _learned_precision_net, pc.Nudged(solver, beta, nudging), optimizer,
            precision=lambda p: p["precision"], mean_over_batch=False,
        )  # fmt: skip
        new, _, info = step(params, optimizer.init(params), x, {"y": y})
        assert int(info.inference_steps) < 3000
        return sgd_update(new, params)

    # (bias order, largest error at beta = 0.01); measured errors at beta = 0.1 / 0.01:
    # positive 0.267 / 0.0363, negative 0.671 / 0.0395, centred 0.208 / 0.00169.
    for nudging, order, bound in [
        ("positive", 1, 0.08),
        ("negative", 1, 0.08),
        ("centred", 2, 5e-3),
    ]:
        errors = [rel_error(estimate(nudging, beta), expected) for beta in (0.1, 0.01)]
        # An O(beta^k) bias shrinks about 10^k-fold: ask for half of that in decades.
        assert errors[1] < bound and errors[0] / errors[1] > 10 ** (order / 2 + 0.3), errors


# ---------------------------------------------------------------- 8. per-sample tolerance


def test_tolerance_stops_the_same_sample_at_the_same_step_in_any_batch(problem):
    params, x, observed, latent = problem

    def steps_taken(x, observed, latent):
        _, info = pc.infer(
            mlp,
            params,
            latent,
            x,
            observed,
            solver=pc.GradientDescent(500, step_size=0.1, tol=1e-3),
        )
        return int(info.steps)

    def pick(tree, rows):
        return jax.tree.map(lambda a: a[np.asarray(rows)], tree)

    alone = [steps_taken(x[i : i + 1], pick(observed, [i]), pick(latent, [i])) for i in range(4)]
    assert len(set(alone)) > 1  # the samples need different numbers of steps
    together = steps_taken(x[:4], pick(observed, range(4)), pick(latent, range(4)))
    assert together == max(alone)
    copies = [0] * 8  # the same sample eight times stops where it stops alone
    assert (
        steps_taken(x[np.asarray(copies)], pick(observed, copies), pick(latent, copies)) == alone[0]
    )


# ---------------------------------------------------------------- 10. preconditioned custom nodes


def _classifier(params, x):
    h = pc.node("h", x @ params["w1"])
    return pc.node("label", jnp.tanh(h) @ params["w2"], energy=pc.cross_entropy)


def test_preconditioned_inference_with_a_free_custom_energy_node():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(9), 3)
    params = {"w1": jax.random.normal(k1, (3, 4)), "w2": jax.random.normal(k2, (4, 5))}
    x = jax.random.normal(k3, (6, 3))
    start = pc.forward_init(_classifier, params, x)
    start["label"] = jnp.full((6, 5), 0.2)
    precision, eta = 4.0, 0.1

    def by_hand(s):
        own = 0.5 * precision * jnp.sum((s["h"] - x @ params["w1"]) ** 2)
        logits = jnp.tanh(s["h"]) @ params["w2"]
        return own - jnp.sum(s["label"] * jax.nn.log_softmax(logits))

    grads = jax.grad(by_hand)(start)
    expected = {"h": start["h"] - eta * grads["h"] / precision, "label": start["label"]}
    expected["label"] = start["label"] - eta * grads["label"]  # custom energy: not scaled
    states, _ = pc.infer(
        pc.preconditioned(_classifier),
        params,
        start,
        x,
        precision={"h": precision},
        solver=pc.GradientDescent(1, step_size=eta),
    )
    for name in expected:
        # measured: max relative 1.6e-6 where entries are near 0, max absolute 2.1e-8
        np.testing.assert_allclose(states[name], expected[name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 11./16. optimizer errors


def test_errors_from_the_optimizer_are_not_blamed_on_its_initialisation(problem):
    params, x, observed, _ = problem
    model = pc.nn.MLP([6, 5, 3], key=jax.random.PRNGKey(0))  # dense layers: Fisher factors
    diagonal = pc.natural_gradient("diagonal")
    kronecker = pc.fisher_statistics(  # statistics of another mode than the transform's
        pc.nn.call, model, {}, x, {"h0": pc.forward_init(pc.nn.call, model, x)["h0"],
        "h1": observed["h2"]}, mode="kronecker",
    )  # fmt: skip

    def refusing_update(updates, state, params=None, **extra):  # an optimizer that raises
        return diagonal.update(updates, state, params, fisher=kronecker)

    optimizer = optax.GradientTransformationExtraArgs(diagonal.init, refusing_update)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = pc.make_train_step(pc.nn.call, pc.Equilibrium(pc.GradientDescent(2)), optimizer)
    with pytest.raises(ValueError, match="other mode") as caught:
        step(model, opt_state, x, {"h1": observed["h2"]})
    assert "initialise the optimizer state" not in str(caught.value)

    def fussy_update(updates, state, params=None):
        if jax.tree.leaves(updates)[0].sum() > 0:  # a Python branch on a traced value
            pass
        return updates, state

    fussy = optax.GradientTransformation(lambda p: optax.EmptyState(), fussy_update)
    step = jax.jit(pc.make_train_step(mlp, pc.Equilibrium(pc.GradientDescent(2)), fussy))
    with pytest.raises(jax.errors.TracerBoolConversionError):
        step(params, fussy.init(params), x, observed)


def test_an_optimizer_state_from_another_optimizer_is_named(problem):
    params, x, observed, _ = problem
    momentum = optax.sgd(0.1, momentum=0.9)
    rule = pc.Equilibrium(pc.GradientDescent(2))
    step = pc.make_train_step(mlp, rule, optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"`opt_state` does not match `optimizer`"):
        step(params, momentum.init(params), x, observed)
    with pytest.raises(TypeError, match=r"`optimizer` must be an optax"):
        pc.make_train_step(mlp, rule, None)


@pytest.mark.parametrize("argument", ["states", "observed"])
def test_node_dicts_of_the_wrong_type_are_named(problem, argument):
    params, x, observed, latent = problem
    bad = {"states": list(latent.values()), "observed": list(observed.values())}[argument]
    kwargs = {"states": latent, "observed": observed, argument: bad}
    with pytest.raises(TypeError, match=rf"`{argument}` must be a dict"):
        pc.infer(mlp, params, kwargs["states"], x, kwargs["observed"], solver=pc.GradientDescent(1))
    with pytest.raises(TypeError, match=rf"`{argument}` must be a dict"):
        pc.energy(mlp, params, kwargs["states"], x, kwargs["observed"])


# ---------------------------------------------------------------- 15. integer scalars


def test_integer_scalars_are_accepted_as_steps_and_the_rest_rejected(problem):
    params, x, observed, latent = problem
    reference, _ = pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(3))
    for steps in (np.int64(3), np.int32(3), jnp.asarray(3)):
        states, _ = pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(steps))
        assert trees_equal(states, reference)
    for steps in (3.0, True, np.array([3]), "3"):
        with pytest.raises(ValueError, match="`steps` must be a positive int"):
            pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(steps))


# ---------------------------------------------------------------- 17. Python float leaves


def test_python_float_parameters_are_refused_with_their_path():
    def scaled(params, x):
        return pc.node("y", params["scale"] * x @ params["w"])

    params = {"scale": 2.0, "w": jnp.ones((3, 2))}
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    optimizer = optax.sgd(0.1)
    step = pc.make_train_step(scaled, pc.Equilibrium(pc.GradientDescent(1)), optimizer)
    with pytest.raises(TypeError, match=r"\['scale'\].*Python float"):
        step(params, optimizer.init(eqx.filter(params, eqx.is_inexact_array)), x, {"y": y})
    with pytest.raises(TypeError, match=r"\['scale'\].*Python float"):
        pc.param_grads(scaled, params, {}, x, {"y": y})


# ---------------------------------------------------------------- 18. iPC's reported energy


def test_incremental_energy_is_the_one_before_the_last_update(problem):
    params, x, observed, latent = problem
    steps, eta, lr, batch = 4, 0.1, 0.05, x.shape[0]
    p, s = params, latent
    for _ in range(steps):  # iPC by hand: one joint gradient of the hand-written energy a step
        value, (gp, gs) = jax.value_and_grad(handwritten_energy, (0, 1))(p, s, x, observed)
        s = jax.tree.map(lambda a, g: a - eta * g, s, gs)
        p = jax.tree.map(lambda a, g: a - lr * g / batch, p, gp)
    optimizer = optax.sgd(lr)
    step = pc.make_train_step(mlp, pc.Incremental(steps, step_size=eta), optimizer)
    new, _, info = step(params, optimizer.init(params), x, observed)
    assert rel_error(new, p) < 1e-7  # measured 3.2e-9 (float32)
    np.testing.assert_allclose(info.energy, value, rtol=1e-6)  # measured 6.8e-8


# ---------------------------------------------------------------- standard-PC parameter gradients


@pytest.mark.x64
def test_standard_pc_param_grads_equal_jax_grad_of_the_handwritten_energy(problem64):
    params, x, observed, latent = problem64
    states, _ = pc.infer(
        mlp, params, latent, x, observed, solver=pc.GradientDescent(20, step_size=0.2)
    )
    precision = {"h0": 2.0, "h2": 0.5}
    grads = pc.param_grads(mlp, params, states, x, observed, precision=precision)
    expected = jax.grad(handwritten_energy)(params, states, x, observed, precision)
    assert rel_error(grads, expected) < 1e-14  # measured 0
