"""Issue 29 (solver parts): per-example `jax.vmap` of inference and training (item 3),
per-sample freezing under `tol` (item 6), argument checks and a differentiable `tol`
(item 13), readable `throw=True` errors (item 14). Ground truths are hand-written JAX."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcjax as pc

IN, HID, OUT, BATCH = 3, 4, 5, 6
STATE_STEP, LR = 0.2, 0.5


def two_layer(params, x):
    """h = W1 x (free), y = W2 tanh(h) (observed): one example per row, or one example."""
    h = pc.node("h", x @ params["w1"])
    return pc.node("y", jnp.tanh(h) @ params["w2"])


def hand_energy(params, h, x, y):
    """The same network's energy, written out: 1/2 |h - W1 x|^2 + 1/2 |y - W2 tanh h|^2."""
    return 0.5 * jnp.sum((h - x @ params["w1"]) ** 2) + 0.5 * jnp.sum(
        (y - jnp.tanh(h) @ params["w2"]) ** 2
    )


@pytest.fixture(scope="module")
def data():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {
        "w1": jax.random.normal(k1, (IN, HID)),
        "w2": jax.random.normal(k2, (HID, OUT)),
    }
    x = jax.random.normal(k3, (BATCH, IN))
    y = jax.random.normal(k4, (BATCH, OUT)) * 2
    return params, x, y


def hand_relaxed(params, x, y, steps):
    """`steps` SGD steps of size STATE_STEP on h from the feedforward pass (one example)."""
    h = x @ params["w1"]
    for _ in range(steps):
        h = h - STATE_STEP * jax.grad(hand_energy, argnums=1)(params, h, x, y)
    return h


# ---------------------------------------------------------------- item 3: vmap over examples


def test_vmapped_infer_reports_each_examples_euclidean_norm(data):
    params, x, y = data
    solver = pc.GradientDescent(2, step_size=STATE_STEP)

    def one(xn, yn):
        start = {"h": xn @ params["w1"]}
        return pc.infer(two_layer, params, start, xn, {"y": yn}, solver=solver)

    states, info = jax.vmap(one)(x, y)
    for n in range(BATCH):
        h = hand_relaxed(params, x[n], y[n], 2)
        np.testing.assert_allclose(states["h"][n], h, rtol=1e-5, atol=1e-6)
        field = jax.grad(hand_energy, argnums=1)(params, h, x[n], y[n])
        # the example's Euclidean norm (before the fix: its largest component)
        # measured relative difference 5.2e-5 (float32 rounding of a small field)
        np.testing.assert_allclose(info.grad_norm[n], jnp.linalg.norm(field), rtol=3e-4)


def test_vmapped_tol_stops_on_the_examples_norm(data):
    params, x, y = data
    # A tolerance between the largest component and the norm of the first example's field.
    h = hand_relaxed(params, x[0], y[0], 0)
    field = jax.grad(hand_energy, argnums=1)(params, h, x[0], y[0])
    norm, largest = float(jnp.linalg.norm(field)), float(jnp.max(jnp.abs(field)))
    assert largest < norm
    tol = 0.5 * (largest + norm)
    solver = pc.GradientDescent(1, step_size=STATE_STEP, tol=tol)
    start = {"h": x[0] @ params["w1"]}
    _, info = pc.infer(two_layer, params, start, x[0], {"y": y[0]}, solver=solver)
    # At the start the norm is above tol: one step is taken and the run is not converged.
    assert int(info.steps) == 1


