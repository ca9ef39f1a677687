"""The `pcjax_node` primitive and `harvest` (groundwork for issue 11).

Ground truths are hand-written: each network is also written out by hand with the states
substituted explicitly, and energies, predictions and gradients (jax.grad of the hand-written
energy) are compared with what `harvest` gives for the tagged function, whose nodes sit inside
`jax.vmap`, `lax.scan`, `jax.jit` and `jax.checkpoint`.
"""

from __future__ import annotations

import functools
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_error, trees_equal
from jax import lax

from pcjax._harvest import harvest, mark_state_dtype, tag, tagged_nodes

B, T, N_IN, H, N_OUT = 2, 3, 4, 5, 3  # batch, steps, input, hidden, output


def _energy(states, predictions):
    """0.5 * sum of squared prediction errors over the nodes in `states`."""
    return sum(0.5 * jnp.sum((states[k] - predictions[k]) ** 2) for k in states)


def _harvest_energy(fn):
    """(params, states, x) -> (energy, predictions) of `fn` with `states` substituted."""

    def energy(params, states, x):
        predictions = harvest(fn)(states, params, x)[1]
        return _energy(states, predictions), predictions

    return energy


def _hand_energy(predict, **kwargs):
    """(params, states, x) -> (energy, predictions) of a hand-written `predict`."""

    def energy(params, states, x):
        predictions = predict(params, states, x, **kwargs)
        return _energy(states, predictions), predictions

    return energy


def _value_and_grads(energy):
    """Jitted ((energy, predictions), (d/d params, d/d states)) of an energy function."""
    return jax.jit(jax.value_and_grad(energy, argnums=(0, 1), has_aux=True))


def _compare(fn, predict, params, states, x, **kwargs):
    """Relative errors of harvest's energy, predictions and gradients vs the hand-written."""
    (energy, mus), grads = _value_and_grads(_harvest_energy(fn))(params, states, x)
    (energy_0, mus_0), grads_0 = _value_and_grads(_hand_energy(predict, **kwargs))(
        params, states, x
    )
    return rel_error(energy, energy_0), rel_error(mus, mus_0), rel_error(grads, grads_0)


