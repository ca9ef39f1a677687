"""Inference solvers: ODE inference against closed forms, their reports (stats, evaluation
counts, throw=), and ODE vs gradient descent on the demo MLP."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcjax as pc
from pcjax import datasets, demo

P_Y = 2.0


def linear_gaussian(params, x):
    """z ~ N(m, I) (one prior node per sample), y = z W + b observed with precision P_Y."""
    z = pc.node("z", params["m"] + 0.0 * x)
    return pc.node("y", z @ params["w"] + params["b"])


@pytest.fixture(scope="module")
def gaussian():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "m": jax.random.normal(k1, (3,)),
        "w": jax.random.normal(k2, (3, 2)) / 4,
        "b": jnp.array([0.3, -0.2]),
    }
    x = jnp.zeros((5, 1))
    y = jax.random.normal(k3, (5, 2))
    # The posterior mean: (I + P W W^T) z = m + P (y - b) W^T, per sample.
    w = np.asarray(params["w"], np.float64)
    lhs = np.eye(3) + P_Y * w @ w.T
    rhs = np.asarray(params["m"])[None] + P_Y * (np.asarray(y) - np.asarray(params["b"])) @ w.T
    posterior = np.linalg.solve(lhs, rhs.T).T
    hessian_max = float(np.linalg.eigvalsh(lhs).max())
    return params, x, y, posterior, hessian_max


def infer(solver, params, x, y, fn=linear_gaussian):
    start = {"z": jnp.zeros((x.shape[0], 3))}
    return pc.infer(fn, params, start, x, {"y": y}, solver=solver, precision={"y": P_Y})


@pytest.mark.parametrize("solver", [diffrax.Heun(), diffrax.Tsit5(), diffrax.Bosh3()])
def test_ode_inference_reaches_the_closed_form_posterior(gaussian, solver):
    params, x, y, posterior, hessian_max = gaussian
    assert hessian_max < 4  # the default dtmax = 0.5 is stable for it (measured 2.49)
    states, info = infer(pc.ODE(solver, tol=1e-5), params, x, y)
    assert bool(info.converged) and not bool(info.diverged)
    assert float(info.grad_norm) <= 1e-5
    # |z - z*| <= |grad| / lambda_min (= 1) <= 1e-5; measured 4.4e-6 (Heun), 4.7e-6 (Tsit5),
    # 5.8e-6 (Bosh3)
    assert np.max(np.abs(np.asarray(states["z"]) - posterior)) < 1.5e-5


def test_the_report_is_the_field_at_the_returned_states(gaussian):
    params, x, y, _, _ = gaussian
    states, info = infer(pc.GradientDescent(200, step_size=0.2, tol=1e-4), params, x, y)

    def energy(z):  # written out
        return 0.5 * jnp.sum((z - params["m"]) ** 2) + 0.5 * P_Y * jnp.sum(
            (y - z @ params["w"] - params["b"]) ** 2
        )

    grads = jax.grad(energy)(states["z"])
    # float32 rounding of a small field (norm 9e-5); measured 4.1e-5 since converged samples
    # freeze at their own step (issue 29 item 6)
    assert float(info.grad_norm) == pytest.approx(
        float(jnp.max(jnp.linalg.norm(grads, axis=1))), rel=2e-4
    )
    assert float(info.energy) == pytest.approx(float(energy(states["z"])), rel=1e-6)
    assert bool(info.converged) and 0 < int(info.steps) < 200
    assert int(info.evaluations) == int(info.steps) + 2  # one per step, the start, the report


@pytest.mark.parametrize(
    "solver",
    [
        pc.ODE(),
        pc.ODE(diffrax.Tsit5()),
        pc.ODE(diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize()),
        pc.GradientDescent(100, tol=1e-3),
        pc.GradientDescent(10),
    ],
    ids=["heun", "tsit5", "euler", "gd_tol", "gd"],
)
def test_evaluations_are_counted_exactly(gaussian, solver):
    params, x, y, _, _ = gaussian
    calls = []

    def counted(params, x):  # a host callback runs once per evaluation of the field
        jax.debug.callback(lambda: calls.append(1))
        return linear_gaussian(params, x)

    states, info = infer(solver, params, x, y, fn=counted)
    jax.block_until_ready(states)
    assert len(calls) == int(info.evaluations)


def test_throw_raises_when_tol_is_not_reached_or_the_energy_diverges(gaussian):
    params, x, y, _, _ = gaussian
    _, info = infer(pc.ODE(max_steps=3), params, x, y)
    assert not bool(info.converged) and not bool(info.diverged)
    with pytest.raises(Exception, match="before every sample's state gradient"):
        jax.block_until_ready(infer(pc.ODE(max_steps=3, throw=True), params, x, y))
    with pytest.raises(Exception, match="before every sample's state gradient"):
        jax.block_until_ready(infer(pc.GradientDescent(2, tol=1e-6, throw=True), params, x, y))
    _, info = infer(pc.GradientDescent(50, step_size=3.0), params, x, y)
    assert bool(info.diverged) and not bool(info.converged)
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(
            infer(pc.GradientDescent(50, step_size=3.0, throw=True), params, x, y)
        )
    # no tol: throw checks divergence only, and `converged` means relative_grad_norm <= 1e-3
    # (issue 28; it meant "did not diverge" before): measured 0.71 after 3 steps
    _, info = infer(pc.GradientDescent(3, throw=True), params, x, y)
    assert not bool(info.converged) and 0.5 < float(info.relative_grad_norm) < 0.9


def start_energy(params, y):
    """The energy at the start of `infer` (z = 0), written out."""
    return 0.5 * jnp.sum(params["m"] ** 2) * y.shape[0] + 0.5 * P_Y * jnp.sum(
        (y - params["b"]) ** 2
    )


@pytest.mark.parametrize(
    "solver",
    [
        pc.ODE(),
        pc.GradientDescent(100, tol=1e-3),
        pc.GradientDescent(10, step_size=0.2),
        pc.ConjugateGradient(2, newton_steps=2),
    ],
    ids=["ode", "gd_tol", "gd", "cg"],
)
def test_the_report_keeps_the_starting_energy(gaussian, solver):
    params, x, y, _, _ = gaussian
    _, info = infer(solver, params, x, y)
    assert float(info.initial_energy) == pytest.approx(float(start_energy(params, y)), rel=1e-6)
    assert float(info.energy) < float(info.initial_energy) and not bool(info.energy_rose)


def test_a_finite_run_whose_energy_rose_is_flagged(gaussian):
    """State step 1.0 on a Hessian with largest eigenvalue 2.49: that component grows by 1.49
    a step, so after 10 steps the energy is far above its start yet finite. `diverged` cannot
    see it; `energy_rose` does (the silent failure measured on a trained 128-block network)."""
    params, x, y, _, _ = gaussian
    _, info = infer(pc.GradientDescent(10, step_size=1.0), params, x, y)
    assert not bool(info.diverged) and np.isfinite(float(info.energy))
    assert float(info.energy) > 10 * float(start_energy(params, y))  # measured: 814 times
    assert bool(info.energy_rose)


def test_ode_reaches_equilibrium_in_fewer_evaluations_than_gradient_descent():
    """The demo's MLP (GELU, pre-activation nodes, label clamped) at the demo's state step
    size 0.1, on a batch of the offline digits: evaluations of the state field until every
    sample's gradient norm is at most 1e-3."""
    data = datasets.load_digits()
    x = jnp.asarray(data.x_train[:32].reshape(32, -1))
    y = jnp.eye(10)[data.y_train[:32]]
    params = demo.init_mlp(jax.random.PRNGKey(0), [x.shape[1], 128, 128, 10])
    start = {k: v for k, v in pc.forward_init(demo.mlp, params, x).items() if k != "h2"}
    counts = {}
    for name, solver in [
        ("gradient descent", pc.GradientDescent(2000, step_size=0.1, tol=1e-3)),
        ("ode", pc.ODE(tol=1e-3)),
        ("conjugate gradient", pc.ConjugateGradient(6, newton_steps=3, tol=1e-3)),
    ]:
        _, info = jax.jit(
            lambda s, solver=solver: pc.infer(demo.mlp, params, s, x, {"h2": y}, solver=solver)
        )(start)
        assert bool(info.converged) and float(info.grad_norm) <= 1e-3
        counts[name] = int(info.evaluations)
    # measured: gradient descent 158 evaluations, ODE (Heun, dtmax 0.5) 137, Newton-CG 22
    # (3 linearisations, 18 Hessian-vector products, the report)
    assert counts["ode"] < counts["gradient descent"]
    assert counts["conjugate gradient"] < counts["ode"] / 4


