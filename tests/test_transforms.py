"""Nodes inside the user's own transformations, through the public API (issue 11): per-sample
equinox layers under `jax.vmap`, RNNs with `lax.scan`, inner `jax.jit` with a warm cache and
`jax.checkpoint`. Ground truths: hand-written energies and `jax.grad` of the loss."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_error

import pcjax as pc
from pcjax import fisher_mask
from pcjax._solvers import per_sample_grad_norm


class PerSampleMLP(eqx.Module):
    """An equinox MLP written per sample (as `eqx.nn` layers are), tagged in `__call__`."""

    layers: list

    def __init__(self, sizes, key):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]

    def __call__(self, x):
        h = x
        for i, layer in enumerate(self.layers):
            h = pc.node(f"h{i}", layer(h))
            if i < len(self.layers) - 1:
                h = jnp.tanh(h)
        return h


def batched(model, x):
    return jax.vmap(model)(x)


@pytest.mark.x64
def test_vmapped_equinox_model_energy_and_fpa_gradients():
    model = PerSampleMLP([4, 5, 3], jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    y = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    ff = pc.forward_init(batched, model, x)
    assert ff["h0"].shape == (6, 5) and ff["h1"].shape == (6, 3)
    states = {"h0": ff["h0"] + 0.1}

    def by_hand(m, h0):  # the energy written out
        mu0 = jax.vmap(m.layers[0])(x)
        mu1 = jax.vmap(m.layers[1])(jnp.tanh(h0))
        return 0.5 * jnp.sum((h0 - mu0) ** 2) + 0.5 * jnp.sum((y - mu1) ** 2)

    @eqx.filter_jit  # pcjax's side, one compile rather than op by op
    def ours(model, states, start):
        energy = pc.energy(batched, model, states, x, {"h1": y})
        relaxed, _ = pc.infer(
            pc.fixed_predictions(batched),
            model,
            start,
            x,
            {"h1": y},
            solver=pc.GradientDescent(1, step_size=1.0),
        )
        return energy, pc.param_grads(pc.fixed_predictions(batched), model, relaxed, x, {"h1": y})

    @eqx.filter_jit
    def truth(model, h0):
        loss = lambda m: 0.5 * jnp.sum((y - batched(m, x)) ** 2)  # noqa: E731
        return by_hand(model, h0), eqx.filter_grad(loss)(model)

    energy, grads = ours(model, states, {"h0": ff["h0"]})
    expected, reference = truth(model, states["h0"])
    np.testing.assert_allclose(energy, expected, rtol=1e-14)
    assert rel_error(grads, reference) < 1e-15  # measured 7.4e-17


def rnn(params, xs):
    """h_t = tanh(h_{t-1}) W + x_t U, a node per step; the output y = h_T V."""

    def step(h, x):
        h = pc.node("h", jnp.tanh(h) @ params["w"] + x @ params["u"])
        return h, None

    h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], params["w"].shape[0])), xs)
    return pc.node("y", h @ params["v"])


@pytest.mark.x64
def test_scan_rnn_nodes_are_stacked_and_fpa_equals_backprop():
    k = jax.random.split(jax.random.PRNGKey(3), 5)
    params = {
        "w": jax.random.normal(k[0], (4, 4)) / 2,
        "u": jax.random.normal(k[1], (2, 4)),
        "v": jax.random.normal(k[2], (4, 3)),
    }
    xs = jax.random.normal(k[3], (5, 6, 2))  # time, batch, features
    y = jax.random.normal(k[4], (6, 3))
    ff = pc.forward_init(rnn, params, xs)
    assert ff["h"].shape == (5, 6, 4)
    states = {"h": ff["h"] + 0.05 * jnp.cos(ff["h"])}

    def by_hand(h):  # step t predicted from the state of step t - 1
        previous = jnp.concatenate([jnp.zeros((1, 6, 4)), h[:-1]])
        mu = jnp.tanh(previous) @ params["w"] + xs @ params["u"]
        return 0.5 * jnp.sum((h - mu) ** 2) + 0.5 * jnp.sum((y - h[-1] @ params["v"]) ** 2)

    @jax.jit  # pcjax's side, one compile rather than op by op
    def ours(params, states, start):
        energy = pc.energy(rnn, params, states, xs, {"y": y})
        relaxed, _ = pc.infer(
            pc.fixed_predictions(rnn),
            params,
            start,
            xs,
            {"y": y},
            solver=pc.GradientDescent(6, step_size=1.0),
        )
        return energy, pc.param_grads(pc.fixed_predictions(rnn), params, relaxed, xs, {"y": y})

    energy, grads = ours(params, states, {"h": ff["h"]})
    np.testing.assert_allclose(energy, jax.jit(by_hand)(states["h"]), rtol=1e-14)
    reference = jax.jit(jax.grad(lambda p: 0.5 * jnp.sum((y - rnn(p, xs)) ** 2)))(params)
    assert rel_error(grads, reference) < 1e-15  # measured 1.3e-16


@jax.jit
def inner_block(w, h):
    return pc.node("inner", jnp.tanh(h) @ w)


def with_inner_jit_and_checkpoint(params, x):
    h = pc.node("first", x @ params[0])
    h = inner_block(params[1], h)
    return pc.node("out", jax.checkpoint(lambda h: jnp.tanh(h) @ params[2])(h))


def test_inner_jit_with_a_warm_cache_and_checkpoint_keep_their_nodes():
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    params = [jax.random.normal(k, (3, 3)) for k in keys[:3]]
    x = jax.random.normal(keys[3], (5, 3))
    with_inner_jit_and_checkpoint(params, x)  # warms inner_block's cache outside pcjax
    assert sorted(pc.forward_init(with_inner_jit_and_checkpoint, params, x)) == [
        "first", "inner", "out",
    ]  # fmt: skip
    optimizer = optax.sgd(0.1)
    rule = pc.Equilibrium(pc.GradientDescent(3))
    step = jax.jit(pc.make_train_step(with_inner_jit_and_checkpoint, rule, optimizer))
    _, _, info = step(params, optimizer.init(params), x, {"out": jnp.zeros((5, 3))})
    assert not bool(info.diverged)
    states = pc.forward_init(with_inner_jit_and_checkpoint, params, x)
    shifted = {"first": states["first"], "inner": states["inner"] + 1.0}
    by_hand = 0.5 * jnp.sum(1.0**2 * jnp.ones((5, 3))) + 0.5 * jnp.sum(
        (jnp.tanh(shifted["inner"]) @ params[2]) ** 2
    )
    energy = pc.energy(
        with_inner_jit_and_checkpoint, params, shifted, x, {"out": jnp.zeros((5, 3))}
    )
    np.testing.assert_allclose(energy, by_hand, rtol=1e-6)


def test_a_node_in_a_while_loop_or_cond_is_a_clear_error():
    def looped(params, x):
        return jax.lax.while_loop(lambda h: h.sum() > 1e9, lambda h: pc.node("h", h * 2), x)

    def branched(params, x):
        return jax.lax.cond(x.sum() > 0, lambda h: pc.node("h", h), lambda h: h, x)

    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"'h'.*while"):
        pc.forward_init(looped, None, x)
    with pytest.raises(ValueError, match=r"'h'.*cond"):
        pc.forward_init(branched, None, x)


# ---------------------------------------------------------------- natural gradients follow
# The Kronecker mode's statistics must find the dense layers through vmap and scan, and its
# update must equal the dense solve (G_ll + lambda I)^{-1} g per parameter leaf, with the Fisher
# block G_ll = (1/B) sum_nodes J^T P J built from `jax.jacfwd` of hand-written predictions.


def fisher_blocks(predict, params, precision, batch):
    """The exact per-leaf Fisher blocks of hand-written `predict(params) -> {node: mu}`, whose
    node values have the batch on axis `batch[node]` and the features last."""
    jac = jax.jacfwd(predict)(params)
    blocks = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        total = 0.0
        for name, p in precision.items():
            j = jax.tree_util.tree_flatten_with_path(jac[name])[0]
            j = dict((jax.tree_util.keystr(k), v) for k, v in j)[jax.tree_util.keystr(path)]
            mu_shape = predict(params)[name].shape
            j = j.reshape(int(np.prod(mu_shape[:-1])), mu_shape[-1], leaf.size)
            total = total + jnp.einsum("poi,oq,pqj->ij", j, p, j)
        blocks[jax.tree_util.keystr(path)] = total / batch
    return blocks


def block_solve(blocks, grads, found, damping):
    def solve(path, g):
        key = jax.tree_util.keystr(path)
        if not found[key]:
            return g
        g_mat = blocks[key] + damping * jnp.eye(g.size)
        return jnp.linalg.solve(g_mat, g.ravel()).reshape(g.shape)

    return jax.tree_util.tree_map_with_path(solve, grads)


def vmapped_linear_model(k):
    model = PerSampleMLP([3, 4, 2], k[0])
    x = jax.random.normal(k[1], (5, 3))

    def predict(m, states):
        return {
            "h0": jax.vmap(m.layers[0])(x),
            "h1": jax.vmap(m.layers[1])(jnp.tanh(states["h0"])),
        }

    found = {f".layers[{i}].{leaf}" for i in (0, 1) for leaf in ("weight", "bias")}
    return model, batched, x, predict, found


def scanned_stack(params, x):
    """Layers stacked along a leading axis and applied with lax.scan (one node per layer)."""
    h = pc.node("stem", x @ params["stem"])

    def layer(h, wb):
        w, b = wb
        return pc.node("layer", jnp.tanh(h) @ w + b), None

    h, _ = jax.lax.scan(layer, h, (params["w"], params["b"]))
    return h


def scanned_stack_model(k):
    params = {
        "stem": jax.random.normal(k[0], (3, 4)),
        "w": jax.random.normal(k[1], (3, 4, 4)) / 2,
        "b": jax.random.normal(k[2], (3, 4)),
    }
    x = jax.random.normal(k[3], (5, 3))

    def predict(p, states):
        previous = jnp.concatenate([states["stem"][None], states["layer"][:-1]])
        return {"stem": x @ p["stem"], "layer": jnp.tanh(previous) @ p["w"] + p["b"][:, None]}

    return params, scanned_stack, x, predict, {"['stem']", "['w']", "['b']"}


class Recurrent(eqx.Module):
    """h_t = cell(tanh(h_{t-1})) + x_t U with a per-sample eqx.nn.Linear cell, vmapped inside
    the scan body: the cell's weights are shared by every step (scan constants)."""

    cell: eqx.nn.Linear
    u: jax.Array

    def __call__(self, xs):
        def step(h, x):
            return pc.node("h", jax.vmap(self.cell)(jnp.tanh(h)) + x @ self.u), None

        h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], self.u.shape[1])), xs)
        return h


