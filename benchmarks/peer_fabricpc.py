"""The suite's MLP and CNN tasks written with the peer library FabricPC, run in its own venv.

    <fabricpc venv>/bin/python benchmarks/peer_fabricpc.py --data data.npz --config config.json \\
        [--weights weights.npz]

FabricPC (PyPI `fabricpc`, tested with 0.6.0 on jax 0.10) builds a PC network as a graph of
nodes joined by edges; `make_train_step` runs its feedforward state initialisation,
`InferenceSGD` (z -= eta * dE/dz) and the local weight gradients, then an optax update.

Peer contract (the same for `peer_pcx.py`)
------------------------------------------
`data.npz`: `x_train`, `y_train`, `x_test`, `y_test`; labels are integer classes. For the MLP
the images are flattened (any trailing shape is); for the CNN they are channels-last
`(N, H, W, C)` (`(N, H, W)` gets a channel axis; flat `(N, D)` needs `image_shape`).

`config.json` keys:
  task             "mlp" (default, so older configs still work) or "cnn"
  hidden           dense hidden widths, e.g. [256, 256]
  channels         CNN only: 3x3 'SAME' convolution widths, e.g. [8, 16]
  pool_after       CNN only, optional: conv blocks followed by 2x2 max pooling (default: all)
  image_shape      CNN only, optional: [H, W, C] when the data is stored flat
  activation       optional: "gelu" or "relu" (default: gelu for the MLP, relu for the CNN,
                   as pcjax.nn.MLP and pcjax.nn.VGG)
  classes          optional, default 10
  batch            batch size (also the number of samples of the weight check)
  inference_steps  T, the state updates per training step
  state_step       the state SGD step size
  lr, epochs       AdamW (weight decay 1e-4) on a cosine schedule from lr over the epochs
  seed, repeats    init seed; number of timed calls of each step
  speed_only       if false, also train `epochs` epochs and report the test accuracy

The network is pcjax's: node i is the PRE-activation output of layer i (conv i, then dense j;
the last node is the output, clamped to the one-hot label, squared-error energy), predicted
from its parent node by mu_i = layer_i(pool(act(x_{i-1}))) (no activation on the input; 2x2
max pooling after the conv blocks in `pool_after`; the first dense layer flattens the
channels-last map). Energy F = sum over nodes and samples of 1/2 ||x_i - mu_i||^2.

`weights.npz` (optional): `w0, b0, w1, b1, ...`, one pair per layer in network order (convs,
then dense layers; the output layer last), float32. Dense `w{i}`: (in, out), so mu = h @ w + b
-- the TRANSPOSE of pcjax.nn.Linear.weight, which is (out, in); conv `w{i}`: HWIO
(3, 3, in, out) as pcjax.nn.Conv2d.weight; `b{i}`: (out,). The first dense layer's `in` index is
the row-major flatten of the (H, W, C) map. With weights, the script first runs the weight
check: the first `batch` training samples, feedforward initialisation, label clamped, T state
steps of size `state_step`, and reports `relaxed_energy` (F at the final states) and
`feedforward_energy` (F at the initialisation: the output node's term only). Then it times
from those weights (else from its own random init).

Printed: one JSON line with
  peer, version, task, jax_version, backend; with weights: relaxed_energy, feedforward_energy,
  relaxed_energy_nodes (per node, network order), check_samples; step_ms, backprop_ms, ratio,
  compile_s (the peer step's first call), and the same under the older names step_seconds,
  backprop_step_seconds, x_backprop, compile_seconds, jax; if not speed_only: test_accuracy,
  train_seconds, energy (the last training batch's FabricPC metric times the batch: summed
  convention, but one state update stale, see below); FabricPC only: fabricpc_metric_energy.
An unsupported task or a malformed file exits non-zero with the reason as the last stderr line.

How FabricPC expresses that network
-----------------------------------
FabricPC's own `Linear` and `ConvNode` predict z_mu = f(W x + b), i.e. their latents are
POST-activation, and its `MaxPool` is a node with a latent and an energy of its own: its native
graphs are a different network (other energy, other states). The script therefore defines two
node classes through FabricPC's documented extension point: subclasses of `Linear` and
`ConvNode` with identity activation whose `predict` applies the activation (and the pooling) to
the parent's latent before FabricPC's own matmul / convolution (`Linear.predict`,
`ConvNode.predict`). Everything else is FabricPC's: graph construction, FeedforwardStateInit,
InferenceSGD, GaussianEnergy, the batch-summed local weight gradients divided by the batch
(`pc_weight_gradients`), and the jitted `make_train_step`.

Energy conventions: FabricPC's GaussianEnergy is 1/2 ||z - mu||^2 per sample (pcjax's), and the
state gradients come from the energy summed over the batch (pcjax's). Its reported metric
`energy` is divided by the batch (`grad_denominator`) and read from the node energies computed
during the last inference step, i.e. BEFORE the last state update; `relaxed_energy` is
recomputed at the final states. `fabricpc_metric_energy` (with weights) is that metric times the
batch after one step from the given weights, for comparison.

Speed note: `InferenceSGD.run_inference` is a `lax.fori_loop` (not unrolled); pcx's loop is a
Python loop in the jitted step, i.e. unrolled. On a 2-core CPU (quick CNN), unrolling
FabricPC's loop (a diagnostic subclass, not used here) took its step from ~209 to ~85 ms.
"""

