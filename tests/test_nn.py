"""pcjax.nn builders (per-sample equinox modules, `nn.call` = `jax.vmap(model)`): under fixed
predictions, PC parameter gradients equal backprop's on every architecture (float32, 1e-4
relative), scanned models (over time or over layers) are the unrolled models with stacked
nodes, and standard PC approaches backprop as the output precision shrinks."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_error

import pcjax as pc
from pcjax import nn
from pcjax._tagging import scan_depths

KEY = jax.random.PRNGKey(0)


def f32(model):
    return jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)


ARCHITECTURES = {
    "mlp": lambda k: (nn.MLP([6, 8, 8, 3], key=k), (5, 6)),
    "vgg": lambda k: (nn.VGG(2, [4, 6], [8], 3, image_size=8, key=k), (3, 8, 8, 2)),
    "resnet": lambda k: (nn.ResNet(6, 8, 3, 3, key=k), (5, 6)),
    "resnet_mupc": lambda k: (nn.ResNet(6, 8, 3, 3, key=k, mupc=True), (5, 6)),
    "resnet_scan": lambda k: (nn.ResNet(6, 8, 3, 3, key=k, scan_layers=True), (5, 6)),
    "residual_mlp": lambda k: (nn.ResidualMLP(6, 8, 3, 3, key=k), (5, 6)),
    "lstm": lambda k: (nn.LSTM(3, 6, 3, key=k), (4, 5, 3)),
    "lstm_gates": lambda k: (nn.LSTM(3, 6, 3, key=k, nodes="op"), (4, 5, 3)),
    "lstm_unrolled": lambda k: (nn.LSTM(3, 6, 3, key=k, scan=False), (4, 5, 3)),
    "gru": lambda k: (nn.GRU(3, 6, 3, key=k), (4, 5, 3)),
    "gru_ops": lambda k: (nn.GRU(3, 6, 3, key=k, nodes="op"), (4, 5, 3)),
    "gru_unrolled": lambda k: (nn.GRU(3, 6, 3, key=k, scan=False), (4, 5, 3)),
    "transformer": lambda k: (nn.TransformerBlock(8, 2, 16, 3, key=k), (3, 5, 8)),
    "transformer_ops": lambda k: (nn.TransformerBlock(8, 2, 16, 3, key=k, nodes="op"), (3, 5, 8)),
    "transformer_stack": lambda k: (nn.Transformer(8, 2, 16, 3, 2, key=k), (3, 5, 8)),
    "transformer_scan": lambda k: (
        nn.Transformer(8, 2, 16, 3, 2, key=k, nodes="op", scan_layers=True),
        (3, 5, 8),
    ),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(KEY, len(request.param)), 3)
    model, shape = ARCHITECTURES[request.param](k1)
    model = f32(model)
    x = jax.random.normal(k2, shape, jnp.float32)
    y = jax.random.normal(k3, (shape[0], 3), jnp.float32)
    return request.param, model, x, y


forward = eqx.filter_jit(functools.partial(pc.forward_init, nn.call))
energy = eqx.filter_jit(functools.partial(pc.energy, nn.call))
batched = eqx.filter_jit(nn.call)


def shapes(model, x):
    """Every node's state shape (traced abstractly: nothing is compiled; names sorted)."""
    nodes = jax.eval_shape(functools.partial(pc.forward_init, nn.call), model, x)
    return {k: v.shape for k, v in nodes.items()}


def unrolled_depth(model, x) -> int:
    """The number of node values per sample: a node stacked over a scan counts once per step.
    FPA inference with step size 1 is exact after at most this many steps."""
    depths = scan_depths(nn.call, model, x)
    return sum(int(np.prod(shape[: depths[k]])) for k, shape in shapes(model, x).items())


@eqx.filter_jit
def _fixed_prediction_grads(model, x, target, output, steps):
    latent = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != output}
    states, info = pc.infer(
        pc.fixed_predictions(nn.call),
        model,
        latent,
        x,
        {output: target},
        solver=pc.GradientDescent(steps, step_size=1.0),
    )
    grads = pc.param_grads(pc.fixed_predictions(nn.call), model, states, x, {output: target})
    return grads, info.diverged


def fixed_prediction_grads(model, x, output, target):
    """PC parameter gradients under fixed predictions, the `output` node clamped to `target`.
    Step size 1: exact after as many steps as the (unrolled) node graph is deep."""
    steps = unrolled_depth(model, x)
    grads, diverged = _fixed_prediction_grads(model, x, target, output, steps)
    assert not bool(diverged)
    return grads


