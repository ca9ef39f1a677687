"""Amortised (hybrid) PC (`pcjax.Amortised`) on a linear-Gaussian generative model, where the
posterior mean is known in closed form.

Model: z ~ N(0, I) (the node "z" predicted by the zero input), y ~ N(z W, I) observed, so

    F = 1/2 |z|^2 + 1/2 |y - z W|^2,   posterior mean z* = y W^T (I + W W^T)^-1 = y A*,

and the amortiser q(y) = y A is exact at A = A*.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import pcjax as pc

B, DZ, DY = 8, 3, 5


def generative(params, x):
    z = pc.node("z", x)  # x: zeros, the prior mean
    return pc.node("y", z @ params["w"])


def amortiser(params, x, observed):
    return {"z": observed["y"] @ params["a"]}


@pytest.fixture(scope="module")
def problem():
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    w = jax.random.normal(k[0], (DZ, DY)) / 2
    a_star = w.T @ jnp.linalg.inv(jnp.eye(DZ) + w @ w.T)
    params = {"w": w, "a": 0.1 * jax.random.normal(k[1], (DY, DZ))}
    return params, a_star, k[2]


def relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_amortised_step_matches_the_closed_form(problem):
    params, a_star, key = problem
    y = jax.random.normal(key, (B, DY))
    x = jnp.zeros((B, DZ))
    z_star = y @ a_star  # the exact equilibrium, whatever the start
    # Hand-written: dF/dW at z*, and the amortisation gradient -(y^T (z* - y A)); batch mean.
    grad_w = -(z_star.T @ (y - z_star @ params["w"]))
    grad_a = -(y.T @ (z_star - y @ params["a"]))
    lr = 0.5
    solver = pc.GradientDescent(2000, step_size=0.2, tol=1e-6)
    step = jax.jit(pc.make_train_step(generative, pc.Amortised(solver, amortiser), optax.sgd(lr)))
    new, _, info = step(params, optax.sgd(lr).init(params), x, {"y": y})
    assert bool(info.converged)
    assert relative(new["w"] - params["w"], -lr * grad_w / B) < 1e-5  # measured 5.2e-7 (49 steps)
    assert relative(new["a"] - params["a"], -lr * grad_a / B) < 1e-5  # measured 3.6e-7


def test_the_amortiser_learns_the_posterior_mean_and_shortens_inference(problem):
    params, a_star, key = problem
    # Learn the amortiser only (the generative weights masked out of the optimizer).
    optimizer = optax.multi_transform(
        {"learn": optax.sgd(0.3), "freeze": optax.set_to_zero()}, {"w": "freeze", "a": "learn"}
    )
    solver = pc.GradientDescent(500, step_size=0.2, tol=1e-5)
    step = jax.jit(pc.make_train_step(generative, pc.Amortised(solver, amortiser), optimizer))
    opt_state = optimizer.init(params)
    x = jnp.zeros((B, DZ))
    steps = []
    for k in jax.random.split(key, 150):
        y = jax.random.normal(k, (B, DY))
        params, opt_state, info = step(params, opt_state, x, {"y": y})
        steps.append(int(info.inference_steps))
    assert relative(params["a"], a_star) < 1e-4  # measured 3.0e-6
    # From the learned proposal inference starts at the equilibrium (measured: 40 steps at
    # the first batch, 0 at the last).
    assert steps[-1] < steps[0] / 4, (steps[0], steps[-1])


def test_amortiser_output_is_checked_against_the_free_nodes(problem):
    params, _, key = problem
    y = jax.random.normal(key, (B, DY))
    solver = pc.GradientDescent(3)
    for bad, match in [
        (lambda p, x, o: {"y": o["y"]}, "free node"),
        (lambda p, x, o: {"z": o["y"]}, "shape"),
    ]:
        step = pc.make_train_step(generative, pc.Amortised(solver, bad), optax.sgd(0.1))
        with pytest.raises(ValueError, match=match):
            step(params, optax.sgd(0.1).init(params), jnp.zeros((B, DZ)), {"y": y})
    with pytest.raises(TypeError, match="amortiser"):
        pc.Amortised(solver, "not a function")