def _normal(seed, dtype, *shapes, scale=1.0):
    """Standard normal arrays (numpy's generator: no per-shape PRNG compilation)."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(scale * rng.standard_normal(shape), dtype) for shape in shapes]


# --------------------------------------------------------------------------------------------
# A per-sample MLP, vmapped inside the function.


def _mlp_sample(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        h = tag(f"h{i}", h @ w + b)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def _mlp_batch(params, x):
    return jax.vmap(_mlp_sample, in_axes=(None, 0))(params, x)


def _mlp_by_hand(params, states, x):
    """Predictions of the 3-layer MLP from explicitly substituted states."""
    (w0, b0), (w1, b1), (w2, b2) = params
    return {
        "h0": x @ w0 + b0,
        "h1": jnp.tanh(states["h0"]) @ w1 + b1,
        "h2": jnp.tanh(states["h1"]) @ w2 + b2,
    }


def _mlp_problem(dtype):
    sizes = [6, 5, 4, 3]
    w = _normal(0, dtype, *itertools.pairwise(sizes), scale=0.5)
    b = _normal(1, dtype, *[(n,) for n in sizes[1:]], scale=0.1)
    params = list(zip(w, b))
    (x,) = _normal(2, dtype, (8, 6))
    forward = {}
    h = x
    for i, (w, b) in enumerate(params):
        forward[f"h{i}"] = h = h @ w + b
        h = jnp.tanh(h) if i < 2 else h
    noise = _normal(3, dtype, *[v.shape for v in forward.values()], scale=0.3)
    return params, x, forward, {k: v + n for (k, v), n in zip(forward.items(), noise)}


def test_tag_is_the_identity_under_transformations():
    params, x, _, _ = _mlp_problem(jnp.float32)

    def untagged(params, x):
        (w0, b0), (w1, b1), (w2, b2) = params
        return jnp.tanh(jnp.tanh(x @ w0 + b0) @ w1 + b1) @ w2 + b2

    def loss(fn):
        return lambda params, x: jnp.sum(fn(params, x) ** 2)

    assert trees_equal(_mlp_batch(params, x), untagged(params, x))
    assert trees_equal(jax.jit(_mlp_batch)(params, x), jax.jit(untagged)(params, x))
    grads = jax.jit(jax.grad(loss(_mlp_batch)))(params, x)
    assert trees_equal(grads, jax.jit(jax.grad(loss(untagged)))(params, x))
    assert trees_equal(
        jax.jit(jax.vmap(jax.grad(loss(_mlp_sample)), (None, 0)))(params, x),
        jax.jit(jax.vmap(jax.grad(loss(untagged)), (None, 0)))(params, x),
    )
    # Transposition (jax.linear_transpose) of a tagged linear map is the plain transpose.
    (ct,) = jax.linear_transpose(lambda v: tag("a", 2.0 * v), x)(x)
    assert trees_equal(ct, 2.0 * x)


def test_tag_rejects_bad_arguments():
    with pytest.raises(TypeError, match="node name must be a str"):
        tag(3, jnp.ones(2))
    with pytest.raises(TypeError, match="node 'a' must tag one array, got dict"):
        tag("a", {"x": jnp.ones(2)})
    with pytest.raises(TypeError, match="the energy of node 'a' must be a function"):
        tag("a", jnp.ones(2), energy=1.0)


def _cross_entropy(state, prediction):
    return -jnp.sum(state * jax.nn.log_softmax(prediction))


@jax.jit
def _jitted_logits(x):
    return tag("label", 2.0 * x, energy=_cross_entropy)


def test_custom_energy_is_found_inside_a_warm_jit():
    x = jnp.ones((B, N_OUT))
    _jitted_logits(x)  # warm the cache: the function body will not run again
    shapes, energies, _ = tagged_nodes(lambda x: jnp.tanh(_jitted_logits(x)))(x)
    assert shapes == {"label": jax.ShapeDtypeStruct((B, N_OUT), jnp.float32)}
    assert energies == {"label": _cross_entropy}


@pytest.mark.x64
def test_vmapped_mlp_energy_and_gradients():
    params, x, _, states = _mlp_problem(jnp.float64)
    out, predictions = harvest(_mlp_batch)(states, params, x)
    assert {k: v.shape for k, v in predictions.items()} == {
        "h0": (8, 5),
        "h1": (8, 4),
        "h2": (8, 3),
    }
    assert trees_equal(out, states["h2"])  # the output is the (substituted) last node
    energy, predictions, grads = _compare(_mlp_batch, _mlp_by_hand, params, states, x)
    assert energy < 5e-16  # measured 0.0
    assert predictions < 5e-16  # measured 0.0
    assert grads < 5e-16  # measured 0.0


def test_vmapped_node_has_a_leading_batch_axis():
    """Whatever axis vmap batches (in_axes=1 here), a node's state is (batch, *shape)."""
    x = jnp.arange(15.0).reshape(3, 5)
    double = lambda v: tag("a", 2.0 * v)  # noqa: E731
    for fn in (jax.vmap(double, in_axes=1), jax.vmap(jax.vmap(double), in_axes=1)):
        assert tagged_nodes(fn)(x)[0] == {"a": jax.ShapeDtypeStruct((5, 3), jnp.float32)}
        state = -jnp.arange(15.0).reshape(5, 3)
        out, predictions = harvest(fn)({"a": state}, x)
        assert trees_equal(predictions["a"], 2.0 * x.T)
        assert trees_equal(out, state)


def test_fixed_prediction_check_feedforward_states():
    """With states = the feedforward values, the predictions are the plain forward values."""
    params, x, forward, _ = _mlp_problem(jnp.float32)
    _, reaped = harvest(_mlp_batch)(None, params, x)
    _, predictions = jax.jit(harvest(_mlp_batch))(forward, params, x)
    assert rel_error(reaped, forward) < 5e-7  # measured 0.0
    assert rel_error(predictions, forward) < 5e-7  # measured 0.0
    # In a scan: the values reaped with no state substituted are the feedforward pass, i.e.
    # each step's prediction computed by hand from the reaped previous step reproduces them.
    params, xs = _rnn_params(jnp.float32)
    _, reaped = jax.jit(harvest(_rnn_scan))({}, params, xs)
    assert rel_error(reaped, _rnn_by_hand(params, reaped, xs)) < 5e-7  # measured 7.4e-8
    _, only_y = jax.jit(harvest(_rnn_scan))({"y": reaped["y"] + 1.0}, params, xs)
    assert rel_error(only_y["h"], reaped["h"]) < 5e-7  # measured 0.0


