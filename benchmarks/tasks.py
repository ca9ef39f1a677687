"""The registry: benchmark tasks x training algorithms (and the peers that run a task).

Tasks (`tasks(quick)`): `mlp_mnist`, `cnn_mnist`, `vgg5_cifar`, each a data set, a network
(`models.network`) and a training budget. Every output is a Gaussian (squared-error) node, so
every algorithm applies to every task.

Algorithms (`ALGORITHMS`), each built once per task into a pure step
`(model, opt_state, x, y) -> (model, opt_state)` to be jitted by the caller (no algorithm
returns more than the reference does: pcjax's `info`, whose `diverged` and `grad_norm` cost one
more state-gradient evaluation at the relaxed states, is left for XLA to drop; divergence shows
as non-finite parameters):

- `backprop`: the same network and loss, `jax.grad`.
- `pc`: `pc.make_train_step(nn.call, pc.Equilibrium(pc.GradientDescent(T, step_size=a)), opt)`.
- `fpa`: the same with `pc.fixed_predictions(nn.call)`.
- `epc`: the same with `pc.error_parameterised(nn.call)` (inference over the errors).
- `ipc`: `pc.Incremental(T, step_size=a)` (a parameter update at each of the T steps).
- `pc_fast`: the preset `pc.preset("fast", nn.call)`: ePC, one error step of size 1.
- `bpc` (MLP tasks): `pc.bidirectional` of the network and top-down weights `V_i` predicting
  each hidden layer's node from the activation of the layer above (down weight 0.1).
- `amortised` (MLP tasks): `pc.Amortised` with an MLP of the same sizes (its own weights) whose
  feedforward values propose the hidden states; the PC relaxation as in `pc`.
- `pc_natgrad`: `pc` with `optax.chain(pc.natural_gradient("kronecker", damping=0.1,
  ema_decay=0.95, refresh_every=10, mask=pc.fisher_mask(...)), optax.sgd(cosine 0.05,
  momentum=0.9))`; convolutions pass through unpreconditioned.
- `reference`: the hand-written `lax.scan` PC step of the same network
  (`models.reference_step`, pcjax's default loop form); timed, not trained.

AdamW (weight decay 1e-4) on a cosine schedule from the task's `lr` for all but `pc_natgrad`
(for iPC the schedule counts its T updates per batch).

Peers (`peers.PEERS`) name the tasks they implement; `peers.py` runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import models
import numpy as np
import optax

import pcjax as pc
from pcjax import nn


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task: a data set, a network and its training budget."""

    name: str
    description: str
    data: str  # "mnist" or "cifar10"
    channels: tuple[int, ...]  # convolution widths; () for the MLP
    hidden: tuple[int, ...]  # dense hidden widths
    batch: int
    epochs: int
    target: float  # test accuracy for "time to target"
    train_subset: int | None = None  # use the first n training images only
    eval_every: int = 100  # steps between test evaluations
    inference_steps: int = 8
    state_step: float = 0.1
    lr: float = 1e-3

    @property
    def kind(self) -> str:
        """The network kind of the peer contract: "mlp" or "cnn"."""
        return "cnn" if self.channels else "mlp"


TASK_NAMES = ("mlp_mnist", "cnn_mnist", "vgg5_cifar")


def tasks(quick: bool) -> dict[str, Task]:
    """The suite's tasks, quick (small, CPU minutes) or full size."""
    if quick:
        rows = [
            Task("mlp_mnist", "MLP 784-256-256-10", "mnist", (), (256, 256), 128, 1, 0.95),
            Task(
                "cnn_mnist",
                "VGG conv 8,16 + dense 64",
                "mnist",
                (8, 16),
                (64,),
                64,
                1,
                0.9,
                train_subset=12_000,
                eval_every=50,
                state_step=0.05,
            ),
            Task(
                "vgg5_cifar",
                "VGG-5 shape, widths / 8 (16,32,64,64)",
                "cifar10",
                (16, 32, 64, 64),
                (),
                64,
                2,
                0.5,
                train_subset=5_000,
                eval_every=26,
                state_step=0.05,
            ),
        ]
    else:
        rows = [
            Task("mlp_mnist", "MLP 784-1024-1024-10", "mnist", (), (1024, 1024), 128, 8, 0.98),
            Task(
                "cnn_mnist",
                "VGG conv 32,64 + dense 128",
                "mnist",
                (32, 64),
                (128,),
                128,
                5,
                0.99,
                eval_every=200,
                state_step=0.05,
            ),
            Task(
                "vgg5_cifar",
                "VGG-5 (conv 128,256,512,512 + linear)",
                "cifar10",
                (128, 256, 512, 512),
                (),
                128,
                10,
                0.7,
                eval_every=200,
                state_step=0.05,
            ),
        ]
    return {t.name: t for t in rows}


