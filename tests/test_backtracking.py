"""`pcjax.Backtracking`: gradient descent on the states whose kept steps never raise the energy,
checked against dense-solve equilibria of linear-Gaussian networks."""

import jax
import jax.numpy as jnp
import optax
import pytest

import pcjax as pc

# A stiff latent node: precisions 1, 30, 900 (the ratio of the uncertainty notebook's task).
PRECISION = jnp.array([1.0, 30.0, 900.0])
STEP = 0.01  # above plain gradient descent's bound 2 / lambda_max = 2.2e-3 (lambda_max = 900.5)


def net(params, x):
    h = pc.node("h", x @ params["w1"])
    return pc.node("y", h @ params["w2"])


def _problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k1, (2, 3)), "w2": jax.random.normal(k2, (3, 2)) / 2}
    x, y = jax.random.normal(k3, (4, 2)), jax.random.normal(k4, (4, 2))
    return params, x, y


def _equilibrium(params, x, y):
    """The minimiser of F = 1/2 (h - x W1)^T P (h - x W1) + 1/2 |y - h W2|^2 in h, per sample:
    (P + W2 W2^T) h = P x W1 + W2 y, by a dense solve."""
    w2 = params["w2"]
    matrix = jnp.diag(PRECISION) + w2 @ w2.T
    rhs = (x @ params["w1"]) * PRECISION + y @ w2.T
    return jnp.linalg.solve(matrix, rhs.T).T


@pytest.fixture(scope="module")
def problem():
    params, x, y = _problem()
    return params, x, y, _equilibrium(params, x, y)


PREC = {"h": pc.DiagonalPrecision(PRECISION)}


def test_stiff_precision_reaches_dense_equilibrium_where_gradient_descent_diverges(problem):
    params, x, y, h_star = problem
    start = {"h": jnp.zeros_like(h_star)}

    def relax(solver):
        return pc.infer(net, params, start, x, {"y": y}, solver=solver, precision=PREC)

    _, plain = jax.jit(lambda: relax(pc.GradientDescent(50, step_size=STEP)))()
    assert bool(plain.diverged) or bool(plain.energy_rose)

    solver = pc.Backtracking(1500, step_size=STEP, record_energy=True)
    states, info = jax.jit(lambda: relax(solver))()
    error = float(jnp.max(jnp.abs(states["h"] - h_star)))
    assert error < 1e-4, error  # measured 3.5e-6
    assert not bool(info.diverged) and not bool(info.energy_rose)
    energies = info.energies
    assert energies.shape == (1500,)
    # Non-increasing up to float32 rounding of F: a kept step may raise the computed energy by
    # at most 64 eps |F| (and only while still descending); measured rises <= 1.9e-6 (2 ulps).
    rounding = 64 * jnp.finfo(jnp.float32).eps * jnp.abs(energies[:-1])
    rises = jnp.diff(energies) - rounding
    assert bool(jnp.all(rises <= 0)), jnp.max(rises)
    assert float(energies[-1]) < float(energies[0]) - 100  # measured start -> end: 489 -> -14.5
    assert float(info.energy) <= float(energies[-1])
    # every proposal counted: the start, >= one a step, and the caller's final evaluation
    assert 1502 <= int(info.evaluations) <= 1500 * 20 + 2
    assert bool(info.converged)  # relative field norm below 1e-3


def test_jit_and_vmap_per_example(problem):
    """A per-example run under `jax.vmap` (each example its own step size) inside `jax.jit`."""
    params, x, y, h_star = problem
    solver = pc.Backtracking(1500, step_size=STEP)

    def one(h, x_n, y_n):
        observed = {"y": y_n}
        states, info = pc.infer(net, params, {"h": h}, x_n, observed, solver=solver, precision=PREC)
        return states["h"], info.energy_rose, info.evaluations

    h, rose, evaluations = jax.jit(jax.vmap(one))(jnp.zeros_like(h_star), x, y)
    error = float(jnp.max(jnp.abs(h - h_star)))
    assert error < 1e-4, error  # measured 3.2e-6
    assert not bool(jnp.any(rose))
    assert evaluations.shape == (4,) and bool(jnp.all(evaluations >= 1502))


def test_train_step_learns_at_the_dense_equilibrium(problem):
    """`make_train_step(fn, Equilibrium(Backtracking(...)), sgd)` moves the weights by the
    learning rate times the batch mean of dF/dW at the dense-solve equilibrium (jax.grad of
    the hand-written energy)."""
    params, x, y, h_star = problem
    lr = 0.1
    step = pc.make_train_step(
        net, pc.Equilibrium(pc.Backtracking(1500, step_size=STEP)), optax.sgd(lr), precision=PREC
    )
    optimizer = optax.sgd(lr)
    new, _, info = jax.jit(step)(params, optimizer.init(params), x, {"y": y})

    def energy(p):
        e_h = h_star - x @ p["w1"]
        e_y = y - h_star @ p["w2"]
        return 0.5 * jnp.sum(e_h**2 * PRECISION) + 0.5 * jnp.sum(e_y**2)

    grads = jax.grad(energy)(params)
    for name in params:
        expected = params[name] - lr * grads[name] / x.shape[0]
        gap = float(jnp.max(jnp.abs(new[name] - expected)))
        assert gap < 1e-4, (name, gap)  # measured 1e-6
    assert not bool(info.diverged)


def test_refuses_bad_arguments_and_non_gradient_fields(problem):
    params, x, y, h_star = problem
    for shrink in (0.0, 1.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="`shrink` must be a number in"):
            pc.Backtracking(10, shrink=shrink)
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="`steps` must be a positive int"):
            pc.Backtracking(steps)
    with pytest.raises(ValueError, match="`max_tries` must be a positive int"):
        pc.Backtracking(10, max_tries=0)
    with pytest.raises(ValueError, match="`grow` must be a finite number >= 1"):
        pc.Backtracking(10, grow=0.5)
    for name in ("step_size", "max_step_size"):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive finite number"):
            pc.Backtracking(10, **{name: -0.1})
    # The decrease test needs the field to be the gradient of the reported energy.
    start = {"h": jnp.zeros_like(h_star)}
    for model in (pc.fixed_predictions(net), pc.preconditioned(net)):
        with pytest.raises(ValueError, match="Backtracking needs the state field to be the"):
            pc.infer(model, params, start, x, {"y": y}, solver=pc.Backtracking(5), precision=PREC)