def test_conjugate_gradient_solves_a_linear_gaussian_model_exactly(gaussian):
    """The energy is quadratic in z (3 numbers per sample), so per-sample CG is exact after
    3 iterations: the dense solve of the fixture, to float32 rounding."""
    params, x, y, posterior, _ = gaussian
    states, info = infer(pc.ConjugateGradient(3, per_sample=True), params, x, y)
    assert np.max(np.abs(np.asarray(states["z"]) - posterior)) < 2e-6  # measured 2.4e-7
    assert float(info.grad_norm) < 1e-5 and bool(info.converged)
    assert int(info.steps) == 3 and int(info.evaluations) == 5  # linearise, 3 products, report
    two, _ = infer(pc.ConjugateGradient(2, per_sample=True), params, x, y)  # one short
    assert np.max(np.abs(np.asarray(two["z"]) - posterior)) > 1e-3


def test_conjugate_gradient_runs_one_solve_per_sample(gaussian):
    """Each sample's step lengths come from its own inner products: a sample's states do not
    depend on the rest of the batch (a CG over the whole batch would couple them)."""
    params, x, y, _, _ = gaussian
    solver = pc.ConjugateGradient(2, per_sample=True)  # not converged: compares the iterates
    batch, _ = infer(solver, params, x, y)
    alone = jax.jit(lambda xi, yi: infer(solver, params, xi, yi)[0]["z"])
    for i in range(x.shape[0]):
        z = alone(x[i : i + 1], y[i : i + 1])
        np.testing.assert_allclose(z[0], batch["z"][i], rtol=1e-6, atol=1e-7)