# ---------------------------------------------------------------------------------------------
# Algorithms

BPC_DOWN_WEIGHT = 0.1  # bPC's top-down (generative) weight; the bottom-up one is 1


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """`build(task, params, x, total_steps) -> (step, optimizer)`. `params` is the task's
    network, or `(network, companion(network, key))` for an algorithm with a companion (bPC's
    top-down weights, the amortiser); `network` is the energy its inference descends and
    `forward` the tagged function over `params`, `start(params, x)` the initial free states
    when not `forward`'s feedforward values (all three for the equilibrium count)."""

    name: str
    trained: bool  # False: timed only (the reference)
    build: Callable[[Task, Any, Any, int], tuple[Callable, optax.GradientTransformation]]
    network: Any = nn.call
    companion: Callable[[Any, Any], Any] | None = None
    kinds: tuple[str, ...] = ("mlp", "cnn")  # the task kinds it applies to
    forward: Callable[..., Any] = nn.call
    start: Callable[[Any, Any], Any] | None = None  # the initial states, else `forward`'s

    def params(self, model: Any, key: Any) -> Any:
        return model if self.companion is None else (model, self.companion(model, key))


def network_of(params: Any) -> Any:
    """The task's network in `params` (the first of a `(network, companion)` pair)."""
    return params[0] if isinstance(params, tuple) else params


def on_network(params: Any, x: Any) -> Any:
    """`nn.call` on the network of a `(network, companion)` pair."""
    return nn.call(params[0], x)


def adamw(task: Task, total_steps: int) -> optax.GradientTransformation:
    return optax.adamw(optax.cosine_decay_schedule(task.lr, total_steps), weight_decay=1e-4)


def natural_kronecker(mask: Any, total_steps: int) -> optax.GradientTransformation:
    """Kronecker natural gradient (damping 0.1, EMA 0.95, refresh every 10) + SGD momentum."""
    return optax.chain(
        pc.natural_gradient("kronecker", damping=0.1, ema_decay=0.95, refresh_every=10, mask=mask),
        optax.sgd(optax.cosine_decay_schedule(0.05, total_steps), momentum=0.9),
    )


def gradient_descent(task: Task) -> pc.GradientDescent:
    return pc.GradientDescent(task.inference_steps, step_size=task.state_step)


def _pc_step(fn, rule, optimizer, output: str) -> Callable:
    train = pc.make_train_step(fn, rule, optimizer)  # built once; the caller jits it

    def step(model, opt_state, x, y):
        model, opt_state, _ = train(model, opt_state, x, {output: y})
        return model, opt_state

    return step


def _backprop(task, model, x, total):
    optimizer = adamw(task, total)
    return models.backprop_step(optimizer), optimizer


def _reference(task, model, x, total):
    optimizer = adamw(task, total)
    return models.reference_step(optimizer, task.inference_steps, task.state_step), optimizer


def _pc(task, model, x, total):
    optimizer = adamw(task, total)
    rule = pc.Equilibrium(gradient_descent(task))
    return _pc_step(nn.call, rule, optimizer, models.output_node(model)), optimizer


def _fpa(task, model, x, total):
    optimizer = adamw(task, total)
    rule = pc.Equilibrium(gradient_descent(task))
    fn = pc.fixed_predictions(nn.call)
    return _pc_step(fn, rule, optimizer, models.output_node(model)), optimizer


def _epc(task, model, x, total):
    optimizer = adamw(task, total)
    rule = pc.Equilibrium(gradient_descent(task))
    fn = pc.error_parameterised(nn.call)
    return _pc_step(fn, rule, optimizer, models.output_node(model)), optimizer