from __future__ import annotations

import argparse
import json
import time

import fabricpc
import jax
import jax.numpy as jnp
import numpy as np
import optax
from fabricpc.core.activations import IdentityActivation
from fabricpc.core.energy import GaussianEnergy, graph_energy
from fabricpc.core.inference import InferenceSGD, run_inference
from fabricpc.core.initializers import (
    KaimingInitializer,
    NormalInitializer,
    ZerosInitializer,
)
from fabricpc.core.topology import Edge
from fabricpc.core.types import GraphParams, NodeParams
from fabricpc.graph_assembly import TaskMap, graph
from fabricpc.graph_initialization import initialize_params
from fabricpc.graph_initialization.state_initializer import initialize_graph_state
from fabricpc.nodes import ConvNode, IdentityNode, Linear, NodeBase
from fabricpc.training import build_clamps, make_train_step
from peer_network import (
    ACTIVATIONS,
    backprop_step,
    fail,
    load_data,
    load_weights,
    max_pool,
    network,
    random_weights,
    timed,
)

# ---------------------------------------------------------------------------------------------
# FabricPC


def _pooled_shapes(input_shapes: dict, node_config) -> dict:
    """The parents' shapes after the pooling in `predict` (FabricPC sizes weights from them)."""
    if not node_config.get("parent_pool"):
        return input_shapes
    return {k: (s[0] // 2, s[1] // 2, s[2]) for k, s in input_shapes.items()}


def _transformed(inputs: dict, node_config) -> dict:
    """The parent states as the layer reads them: activation, then pooling."""
    activation = node_config.get("parent_activation")
    out = {}
    for key, h in inputs.items():
        h = ACTIVATIONS[activation](h) if activation else h
        out[key] = max_pool(h) if node_config.get("parent_pool") else h
    return out


class PreActDense(Linear):
    """FabricPC's Linear (identity activation, so its latent is the pre-activation) reading
    act(parent) [pooled] [flattened: `flatten_input`, FabricPC's own option]."""

    def __init__(self, shape, name, *, parent_activation=None, parent_pool=False, flatten=False):
        NodeBase.__init__(
            self,
            shape=shape,
            name=name,
            activation=IdentityActivation(),
            energy=GaussianEnergy(),
            latent_init=NormalInitializer(),
            weight_init=KaimingInitializer(),
            use_bias=True,
            flatten_input=flatten,
            parent_activation=parent_activation,
            parent_pool=parent_pool,
        )

    @staticmethod
    def initialize_params(key, node_shape, input_shapes, weight_init, config=None):
        shapes = _pooled_shapes(input_shapes, config)
        return Linear.initialize_params(key, node_shape, shapes, weight_init, config)

    @staticmethod
    def predict(params, inputs, state, node_info):
        return Linear.predict(params, _transformed(inputs, node_info.node_config), state, node_info)


class PreActConv(ConvNode):
    """FabricPC's ConvNode (3x3, stride 1, 'SAME', NHWC / HWIO, identity activation) reading
    act(parent) [pooled]."""

    def __init__(self, shape, name, *, parent_activation=None, parent_pool=False):
        NodeBase.__init__(
            self,
            shape=shape,
            name=name,
            activation=IdentityActivation(),
            energy=GaussianEnergy(),
            latent_init=NormalInitializer(),
            weight_init=KaimingInitializer(),
            use_bias=True,
            bias_init=ZerosInitializer(),
            kernel_size=(3, 3),
            stride=(1, 1),
            padding="SAME",
            parent_activation=parent_activation,
            parent_pool=parent_pool,
        )

    @staticmethod
    def initialize_params(key, node_shape, input_shapes, weight_init, config=None):
        shapes = _pooled_shapes(input_shapes, config)
        return ConvNode.initialize_params(key, node_shape, shapes, weight_init, config)

    @staticmethod
    def predict(params, inputs, state, node_info):
        return ConvNode.predict(
            params, _transformed(inputs, node_info.node_config), state, node_info
        )


def build_graph(layers, sample_shape, activation: str, config: dict):
    """The FabricPC graph: an input source node, then one node per layer (pcjax's names)."""
    source = IdentityNode(shape=tuple(sample_shape), name="input")
    nodes, edges, names = [source], [], []
    n_conv = sum(spec.kind == "conv" for spec in layers)
    for i, spec in enumerate(layers):
        act = activation if spec.act_parent else None
        if config.get("task", "mlp") == "mlp":
            name = f"h{i}"
        else:
            name = f"conv{i}" if spec.kind == "conv" else f"fc{i - n_conv}"
        if spec.kind == "conv":
            node = PreActConv(
                spec.out_shape, name, parent_activation=act, parent_pool=spec.pool_parent
            )
        else:
            node = PreActDense(
                spec.out_shape,
                name,
                parent_activation=act,
                parent_pool=spec.pool_parent,
                flatten=spec.flatten_parent,
            )
        edges.append(Edge(source=nodes[-1], target=node.slot("in")))
        nodes.append(node)
        names.append(name)
    structure = graph(
        nodes=nodes,
        edges=edges,
        task_map=TaskMap(x=source, y=nodes[-1]),
        inference=InferenceSGD(
            eta_infer=config["state_step"], infer_steps=config["inference_steps"]
        ),
    )
    return structure, names


def graph_params(structure, names, weights) -> GraphParams:
    """FabricPC parameters holding `weights` (a list of (w, b) in the contract's layouts)."""
    params = initialize_params(structure, jax.random.PRNGKey(0))
    nodes = dict(params.nodes)
    for name, (w, b) in zip(names, weights):
        (edge,) = structure.nodes[name].node_info.in_edges
        old = params.nodes[name]
        if old.weights[edge].shape != w.shape:
            fail(f"node {name}: FabricPC weight {old.weights[edge].shape}, given {w.shape}")
        nodes[name] = NodeParams(
            weights={edge: jnp.asarray(w)},
            biases={"b": jnp.asarray(b).reshape(old.biases["b"].shape)},
        )
    return GraphParams(nodes=nodes)


def energy_check(structure, names, params, x, y):
    """F at the feedforward initialisation and after T state steps, pcjax's convention."""
    clamps = build_clamps({"x": x, "y": y}, structure, clamp_target=True)
    key = jax.random.PRNGKey(0)

    @jax.jit
    def relax(params, clamps):
        state = initialize_graph_state(structure, x.shape[0], key, clamps=clamps, params=params)
        # Recompute every node's energy at the given latents (the feedforward initialiser
        # leaves the hidden nodes' energies at their zero placeholders; the inference loop's
        # are one update stale).
        rescore = InferenceSGD.forward_value_and_grad
        feedforward = graph_energy(rescore(params, state, clamps, structure), structure)
        final = rescore(params, run_inference(params, state, clamps, structure), clamps, structure)
        per_node = jnp.stack([jnp.sum(final.nodes[n].energy) for n in names])
        return feedforward, per_node

    feedforward, per_node = relax(params, clamps)
    return float(feedforward), float(jnp.sum(per_node)), [float(e) for e in per_node]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights")
    args = parser.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    task = config.get("task", "mlp")
    if task not in ("mlp", "cnn"):
        fail(f"unknown task {task!r} (known: 'mlp', 'cnn')")
    activation_name = config.get("activation", "gelu" if task == "mlp" else "relu")
    if activation_name not in ACTIVATIONS:
        fail(f"unknown activation {activation_name!r} (known: {sorted(ACTIVATIONS)})")
    activation = ACTIVATIONS[activation_name]
    x_train, y_train, x_test, y_test = load_data(args.data, config)
    sample_shape = x_train.shape[1:]
    layers = network(config, sample_shape)
    classes = layers[-1].fan_out
    batch = config["batch"]
    onehot = np.eye(classes, dtype=np.float32)[y_train]
    weights = (
        load_weights(args.weights, layers)
        if args.weights
        else random_weights(layers, config["seed"])
    )
    structure, names = build_graph(layers, sample_shape, activation_name, config)
    x, y = jnp.asarray(x_train[:batch]), jnp.asarray(onehot[:batch])

    result = {
        "peer": "fabricpc",
        "version": fabricpc.__version__,
        "task": task,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    if args.weights:
        ff, relaxed, per_node = energy_check(
            structure, names, graph_params(structure, names, weights), x, y
        )
        result.update(
            relaxed_energy=relaxed,
            feedforward_energy=ff,
            relaxed_energy_nodes=per_node,
            check_samples=int(x.shape[0]),
        )

    per_epoch = len(x_train) // batch
    total = max(per_epoch * config["epochs"], 1)
    optimizer = optax.adamw(optax.cosine_decay_schedule(config["lr"], total), weight_decay=1e-4)
    pc_step = make_train_step(structure, optimizer)  # jitted; FabricPC's public custom-loop step
    key = jax.random.PRNGKey(config["seed"])
    batch_dict = {"x": x, "y": y}

    params = graph_params(structure, names, weights)
    pc_carry = (params, optimizer.init(params))
    start = time.perf_counter()
    out = jax.block_until_ready(pc_step(*pc_carry, batch_dict, key))
    compile_seconds = time.perf_counter() - start
    if args.weights:  # FabricPC's own energy metric: per sample, one state update stale
        result["fabricpc_metric_energy"] = float(out[2]["energy"]) * batch
    pc_carry = out[:2]

    bp_params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]
    bp_step = backprop_step(layers, activation, optimizer)
    bp_carry = jax.block_until_ready(bp_step(bp_params, optimizer.init(bp_params), x, y))

    def run_pc():
        nonlocal pc_carry
        out = pc_step(*pc_carry, batch_dict, key)
        pc_carry = out[:2]
        return out

    def run_bp():
        nonlocal bp_carry
        bp_carry = bp_step(*bp_carry, x, y)
        return bp_carry

    medians = timed({"pc": run_pc, "bp": run_bp}, config["repeats"])
    result.update(
        step_ms=1e3 * medians["pc"],
        backprop_ms=1e3 * medians["bp"],
        ratio=medians["pc"] / medians["bp"],
        compile_s=compile_seconds,
        step_seconds=medians["pc"],
        backprop_step_seconds=medians["bp"],
        x_backprop=medians["pc"] / medians["bp"],
        compile_seconds=compile_seconds,
        jax=jax.__version__,
    )

    if not config.get("speed_only", True):
        params = graph_params(structure, names, random_weights(layers, config["seed"]))
        opt_state = optimizer.init(params)
        rng = np.random.default_rng(config["seed"])
        start = time.perf_counter()
        for _ in range(config["epochs"]):
            order = rng.permutation(len(x_train))
            for i in range(per_epoch):
                index = order[i * batch : (i + 1) * batch]
                b = {"x": jnp.asarray(x_train[index]), "y": jnp.asarray(onehot[index])}
                params, opt_state, metrics, _ = pc_step(params, opt_state, b, key)
        jax.block_until_ready(params)
        result["train_seconds"] = time.perf_counter() - start

        @jax.jit
        def predict(params, xb):  # feedforward initialisation with the input clamped only
            clamps = build_clamps({"x": xb}, structure, clamp_target=False)
            state = initialize_graph_state(structure, xb.shape[0], key, clamps, params=params)
            return jnp.argmax(state.nodes[names[-1]].z_latent, -1)

        hits = sum(
            int(jnp.sum(predict(params, jnp.asarray(x_test[i : i + 1000])) == y_test[i : i + 1000]))
            for i in range(0, len(x_test), 1000)
        )
        result["test_accuracy"] = hits / len(x_test)
        result["energy"] = float(metrics["energy"]) * batch
    print(json.dumps(result))


if __name__ == "__main__":
    main()