def recurrent_model(k):
    model = Recurrent(eqx.nn.Linear(4, 4, key=k[0]), jax.random.normal(k[1], (2, 4)))
    xs = jax.random.normal(k[2], (6, 5, 2))  # time, batch, features

    def predict(m, states):
        previous = jnp.concatenate([jnp.zeros((1, 5, 4)), states["h"][:-1]])
        mu = jnp.tanh(previous) @ m.cell.weight.T + m.cell.bias + xs @ m.u
        return {"h": mu}

    # U sits on the skip path: not a dense layer of the node here (it passes through).
    return model, lambda m, xs: m(xs), xs, predict, {".cell.weight", ".cell.bias"}


def scaled_residual(params, x):
    """Residual blocks with a constant branch scale (as muPC scales them), per-sample layers."""
    h = pc.node("stem", jax.vmap(params["stem"])(x))
    for i, layer in enumerate(params["blocks"]):
        h = pc.node(f"block{i}", h + 0.5 * jax.vmap(layer)(jnp.tanh(h)))
    return h


def scaled_residual_model(k):
    params = {
        "stem": eqx.nn.Linear(3, 4, key=k[0]),
        "blocks": [eqx.nn.Linear(4, 4, key=k[1]), eqx.nn.Linear(4, 4, key=k[2])],
    }
    x = jax.random.normal(k[3], (5, 3))

    def predict(p, s):
        mu = {"stem": jax.vmap(p["stem"])(x)}
        before = s["stem"]
        for i, layer in enumerate(p["blocks"]):
            mu[f"block{i}"] = before + 0.5 * jax.vmap(layer)(jnp.tanh(before))
            before = s[f"block{i}"]
        return mu

    found = {f"['{k}']{i}.{leaf}" for k, i in (("stem", ""), ("blocks", "[0]"), ("blocks", "[1]"))
             for leaf in ("weight", "bias")}  # fmt: skip
    return params, scaled_residual, x, predict, found