@eqx.filter_jit
def squared_error_grads(model, x, y):
    return eqx.filter_grad(lambda m: 0.5 * jnp.sum((y - nn.call(m, x)) ** 2))(model)


def test_fixed_predictions_equal_backprop(architecture):
    name, model, x, y = architecture
    output = [k for k, shape in shapes(model, x).items() if shape == y.shape][-1]
    grads = fixed_prediction_grads(model, x, output, y)
    # measured: gru 5.8e-8, gru_ops 2.2e-7, gru_unrolled 4.5e-8, lstm 2.1e-8, lstm_gates 3.4e-7,
    # lstm_unrolled 5.9e-8, mlp 8.9e-8, resnet 6.1e-8, resnet_mupc 6.9e-8, resnet_scan 8.3e-8,
    # residual_mlp 1.1e-7,
    # transformer 2.2e-7, transformer_ops 2.3e-7, transformer_scan 2.8e-7,
    # transformer_stack 1.7e-7, vgg 1.1e-7
    assert rel_error(grads, squared_error_grads(model, x, y)) < 1e-4, name


@pytest.mark.x64
def test_standard_pc_approaches_backprop_on_a_resnet():
    k1, k2, k3 = jax.random.split(KEY, 3)
    model = nn.ResNet(4, 6, 2, 2, key=k1)  # float64 here: the limit needs tight equilibria
    x = jax.random.normal(k2, (6, 4))
    y = jax.random.normal(k3, (6, 2))
    latent = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != "out"}
    reference = squared_error_grads(model, x, y)

    @eqx.filter_jit  # the precision is an argument: one compile serves every gamma
    def scaled_grads(gamma):
        states, _ = pc.infer(
            nn.call,
            model,
            latent,
            x,
            {"out": y},
            precision={"out": gamma},
            solver=pc.GradientDescent(4000, step_size=0.2, tol=1e-12),
        )
        grads = pc.param_grads(nn.call, model, states, x, {"out": y}, precision={"out": gamma})
        return jax.tree.map(lambda g: g / gamma, grads)

    errors = [rel_error(scaled_grads(jnp.asarray(g)), reference) for g in [0.1, 0.01, 0.001]]
    # measured 0.599, 0.245, 0.0121 (ReLU kinks slow this ResNet's equilibria at gamma >= 0.01)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_node_names_shapes_and_granularity():
    k = jax.random.PRNGKey(1)  # the sizes of ARCHITECTURES (shared compilations)
    xs = jnp.zeros((4, 5, 3))  # batch 4, time 5, features 3
    lstm = shapes(nn.LSTM(3, 6, 3, key=k, scan=False), xs)
    assert set(lstm) == {f"{q}{t}" for t in range(5) for q in "ch"} | {"out"}
    assert lstm["h4"] == (4, 6) and lstm["out"] == (4, 3)
    # Scanned over time: one node per quantity, stacked (time, batch, hidden).
    assert shapes(nn.LSTM(3, 6, 3, key=k), xs) == {"c": (5, 4, 6), "h": (5, 4, 6), "out": (4, 3)}
    lstm_ops = shapes(nn.LSTM(3, 6, 3, key=k, nodes="op"), xs)
    assert lstm_ops == {"gates": (5, 4, 24), "c": (5, 4, 6), "h": (5, 4, 6), "out": (4, 3)}
    assert {"gates0", "gates4"} <= set(shapes(nn.LSTM(3, 6, 3, key=k, nodes="op", scan=False), xs))
    assert shapes(nn.GRU(3, 6, 3, key=k), xs) == {"h": (5, 4, 6), "out": (4, 3)}
    assert set(shapes(nn.GRU(3, 6, 3, key=k, scan=False), xs)) == {f"h{t}" for t in range(5)} | {
        "out"
    }
    gru_ops = shapes(nn.GRU(3, 6, 3, key=k, nodes="op"), xs)
    assert gru_ops == {"gates": (5, 4, 12), "candidate": (5, 4, 6), "h": (5, 4, 6), "out": (4, 3)}

    x = jnp.zeros((5, 6))
    resnet = shapes(nn.ResNet(6, 8, 3, 3, key=k, scan_layers=True), x)
    assert resnet == {"stem": (5, 8), "block_hidden": (3, 5, 8), "block": (3, 5, 8), "out": (5, 3)}
    assert set(shapes(nn.ResNet(6, 8, 3, 3, key=k), x)) == {
        "stem", "block0_hidden", "block0", "block1_hidden", "block1", "block2_hidden", "block2",
        "out",
    }  # fmt: skip

    seq = jnp.zeros((3, 5, 8))  # batch 3, sequence 5, d_model 8
    block = shapes(nn.TransformerBlock(8, 2, 16, 3, key=k), seq)
    assert sorted(block) == ["attn", "mlp_hidden", "out", "res1", "res2"]
    ops = shapes(nn.TransformerBlock(8, 2, 16, 3, key=k, nodes="op"), seq)
    assert ops["q"] == (3, 5, 8) and ops["scores"] == (3, 2, 5, 5)
    stack = shapes(nn.Transformer(8, 2, 16, 3, 2, key=k), seq)
    assert {"block0_attn", "block1_res2", "out"} <= set(stack) and len(stack) == 9
    scanned = shapes(nn.Transformer(8, 2, 16, 3, 2, key=k, scan_layers=True), seq)
    assert scanned["block_res1"] == (2, 3, 5, 8) and scanned["block_mlp_hidden"] == (2, 3, 5, 16)

    vgg = shapes(nn.VGG(2, [4, 6], [8], 3, image_size=8, key=k), jnp.zeros((3, 8, 8, 2)))
    # The convolution nodes are channels last, as the input images.
    assert vgg == {"conv0": (3, 8, 8, 4), "conv1": (3, 4, 4, 6), "fc0": (3, 8), "fc1": (3, 3)}

    with pytest.raises(ValueError, match="`nodes` must be one of"):
        nn.LSTM(3, 6, 3, key=k, nodes="gate")
    with pytest.raises(ValueError, match="`nodes` must be one of"):
        nn.GRU(3, 6, 3, key=k, nodes="gate")
    with pytest.raises(ValueError, match="not divisible"):
        nn.TransformerBlock(5, 2, 8, 1, key=k)
    with pytest.raises(ValueError, match="`depth` must be at least 1"):
        nn.ResNet(6, 8, 0, 3, key=k)
    with pytest.raises(ValueError, match=r"per-sample model.*pcjax.nn.call"):
        nn.MLP([6, 8, 8, 3], key=k)(x)  # a batch passed to the per-sample model