def _ipc(task, model, x, total):
    optimizer = adamw(task, total * task.inference_steps)  # T parameter updates per batch
    rule = pc.Incremental(task.inference_steps, step_size=task.state_step)
    return _pc_step(nn.call, rule, optimizer, models.output_node(model)), optimizer


def _pc_natgrad(task, model, x, total):
    optimizer = natural_kronecker(pc.fisher_mask(nn.call, model, x), total)
    rule = pc.Equilibrium(gradient_descent(task))
    return _pc_step(nn.call, rule, optimizer, models.output_node(model)), optimizer


def _pc_fast(task, model, x, total):
    optimizer = adamw(task, total)
    network, rule = pc.preset("fast", nn.call)
    return _pc_step(network, rule, optimizer, models.output_node(model)), optimizer


def _top_down_weights(model: nn.MLP, key: Any) -> list[Any]:
    """bPC's top-down weights of an MLP: `V_i` predicts layer i's output from layer i+1's,
    normal with variance 1 / fan-in."""
    outs = [layer.out_features for layer in model.layers]
    keys = jax.random.split(key, len(outs) - 1)
    return [
        jax.random.normal(k, (above, below)) / np.sqrt(above)
        for k, below, above in zip(keys, outs[:-1], outs[1:])
    ]


def _top_down(params: Any, values: dict[str, Any]) -> dict[str, Any]:
    """bPC's top-down predictions: layer i's node from the activation of layer i+1's."""
    model, weights = params
    names = [f"{model.prefix}{i}" for i in range(len(model.layers))]
    return {
        below: model.activation(values[above]) @ v
        for below, above, v in zip(names[:-1], names[1:], weights)
    }


BPC = pc.bidirectional(on_network, _top_down, down_weight=BPC_DOWN_WEIGHT)


def _bpc(task, params, x, total):
    optimizer = adamw(task, total)
    rule = pc.Equilibrium(gradient_descent(task))
    return _pc_step(BPC, rule, optimizer, models.output_node(params[0])), optimizer


def _amortiser_network(model: nn.MLP, key: Any) -> nn.MLP:
    """The amortiser: an MLP of the network's sizes, its own initial weights."""
    sizes = [model.layers[0].in_features] + [layer.out_features for layer in model.layers]
    return nn.MLP(sizes, key=key)


def amortised_proposal(params: Any, x: Any) -> dict[str, Any]:
    """The amortiser's feedforward values of the network's hidden nodes."""
    output = models.output_node(params[0])
    return {k: v for k, v in pc.forward_init(nn.call, params[1], x).items() if k != output}


def _amortised(task, params, x, total):
    optimizer = adamw(task, total)
    rule = pc.Amortised(gradient_descent(task), lambda p, x, observed: amortised_proposal(p, x))
    return _pc_step(on_network, rule, optimizer, models.output_node(params[0])), optimizer


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("backprop", True, _backprop),
        Algorithm("pc", True, _pc),
        Algorithm("fpa", True, _fpa, pc.fixed_predictions(nn.call)),
        Algorithm("epc", True, _epc, pc.error_parameterised(nn.call)),
        Algorithm("ipc", True, _ipc),
        Algorithm("pc_natgrad", True, _pc_natgrad),
        Algorithm("pc_fast", True, _pc_fast, pc.preset("fast", nn.call)[0]),
        Algorithm("bpc", True, _bpc, BPC, _top_down_weights, kinds=("mlp",), forward=on_network),
        Algorithm(
            "amortised",
            True,
            _amortised,
            on_network,
            _amortiser_network,
            kinds=("mlp",),
            forward=on_network,
            start=amortised_proposal,
        ),
        Algorithm("reference", False, _reference),
    )
}


def build(algorithm: str, task: Task, model: Any, x: Any, total_steps: int):
    """`(step, optimizer, opt_state)` of `algorithm` on `task`'s `model`; `x` is a batch of
    inputs (the natural gradient's mask is traced on it); `total_steps` sizes the schedule."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {list(ALGORITHMS)}")
    step, optimizer = ALGORITHMS[algorithm].build(task, model, x, total_steps)
    return step, optimizer, optimizer.init(eqx.filter(model, eqx.is_inexact_array))