def test_harvest_under_outer_jit_and_vmap():
    """vmap applied OUTSIDE harvest to a per-sample function = vmap inside the function."""
    params, x, _, states = _mlp_problem(jnp.float32)
    inside = harvest(_mlp_batch)(states, params, x)
    outside = jax.jit(jax.vmap(harvest(_mlp_sample), in_axes=(0, None, 0)))(states, params, x)
    assert rel_error(outside, inside) < 5e-7  # measured 0.0

    # Per-sample state gradients from an outer vmap(grad) = the batched energy's state gradient.
    grad = functools.partial(jax.grad, argnums=1, has_aux=True)
    per_sample = jax.vmap(grad(_harvest_energy(_mlp_sample)), in_axes=(None, 0, 0))
    per_sample, _ = jax.jit(per_sample)(params, states, x)

    # Parameters closed over (outer tracers among the traced program's constants).
    def closed_over(params, states, x):
        predictions = harvest(lambda x: _mlp_batch(params, x))(states, x)[1]
        return _energy(states, predictions), predictions

    _, (_, closed) = _value_and_grads(closed_over)(params, states, x)
    _, (_, batched) = _value_and_grads(_harvest_energy(_mlp_batch))(params, states, x)
    assert rel_error(per_sample, batched) < 5e-7  # measured 0.0
    assert rel_error(closed, batched) < 5e-7  # measured 0.0


# --------------------------------------------------------------------------------------------
# An RNN under lax.scan (states stacked over steps), in three arrangements with batch vmaps.


def _rnn_params(dtype):
    w, u, v = _normal(4, dtype, (H, H), (N_IN, H), (H, N_OUT), scale=0.5)
    (xs,) = _normal(5, dtype, (T, B, N_IN))
    return (w, u, v), xs


def _cell(params, h, x):
    w, u, _ = params
    return tag("h", jnp.tanh(h @ w + x @ u))


def _rnn_scan(params, xs, reverse=False):
    """Batched RNN: scan over steps of batched cells; xs (T, B, N_IN)."""

    def step(h, x):
        h = _cell(params, h, x)
        return h, None

    h, _ = lax.scan(step, jnp.zeros((xs.shape[1], H), xs.dtype), xs, reverse=reverse)
    return tag("y", h @ params[2])


def _rnn_vmap_in_scan(params, xs):
    """Scan over steps whose body vmaps a jitted per-sample cell."""
    cell = jax.vmap(jax.jit(_cell), in_axes=(None, 0, 0))

    def step(h, x):
        return cell(params, h, x), None

    h, _ = lax.scan(step, jnp.zeros((xs.shape[1], H), xs.dtype), xs)
    return tag("y", h @ params[2])


def _rnn_scan_in_vmap(params, xs):
    """A per-sample RNN (scan inside) vmapped over the batch; states (T, B, H) all the same."""

    def sample(x):
        h, _ = lax.scan(lambda h, xt: (_cell(params, h, xt), None), jnp.zeros(H, x.dtype), x)
        return tag("y", h @ params[2])

    return jax.vmap(sample, in_axes=1)(xs)


def _rnn_by_hand(params, states, xs, reverse=False):
    """Prediction at step t from the state of the step before (in processing order)."""
    w, u, v = params
    order = range(T - 1, -1, -1) if reverse else range(T)
    previous, hs = jnp.zeros((B, H), xs.dtype), [None] * T
    for t in order:
        hs[t] = jnp.tanh(previous @ w + xs[t] @ u)
        previous = states["h"][t]
    return {"h": jnp.stack(hs), "y": previous @ v}


def _rnn_states(dtype):
    """Arbitrary states: the stacked hidden node and the output node."""
    h, y = _normal(6, dtype, (T, B, H), (B, N_OUT))
    return {"h": h, "y": y}


