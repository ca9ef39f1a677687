"""pcjax.nn builders: under fixed predictions, PC parameter gradients equal backprop's on every
architecture (float32, 1e-4 relative), and standard PC approaches them as the output precision
shrinks."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_error

import pcjax as pc
from pcjax import nn

KEY = jax.random.PRNGKey(0)


def f32(model):
    return jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)


ARCHITECTURES = {
    "mlp": lambda k: (nn.MLP([6, 8, 8, 3], key=k), (5, 6)),
    "vgg": lambda k: (nn.VGG(2, [4, 6], [8], 3, image_size=8, key=k), (3, 8, 8, 2)),
    "resnet": lambda k: (nn.ResNet(6, 8, 3, 3, key=k), (5, 6)),
    "resnet_mupc": lambda k: (nn.ResNet(6, 8, 3, 3, key=k, mupc=True), (5, 6)),
    "lstm": lambda k: (nn.LSTM(3, 6, 3, key=k), (4, 5, 3)),
    "lstm_gates": lambda k: (nn.LSTM(3, 6, 3, key=k, nodes="op"), (4, 5, 3)),
    "transformer": lambda k: (nn.TransformerBlock(8, 2, 16, 3, key=k), (3, 5, 8)),
    "transformer_ops": lambda k: (nn.TransformerBlock(8, 2, 16, 3, key=k, nodes="op"), (3, 5, 8)),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(KEY, len(request.param)), 3)
    model, shape = ARCHITECTURES[request.param](k1)
    model = f32(model)
    x = jax.random.normal(k2, shape, jnp.float32)
    y = jax.random.normal(k3, (shape[0], 3), jnp.float32)
    return request.param, model, x, y


def fixed_prediction_grads(model, x, output, target):
    """PC parameter gradients under fixed predictions, the `output` node clamped to `target`."""
    nodes = pc.forward_init(nn.call, model, x)
    latent = {k: v for k, v in nodes.items() if k != output}
    # Step size 1: exact after as many steps as the node graph is deep (at most #nodes).
    states, info = pc.infer(
        nn.call,
        model,
        latent,
        x,
        {output: target},
        steps=len(nodes),
        step_size=1.0,
        fixed_predictions=True,
    )
    assert not bool(info.diverged)
    return pc.param_grads(nn.call, model, states, x, {output: target}, fixed_predictions=True)


def test_fixed_predictions_equal_backprop(architecture):
    name, model, x, y = architecture
    nodes = pc.forward_init(nn.call, model, x)
    output = [k for k, v in nodes.items() if v.shape == y.shape][-1]
    grads = fixed_prediction_grads(model, x, output, y)
    reference = eqx.filter_grad(lambda m: 0.5 * jnp.sum((y - m(x)) ** 2))(model)
    assert rel_error(grads, reference) < 1e-4, name


@pytest.mark.x64
def test_standard_pc_approaches_backprop_on_a_resnet():
    k1, k2, k3 = jax.random.split(KEY, 3)
    model = nn.ResNet(4, 6, 2, 2, key=k1)  # float64 here: the limit needs tight equilibria
    x = jax.random.normal(k2, (6, 4))
    y = jax.random.normal(k3, (6, 2))
    latent = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != "out"}
    reference = eqx.filter_grad(lambda m: 0.5 * jnp.sum((y - m(x)) ** 2))(model)
    errors = []
    for gamma in [1.0, 0.1, 0.01]:
        states, _ = pc.infer(
            nn.call,
            model,
            latent,
            x,
            {"out": y},
            steps=4000,
            step_size=0.2,
            tol=1e-12,
            precision={"out": gamma},
        )
        grads = pc.param_grads(nn.call, model, states, x, {"out": y}, precision={"out": gamma})
        errors.append(rel_error(jax.tree.map(lambda g, s=gamma: g / s, grads), reference))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_node_names_and_granularity():
    k = jax.random.PRNGKey(1)
    lstm = pc.forward_init(nn.call, nn.LSTM(2, 3, 1, key=k), jnp.zeros((1, 2, 2)))
    assert sorted(lstm) == ["c0", "c1", "h0", "h1", "out"]
    lstm_ops = pc.forward_init(nn.call, nn.LSTM(2, 3, 1, key=k, nodes="op"), jnp.zeros((1, 2, 2)))
    assert {"gates0", "gates1"} <= set(lstm_ops)
    block = pc.forward_init(nn.call, nn.TransformerBlock(4, 2, 8, 1, key=k), jnp.zeros((1, 3, 4)))
    assert sorted(block) == ["attn", "mlp_hidden", "out", "res1", "res2"]
    with pytest.raises(ValueError, match="`nodes` must be one of"):
        nn.LSTM(2, 3, 1, key=k, nodes="gate")
    with pytest.raises(ValueError, match="not divisible"):
        nn.TransformerBlock(5, 2, 8, 1, key=k)


def test_mupc_keeps_deep_residual_activity_stable():
    """muPC's 1/sqrt(N L) branch scaling keeps the residual stream O(1) at depth 64, where
    unscaled branches blow it up by orders of magnitude."""
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    scales = {}
    for mupc in (False, True):
        model = nn.ResNet(16, 32, 64, 4, key=KEY, mupc=mupc)
        nodes = pc.forward_init(nn.call, model, x)
        scales[mupc] = float(jnp.std(nodes["block63"]) / jnp.std(nodes["stem"]))
    np.testing.assert_allclose(nn.ResNet(4, 16, 4, 2, key=KEY, mupc=True).branch_scale, 1 / 8)
    assert 0.5 < scales[True] < 2.0 and scales[False] > 100.0, scales


CROSS_ENTROPY = {
    "mlp": lambda k: (nn.MLP([6, 8, 4], key=k, output_energy=pc.cross_entropy), (5, 6), "h1"),
    "vgg": lambda k: (
        nn.VGG(2, [4], [6], 4, image_size=8, key=k, output_energy=pc.cross_entropy),
        (3, 8, 8, 2),
        "fc1",
    ),
    "resnet": lambda k: (
        nn.ResNet(6, 8, 2, 4, key=k, output_energy=pc.cross_entropy),
        (5, 6),
        "out",
    ),
    "lstm": lambda k: (nn.LSTM(3, 6, 4, key=k, output_energy=pc.cross_entropy), (4, 5, 3), "out"),
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
    latent = {k: v for k, v in pc.forward_init(nn.call, model, x).items() if k != output}
    loss = lambda m: optax.softmax_cross_entropy(m(x), labels).sum()  # noqa: E731
    reference = eqx.filter_grad(loss)(model)
    assert rel_error(grads, reference) < 1e-4, name
    # The energy at the feedforward states is the cross-entropy loss itself.
    np.testing.assert_allclose(
        pc.energy(nn.call, model, latent, x, {output: labels}), loss(model), rtol=1e-5
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