def stacked(nodes, names, length):
    """The unrolled model's per-step nodes (`names[scanned](t)`) stacked along a new leading
    axis: the states of the scanned model."""
    return {
        scanned: jnp.stack([nodes[per_step(t)] for t in range(length)])
        for scanned, per_step in names.items()
    }


SCANNED_PAIRS = {
    # name: (scanned model, unrolled model, input shape, scan length,
    #        scanned node -> unrolled name at step t); the sizes of ARCHITECTURES
    "lstm": (
        lambda k: nn.LSTM(3, 6, 3, key=k, nodes="op"),
        lambda k: nn.LSTM(3, 6, 3, key=k, nodes="op", scan=False),
        (4, 5, 3),
        5,
        {q: functools.partial(lambda q, t: f"{q}{t}", q) for q in ("gates", "c", "h")},
    ),
    "gru": (
        lambda k: nn.GRU(3, 6, 3, key=k, nodes="op"),
        lambda k: nn.GRU(3, 6, 3, key=k, nodes="op", scan=False),
        (4, 5, 3),
        5,
        {q: functools.partial(lambda q, t: f"{q}{t}", q) for q in ("gates", "candidate", "h")},
    ),
    "resnet": (
        lambda k: nn.ResNet(6, 8, 3, 3, key=k, scan_layers=True),
        lambda k: nn.ResNet(6, 8, 3, 3, key=k),
        (5, 6),
        3,
        {"block_hidden": lambda t: f"block{t}_hidden", "block": lambda t: f"block{t}"},
    ),
    "transformer": (
        lambda k: nn.Transformer(8, 2, 16, 3, 2, key=k, scan_layers=True),
        lambda k: nn.Transformer(8, 2, 16, 3, 2, key=k),
        (3, 5, 8),
        2,
        {
            f"block_{q}": functools.partial(lambda q, t: f"block{t}_{q}", q)
            for q in ("attn", "res1", "mlp_hidden", "res2")
        },
    ),
}


