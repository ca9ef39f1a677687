"""Hostile input, property-tested: every malformed call gets a clear error or a documented
result; nothing returns NaN parameters without saying so.

Random networks: 1-3 dense layers with random widths, batch sizes, dtypes and random pytree
containers for the parameters (dicts, lists, tuples, nested, with integer and unused leaves).
Widths and batch sizes are drawn from two values each (a size-1 axis and a larger one), and the
values with NumPy: eager JAX compiles each operation once per shape, so few shapes let examples
reuse what earlier ones compiled. Tests of validation that happens before any computation get
states of the right shapes and dtypes without running the network (`_abstract_states`).
"""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

hypothesis = pytest.importorskip("hypothesis")
from conftest import trees_equal  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pcjax as pc  # noqa: E402

# Networks are drawn in float32 and float64: float64 needs x64 on.
pytestmark = pytest.mark.x64

SETTINGS = settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
# Examples that compile an inference loop cost about a second each.
COMPILING = settings(SETTINGS, max_examples=3)
CONTAINERS = ("dict", "list", "tuple", "nested")
WIDTHS = (1, 3)
BATCHES = (1, 4)


@st.composite
def networks(draw, min_batch=1, min_depth=1):
    """A random tagged MLP: `(fn, params, x, observed, free_names)`; with `min_depth=2` it has
    at least one free (latent) node."""
    depth = draw(st.integers(min_depth, 3))
    widths = draw(st.lists(st.sampled_from(WIDTHS), min_size=depth + 1, max_size=depth + 1))
    batch = draw(st.sampled_from([b for b in BATCHES if b >= min_batch]))
    dtype = draw(st.sampled_from([jnp.float32, jnp.float64]))
    container = draw(st.sampled_from(CONTAINERS))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    layers = [
        (
            jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), dtype),
            jnp.asarray(np.zeros(b), dtype),
        )
        for a, b in itertools.pairwise(widths)
    ]
    if container == "dict":
        params = {f"layer{i}": {"w": w, "b": b} for i, (w, b) in enumerate(layers)}
    elif container == "list":
        params = [[w, b] for w, b in layers]
    elif container == "tuple":
        params = tuple((w, b) for w, b in layers)
    else:  # integer and unused leaves next to the layers
        params = {"layers": [{"wb": (w, b)} for w, b in layers], "count": jnp.array(3)}
        params["unused"] = {"scale": jnp.ones(2, dtype)}

    def layer(p, i):
        if container == "dict":
            return p[f"layer{i}"]["w"], p[f"layer{i}"]["b"]
        if container == "nested":
            return p["layers"][i]["wb"]
        return p[i][0], p[i][1]

    def fn(p, x):
        h = x
        for i in range(depth):
            w, b = layer(p, i)
            h = pc.node(f"n{i}", h @ w + b)
            if i < depth - 1:
                h = jnp.tanh(h)
        return h

    x = jnp.asarray(rng.standard_normal((batch, widths[0])), dtype)
    target = jnp.asarray(np.ones((batch, widths[-1])), dtype)
    observed = {f"n{depth - 1}": target}
    free = [f"n{i}" for i in range(depth - 1)]
    return fn, params, x, observed, free


def _states(fn, params, x, observed):
    return {k: v for k, v in pc.forward_init(fn, params, x).items() if k not in observed}


def _abstract_states(fn, params, x, observed):
    """Zero states of the shapes and dtypes `_states` gives, found by tracing the network once
    (`jax.eval_shape`) rather than running it, which compiles each of its operations."""
    shapes = jax.eval_shape(lambda: pc.forward_init(fn, params, x))
    return {
        k: jnp.asarray(np.zeros(v.shape, v.dtype)) for k, v in shapes.items() if k not in observed
    }


@COMPILING
@given(networks())
def test_random_pytrees_keep_their_structure(net):
    fn, params, x, observed, _ = net
    states = _states(fn, params, x, observed)
    relaxed, info = pc.infer(fn, params, states, x, observed, solver=pc.GradientDescent(3))
    assert not bool(info.diverged)
    grads = pc.param_grads(fn, params, relaxed, x, observed)
    assert jax.tree.structure(grads, is_leaf=lambda v: v is None) == jax.tree.structure(
        jax.tree.map(lambda v: v if jnp.issubdtype(v.dtype, jnp.inexact) else None, params),
        is_leaf=lambda v: v is None,
    )
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))
    step = pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(2)), optimizer)
    new, _, info = step(params, opt_state, x, observed)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    for old, leaf in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert leaf.dtype == old.dtype and leaf.shape == old.shape
        assert bool(jnp.all(jnp.isfinite(leaf)))


@COMPILING
@given(
    networks(),
    st.sampled_from(["x", "observed"]),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.integers(0, 10**6),
)
def test_non_finite_input_is_reported_and_guarded(net, where, bad, position):
    fn, params, x, observed, _ = net
    name = next(iter(observed))
    if where == "x":
        x = x.reshape(-1).at[position % x.size].set(bad).reshape(x.shape)
    else:
        target = observed[name]
        observed = {
            name: target.reshape(-1).at[position % target.size].set(bad).reshape(target.shape)
        }
    states = _states(fn, params, x, observed)
    _, info = pc.infer(fn, params, states, x, observed, solver=pc.GradientDescent(2))
    assert bool(info.diverged)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))
    step = pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(2)), optimizer)
    new, new_state, info = pc.guarded(step)(params, opt_state, x, observed)
    assert bool(info.diverged)
    assert trees_equal(new, params) and trees_equal(new_state, opt_state)
    _, _, info = step(params, opt_state, x, observed)
    assert bool(info.diverged)  # without the guard the update is applied, but reported


