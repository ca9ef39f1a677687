"""Dtypes: float32 by default, float64 when asked, bfloat16 compute with float32 states."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcjax as pc
from pcjax import nn


def _setup(dtype):
    key_m, key_x = jax.random.split(jax.random.PRNGKey(0))
    model = nn.MLP([12, 16, 16, 4], key=key_m, activation=jnp.tanh)
    model = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)
    x = jax.random.normal(key_x, (8, 12), dtype)
    y = jax.nn.one_hot(jnp.arange(8) % 4, 4, dtype=dtype)
    return model, x, {"h2": y}


def _relaxed_grads(fn, model, x, observed, steps=20):
    """Relaxed states, the inference info and the parameter gradients, in one compiled
    function (run eagerly, each operation would compile on its own)."""

    @eqx.filter_jit
    def run(model, x, observed):
        states = {k: v for k, v in pc.forward_init(fn, model, x).items() if k not in observed}
        states, info = pc.infer(
            fn, model, states, x, observed, solver=pc.GradientDescent(steps, step_size=0.2)
        )
        return states, info, pc.param_grads(fn, model, states, x, observed)

    return run(model, x, observed)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.x64)])
def test_native_dtypes_are_kept(dtype):
    model, x, observed = _setup(dtype)
    states, info, grads = _relaxed_grads(nn.call, model, x, observed)
    assert info.energy.dtype == dtype
    assert all(s.dtype == dtype for s in states.values())
    assert all(g.dtype == dtype for g in jax.tree.leaves(grads))
    optimizer = optax.adam(1e-3)
    step = jax.jit(pc.make_train_step(nn.call, pc.Equilibrium(pc.GradientDescent(4)), optimizer))
    new, _, info = step(model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)), x, observed)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(new))
    assert not bool(info.diverged)


def test_bfloat16_compute_with_float32_states():
    model, x, observed = _setup(jnp.float32)
    net = pc.mixed_precision(nn.call)  # bfloat16 compute, float32 states
    states, info, grads = _relaxed_grads(net, model, x, observed)
    assert info.energy.dtype == jnp.float32
    assert all(s.dtype == jnp.float32 for s in states.values())
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # float32 master params
    assert net(model, x).dtype == jnp.bfloat16  # outside pcjax: the network in bfloat16
    # The matrix products really run in bfloat16.
    hlo = jax.jit(lambda m: pc.energy(net, m, states, x, observed)).lower(model).as_text()
    assert "bf16" in hlo
    # Gradients agree with float32 to bfloat16 accuracy (8 mantissa bits: ~0.4% per op).
    _, _, reference = _relaxed_grads(nn.call, model, x, observed)
    flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
    ref = jnp.concatenate([g.ravel() for g in jax.tree.leaves(reference)])
    error = float(jnp.linalg.norm(flat - ref) / jnp.linalg.norm(ref))
    assert 1e-5 < error < 3e-2, error  # not float32-exact, but close
    optimizer = optax.adam(1e-3)
    step = jax.jit(pc.make_train_step(net, pc.Equilibrium(pc.GradientDescent(4)), optimizer))
    new, _, info = step(model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)), x, observed)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new))
    assert info.energy.dtype == jnp.float32 and not bool(info.diverged)


@pytest.mark.x64
def test_mixed_precision_state_dtype_is_configurable():
    model, x, _ = _setup(jnp.float32)
    net = pc.mixed_precision(nn.call, compute_dtype=jnp.float16, state_dtype=jnp.float64)
    states = pc.forward_init(net, model, x)
    assert all(s.dtype == jnp.float64 for s in states.values())
    np.testing.assert_allclose(
        states["h0"], pc.forward_init(nn.call, model, x)["h0"], rtol=1e-2, atol=1e-2
    )


BUILDERS = {
    "MLP": lambda dtype: nn.MLP([4, 8, 3], key=jax.random.PRNGKey(0), dtype=dtype),
    "VGG": lambda dtype: nn.VGG(1, [4], [8], 3, 8, key=jax.random.PRNGKey(0), dtype=dtype),
    "ResNet": lambda dtype: nn.ResNet(
        4, 8, 2, 3, key=jax.random.PRNGKey(0), scan_layers=True, dtype=dtype
    ),
    "LSTM": lambda dtype: nn.LSTM(3, 5, 2, key=jax.random.PRNGKey(0), dtype=dtype),
    "GRU": lambda dtype: nn.GRU(3, 5, 2, key=jax.random.PRNGKey(0), dtype=dtype),
    "TransformerBlock": lambda dtype: nn.TransformerBlock(
        8, 2, 16, 3, key=jax.random.PRNGKey(0), dtype=dtype
    ),
    "Transformer": lambda dtype: nn.Transformer(
        8, 2, 16, 3, 2, key=jax.random.PRNGKey(0), scan_layers=True, dtype=dtype
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builders_take_a_dtype_the_equinox_way(name):
    """`dtype=` sets every parameter's dtype (drawn in it); the default is JAX's default float.

    Only dtypes are asserted, so the models are built abstractly (`eqx.filter_eval_shape`):
    the same dtypes as a real build, without compiling the initialisers."""

    def dtypes(dtype):
        model = eqx.filter_eval_shape(lambda: BUILDERS[name](dtype))
        leaves = [leaf for leaf in jax.tree.leaves(model) if hasattr(leaf, "dtype")]
        assert leaves, name
        return {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)}

    assert dtypes(None) == {jnp.dtype(jnp.float32)}
    assert dtypes(jnp.bfloat16) == {jnp.dtype(jnp.bfloat16)}