@pytest.mark.parametrize("name", sorted(SCANNED_PAIRS))
def test_scanned_model_is_the_unrolled_model_with_stacked_nodes(name):
    """Same parameters from the same key; the scanned model's nodes are the unrolled model's
    per-step nodes stacked, and its energy at any states is the unrolled model's energy at the
    same states (so PC on either is the same algorithm)."""
    make_scanned, make_unrolled, shape, length, names = SCANNED_PAIRS[name]
    k1, k2, k3 = jax.random.split(jax.random.fold_in(KEY, 3), 3)
    scanned, unrolled = make_scanned(k1), make_unrolled(k1)
    x = jax.random.normal(k2, shape)
    ff_scanned, ff_unrolled = forward(scanned, x), forward(unrolled, x)
    stack = stacked(ff_unrolled, names, length)
    for node, value in stack.items():  # measured: 0 except lstm (3.1e-6 relative)
        np.testing.assert_allclose(ff_scanned[node], value, rtol=1e-5, atol=1e-6)
    # Perturbed states: the energies agree (step t predicted from the states of step t - 1).
    noise = jax.random.normal(k3, (len(ff_unrolled),))
    shifted = {k: v + 0.1 * noise[i] * jnp.cos(v) for i, (k, v) in enumerate(ff_unrolled.items())}
    shifted_stack = stacked(shifted, names, length)
    shifted_stack.update({k: v for k, v in shifted.items() if k in ff_scanned})  # stem, out
    np.testing.assert_allclose(  # measured: gru 0, lstm 1.2e-7, resnet 1.2e-7, transformer 1.8e-7
        energy(scanned, shifted_stack, x), energy(unrolled, shifted, x), rtol=1e-5
    )