@COMPILING
@given(networks(), st.floats(1e2, 1e30))
def test_absurd_step_sizes_never_leave_non_finite_params_when_guarded(net, step_size):
    fn, params, x, observed, _ = net
    optimizer = optax.sgd(step_size)
    opt_state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))
    solver = pc.GradientDescent(4, step_size=min(step_size, 1e6))
    step = pc.guarded(pc.make_train_step(fn, pc.Equilibrium(solver), optimizer))
    new, _, info = step(params, opt_state, x, observed)
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(new))
    assert finite
    if bool(info.diverged):
        assert trees_equal(new, params)


@SETTINGS
@given(
    networks(),
    st.one_of(
        st.integers(-5, 0),
        st.floats(allow_nan=True),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    ),
)
def test_bad_steps_are_rejected(net, steps):
    fn, params, x, observed, _ = net
    states = _abstract_states(fn, params, x, observed)
    with pytest.raises(ValueError, match="`steps` must be a positive int"):
        pc.infer(fn, params, states, x, observed, solver=pc.GradientDescent(steps))


@SETTINGS
@given(
    networks(),
    st.one_of(
        st.floats(max_value=0.0),
        st.just(float("nan")),
        st.just(float("inf")),
        st.text(max_size=3),
        st.none(),
    ),
)
def test_bad_step_sizes_are_rejected(net, step_size):
    fn, params, x, observed, _ = net
    states = _abstract_states(fn, params, x, observed)
    with pytest.raises(ValueError, match="`step_size` must be a positive finite number"):
        pc.infer(fn, params, states, x, observed, solver=pc.GradientDescent(2, step_size=step_size))


@SETTINGS
@given(networks(), st.text(min_size=1, max_size=8))
def test_unknown_node_names_are_named(net, name):
    fn, params, x, observed, _ = net
    states = _abstract_states(fn, params, x, observed)
    assume(name not in states and name not in observed)
    with pytest.raises(ValueError, match="unknown node"):
        pc.energy(fn, params, {**states, name: jnp.zeros(3)}, x, observed)


@SETTINGS
@given(networks(min_depth=2), st.integers(1, 3))
def test_wrong_state_shapes_name_node_and_shapes(net, extra):
    fn, params, x, observed, free = net
    states = _abstract_states(fn, params, x, observed)
    name = free[0]
    bad = jnp.zeros((*states[name].shape[:-1], states[name].shape[-1] + extra))
    with pytest.raises(
        ValueError,
        match=rf"'{name}' has shape {tuple(bad.shape)}".replace("(", r"\(").replace(")", r"\)"),
    ):
        pc.energy(fn, params, {**states, name: bad}, x, observed)


@SETTINGS
@given(networks(min_batch=1))
def test_empty_batch_is_an_error(net):
    fn, params, x, observed, _ = net
    x = x[:0]
    observed = {k: v[:0] for k, v in observed.items()}
    optimizer = optax.sgd(0.1)
    step = pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(2)), optimizer)
    with pytest.raises(ValueError, match="empty batch"):
        step(params, optimizer.init(params), x, observed)


@SETTINGS
@given(networks(min_depth=2), st.sampled_from([jnp.int32, jnp.bool_, jnp.uint8]))
def test_integer_free_states_are_rejected(net, dtype):
    fn, params, x, observed, free = net
    states = _abstract_states(fn, params, x, observed)
    states[free[0]] = jnp.asarray(np.zeros(states[free[0]].shape, dtype))  # no compile
    with pytest.raises(TypeError, match=f"free node '{free[0]}' has dtype"):
        pc.infer(fn, params, states, x, observed, solver=pc.GradientDescent(2))


@SETTINGS
@given(networks(), st.sampled_from([0.0, -1.0, np.nan, -np.inf]))
def test_non_positive_precisions_are_rejected(net, value):
    fn, params, x, observed, _ = net
    name = next(iter(observed))
    states = _abstract_states(fn, params, x, observed)
    with pytest.raises(ValueError, match=name):
        pc.energy(fn, params, states, x, observed, precision={name: jnp.asarray(value)})


def test_optimizer_initialised_on_integer_leaves_gets_a_hint():
    def fn(p, x):
        return pc.node("y", x @ p["w"])

    params = {"w": jnp.ones((3, 2)), "count": jnp.array(3)}
    optimizer = optax.adam(1e-2)
    step = pc.make_train_step(fn, pc.Equilibrium(pc.GradientDescent(2)), optimizer)
    with pytest.raises(ValueError, match=r"optimizer.init\(eqx.filter\(params"):
        step(params, optimizer.init(params), jnp.ones((4, 3)), {"y": jnp.zeros((4, 2))})