def test_vmapped_train_step_applies_the_per_example_update(data):
    params, x, y = data
    step = pc.make_train_step(
        two_layer, pc.Equilibrium(pc.GradientDescent(2, step_size=STATE_STEP)), optax.sgd(LR)
    )
    opt_state = optax.sgd(LR).init(params)

    def one(xn, yn):
        return step(params, opt_state, xn, {"y": yn})[0]

    updated = jax.vmap(one)(x, y)
    batched = step(params, opt_state, x, {"y": y})[0]
    grads = []
    for n in range(BATCH):
        h = hand_relaxed(params, x[n], y[n], 2)
        grads.append(jax.grad(hand_energy)(params, h, x[n], y[n]))
    for name in params:
        per_example = [params[name] - LR * g[name] for g in grads]
        # One example is one sample: the full update (before the fix, 1/OUT of it).
        np.testing.assert_allclose(updated[name], np.stack(per_example), rtol=1e-4, atol=1e-6)
        mean = params[name] - LR * sum(g[name] for g in grads) / BATCH
        np.testing.assert_allclose(batched[name], mean, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- items 6 and 13: tol


def relax_batch(params, x, y, solver):
    start = {"h": x @ params["w1"]}
    return pc.infer(two_layer, params, start, x, {"y": y}, solver=solver)


def test_a_sample_stops_at_the_same_step_alone_and_in_a_batch(data):
    params, x, y = data
    solver = pc.GradientDescent(400, step_size=STATE_STEP, tol=1e-4)
    # the second sample needs more steps: measured 30 alone, 67 in the batch
    alone, info_alone = relax_batch(params, x[:1], y[:1], solver)
    batch, info_batch = relax_batch(params, x[:2], y[:2], solver)
    assert int(info_alone.steps) == 30 and int(info_batch.steps) == 67
    # Before the fix the fast sample kept moving after its own stop (difference 1.1e-4 here).
    # Measured difference after: 0.0 (the frozen sample's states are the ones it had alone).
    np.testing.assert_array_equal(batch["h"][0], alone["h"][0])
    # (eager runs recompute the final norm outside the loop: 1.0021e-4 measured, rounding)
    assert float(info_alone.grad_norm) < 1.01e-4 and float(info_batch.grad_norm) < 1.01e-4


def test_a_frozen_sample_ignores_the_optimizers_momentum(data):
    params, x, y = data
    solver = pc.GradientDescent(400, optax.sgd(0.1, momentum=0.9), tol=1e-4)
    alone, _ = relax_batch(params, x[:1], y[:1], solver)
    batch, _ = relax_batch(params, x[:2], y[:2], solver)
    np.testing.assert_array_equal(batch["h"][0], alone["h"][0])


def test_jax_grad_through_a_tol_run_matches_the_unrolled_relaxation(data):
    params, x, y = data
    solver = pc.GradientDescent(100, step_size=STATE_STEP, tol=1e-3)
    _, info = relax_batch(params, x[:1], y[:1], solver)
    steps = int(info.steps)
    assert 1 < steps < 100

    def loss(w1):
        states, _ = relax_batch({**params, "w1": w1}, x[:1], y[:1], solver)
        return jnp.sum(states["h"] ** 2)

    def hand_loss(w1):  # the same number of steps, written out (the stop is locally constant)
        return jnp.sum(hand_relaxed({**params, "w1": w1}, x[0], y[0], steps) ** 2)

    # Before the fix: "Reverse-mode differentiation does not work for lax.while_loop".
    np.testing.assert_allclose(
        jax.grad(loss)(params["w1"]), jax.grad(hand_loss)(params["w1"]), rtol=1e-4, atol=1e-6
    )


# ---------------------------------------------------------------- item 13: argument checks


@pytest.mark.parametrize(
    "kwargs, name",
    [({"dtmax": 0.0}, "dtmax"), ({"dtmax": -1.0}, "dtmax"), ({"rtol": 0.0}, "rtol"),
     ({"atol": -1e-4}, "atol"), ({"max_steps": 0}, "max_steps")],
)  # fmt: skip
def test_ode_refuses_bad_step_controls(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        pc.ODE(**kwargs)


def test_a_key_that_is_not_a_random_key_is_named(data):
    params, x, y = data
    solver = pc.GradientDescent(2, pc.langevin(0.05))
    start = {"h": x @ params["w1"]}
    with pytest.raises(TypeError, match=r"`key` must be a jax\.random key"):
        pc.infer(two_layer, params, start, x, {"y": y}, solver=solver, key=0)
    step = pc.make_train_step(two_layer, pc.Equilibrium(solver), optax.sgd(LR))
    with pytest.raises(TypeError, match=r"`key` must be a jax\.random key"):
        step(params, optax.sgd(LR).init(params), x, {"y": y}, key=jnp.zeros(3))
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):  # typed and legacy keys work
        states, _ = pc.infer(two_layer, params, start, x, {"y": y}, solver=solver, key=key)
        assert states["h"].shape == (BATCH, HID)


@pytest.mark.parametrize(
    "optimizer", [optax.sgd(-0.1), optax.adam(-1e-2), optax.sgd(-0.1, momentum=0.9)]
)
def test_a_state_optimizer_that_ascends_is_refused(optimizer):
    # Before: accepted; the run showed only energy_rose=True with diverged=False.
    with pytest.raises(ValueError, match="UP the energy gradient"):
        pc.GradientDescent(5, optimizer)
    with pytest.raises(ValueError, match="UP the energy gradient"):
        pc.Incremental(5, optimizer)
    pc.GradientDescent(5, optax.sgd(0.1))  # descending ones pass
    pc.GradientDescent(5, pc.langevin(0.05))


# ---------------------------------------------------------------- item 14: throw under jit


def test_throw_message_reaches_the_user_under_filter_jit(data):
    params, x, y = data
    solver = pc.GradientDescent(2, step_size=STATE_STEP, tol=1e-9, throw=True)

    @eqx.filter_jit
    def run(params, x, y):
        return relax_batch(params, x, y, solver)

    with pytest.raises(eqx.EquinoxRuntimeError, match="before every sample's state gradient"):
        jax.block_until_ready(run(params, x, y))


# ---------------------------------------------------------------- issue 28: the certificate


def test_relative_grad_norm_is_one_at_step_zero_and_matches_a_hand_computation(data):
    params, x, y = data
    field = jax.vmap(jax.grad(hand_energy, argnums=1), in_axes=(None, 0, 0, 0))
    start = field(params, x @ params["w1"], x, y)
    for steps in (1, 3):
        _, info = relax_batch(params, x, y, pc.GradientDescent(steps, step_size=STATE_STEP))
        end = field(params, jax.vmap(hand_relaxed, (None, 0, 0, None))(params, x, y, steps), x, y)
        ratio = jnp.max(jnp.linalg.norm(end, axis=1) / jnp.linalg.norm(start, axis=1))
        np.testing.assert_allclose(info.relative_grad_norm, ratio, rtol=1e-4)
        np.testing.assert_allclose(
            info.initial_grad_norm, jnp.max(jnp.linalg.norm(start, axis=1)), rtol=1e-5
        )
        # far from equilibrium after a few steps: not converged without a tol (it was True)
        assert float(info.relative_grad_norm) > 0.1 and not bool(info.converged)
    # step 0 itself: the relaxed states are the start (a tiny step), ratio 1
    _, info = relax_batch(params, x, y, pc.GradientDescent(1, step_size=1e-9))
    np.testing.assert_allclose(info.relative_grad_norm, 1.0, rtol=1e-4)
    _, info = relax_batch(params, x, y, pc.GradientDescent(400, step_size=STATE_STEP))
    assert bool(info.converged) and float(info.relative_grad_norm) <= 1e-3


def test_a_sample_that_starts_at_equilibrium_counts_zero(data):
    params, x, _ = data
    y0 = jnp.tanh(x @ params["w1"]) @ params["w2"]  # the feedforward pass is exact: field 0
    _, info = relax_batch(params, x, y0, pc.GradientDescent(2, step_size=STATE_STEP))
    assert float(info.initial_grad_norm) == 0.0 and float(info.relative_grad_norm) == 0.0
    assert bool(info.converged)


P_Y = 2.0


def linear_gaussian(params, x):
    z = pc.node("z", params["m"] + 0.0 * x)
    return pc.node("y", z @ params["w"])


def test_equilibrium_gap_against_the_closed_form_equilibrium():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {"m": jax.random.normal(k1, (3,)), "w": jax.random.normal(k2, (3, 2)) / 2}
    x, y = jnp.zeros((4, 1)), jax.random.normal(k3, (4, 2))
    w = np.asarray(params["w"], np.float64)
    lhs = np.eye(3) + P_Y * w @ w.T  # dense solve of the posterior mode, per sample
    rhs = np.asarray(params["m"])[None] + P_Y * np.asarray(y, np.float64) @ w.T
    z_star = jnp.asarray(np.linalg.solve(lhs, rhs.T).T, jnp.float32)

    def hand_grads(z):  # dF/d(m, w), written out
        def f(p):
            return 0.5 * jnp.sum((z - p["m"]) ** 2) + 0.5 * P_Y * jnp.sum((y - z @ p["w"]) ** 2)

        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(jax.grad(f)(params))])

    one_step, _ = pc.infer(
        linear_gaussian, params, {"z": jnp.zeros((4, 3))}, x, {"y": y},
        solver=pc.GradientDescent(1, step_size=0.1), precision={"y": P_Y},
    )  # fmt: skip
    gap = pc.equilibrium_gap(
        linear_gaussian, params, one_step, x, {"y": y}, precision={"y": P_Y},
        reference=pc.GradientDescent(300, step_size=0.2),
    )  # fmt: skip
    truth = jnp.linalg.norm(hand_grads(one_step["z"]) - hand_grads(z_star)) / jnp.linalg.norm(
        hand_grads(z_star)
    )
    assert float(truth) > 0.3  # one step is far from equilibrium (measured 0.8)
    np.testing.assert_allclose(gap.gap, truth, rtol=1e-3)
    assert float(gap.energy_gap) > 0 and bool(gap.reference.converged)
    np.testing.assert_allclose(gap.reference_states["z"], z_star, atol=1e-5)
    at_mode = pc.equilibrium_gap(
        linear_gaussian, params, {"z": z_star}, x, {"y": y}, precision={"y": P_Y},
        reference=pc.GradientDescent(300, step_size=0.2),
    )  # fmt: skip
    assert float(at_mode.gap) < 1e-5


def test_guarded_reports_a_skipped_step(data):
    params, x, y = data
    opt = optax.sgd(LR)
    good = pc.guarded(
        pc.make_train_step(
            two_layer, pc.Equilibrium(pc.GradientDescent(2, step_size=STATE_STEP)), opt
        )
    )
    bad = pc.guarded(
        pc.make_train_step(two_layer, pc.Equilibrium(pc.GradientDescent(60, step_size=50.0)), opt)
    )
    kept, _, info = bad(params, opt.init(params), x, {"y": y})
    assert int(info.skipped) == 1 and bool(info.diverged)
    np.testing.assert_array_equal(kept["w1"], params["w1"])  # the update was not applied
    _, _, info = good(params, opt.init(params), x, {"y": y})
    assert int(info.skipped) == 0