@pytest.mark.x64
@pytest.mark.parametrize(
    "build", [vmapped_linear_model, scanned_stack_model, recurrent_model, scaled_residual_model]
)
def test_kronecker_natural_gradient_equals_dense_solve_through_transforms(build):
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    params, fn, x, predict, expected_found = build(keys)
    states = pc.forward_init(fn, params, x)
    states = {k: v + 0.1 * jnp.sin(3 * v) for k, v in states.items()}  # off the feedforward
    rng = np.random.default_rng(0)
    precision = {}
    for name, state in states.items():
        a = rng.normal(size=(state.shape[-1],) * 2)
        precision[name] = a @ a.T / state.shape[-1] + 0.5 * np.eye(state.shape[-1])
    trainable = eqx.filter(params, eqx.is_inexact_array)
    found = fisher_mask(fn, params, x)
    found_paths = {
        jax.tree_util.keystr(p) for p, f in jax.tree_util.tree_flatten_with_path(found)[0] if f
    }
    assert found_paths == expected_found
    fisher = pc.fisher_statistics(
        fn, params, states, x, precision={k: pc.FullPrecision(jnp.asarray(v)) for k, v in
                                          precision.items()},
    )  # fmt: skip
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), trainable)
    transform = pc.natural_gradient("kronecker", damping=0.1)
    natural, _ = transform.update(grads, transform.init(trainable), trainable, fisher=fisher)
    # With running factors kept for the leaves found (their first update uses its own).
    running = pc.natural_gradient("kronecker", damping=0.1, ema_decay=0.5, mask=found)
    first, _ = running.update(grads, running.init(trainable), trainable, fisher=fisher)
    assert rel_error(first, natural) < 1e-15  # measured 0.0 on all three
    batch = x.shape[-2] if fn is not scanned_stack else x.shape[0]
    blocks = fisher_blocks(
        lambda p: predict(eqx.combine(p, eqx.filter(params, eqx.is_inexact_array, inverse=True)),
                          states),
        trainable, {k: jnp.asarray(v) for k, v in precision.items()}, batch,
    )  # fmt: skip
    flags = {jax.tree_util.keystr(p): f for p, f in jax.tree_util.tree_flatten_with_path(found)[0]}
    expected = block_solve(blocks, grads, flags, 0.1)
    assert rel_error(natural, expected) < 5e-14  # measured 6.5e-16, 6.2e-15, 8.5e-16, 8.5e-16