@pytest.mark.x64
@pytest.mark.parametrize("reverse", [False, True])
def test_rnn_scan_stacked_states_energy_and_gradients(reverse):
    params, xs = _rnn_params(jnp.float64)
    states = _rnn_states(jnp.float64)
    fn = functools.partial(_rnn_scan, reverse=reverse)
    assert tagged_nodes(fn)(params, xs) == (
        {
            "h": jax.ShapeDtypeStruct((T, B, H), jnp.float64),
            "y": jax.ShapeDtypeStruct((B, N_OUT), jnp.float64),
        },
        {},
        {"h": 1, "y": 0},  # enclosing scans
    )
    errors = _compare(fn, _rnn_by_hand, params, states, xs, reverse=reverse)
    energy, predictions, grads = errors
    assert energy < 1e-15  # measured 2.5e-16 (forward), 2.3e-16 (reverse)
    assert predictions < 5e-16  # measured 0.0
    assert grads < 5e-16  # measured 0.0


@pytest.mark.x64
@pytest.mark.parametrize("fn", [_rnn_vmap_in_scan, _rnn_scan_in_vmap])
def test_rnn_vmap_inside_scan_and_scan_inside_vmap(fn):
    params, xs = _rnn_params(jnp.float64)
    states = _rnn_states(jnp.float64)
    _, predictions, grads = _compare(fn, _rnn_by_hand, params, states, xs)
    assert predictions < 5e-16  # measured 0.0
    assert grads < 5e-16  # measured 0.0


# --------------------------------------------------------------------------------------------
# A residual stack: scan over stacked layer parameters.

L, D = 4, 5


def _resnet(params, x):
    def block(h, layer):
        w, b = layer
        return tag("h", h + jnp.tanh(h @ w + b)), None

    h, _ = lax.scan(block, x, params, unroll=2)
    return h


def _resnet_by_hand(params, states, x):
    ws, bs = params
    previous, mus = x, []
    for layer in range(L):
        mus.append(previous + jnp.tanh(previous @ ws[layer] + bs[layer]))
        previous = states["h"][layer]
    return {"h": jnp.stack(mus)}


@pytest.mark.x64
def test_residual_stack_scan_over_layer_params():
    ws, x, h = _normal(7, jnp.float64, (L, D, D), (B, D), (L, B, D))
    (bs,) = _normal(8, jnp.float64, (L, D), scale=0.1)
    params, states = (ws / jnp.sqrt(D), bs), {"h": h}
    harvested = jax.make_jaxpr(harvest(_resnet))(states, params, x)
    assert [e.params["unroll"] for e in harvested.eqns if e.primitive.name == "scan"] == [2]
    out, _ = jax.jit(harvest(_resnet))(states, params, x)
    assert trees_equal(out, states["h"][-1])
    _, predictions, grads = _compare(_resnet, _resnet_by_hand, params, states, x)
    assert predictions < 5e-16  # measured 0.0
    assert grads < 5e-16  # measured 0.0


def _nested_scans(w, x):
    def inner(h, _):
        return tag("n", jnp.tanh(h @ w + 1.0)), None

    def outer(h, _):
        return lax.scan(inner, h, length=3)[0], None

    return lax.scan(outer, x, length=2)[0]


def test_scan_inside_scan_stacks_both_lengths():
    w, x, states = _normal(11, jnp.float32, (D, D), (B, D), (2, 3, B, D))
    assert tagged_nodes(_nested_scans)(w, x)[0] == {
        "n": jax.ShapeDtypeStruct((2, 3, B, D), jnp.float32)
    }

    @jax.jit
    def by_hand(w, states, x):
        previous, mus = x, []
        for i in range(2):
            for j in range(3):
                mus.append(jnp.tanh(previous @ w + 1.0))
                previous = states[i, j]
        return jnp.stack(mus).reshape(states.shape)

    out, predictions = jax.jit(harvest(_nested_scans))({"n": states}, w, x)
    assert trees_equal(out, states[-1, -1])
    assert rel_error(predictions["n"], by_hand(w, states, x)) < 5e-7  # measured 6.1e-8


