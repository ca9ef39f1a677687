"""The suite's MLP task written with the peer library pcx, run in pcx's own virtual environment.

    <pcx venv>/bin/python benchmarks/peer_pcx.py --data data.npz --config config.json

The network matches the suite's `mlp_mnist`: pre-activation nodes (pcx "vodes") after each
dense layer, GELU between layers, a squared-error output vode clamped to the one-hot label; T
inference steps of SGD on the vodes, then AdamW (cosine schedule) on the weights, as in pcx's
own MNIST examples. A backprop step of the same network (plain JAX + optax, in this process) is
timed interleaved with the pcx step, so the ratio is independent of the jax version. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pcx
import pcx.functional as pxf
import pcx.nn as pxnn
import pcx.predictive_coding as pxc
import pcx.utils as pxu


class Model(pxc.EnergyModule):
    def __init__(self, sizes):
        super().__init__()
        self.layers = [pxnn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
        self.vodes = [pxc.Vode() for _ in sizes[1:-1]] + [pxc.Vode(pxc.se_energy)]
        self.vodes[-1].h.frozen = True

    def __call__(self, x, y):
        h = x
        for i, (layer, vode) in enumerate(zip(self.layers, self.vodes)):
            h = vode(layer(h if i == 0 else jax.nn.gelu(h)))
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


@pxf.jit(static_argnums=0)
def train_on_batch(steps, x, y, *, model, optim_w, optim_h):
    model.train()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(x, y, model=model)
    optim_h.init(pxu.M(FREE)(model))
    free = pxu.M(FREE).to([False, True])
    for _ in range(steps):
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            _, g = pxf.value_and_grad(free, has_aux=True)(energy)(x, model=model)
        optim_h.step(model, g["model"])
    with pxu.step(model, clear_params=pxc.VodeParam.Cache):
        (e, _), g = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]), has_aux=True)(
            energy
        )(x, model=model)
    optim_w.step(model, g["model"])
    return e


@pxf.jit()
def predict(x, *, model):
    model.eval()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        return forward(x, None, model=model).argmax(-1)


def backprop_step(optimizer):
    def mlp(params, x):
        h = x
        for i, (w, b) in enumerate(params):
            h = (h if i == 0 else jax.nn.gelu(h)) @ w + b
        return h

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(lambda p: 0.5 * jnp.sum((y - mlp(p, x)) ** 2) / x.shape[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    data = np.load(args.data)
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    batch, steps = config["batch"], config["inference_steps"]
    sizes = [x_train.shape[1], *config["hidden"], 10]
    per_epoch = len(x_train) // batch
    total = per_epoch * config["epochs"]
    onehot = np.eye(10, dtype=np.float32)[y_train]

    pcx.RKG.seed(config["seed"])
    schedule = optax.cosine_decay_schedule(config["lr"], total)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)

    def fresh():
        """A new pcx model with its state and weight optimizers."""
        model = Model(sizes)
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(jnp.zeros((batch, sizes[0])), None, model=model)
            optim_h = pxu.Optim(lambda: optax.sgd(config["state_step"]), pxu.M(FREE)(model))
            optim_w = pxu.Optim(lambda: optimizer, pxu.M(pxnn.LayerParam)(model))
        return model, optim_h, optim_w

    model, optim_h, optim_w = fresh()

    def pcx_step(x, y):
        return train_on_batch(steps, x, y, model=model, optim_w=optim_w, optim_h=optim_h)

    keys = jax.random.split(jax.random.PRNGKey(config["seed"]), len(sizes) - 1)
    params = [
        (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]
    bp_step = backprop_step(optimizer)
    bp_carry = (params, optimizer.init(params))

    # Timing: compile both, then interleave calls on one batch (pcx updates its model in place).
    x, y = jnp.asarray(x_train[:batch]), jnp.asarray(onehot[:batch])
    start = time.perf_counter()
    jax.block_until_ready(pcx_step(x, y))
    compile_seconds = time.perf_counter() - start
    bp_carry = jax.block_until_ready(bp_step(*bp_carry, x, y))
    pcx_times, bp_times = [], []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        jax.block_until_ready((pcx_step(x, y), jax.tree_util.tree_leaves(model)))
        pcx_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        bp_carry = jax.block_until_ready(bp_step(*bp_carry, x, y))
        bp_times.append(time.perf_counter() - start)
    result = {
        "step_seconds": statistics.median(pcx_times),
        "backprop_step_seconds": statistics.median(bp_times),
        "compile_seconds": compile_seconds,
        "jax": jax.__version__,
    }
    result["x_backprop"] = result["step_seconds"] / result["backprop_step_seconds"]

    if not config["speed_only"]:
        model, optim_h, optim_w = fresh()  # a fresh model for the accuracy run
        rng = np.random.default_rng(config["seed"])
        start = time.perf_counter()
        for _ in range(config["epochs"]):
            order = rng.permutation(len(x_train))
            for i in range(per_epoch):
                index = order[i * batch : (i + 1) * batch]
                e = pcx_step(jnp.asarray(x_train[index]), jnp.asarray(onehot[index]))
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
