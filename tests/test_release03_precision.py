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
    step = jax.jit(
        pc.make_train_step(
            fn,
            pc.Equilibrium(pc.GradientDescent(2)),
            optax.sgd(0.05),
            precision=lambda p: {"y": p["prec"]},
        )
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


# ------------------------------------------------------------------ item 4: transformations


def _tanh_net(params, x):
    h = pc.node("h", x @ params["w1"])
    return pc.node("y", jnp.tanh(h) @ params["w2"])


def _down(params, values):
    return {"h": values["y"] @ params["w2"].T}


@pytest.fixture(scope="module")
def tanh_problem():
    key1, key2, key3, key4 = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": jax.random.normal(key1, (3, 4)) / 2,
        "w2": jax.random.normal(key2, (4, 2)) / 2,
    }
    x = jax.random.normal(key3, (5, 3))
    h_state = x @ params["w1"] + 0.3 * jax.random.normal(key4, (5, 4))
    y = jnp.ones((5, 2))
    return params, x, h_state, y


TRANSFORMS = {
    "fixed_predictions": lambda fn: pc.fixed_predictions(fn),
    "preconditioned": lambda fn: pc.preconditioned(fn),
    "preconditioned_fpa": lambda fn: pc.preconditioned(pc.fixed_predictions(fn)),
    "error_parameterised": lambda fn: pc.error_parameterised(fn),
    "bidirectional": lambda fn: pc.bidirectional(fn, _down),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_forward_init_and_prediction_errors_take_transformations(tanh_problem, name):
    # Issue 29 item 4: these raised "'FixedPredictions' object is not callable".
    params, x, h_state, y = tanh_problem
    model = TRANSFORMS[name](_tanh_net)
    h_hat = x @ params["w1"]
    init = pc.forward_init(model, params, x)
    np.testing.assert_allclose(init["h"], h_hat, rtol=1e-6)
    np.testing.assert_allclose(init["y"], jnp.tanh(h_hat) @ params["w2"], rtol=1e-6)
    errors = pc.prediction_errors(model, params, {"h": h_state}, x, {"y": y})
    np.testing.assert_allclose(errors["h"], h_state - h_hat, rtol=1e-6)
    # FPA: the output's prediction is frozen at the feedforward pass, not at the state
    fpa = name in ("fixed_predictions", "preconditioned_fpa")
    parent = h_hat if fpa else h_state
    np.testing.assert_allclose(errors["y"], y - jnp.tanh(parent) @ params["w2"], rtol=1e-5)
    if name != "bidirectional":  # the errors are those the energy weighs
        value = pc.energy(model, params, {"h": h_state}, x, {"y": y})
        np.testing.assert_allclose(
            value, 0.5 * sum(jnp.sum(e**2) for e in errors.values()), rtol=1e-5
        )


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_fisher_statistics_and_mask_take_transformations(tanh_problem, name):
    params, x, h_state, y = tanh_problem
    model = TRANSFORMS[name](_tanh_net)
    mask = pc.fisher_mask(model, params, x)
    assert mask == {"w1": True, "w2": True}
    if name == "bidirectional":
        with pytest.raises(ValueError, match=r"bidirectional.*top-down"):
            pc.fisher_statistics(model, params, {"h": h_state}, x, {"y": y})
        return
    stats = pc.fisher_statistics(model, params, {"h": h_state}, x, {"y": y})
    # E[f(h) f(h)^T] at the linearisation point: the feedforward pass under FPA
    fpa = name in ("fixed_predictions", "preconditioned_fpa")
    inputs = jnp.tanh(x @ params["w1"] if fpa else h_state)
    np.testing.assert_allclose(stats["w2"].inputs, inputs.T @ inputs / 5, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["w1"].inputs, x.T @ x / 5, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ item 7: checkpoints


def test_checkpoint_refuses_other_container_classes(tmp_path):
    # Issue 29 item 7: a saved tuple loaded into a list, and a saved eqx.nn.Linear into another
    # module class with the same fields.
    import collections

    import equinox as eqx

    path = tmp_path / "ckpt"
    pc.save_checkpoint(path, (jnp.ones(2),))
    with pytest.raises(
        ValueError, match=r"leaf \[0\] sits in a tuple in the checkpoint but in a list"
    ):
        pc.load_checkpoint(path, [jnp.zeros(2)])
    loaded, _ = pc.load_checkpoint(path, (jnp.zeros(2),))
    assert isinstance(loaded, tuple)
    np.testing.assert_array_equal(loaded[0], [1.0, 1.0])

    pair = collections.namedtuple("Pair", ["a", "b"])
    other_pair = collections.namedtuple("OtherPair", ["a", "b"])
    pc.save_checkpoint(path, pair(jnp.ones(1), jnp.ones(2)))
    with pytest.raises(ValueError, match=r"leaf \.a sits in a Pair in the checkpoint but in a Oth"):
        pc.load_checkpoint(path, other_pair(jnp.zeros(1), jnp.zeros(2)))
    assert type(pc.load_checkpoint(path, pair(jnp.zeros(1), jnp.zeros(2)))[0]) is pair

    class Other(eqx.Module):
        weight: jax.Array
        bias: jax.Array

    linear = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    pc.save_checkpoint(path, {"layer": linear})
    with pytest.raises(ValueError, match=r"\['layer'\]\.weight sits in a Linear .* in a \S*Other"):
        pc.load_checkpoint(path, {"layer": Other(linear.weight, linear.bias)})
    loaded, _ = pc.load_checkpoint(path, {"layer": eqx.nn.Linear(2, 3, key=jax.random.key(1))})
    np.testing.assert_array_equal(loaded["layer"].weight, linear.weight)


def test_checkpoint_leaf_count_error_names_the_leaf(tmp_path):
    path = tmp_path / "ckpt"
    pc.save_checkpoint(path, {"a": jnp.ones(2), "b": [jnp.ones(1), jnp.ones(3)]})
    with pytest.raises(ValueError, match=r"\['b'\]\[1\].*leaves: 3 in the checkpoint, 2"):
        pc.load_checkpoint(path, {"a": jnp.ones(2), "b": [jnp.ones(1)]})
    with pytest.raises(ValueError, match=r"\['c'\].*leaves: 3 in the checkpoint, 4"):
        pc.load_checkpoint(
            path, {"a": jnp.ones(2), "b": [jnp.ones(1), jnp.ones(3)], "c": jnp.ones(1)}
        )


# ------------------------------------------------------------------ item 9: FPA with precisions


def _deep_net(params, x):
    h1 = pc.node("h1", x @ params["w1"])
    h2 = pc.node("h2", jnp.tanh(h1) @ params["w2"])
    return pc.node("y", jnp.tanh(h2) @ params["w3"])


def test_preconditioned_fixed_predictions_one_pass_with_precisions():
    # Issue 29 item 9: with hidden precisions != 1, FPA's step of size 1 does not give the
    # backprop errors in one pass (here it diverges: P up to 3); preconditioned FPA with step
    # 1 does, for any precisions: P_i e_i = -dL/dx_i after `depth` steps.
    keys = jax.random.split(jax.random.key(0), 5)
    params = {
        "w1": jax.random.normal(keys[0], (3, 4)),
        "w2": jax.random.normal(keys[1], (4, 4)) / 2,
        "w3": jax.random.normal(keys[2], (4, 2)) / 2,
    }
    x, y = jax.random.normal(keys[3], (5, 3)), jax.random.normal(keys[4], (5, 2))
    p_h2 = jnp.array([0.5, 3.0, 1.0, 2.0])
    precision = {"h1": 2.0, "h2": pc.DiagonalPrecision(p_h2), "y": 3.0}

    def loss_of_h2(h2):  # the observed node's energy as a function of h2 (hand-written)
        return 0.5 * 3.0 * jnp.sum((y - jnp.tanh(h2) @ params["w3"]) ** 2)

    def loss_of_h1(h1):
        return loss_of_h2(jnp.tanh(h1) @ params["w2"])

    h1_hat = x @ params["w1"]
    h2_hat = jnp.tanh(h1_hat) @ params["w2"]
    states = {"h1": h1_hat, "h2": h2_hat}
    solver = pc.GradientDescent(2, step_size=1.0)  # two free layers: two steps

    @jax.jit
    def relax(states):
        def run(model):
            relaxed, _ = pc.infer(
                model, params, states, x, {"y": y}, solver=solver, precision=precision
            )
            return relaxed

        fpa = pc.fixed_predictions(_deep_net)
        return run(pc.preconditioned(fpa)), run(fpa)

    relaxed, plain = relax(states)
    np.testing.assert_allclose(
        2.0 * (relaxed["h1"] - h1_hat), -jax.grad(loss_of_h1)(h1_hat), rtol=1e-4, atol=1e-5
    )  # measured 4.8e-7 (float32)
    np.testing.assert_allclose(
        p_h2 * (relaxed["h2"] - h2_hat), -jax.grad(loss_of_h2)(h2_hat), rtol=1e-4, atol=1e-5
    )
    # plain FPA with step 1 does not: the error is carried on times (1 - P) each step
    gap = jnp.max(jnp.abs(2.0 * (plain["h1"] - h1_hat) + jax.grad(loss_of_h1)(h1_hat)))
    assert gap > 0.1  # measured 0.62 (float32)


# ------------------------------------------------------------------ item 8: preset "fast"


def test_fast_preset_signal_is_what_its_docstring_says():
    # Issue 29 item 8: the docstring called the preset backprop-like; it now says the input
    # layer gets exactly its backprop gradient and the output layer learns from
    # e' = e (I - W^T W) (linear output on one free node).
    def net(params, x):
        h = pc.node("h", jnp.tanh(x @ params["w1"]))
        return pc.node("y", h @ params["w2"])

    keys = jax.random.split(jax.random.key(7), 4)
    params = {
        "w1": jax.random.normal(keys[0], (5, 8)) / 5**0.5,
        "w2": jax.random.normal(keys[1], (8, 3)) / 8**0.5,
    }
    x, y = jax.random.normal(keys[2], (6, 5)), jax.random.normal(keys[3], (6, 3))
    model, rule = pc.preset("fast", net)
    h_hat = jnp.tanh(x @ params["w1"])

    @jax.jit  # one compilation instead of many eager dispatches
    def preset_grads(params, x, y):
        relaxed, _ = pc.infer(model, params, {"h": h_hat}, x, {"y": y}, solver=rule.solver)
        return pc.param_grads(net, params, relaxed, x, {"y": y})

    grads = preset_grads(params, x, y)

    def loss(params):  # backprop, hand-written
        return 0.5 * jnp.sum((y - jnp.tanh(x @ params["w1"]) @ params["w2"]) ** 2)

    backprop = jax.grad(loss)(params)
    np.testing.assert_allclose(grads["w1"], backprop["w1"], rtol=1e-5, atol=1e-6)
    e = y - h_hat @ params["w2"]
    h_moved = h_hat + e @ params["w2"].T  # one step: epsilon = backprop gradient
    e_after = e @ (jnp.eye(3) - params["w2"].T @ params["w2"])
    np.testing.assert_allclose(grads["w2"], -h_moved.T @ e_after, rtol=1e-5, atol=1e-6)