# --------------------------------------------------------------------------------------------
# jax.jit (warm cache) and jax.checkpoint blocks.


@jax.jit
def _jitted_block(w, h):
    return tag("j", jnp.tanh(h @ w))


def _blocks(params, x):
    w1, w2 = params
    h = _jitted_block(w1, x)
    remat = jax.checkpoint(
        lambda w, h: tag("c", jnp.tanh(h @ w)), policy=jax.checkpoint_policies.nothing_saveable
    )
    return remat(w2, h) * 2.0


@pytest.mark.x64
def test_jit_with_warm_cache_and_checkpoint_are_transparent():
    w1, w2, x, j = _normal(9, jnp.float64, (N_IN, H), (H, H), (B, N_IN), (B, H))
    params = (w1, w2)
    _jitted_block(params[0], x)  # warm the jit cache outside harvest
    states = {"j": j, "c": jnp.ones((B, H))}

    def by_hand(params, states, x):
        return {"j": jnp.tanh(x @ params[0]), "c": jnp.tanh(states["j"] @ params[1])}

    out, _ = harvest(_blocks)(states, params, x)
    assert trees_equal(out, 2.0 * states["c"])
    # The checkpoint survives in the harvested program (its memory behaviour is kept).
    harvested = jax.make_jaxpr(harvest(_blocks))(states, params, x)
    assert sum(e.primitive.name == "remat2" for e in harvested.eqns) == 1
    _, predictions, grads = _compare(_blocks, by_hand, params, states, x)
    assert predictions < 5e-16  # measured 0.0
    assert grads < 5e-16  # measured 0.0


# --------------------------------------------------------------------------------------------
# Equinox modules, custom derivatives without nodes, mixed precision.


class _Dense(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
        return self.weight @ x + self.bias


class _Net(eqx.Module):
    layers: list
    activation: object = jnp.tanh  # a non-array leaf: stays static

    def __call__(self, x):
        h = x
        for i, layer in enumerate(self.layers):
            h = tag(f"h{i}", layer(h))
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


@pytest.mark.x64
def test_equinox_module_tagged_in_call_and_vmapped():
    w0, b0, w1, b1, x, h0 = _normal(
        10, jnp.float64, (H, N_IN), (H,), (N_OUT, H), (N_OUT,), (B, N_IN), (B, H)
    )
    net = _Net([_Dense(w0, b0), _Dense(w1, b1)])
    states = {"h0": h0, "h1": jnp.zeros((B, N_OUT))}

    def by_hand(net, states, x):
        (l0, l1) = net.layers
        mus = {
            "h0": x @ l0.weight.T + l0.bias,
            "h1": jnp.tanh(states["h0"]) @ l1.weight.T + l1.bias,
        }
        return _energy(states, mus)

    def energy(net, states, x):
        return _energy(states, harvest(lambda m, x: jax.vmap(m)(x))(states, net, x)[1])

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(energy))(net, states, x)
    expected_value, expected = eqx.filter_jit(eqx.filter_value_and_grad(by_hand))(net, states, x)
    assert rel_error(value, expected_value) < 5e-16  # measured 0.0
    assert rel_error(grads, expected) < 5e-16  # measured 0.0


@jax.custom_jvp
def _odd_identity(x):
    return x


_odd_identity.defjvp(lambda primals, tangents: (primals[0], 3.0 * tangents[0]))


def test_custom_jvp_without_nodes_keeps_its_rule():
    """Equations with no node inside are re-bound as they are: the custom rule survives."""
    x = jnp.arange(3.0)
    fn = lambda x: tag("a", 2.0 * _odd_identity(x))  # noqa: E731

    def total(x):
        return jnp.sum(harvest(fn)(None, x)[1]["a"])

    assert trees_equal(jax.grad(total)(x), jnp.full(3, 6.0))  # 2 * 3 (the rule), not 2 * 1