# ---------------------------------------------------------------- exactness: GRU, residual scan,
# checkpointed blocks. Energy = the energy written out; FPA gradients = jax.grad of the loss.


def assert_energy_and_fpa_exact(fn, params, x, y, by_hand, steps):
    """Check pcjax's energy against `by_hand` and return the relative error of the FPA
    gradients to backprop's. Each side is one compiled function (eagerly, every operation
    and every scan would compile on its own)."""

    @eqx.filter_jit
    def ours(params, x, y):
        ff = pc.forward_init(fn, params, x)
        latent = {k: v for k, v in ff.items() if k != "out"}
        shifted = {k: v + 0.05 * jnp.cos(v) for k, v in latent.items()}
        energy = pc.energy(fn, params, shifted, x, {"out": y})
        relaxed, _ = pc.infer(
            pc.fixed_predictions(fn),
            params,
            latent,
            x,
            {"out": y},
            solver=pc.GradientDescent(steps, step_size=1.0),
        )
        grads = pc.param_grads(pc.fixed_predictions(fn), params, relaxed, x, {"out": y})
        return shifted, energy, grads

    @eqx.filter_jit
    def truth(params, shifted, x, y):
        reference = eqx.filter_grad(lambda p: 0.5 * jnp.sum((y - fn(p, x)) ** 2))(params)
        return by_hand(params, shifted), reference

    shifted, energy, grads = ours(params, x, y)
    expected, reference = truth(params, shifted, x, y)
    np.testing.assert_allclose(energy, expected, rtol=1e-13)
    return rel_error(grads, reference)


class GRU(eqx.Module):
    """A per-sample eqx.nn.GRUCell, vmapped over the batch inside a lax.scan over time."""

    cell: eqx.nn.GRUCell
    head: jax.Array

    def __call__(self, xs):  # xs: (time, batch, features)
        def step(h, x):
            return pc.node("h", jax.vmap(self.cell)(x, h)), None

        h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], self.cell.hidden_size)), xs)
        return pc.node("out", h @ self.head)


