"""Bad input, transformations (jit / vmap / grad), equinox parameters and training steps."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp

import pcjax as pc

# ---------------------------------------------------------------- bad input


def test_state_shape_mismatch_names_node_and_shapes(problem):
    params, x, observed, latent = problem
    bad = {**latent, "h1": jnp.zeros((8, 7))}
    with pytest.raises(ValueError, match=r"'h1' has shape \(8, 7\).*prediction has shape \(8, 4\)"):
        pc.energy(mlp, params, bad, x, observed)
    with pytest.raises(ValueError, match="'h2' has shape"):
        pc.infer(mlp, params, latent, x, {"h2": jnp.zeros((8,))}, solver=pc.GradientDescent(1))


def test_node_in_neither_or_both(problem):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match=r"\['h2'\] are in neither"):
        pc.energy(mlp, params, latent, x)
    with pytest.raises(ValueError, match=r"\['h1'\] are in both"):
        pc.infer(
            mlp, params, latent, x, {**observed, "h1": latent["h1"]}, solver=pc.GradientDescent(1)
        )


def test_unknown_node_names(problem):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match=r"unknown node\(s\) \['h9'\].*tags \['h0', 'h1', 'h2'\]"):
        pc.energy(mlp, params, {**latent, "h9": latent["h0"]}, x, observed)
    with pytest.raises(ValueError, match=r"`precision` names unknown node\(s\) \['out'\]"):
        pc.infer(
            mlp, params, latent, x, observed, precision={"out": 1.0}, solver=pc.GradientDescent(1)
        )


@pytest.mark.parametrize("value", [0.0, -1.0, jnp.array([1.0, -2.0, 1.0, 1.0]), jnp.nan])
def test_non_positive_precision(problem, value):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match="precision of node 'h1' must be positive"):
        pc.energy(mlp, params, latent, x, observed, precision={"h1": value})


def test_traced_non_positive_precision_fails_at_run_time(problem):
    params, x, observed, latent = problem
    run = jax.jit(lambda p: pc.energy(mlp, params, latent, x, observed, precision={"h1": p}))
    assert np.isfinite(float(run(2.0)))
    with pytest.raises(Exception, match="precision of node 'h1' must be positive"):
        jax.block_until_ready(run(-2.0))


def test_precision_shape_must_fit_node(problem):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match=r"'h1' has shape \(5,\).*node's shape \(8, 4\)"):
        pc.energy(mlp, params, latent, x, observed, precision={"h1": jnp.ones(5)})


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_positive_int(problem, steps):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match="`steps` must be a positive int"):
        pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(steps))


def test_duplicate_and_untagged_functions(problem):
    params, x, _observed, _latent = problem

    def twice(params, x):
        return pc.node("a", pc.node("a", x))

    with pytest.raises(ValueError, match="'a' is tagged twice"):
        pc.forward_init(twice, params, x)
    with pytest.raises(ValueError, match="tagged no node"):
        pc.forward_init(lambda p, x: x, params, x)


# ---------------------------------------------------------------- transformations


def test_vmap_over_samples_equals_batched_inference(problem):
    params, x, observed, latent = problem

    def one(states, xi, yi):
        add_batch = functools.partial(jax.tree.map, lambda v: v[None])
        states, info = pc.infer(
            mlp, params, add_batch(states), xi[None], {"h2": yi[None]}, solver=pc.GradientDescent(7)
        )
        return jax.tree.map(lambda v: v[0], states), info.energy

    per_sample, energies = jax.vmap(one)(latent, x, observed["h2"])
    batched, info = pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(7))
    for name in batched:
        np.testing.assert_allclose(per_sample[name], batched[name], rtol=1e-12)
    # The same terms summed in another order (per sample, then over samples): float32 rounding
    # only (measured 6.7e-8, one unit in the last place; bit-equal before the scan also kept
    # the starting energy, by the luck of XLA's fusion).
    np.testing.assert_allclose(jnp.sum(energies), info.energy, rtol=1e-6)


def test_grad_through_inference_matches_finite_differences(problem64):
    params, x, observed, latent = problem64

    def relaxed_energy(scale):
        _states, info = pc.infer(
            mlp,
            params,
            latent,
            scale * x,
            {"h2": observed["h2"]},
            solver=pc.GradientDescent(10, step_size=0.2),
        )
        return info.energy

    grad = jax.grad(relaxed_energy)(1.0)
    eps = 1e-6
    fd = (relaxed_energy(1.0 + eps) - relaxed_energy(1.0 - eps)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_jitted_train_step_compiles_once(problem):
    params, x, observed, _ = problem
    traces = []

    def counted(params, x):
        traces.append(None)
        return mlp(params, x)

    optimizer = optax.adam(1e-2)
    step = jax.jit(pc.make_train_step(counted, pc.Equilibrium(pc.GradientDescent(5)), optimizer))
    opt_state = optimizer.init(params)
    params, opt_state, info = step(params, opt_state, x, observed)
    after_first = len(traces)
    for _ in range(3):
        params, opt_state, info = step(params, opt_state, x + 1.0, observed)
    assert len(traces) == after_first
    assert not bool(info.diverged)


# ---------------------------------------------------------------- learning


class TaggedMLP(eqx.Module):
    """An equinox model with a non-array field (the activation), tagged in `__call__`."""

    layers: list
    activation: callable = eqx.field(static=True)

    def __init__(self, sizes, key, activation=jnp.tanh):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]
        self.activation = activation

    def __call__(self, x):
        h = x
        for i, layer in enumerate(self.layers):
            h = pc.node(f"h{i}", jax.vmap(layer)(h))
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


def call_model(model, x):
    return model(x)


@pytest.mark.x64
def test_equinox_params_fpa_grads_equal_backprop():
    model = TaggedMLP([5, 7, 3], jax.random.PRNGKey(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (6, 5))
    y = jax.random.normal(jax.random.PRNGKey(5), (6, 3))
    latent = {"h0": pc.forward_init(call_model, model, x)["h0"]}
    states, _ = pc.infer(
        pc.fixed_predictions(call_model),
        model,
        latent,
        x,
        {"h1": y},
        solver=pc.GradientDescent(1, step_size=1.0),
    )
    grads = pc.param_grads(pc.fixed_predictions(call_model), model, states, x, {"h1": y})
    reference = eqx.filter_grad(lambda m: 0.5 * jnp.sum((y - m(x)) ** 2))(model)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        np.testing.assert_allclose(g, r, rtol=1e-10)


@pytest.mark.parametrize("fixed_predictions", [False, True])
def test_train_step_equals_infer_then_param_grads(problem, fixed_predictions):
    params, x, observed, latent = problem
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(params)
    model = pc.fixed_predictions(mlp) if fixed_predictions else mlp
    solver = pc.GradientDescent(4, step_size=0.3)
    step = pc.make_train_step(model, pc.Equilibrium(solver), optimizer)
    new, _, info = step(params, opt_state, x, observed)
    states, _ = pc.infer(model, params, latent, x, observed, solver=solver)
    grads = pc.param_grads(model, params, states, x, observed)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g / x.shape[0], params, grads)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert int(info.inference_steps) == 4


def test_incremental_pc_updates_params_every_step(problem):
    params, x, observed, latent = problem
    optimizer = optax.sgd(0.05)
    step = pc.make_train_step(
        mlp, pc.Incremental(3, step_size=0.2), optimizer, mean_over_batch=False
    )
    new, _, info = step(params, optimizer.init(params), x, observed)
    # The same thing written out: joint gradient, states and params updated together; the
    # energy reported is the last step's, before its update.
    states, p = dict(latent), params
    for _ in range(3):
        energy = lambda p, s: pc.energy(mlp, p, s, x, observed)  # noqa: E731
        value, (gp, gs) = jax.value_and_grad(energy, (0, 1))(p, states)
        states = jax.tree.map(lambda s, g: s - 0.2 * g, states, gs)
        p = jax.tree.map(lambda w, g: w - 0.05 * g, p, gp)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # float32; max |diff| 3e-8
    np.testing.assert_allclose(info.energy, value, rtol=1e-6)  # measured 0


def test_per_sample_param_grads_by_vmap_sum_to_batch_grads(problem):
    params, x, observed, latent = problem
    states, _ = jax.jit(
        lambda s: pc.infer(mlp, params, s, x, observed, solver=pc.GradientDescent(5))
    )(latent)

    def one(s, xi, yi):
        add_batch = functools.partial(jax.tree.map, lambda v: v[None])
        return pc.param_grads(mlp, params, add_batch(s), xi[None], {"h2": yi[None]})

    per_sample = jax.vmap(one)(states, x, observed["h2"])
    batch = pc.param_grads(mlp, params, states, x, observed)
    for a, b in zip(jax.tree.leaves(per_sample), jax.tree.leaves(batch)):
        np.testing.assert_allclose(a.sum(0), b, rtol=2e-5, atol=1e-7)  # float32: 4.9e-6


@pytest.mark.parametrize("unroll", [1, 3, True])
def test_unrolling_does_not_change_the_result(problem, unroll):
    params, x, observed, latent = problem
    rolled, _ = pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(6, unroll=1))
    states, _ = pc.infer(
        mlp, params, latent, x, observed, solver=pc.GradientDescent(6, unroll=unroll)
    )
    for name in latent:
        np.testing.assert_allclose(states[name], rolled[name], rtol=1e-12)


@pytest.mark.parametrize("unroll", [0, -2, 1.5, "yes"])
def test_bad_unroll_is_rejected(problem, unroll):
    params, x, observed, latent = problem
    with pytest.raises(ValueError, match="unroll"):
        pc.infer(mlp, params, latent, x, observed, solver=pc.GradientDescent(3, unroll=unroll))


def test_docstrings_hold_no_control_characters():
    """Regression: LaTeX such as `\\varepsilon` or `\\text` in a non-raw docstring became a
    vertical tab / tab (`pcjax.error_parameterised` rendered "arepsilon", "ext")."""
    import inspect

    names = [getattr(pc, name) for name in pc.__all__] + [
        getattr(pc.nn, name) for name in getattr(pc.nn, "__all__", [])
    ]
    bad = []
    for obj in names:
        members = [obj] + [m for _, m in inspect.getmembers(obj) if inspect.isfunction(m)]
        for member in members:
            doc = getattr(member, "__doc__", None) or ""
            if any(ord(c) < 32 and c not in "\n" for c in doc):
                bad.append(getattr(member, "__qualname__", repr(member)))
    assert not bad, f"control characters in the docstrings of {sorted(set(bad))}"