def test_mixed_precision_marker_sets_the_state_dtype():
    params, x, _, states = _mlp_problem(jnp.float32)

    def bf16_mlp(params, x):
        cast = functools.partial(jax.tree.map, lambda a: a.astype(jnp.bfloat16))
        # The marker puts the state dtype in the traced program (how pcjax.mixed_precision does).
        return _mlp_batch(*mark_state_dtype((cast(params), cast(x)), jnp.float32))

    _, predictions = jax.jit(harvest(bf16_mlp))(states, params, x)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (params, states, x))
    expected = jax.jit(lambda *a: jax.tree.map(lambda m: m.astype(jnp.float32), _mlp_by_hand(*a)))
    assert trees_equal(predictions, expected(*low))
    # Given which values are observed, the free states must have the state dtype.
    with pytest.raises(ValueError, match=r"'h0' has shape \(8, 5\) and dtype bfloat16"):
        harvest(bf16_mlp)(low[1], params, x, observed=())


# --------------------------------------------------------------------------------------------
# Clear errors.


@jax.custom_vjp
def _vjp_block(x):
    return tag("v", 3.0 * x)


_vjp_block.defvjp(lambda x: (_vjp_block(x), None), lambda _, ct: (3.0 * ct,))


@jax.custom_jvp
def _jvp_block(x):
    return tag("g", x**2)


_jvp_block.defjvp(lambda p, t: (_jvp_block(p[0]), 2.0 * p[0] * t[0]))


def _twice_in_scan(x):
    h, _ = lax.scan(lambda h, xt: (tag("s", h * xt), None), 1.0, x)
    return tag("s", h)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (
            lambda x: lax.while_loop(lambda h: h[0] < 5.0, lambda h: tag("w", h + 1.0), x),
            r"node\(s\) \['w'\] are tagged inside a lax.while_loop",
        ),
        (
            lambda x: lax.fori_loop(0, (x[0] > 0) + 1, lambda i, h: tag("f", h * 2.0), x),
            r"\['f'\] are tagged inside a lax.while_loop / lax.fori_loop",
        ),
        (
            lambda x: lax.cond(x[0] > 0, lambda h: tag("c", h), lambda h: -h, x),
            r"\['c'\] are tagged inside a lax.cond / lax.switch branch",
        ),
        (_vjp_block, r"\['v'\] are tagged inside a jax.custom_vjp function"),
        (_jvp_block, r"\['g'\] are tagged inside a jax.custom_jvp function"),
        (lambda x: tag("d", x) + tag("d", 2.0 * x), "node 'd' is tagged twice"),
        (_twice_in_scan, "node 's' is tagged twice"),
    ],
    ids=["while_loop", "fori_loop", "cond", "custom_vjp", "custom_jvp", "twice", "twice_scan"],
)
def test_unsupported_constructs_and_duplicates_raise(fn, message):
    x = jnp.arange(1.0, 4.0)
    with pytest.raises(ValueError, match=message):
        harvest(fn)(None, x)
    fn(x)  # outside harvest the tags are identities, whatever surrounds them


def test_bad_states_raise():
    params, xs = _rnn_params(jnp.float32)
    good = {"h": jnp.zeros((T, B, H)), "y": jnp.zeros((B, N_OUT))}
    with pytest.raises(ValueError, match=r"unknown node\(s\) \['z'\].*tags \['h', 'y'\]"):
        harvest(_rnn_scan)({**good, "z": jnp.zeros(2)}, params, xs)
    per_step = (
        r"'h' has shape \(2, 5\) and dtype float32, but its prediction has shape \(3, 2, 5\) "
        r"and dtype float32 \(the node is inside 1 lax.scan\(s\): its state is stacked along 1 "
        r"leading axis\(es\) of the scan lengths \(3,\)\)"
    )
    with pytest.raises(ValueError, match=per_step):
        harvest(_rnn_scan)({**good, "h": jnp.zeros((B, H))}, params, xs)
    with pytest.raises(ValueError, match=r"'y' .* int32, but .* \(2, 3\) and dtype float32; use"):
        # A free state (observed=(): no value is observed) must have the prediction's dtype.
        harvest(_rnn_scan)({**good, "y": jnp.zeros((B, N_OUT), jnp.int32)}, params, xs, observed=())
    with pytest.raises(TypeError, match="`values` must map node names to states, got list"):
        harvest(_rnn_scan)([1.0], params, xs)