def test_conjugate_gradient_under_vmap_is_one_solve_per_sample(gaussian):
    """The default CG runs over all the states it is given: under `jax.vmap` over unbatched
    samples that is one CG per sample, the same iterates as `per_sample=True` on the batch;
    on the batch itself it is one CG over all samples, which differs (the step lengths couple
    the samples); `per_sample=True` on unbatched states is one sample, the same CG."""
    params, x, y, _, _ = gaussian

    def sample_fn(params, xi):  # one sample, no batch axis
        z = pc.node("z", params["m"] + 0.0 * xi[0])
        return pc.node("y", z @ params["w"] + params["b"])

    def one(yi, solver):
        start = {"z": jnp.zeros(3)}
        return pc.infer(sample_fn, params, start, x[0], {"y": yi}, solver=solver,
                        precision={"y": P_Y})[0]["z"]  # fmt: skip

    vmapped = jax.vmap(lambda yi: one(yi, pc.ConjugateGradient(2)))(y)
    per_sample, _ = infer(pc.ConjugateGradient(2, per_sample=True), params, x, y)
    coupled, _ = infer(pc.ConjugateGradient(2), params, x, y)

    def gap(a):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(per_sample["z"]))))

    assert gap(vmapped) < 1e-6  # measured 0.0
    assert gap(coupled["z"]) > 1e-5  # measured 7.2e-5 (CG(2) is near the solution here)
    # Unbatched states are one sample (issue 29 item 3): per_sample=True is then one CG too.
    one_sample = jax.vmap(lambda yi: one(yi, pc.ConjugateGradient(2, per_sample=True)))(y)
    assert gap(one_sample) < 1e-6  # measured 0.0


