"""The suite's MLP and CNN tasks written with the peer library pcx, run in pcx's own venv.

    <pcx venv>/bin/python benchmarks/peer_pcx.py --data data.npz --config config.json \\
        [--weights weights.npz]

pcx (PyPI `pcx`, tested with 0.6.3; it needs jax < 0.5, here 0.4.38) holds the node states in
"vodes" of an imperative module; as in pcx's own MNIST examples, a step is a feedforward
initialisation (STATUS.INIT), T steps of optax SGD on the free vode states, then AdamW on the
weights.

Peer contract (the same as `peer_fabricpc.py`'s docstring)
-----------------------------------------------------------
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
  pcx_conv         pcx only, optional: "nhwc" (default) or "eqx" (see below)

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
  train_seconds, energy (F of the last training batch at its relaxed states).
An unsupported task or a malformed file exits non-zero with the reason as the last stderr line.

How pcx expresses that network
------------------------------
A vode after each layer holds the pre-activation; the activation (and pooling, flattening) is
applied to the previous vode's value inside the model's `__call__`, as the existing MLP did.
pcx's own `pxnn.Conv2d` is `eqx.nn.Conv2d`, channels-FIRST (one sample (C, H, W), kernel
OIHW). By default (`pcx_conv: "nhwc"`) the convolutions are instead a small channels-last
equinox module (HWIO kernel, `lax.conv_general_dilated` on NHWC, as pcjax.nn.Conv2d) wrapped
with pcx's generic `pxnn.Layer`, so both libraries run the same XLA convolution and the vode
states are NHWC. `pcx_conv: "eqx"` uses pcx's own `pxnn.Conv2d(padding=1)` on (C, H, W) states
with the kernels transposed to OIHW (a conv state is moved to (H, W, C) where the next layer
reads it, and the input to (C, H, W) before each convolution): the same function and energy
(the states are a permutation), in pcx's native layout.
Pooling is written as pcjax's (reshape and max), not with `pxnn.MaxPool2d`.

Energy conventions: pcx's `se_energy` is 1/2 (h - u)^2, summed over a vode's elements and (by
`psum` over the vmapped batch) over the samples: pcjax's F, no conversion. Its weight gradient
is of that batch sum; the step divides it by the batch (`scale_by=1 / batch`) as pcjax,
FabricPC and the backprop baseline do.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pcx
import pcx.functional as pxf
import pcx.nn as pxnn
import pcx.predictive_coding as pxc
import pcx.utils as pxu
from peer_network import (
    ACTIVATIONS,
    backprop_step,
    conv,
    fail,
    load_data,
    load_weights,
    network,
    parent_input,
    random_weights,
    timed,
)

# ---------------------------------------------------------------------------------------------
# pcx


class ConvNHWC(eqx.Module):
    """A 3x3 'SAME' convolution of one channels-last (H, W, C) sample, HWIO kernel (as
    pcjax.nn.Conv2d); wrapped with `pxnn.Layer` its arrays become pcx LayerParams."""

    weight: jax.Array
    bias: jax.Array

    def __init__(self, cin: int, cout: int, *, key: jax.Array):
        self.weight = jax.random.normal(key, (3, 3, cin, cout)) / math.sqrt(9 * cin)
        self.bias = jnp.zeros(cout)

    def __call__(self, x, *, key=None):
        return conv(x[None], self.weight)[0] + self.bias


class Model(pxc.EnergyModule):
    def __init__(self, layers, activation, conv_layout: str):
        super().__init__()
        self.specs = pcx.static(tuple(layers))
        self.activation = pcx.static(activation)
        self.channels_first = pcx.static(conv_layout == "eqx")
        self.layers = []
        for spec in layers:
            if spec.kind == "dense":
                self.layers.append(pxnn.Linear(spec.fan_in, spec.fan_out))
            elif conv_layout == "eqx":
                self.layers.append(pxnn.Conv2d(spec.fan_in, spec.fan_out, 3, padding=1))
            else:
                self.layers.append(pxnn.Layer(ConvNHWC, spec.fan_in, spec.fan_out, key=pcx.RKG()))
        self.vodes = [pxc.Vode() for _ in layers[:-1]] + [pxc.Vode(pxc.se_energy)]
        self.vodes[-1].h.frozen = True

    def __call__(self, x, y):
        """One sample (under `vmap`); the label `y` is clamped to the output vode if given."""
        specs, channels_first = self.specs.get(), self.channels_first.get()
        h = x
        for i, (spec, layer, vode) in enumerate(zip(specs, self.layers, self.vodes)):
            if channels_first and i > 0 and specs[i - 1].kind == "conv":
                h = jnp.moveaxis(h, 0, -1)  # the eqx conv's (C, H, W) state, read as (H, W, C)
            h = parent_input(spec, h[None], self.activation.get())[0]
            if channels_first and spec.kind == "conv":
                h = jnp.moveaxis(h, -1, 0)
            h = vode(layer(h))
        if y is not None:
            self.vodes[-1].set("h", y)
        return self.vodes[-1].get("u")


VODES = pxc.VodeParam | pxc.VodeParam.Cache
FREE = pxu.M_hasnot(pxc.VodeParam, frozen=True)  # every vode state but the clamped label


@pxf.vmap(pxu.M(VODES).to((None, 0)), in_axes=(0, 0), out_axes=0)
def forward(x, y, *, model):
    return model(x, y)


@pxf.vmap(pxu.M(VODES).to((None, 0)), in_axes=(0,), out_axes=(None, 0), axis_name="batch")
def energy(x, *, model):
    y_ = model(x, None)
    return jax.lax.psum(model.energy().sum(), "batch"), y_


@pxf.vmap(pxu.M(VODES).to((None, 0)), in_axes=(0,), out_axes=None, axis_name="batch")
def node_energies(x, *, model):
    model(x, None)
    return jax.lax.psum(jnp.stack([vode.energy() for vode in model.vodes]), "batch")


def relax(steps, x, *, model, optim_h):
    """T steps of state SGD on the free vodes (after the feedforward initialisation)."""
    optim_h.init(pxu.M(FREE)(model))
    free = pxu.M(FREE).to([False, True])
    for _ in range(steps):
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            _, g = pxf.value_and_grad(free, has_aux=True)(energy)(x, model=model)
        optim_h.step(model, g["model"])


@pxf.jit(static_argnums=0)
def train_on_batch(steps, x, y, *, model, optim_w, optim_h):
    model.train()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(x, y, model=model)
    relax(steps, x, model=model, optim_h=optim_h)
    with pxu.step(model, clear_params=pxc.VodeParam.Cache):
        (e, _), g = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]), has_aux=True)(
            energy
        )(x, model=model)
    optim_w.step(model, g["model"], scale_by=1 / x.shape[0])  # mean over the batch, as pcjax
    return e


@pxf.jit(static_argnums=0)
def energy_check(steps, x, y, *, model, optim_h):
    """Per-node F at the feedforward initialisation and after T state steps."""
    model.train()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(x, y, model=model)
    with pxu.step(model, clear_params=pxc.VodeParam.Cache):
        feedforward = node_energies(x, model=model)
    relax(steps, x, model=model, optim_h=optim_h)
    with pxu.step(model, clear_params=pxc.VodeParam.Cache):
        return feedforward, node_energies(x, model=model)


@pxf.jit()
def predict(x, *, model):
    model.eval()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        return forward(x, None, model=model).argmax(-1)


def set_weights(model, weights, conv_layout: str):
    """Put the contract's (w, b) pairs into the model's layers."""
    for spec, layer, (w, b) in zip(model.specs.get(), model.layers, weights):
        if spec.kind == "dense":
            w = w.T  # eqx.nn.Linear: (out, in)
        elif conv_layout == "eqx":
            w = np.transpose(w, (3, 2, 0, 1))  # HWIO -> OIHW
            b = b[:, None, None]  # eqx.nn.Conv bias: (out, 1, 1)
        if layer.nn.weight.shape != w.shape or layer.nn.bias.shape != b.shape:
            fail(f"pcx layer {layer.nn.weight.shape}/{layer.nn.bias.shape}, given {w.shape}")
        layer.nn.weight.set(jnp.asarray(w))
        layer.nn.bias.set(jnp.asarray(b))


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
    conv_layout = config.get("pcx_conv", "nhwc")
    if conv_layout not in ("nhwc", "eqx"):
        fail(f"unknown pcx_conv {conv_layout!r} (known: 'nhwc', 'eqx')")
    x_train, y_train, x_test, y_test = load_data(args.data, config)
    layers = network(config, x_train.shape[1:])
    classes = layers[-1].fan_out
    batch, steps = config["batch"], config["inference_steps"]
    onehot = np.eye(classes, dtype=np.float32)[y_train]
    weights = (
        load_weights(args.weights, layers)
        if args.weights
        else random_weights(layers, config["seed"])
    )
    per_epoch = len(x_train) // batch
    total = max(per_epoch * config["epochs"], 1)
    optimizer = optax.adamw(optax.cosine_decay_schedule(config["lr"], total), weight_decay=1e-4)
    pcx.RKG.seed(config["seed"])

    def fresh(weights):
        """A new pcx model holding `weights`, with its state and weight optimizers."""
        model = Model(layers, activation, conv_layout)
        set_weights(model, weights, conv_layout)
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(jnp.zeros((batch, *x_train.shape[1:])), None, model=model)
            optim_h = pxu.Optim(lambda: optax.sgd(config["state_step"]), pxu.M(FREE)(model))
            optim_w = pxu.Optim(lambda: optimizer, pxu.M(pxnn.LayerParam)(model))
        return model, optim_h, optim_w

    x, y = jnp.asarray(x_train[:batch]), jnp.asarray(onehot[:batch])
    result = {
        "peer": "pcx",
        "version": importlib.metadata.version("pcx"),
        "task": task,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    if task == "cnn":
        result["pcx_conv"] = conv_layout
    if args.weights:
        model, optim_h, _ = fresh(weights)
        feedforward, per_node = energy_check(steps, x, y, model=model, optim_h=optim_h)
        result.update(
            relaxed_energy=float(jnp.sum(per_node)),
            feedforward_energy=float(jnp.sum(feedforward)),
            relaxed_energy_nodes=[float(e) for e in per_node],
            check_samples=int(x.shape[0]),
        )

    model, optim_h, optim_w = fresh(weights)

    def run_pc():
        e = train_on_batch(steps, x, y, model=model, optim_w=optim_w, optim_h=optim_h)
        return e, jax.tree_util.tree_leaves(model)  # pcx updates the model in place

    bp_params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]
    bp_step = backprop_step(layers, activation, optimizer)
    bp_carry = (bp_params, optimizer.init(bp_params))

    def run_bp():
        nonlocal bp_carry
        bp_carry = bp_step(*bp_carry, x, y)
        return bp_carry

    start = time.perf_counter()
    jax.block_until_ready(run_pc())
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(run_bp())
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
        model, optim_h, optim_w = fresh(random_weights(layers, config["seed"]))
        rng = np.random.default_rng(config["seed"])
        start = time.perf_counter()
        for _ in range(config["epochs"]):
            order = rng.permutation(len(x_train))
            for i in range(per_epoch):
                index = order[i * batch : (i + 1) * batch]
                e = train_on_batch(
                    steps,
                    jnp.asarray(x_train[index]),
                    jnp.asarray(onehot[index]),
                    model=model,
                    optim_w=optim_w,
                    optim_h=optim_h,
                )
        jax.block_until_ready(e)
        result["train_seconds"] = time.perf_counter() - start
        hits = 0
        for i in range(0, len(x_test) - batch + 1, batch):  # pcx vodes have a fixed batch size
            guesses = predict(jnp.asarray(x_test[i : i + batch]), model=model)
            hits += int(jnp.sum(guesses == y_test[i : i + batch]))
        result["test_accuracy"] = hits / (len(x_test) // batch * batch)
        result["energy"] = float(e)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