@pytest.mark.x64
def test_gru_with_scan_energy_and_fpa_gradients_are_exact():
    k = jax.random.split(jax.random.PRNGKey(11), 4)
    model = GRU(eqx.nn.GRUCell(2, 4, key=k[0]), jax.random.normal(k[1], (4, 3)))
    xs = jax.random.normal(k[2], (5, 6, 2))
    y = jax.random.normal(k[3], (6, 3))

    def by_hand(m, states):  # step t predicted from the state of step t - 1
        h = states["h"]
        previous = jnp.concatenate([jnp.zeros((1, 6, 4)), h[:-1]])
        mu = jax.vmap(jax.vmap(m.cell))(xs, previous)
        return 0.5 * jnp.sum((h - mu) ** 2) + 0.5 * jnp.sum((y - h[-1] @ m.head) ** 2)

    fn = lambda m, xs: m(xs)  # noqa: E731
    error = assert_energy_and_fpa_exact(fn, model, xs, y, by_hand, steps=7)
    assert error < 1e-14  # measured 1.3e-16


def residual_scan(params, x):
    """A residual stack written as scan over layers (stacked parameters)."""
    h = pc.node("stem", x @ params["stem"])

    def block(h, w):
        hidden = pc.node("hidden", jax.nn.relu(h) @ w[0])
        return pc.node("block", h + jnp.tanh(hidden) @ w[1]), None

    h, _ = jax.lax.scan(block, h, (params["w1"], params["w2"]))
    return pc.node("out", jnp.tanh(h) @ params["head"])


@pytest.mark.x64
def test_residual_scan_over_layers_energy_and_fpa_gradients_are_exact():
    k = jax.random.split(jax.random.PRNGKey(12), 6)
    params = {
        "stem": jax.random.normal(k[0], (3, 4)),
        "w1": jax.random.normal(k[1], (4, 4, 4)) / 2,
        "w2": jax.random.normal(k[2], (4, 4, 4)) / 2,
        "head": jax.random.normal(k[3], (4, 2)),
    }
    x, y = jax.random.normal(k[4], (5, 3)), jax.random.normal(k[5], (5, 2))

    def by_hand(p, s):
        before = jnp.concatenate([s["stem"][None], s["block"][:-1]])  # each block's input
        mu_hidden = jax.nn.relu(before) @ p["w1"]
        mu_block = before + jnp.tanh(s["hidden"]) @ p["w2"]
        mu_out = jnp.tanh(s["block"][-1]) @ p["head"]
        return 0.5 * (
            jnp.sum((s["stem"] - x @ p["stem"]) ** 2)
            + jnp.sum((s["hidden"] - mu_hidden) ** 2)
            + jnp.sum((s["block"] - mu_block) ** 2)
            + jnp.sum((y - mu_out) ** 2)
        )

    ff = pc.forward_init(residual_scan, params, x)
    assert ff["hidden"].shape == (4, 5, 4) and ff["block"].shape == (4, 5, 4)
    error = assert_energy_and_fpa_exact(residual_scan, params, x, y, by_hand, steps=10)
    assert error < 1e-14  # measured 2.1e-16


def checkpointed_blocks(params, x):
    """Residual blocks each wrapped in jax.checkpoint (one with eqx.filter_checkpoint)."""
    h = pc.node("stem", x @ params[0])
    for i, w in enumerate(params[1:-1]):
        wrap = jax.checkpoint if i % 2 == 0 else eqx.filter_checkpoint

        def block(h, w, i=i):
            return pc.node(f"block{i}", h + jnp.tanh(h) @ w)

        h = wrap(block)(h, w)
    return pc.node("out", h @ params[-1])


@pytest.mark.x64
def test_checkpointed_blocks_energy_and_fpa_gradients_are_exact():
    k = jax.random.split(jax.random.PRNGKey(13), 6)
    params = [jax.random.normal(k[0], (3, 4))]
    params += [jax.random.normal(k[i], (4, 4)) / 2 for i in (1, 2, 3)]
    params += [jax.random.normal(k[4], (4, 2))]
    x, y = jax.random.normal(k[5], (5, 3)), jnp.ones((5, 2))

    def by_hand(p, s):
        total = jnp.sum((s["stem"] - x @ p[0]) ** 2)
        before = s["stem"]
        for i in range(3):
            total += jnp.sum((s[f"block{i}"] - before - jnp.tanh(before) @ p[i + 1]) ** 2)
            before = s[f"block{i}"]
        return 0.5 * (total + jnp.sum((y - before @ p[-1]) ** 2))

    error = assert_energy_and_fpa_exact(checkpointed_blocks, params, x, y, by_hand, steps=6)
    assert error < 1e-14  # measured 7.3e-17


def sequence_to_sequence(params, xs):
    """An RNN observed at every step: its output node is stacked (time, batch, out)."""

    def step(h, x):
        h = pc.node("h", jnp.tanh(h) @ params["w"] + x @ params["u"])
        return h, pc.node("y", h @ params["v"])

    _, ys = jax.lax.scan(step, jnp.zeros((xs.shape[1], 3)), xs)
    return ys