def test_conjugate_gradient_stops_at_negative_curvature():
    """F(z) = c z^2 / 2 + (z^2 - 1)^2 / 4 (c = 1e-3, the prior node's precision): its
    curvature c + 3 z^2 - 1 is negative at z = 0.1, where a Newton step would climb towards
    the maximum at 0, so that sample's CG makes no step; at z = 2 it is positive and one
    iteration is the written-out Newton step."""

    def double_well(params, x):
        z = pc.node("z", x)  # prediction 0: the term c z^2 / 2
        return pc.node("y", z, energy=lambda value, mu: jnp.sum((mu**2 - 1) ** 2) / 4)

    c = 1e-3
    z = np.array([0.1, 2.0])
    states, info = pc.infer(
        double_well,
        {},
        {"z": jnp.asarray(z[:, None], jnp.float32)},
        jnp.zeros((2, 1)),
        {"y": jnp.zeros((2, 1))},
        solver=pc.ConjugateGradient(1, per_sample=True),
        precision={"z": c},
    )
    assert c + 3 * z[0] ** 2 - 1 < 0 < c + 3 * z[1] ** 2 - 1
    newton = z[1] - (c * z[1] + z[1] ** 3 - z[1]) / (c + 3 * z[1] ** 2 - 1)
    np.testing.assert_allclose(np.asarray(states["z"])[:, 0], [z[0], newton], rtol=1e-6)
    assert np.isfinite(float(info.energy)) and not bool(info.energy_rose)


def test_conjugate_gradient_needs_a_gradient_field(gaussian):
    params, x, y, _, _ = gaussian
    start = {"z": jnp.zeros((x.shape[0], 3))}
    for model in (pc.fixed_predictions(linear_gaussian), pc.preconditioned(linear_gaussian)):
        with pytest.raises(ValueError, match="ConjugateGradient needs the state field"):
            pc.infer(model, params, start, x, {"y": y}, solver=pc.ConjugateGradient(3))
    shared = {"z": jnp.zeros(())}
    with pytest.raises(ValueError, match="not every node has the batch axis"):
        pc.infer(
            lambda p, x: pc.node("y", pc.node("z", p["m"].sum()) + 0 * x[:, :1]),
            params,
            shared,
            x,
            {"y": y[:, :1]},
            solver=pc.ConjugateGradient(3, per_sample=True),
        )
    unbatched = {"z": jnp.zeros((3,))}  # shared by the output's 5 samples
    with pytest.raises(ValueError, match="not every node has the batch axis"):
        pc.infer(
            lambda p, x: pc.node("y", pc.node("z", p["m"]) @ p["w"] + 0 * x[:, :1]),
            params,
            unbatched,
            x,
            {"y": y},
            solver=pc.ConjugateGradient(3, per_sample=True),
        )


@pytest.mark.x64
def test_grad_through_conjugate_gradient_inference_matches_finite_differences():
    """Newton-CG inference is differentiable (jax.linearize and scans inside): d/ds of the
    relaxed energy at inputs s * x, against central differences in float64."""

    def net(params, x):
        h = pc.node("h", jnp.tanh(x @ params["w1"]))
        return pc.node("y", h @ params["w2"])

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w1": jax.random.normal(k1, (3, 4), jnp.float64) / 2,
        "w2": jax.random.normal(k2, (4, 2), jnp.float64) / 2,
    }
    x, y = jax.random.normal(k3, (5, 3), jnp.float64), jnp.ones((5, 2), jnp.float64)
    start = {"h": pc.forward_init(net, params, x)["h"]}
    solver = pc.ConjugateGradient(4, newton_steps=3, per_sample=True)

    def relaxed_energy(scale):
        _, info = pc.infer(net, params, start, scale * x, {"y": y}, solver=solver)
        return info.energy

    eps = 1e-6
    fd = (relaxed_energy(1 + eps) - relaxed_energy(1 - eps)) / (2 * eps)
    # measured: relative difference 2.6e-10 (the finite difference's own error)
    np.testing.assert_allclose(jax.grad(relaxed_energy)(1.0), fd, rtol=1e-8)
