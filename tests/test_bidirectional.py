"""Bidirectional PC (`pcjax.bidirectional`) on a linear network, where every equilibrium is the
solution of a linear system.

Bottom-up: image -> h = image W1 -> y = h W2. Top-down: h is predicted from y by y V2 and the
image from h by h V1. With weights a (up) and b (down), per sample

    F = a/2 (|h - image W1|^2 + |y - h W2|^2) + b/2 (|h - y V2|^2 + |image - h V1|^2),

quadratic in every free node, so the relaxed states are a dense solve of dF/dfree = 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import pcjax as pc

B, DX, DH, DY = 5, 4, 3, 2
UP, DOWN = 1.0, 0.5


def up(params, x):
    image = pc.node("image", x, energy=lambda state, mu: jnp.zeros(()))  # data node, no own term
    h = pc.node("h", image @ params["w1"])
    return pc.node("y", h @ params["w2"])


def down(params, values):
    return {"h": values["y"] @ params["v2"], "image": values["h"] @ params["v1"]}


def energy_by_hand(params, image, h, y):
    bottom_up = jnp.sum((h - image @ params["w1"]) ** 2) + jnp.sum((y - h @ params["w2"]) ** 2)
    top_down = jnp.sum((h - y @ params["v2"]) ** 2) + jnp.sum((image - h @ params["v1"]) ** 2)
    return 0.5 * UP * bottom_up + 0.5 * DOWN * top_down


@pytest.fixture(scope="module")
def setup():
    keys = jax.random.split(jax.random.PRNGKey(11), 6)
    shapes = {"w1": (DX, DH), "w2": (DH, DY), "v2": (DY, DH), "v1": (DH, DX)}
    params = {
        k: jax.random.normal(key, shape) / 2 for (k, shape), key in zip(shapes.items(), keys[:4])
    }
    image = jax.random.normal(keys[4], (B, DX))
    label = jax.random.normal(keys[5], (B, DY))
    model = pc.bidirectional(up, down, up_weight=UP, down_weight=DOWN)
    return params, image, label, model


@functools.partial(jax.jit, static_argnames="free")
def solve_free(params, image, label, free):
    """The minimiser of `energy_by_hand` over the `free` nodes (a dense solve: the energy is
    quadratic, its Hessian constant), the others fixed at the given values. Jitted: run eagerly,
    the Hessian and the solve compile op by op."""
    values = {"image": image, "h": jnp.zeros((B, DH)), "y": label}
    sizes = {"image": DX, "h": DH, "y": DY}

    def flat_energy(z):
        parts, start = dict(values), 0
        for name in free:
            parts[name] = z[:, start : start + sizes[name]]
            start += sizes[name]
        return energy_by_hand(params, parts["image"], parts["h"], parts["y"])

    z0 = jnp.zeros((B, sum(sizes[n] for n in free)))
    gradient = jax.grad(flat_energy)(z0)
    hessian = jax.hessian(flat_energy)(z0)  # (B, n, B, n): block diagonal over samples
    n = z0.shape[1]
    blocks = jnp.stack([hessian[i, :, i, :] for i in range(B)])
    z = -jnp.linalg.solve(blocks, gradient[..., None])[..., 0]
    out, start = {}, 0
    for name in free:
        out[name] = z[:, start : start + sizes[name]]
        start += sizes[name]
    assert start == n
    return out


SOLVER = pc.GradientDescent(3000, step_size=0.2, tol=1e-6)


@pytest.mark.parametrize(
    "free",
    [("h",), ("h", "y"), ("image", "h")],
    ids=["train (image, label clamped)", "classify (label free)", "generate (image free)"],
)
def test_relaxed_states_solve_the_bidirectional_energy(setup, free):
    params, image, label, model = setup
    values = {"image": image, "y": label}
    observed = {k: v for k, v in values.items() if k not in free}
    start = {k: v for k, v in pc.forward_init(up, params, image).items() if k in free}
    states, info = jax.jit(lambda p, s, x, o: pc.infer(model, p, s, x, o, solver=SOLVER))(
        params, start, image, observed
    )
    assert bool(info.converged)
    expected = solve_free(params, image, label, free)
    for name in free:
        error = jnp.max(jnp.abs(states[name] - expected[name]))
        assert error < 1e-5, (name, float(error))  # measured <= 2.3e-6
    # The energy pcjax reports is the hand-written one at these states.
    full = {**values, **states}
    assert jnp.allclose(
        pc.energy(model, params, states, image, observed),
        energy_by_hand(params, full["image"], full["h"], full["y"]),
        rtol=1e-6,
    )


def test_learning_takes_the_gradient_of_both_networks(setup):
    params, image, label, model = setup
    h_star = solve_free(params, image, label, ("h",))["h"]
    expected = jax.grad(energy_by_hand)(params, image, h_star, label)
    lr = 0.1
    step = jax.jit(pc.make_train_step(model, pc.Equilibrium(SOLVER), optax.sgd(lr)))
    new, _, info = step(params, optax.sgd(lr).init(params), image, {"image": image, "y": label})
    assert bool(info.converged)
    for k in params:  # make_train_step averages over the batch
        moved = (params[k] - new[k]) / lr * B
        error = jnp.linalg.norm(moved - expected[k]) / jnp.linalg.norm(expected[k])
        assert error < 5e-6, (k, float(error))  # measured <= 9.2e-7
    assert float(jnp.linalg.norm(expected["v1"])) > 0.1  # the top-down weights do learn


def test_zero_down_weight_is_standard_pc(setup):
    params, image, label, _ = setup
    model = pc.bidirectional(up, down, down_weight=0.0)
    states = {"h": jax.random.normal(jax.random.PRNGKey(0), (B, DH))}
    observed = {"image": image, "y": label}
    grads = pc.param_grads(model, params, states, image, observed)
    expected = pc.param_grads(up, params, states, image, observed)
    for k in ("w1", "w2"):
        assert jnp.allclose(grads[k], expected[k], rtol=1e-6)
    assert not jnp.any(grads["v1"]) and not jnp.any(grads["v2"])


def test_refusals_name_the_problem(setup):
    params, image, label, model = setup
    with pytest.raises(ValueError, match="FPA transforms the standard energy only"):
        pc.fixed_predictions(model)
    with pytest.raises(ValueError, match="ePC transforms the standard energy only"):
        pc.error_parameterised(model)
    with pytest.raises(ValueError, match="Nudged: nudging a bidirectional"):
        pc.make_train_step(model, pc.Nudged(SOLVER), optax.sgd(0.1))
    with pytest.raises(TypeError, match="`up` must be a tagged forward function"):
        pc.bidirectional(pc.preconditioned(up), down)
    with pytest.raises(ValueError, match="`down_weight` must be a non-negative"):
        pc.bidirectional(up, down, down_weight=-1.0)
    step = pc.make_train_step(
        model, pc.Equilibrium(pc.GradientDescent(2)), pc.natural_gradient("diagonal")
    )
    opt = pc.natural_gradient("diagonal")
    with pytest.raises(ValueError, match=r"bidirectional \(bPC\) network are not implemented"):
        step(params, opt.init(params), image, {"image": image, "y": label})
    observed = {"image": image, "y": label}
    states = {"h": jnp.zeros((B, DH))}
    wrong_name = pc.bidirectional(up, lambda p, v: {"hidden": v["h"]})
    with pytest.raises(ValueError, match="predicts 'hidden', which is not a node"):
        pc.energy(wrong_name, params, states, image, observed)
    wrong_shape = pc.bidirectional(up, lambda p, v: {"h": v["y"]})
    with pytest.raises(ValueError, match=r"prediction of node 'h' has shape \(5, 2\)"):
        pc.energy(wrong_shape, params, states, image, observed)