def test_train_step_averages_over_the_batch_not_the_stacked_time_axis():
    k = jax.random.split(jax.random.PRNGKey(14), 5)
    params = {
        "w": jax.random.normal(k[0], (3, 3)) / 2,
        "u": jax.random.normal(k[1], (2, 3)),
        "v": jax.random.normal(k[2], (3, 2)),
    }
    xs = jax.random.normal(k[3], (7, 4, 2))  # time 7, batch 4
    ys = jax.random.normal(k[4], (7, 4, 2))
    step = pc.make_train_step(
        pc.fixed_predictions(sequence_to_sequence),
        pc.Equilibrium(pc.GradientDescent(9, step_size=1.0)),
        optax.sgd(1.0),
    )
    new, _, _ = jax.jit(step)(params, optax.sgd(1.0).init(params), xs, {"y": ys})
    summed = jax.jit(jax.grad(lambda p: 0.5 * jnp.sum((ys - sequence_to_sequence(p, xs)) ** 2)))(
        params
    )
    moved = jax.tree.map(lambda a, b: a - b, params, new)
    assert rel_error(moved, jax.tree.map(lambda g: g / 4, summed)) < 1e-7  # measured 1.0e-8


def test_tol_takes_each_samples_norm_past_the_stacked_scan_axes():
    """`GradientDescent(tol=...)` stops on the largest per-sample gradient norm; for a node
    stacked along a scan the sample axis comes after the stacked axis (it used to take axis 0:
    a shape error beside unstacked nodes, the max over layers otherwise)."""
    k = jax.random.split(jax.random.PRNGKey(15), 4)
    params = {
        "stem": jax.random.normal(k[0], (3, 4)),
        "w": jax.random.normal(k[1], (3, 4, 4)) / 2,
        "b": jnp.zeros((3, 4)),
    }
    x = jax.random.normal(k[2], (5, 3))
    y = jax.random.normal(k[3], (5, 4))

    def observed_last(p, x):  # the last layer's output is observed through an extra node
        return pc.node("out", scanned_stack(p, x))

    ff = pc.forward_init(observed_last, params, x)
    latent = {"stem": ff["stem"], "layer": ff["layer"]}
    grads = jax.grad(lambda s: pc.energy(observed_last, params, s, x, {"out": y}))(latent)
    by_hand = jnp.sqrt(
        jnp.sum(grads["stem"] ** 2, axis=1) + jnp.sum(grads["layer"] ** 2, axis=(0, 2))
    ).max()
    norm = per_sample_grad_norm(grads, {"stem": 0, "layer": 1})
    np.testing.assert_allclose(norm, by_hand, rtol=1e-6)
    _, info = pc.infer(
        observed_last,
        params,
        latent,
        x,
        {"out": y},
        solver=pc.GradientDescent(500, step_size=0.2, tol=float(norm) / 10),
    )
    assert 0 < int(info.steps) < 500


@jax.jit
def _jitted_cell(w, h):
    return pc.node("cell", jnp.tanh(h) @ w)


def jit_in_vmap_in_scan(w, xs):
    """A jitted, tagged cell, vmapped over the batch inside a scan over time."""

    def step(h, x):
        return jax.vmap(lambda h, x: _jitted_cell(w, h) + x)(h, x), None

    return jax.lax.scan(step, jnp.zeros(xs.shape[1:]), xs)[0]


def test_jit_inside_vmap_inside_scan_compose():
    k = jax.random.split(jax.random.PRNGKey(16), 2)
    w = jax.random.normal(k[0], (3, 3))
    xs = jax.random.normal(k[1], (4, 5, 3))  # time, batch, features
    _jitted_cell(w, xs[0, 0])  # a warm cache
    states = pc.forward_init(jit_in_vmap_in_scan, w, xs)
    assert states["cell"].shape == (4, 5, 3)
    shifted = {"cell": states["cell"] + 0.1}
    previous = jnp.concatenate([jnp.zeros((1, 5, 3)), (shifted["cell"] + xs)[:-1]])
    by_hand = 0.5 * jnp.sum((shifted["cell"] - jnp.tanh(previous) @ w) ** 2)
    energy = pc.energy(jit_in_vmap_in_scan, w, shifted, xs)
    np.testing.assert_allclose(energy, by_hand, rtol=1e-5)  # measured 0.0 (float32)