def test_train_step_on_scanned_layers_equals_unrolled():
    """One jitted PC training step (standard inference): the same parameter update whether the
    ResNet's blocks are scanned or unrolled."""
    k1, k2, k3 = jax.random.split(KEY, 3)
    x, y = jax.random.normal(k2, (5, 6)), jax.random.normal(k3, (5, 3))
    optimizer = optax.sgd(0.1)
    step = eqx.filter_jit(
        pc.make_train_step(nn.call, pc.Equilibrium(pc.GradientDescent(4, step_size=0.1)), optimizer)
    )
    updated = {}
    for scan_layers in (False, True):
        model = nn.ResNet(6, 8, 3, 3, key=k1, scan_layers=scan_layers)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        updated[scan_layers] = step(model, opt_state, x, {"out": y})[0]
    unrolled_blocks = updated[False].blocks
    restacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *unrolled_blocks)
    # measured: bitwise equal (max difference 0)
    np.testing.assert_allclose(updated[False].stem.weight, updated[True].stem.weight, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(updated[True].blocks)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_written_out_cells_and_attention_equal_equinox_layers():
    """The LSTM's equations, the GRU's `nodes="op"` equations and the attention with `nodes="op"`
    compute what calling the equinox layers computes."""
    k1, k2 = jax.random.split(KEY)
    xs = jax.random.normal(k2, (5, 3))  # one sample: time 5, features 3
    lstm = nn.LSTM(3, 6, 3, key=k1)

    @eqx.filter_jit
    def with_cell(lstm, xs):
        zeros = jnp.zeros(6)
        (h, _), _ = jax.lax.scan(lambda hc, x: (lstm.cell(x, hc), None), (zeros, zeros), xs)
        return lstm.head(h)

    one = eqx.filter_jit(lambda model, x: model(x))  # measured: all three bitwise equal
    np.testing.assert_allclose(one(lstm, xs), with_cell(lstm, xs), rtol=1e-6, atol=1e-6)
    gru_ops, gru = nn.GRU(3, 6, 3, key=k1, nodes="op"), nn.GRU(3, 6, 3, key=k1)
    np.testing.assert_allclose(one(gru_ops, xs), one(gru, xs), rtol=1e-6, atol=1e-6)
    seq = jax.random.normal(k2, (3, 5, 8))
    ops = nn.TransformerBlock(8, 2, 16, 3, key=k1, nodes="op")
    layer = nn.TransformerBlock(8, 2, 16, 3, key=k1)
    np.testing.assert_allclose(batched(ops, seq), batched(layer, seq), rtol=1e-5, atol=1e-6)


def test_mupc_keeps_deep_residual_activity_stable():
    """muPC's 1/sqrt(N L) branch scaling keeps the residual stream O(1) at depth 64, where
    unscaled branches blow it up by orders of magnitude."""
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    scales = {}
    for mupc in (False, True):
        model = nn.ResNet(16, 32, 64, 4, key=KEY, mupc=mupc, scan_layers=True)
        nodes = forward(model, x)
        scales[mupc] = float(jnp.std(nodes["block"][-1]) / jnp.std(nodes["stem"]))
    np.testing.assert_allclose(nn.ResNet(4, 16, 4, 2, key=KEY, mupc=True).branch_scale, 1 / 8)
    assert 0.5 < scales[True] < 2.0 and scales[False] > 100.0, scales


def test_residual_mlp_parameterisations():
    """The full muPC parameterisation keeps the stream and the output O(1) at depth 64 (input
    multiplier 1/sqrt(D), branches 1/sqrt(N L), output 1/N on unit-variance weights); the
    standard one (variance 1/fan-in, multipliers 1) blows both up."""
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    growth, output = {}, {}
    for kind in ("mupc", "standard"):
        model = nn.ResidualMLP(16, 32, 64, 4, key=KEY, parameterisation=kind)
        nodes = forward(model, x)
        growth[kind] = float(jnp.std(nodes["block"][-1]) / jnp.std(nodes["stem"]))
        output[kind] = float(jnp.std(nodes["out"]))
    # measured: mupc 1.32 and 0.13; standard 1.3e6 and 2.6e5
    assert 0.5 < growth["mupc"] < 2.0 and output["mupc"] < 1.0, (growth, output)
    assert growth["standard"] > 1e3 and output["standard"] > 1e3, (growth, output)
    mupc = nn.ResidualMLP(16, 32, 64, 4, key=KEY)
    np.testing.assert_allclose(mupc.multipliers, (1 / 4, 1 / np.sqrt(32 * 64), 1 / 32))
    np.testing.assert_allclose(float(jnp.std(mupc.blocks)), 1.0, rtol=0.02)
    with pytest.raises(ValueError, match="`parameterisation` must be one of"):
        nn.ResidualMLP(16, 32, 4, 4, key=KEY, parameterisation="mup")


CROSS_ENTROPY = {
    "mlp": lambda k: (nn.MLP([6, 8, 4], key=k, output_energy=pc.cross_entropy), (5, 6), "h1"),
    "vgg": lambda k: (
        nn.VGG(2, [4], [6], 4, image_size=8, key=k, output_energy=pc.cross_entropy),
        (3, 8, 8, 2),
        "fc1",
    ),
    "resnet": lambda k: (
        nn.ResNet(6, 8, 2, 4, key=k, output_energy=pc.cross_entropy, scan_layers=True),
        (5, 6),
        "out",
    ),
    "lstm": lambda k: (nn.LSTM(3, 6, 4, key=k, output_energy=pc.cross_entropy), (4, 5, 3), "out"),
    "gru": lambda k: (nn.GRU(3, 6, 4, key=k, output_energy=pc.cross_entropy), (4, 5, 3), "out"),
    "transformer": lambda k: (
        nn.TransformerBlock(8, 2, 16, 4, key=k, output_energy=pc.cross_entropy),
        (3, 5, 8),
        "out",
    ),
}


@pytest.mark.parametrize("name", sorted(CROSS_ENTROPY))
def test_cross_entropy_output_with_fixed_predictions_equals_backprop(name):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(KEY, 7), 3)
    model, shape, output = CROSS_ENTROPY[name](k1)
    model = f32(model)
    x = jax.random.normal(k2, shape, jnp.float32)
    labels = jax.nn.one_hot(jax.random.randint(k3, (shape[0],), 0, 4), 4)
    grads = fixed_prediction_grads(model, x, output, labels)
    latent = {k: v for k, v in forward(model, x).items() if k != output}
    loss = lambda m: optax.softmax_cross_entropy(nn.call(m, x), labels).sum()  # noqa: E731
    reference = eqx.filter_jit(eqx.filter_grad(loss))(model)
    # measured: gru 6.2e-8, lstm 9.4e-8, mlp 8.7e-8, resnet 1.5e-7, transformer 4.6e-7, vgg 1.1e-7
    assert rel_error(grads, reference) < 1e-4, name
    # The energy at the feedforward states is the cross-entropy loss itself.
    np.testing.assert_allclose(
        energy(model, latent, x, {output: labels}), eqx.filter_jit(loss)(model), rtol=1e-5
    )


def test_custom_energy_nodes_take_no_precision_or_fisher():
    model = nn.MLP([3, 4, 2], key=KEY, output_energy=pc.cross_entropy)
    x = jnp.ones((2, 3))
    latent = {"h0": pc.forward_init(nn.call, model, x)["h0"]}
    labels = jnp.eye(2)
    with pytest.raises(ValueError, match=r"\['h1'\] have a custom energy.*take no precision"):
        pc.energy(nn.call, model, latent, x, {"h1": labels}, precision={"h1": 2.0})
    with pytest.raises(ValueError, match="natural gradients need Gaussian nodes"):
        pc.fisher_statistics(nn.call, model, latent, x, {"h1": labels})
    with pytest.raises(TypeError, match="energy of node 'a' must be a function"):
        pc.forward_init(lambda p, x: pc.node("a", x, energy="cross_entropy"), None, x)
