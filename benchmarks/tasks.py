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
import models
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


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    trained: bool  # False: timed only (the reference)
    build: Callable[[Task, Any, Any, int], tuple[Callable, optax.GradientTransformation]]
    network: Any = nn.call  # the energy its inference descends (for the equilibrium count)


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


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("backprop", True, _backprop),
        Algorithm("pc", True, _pc),
        Algorithm("fpa", True, _fpa, pc.fixed_predictions(nn.call)),
        Algorithm("epc", True, _epc, pc.error_parameterised(nn.call)),
        Algorithm("ipc", True, _ipc),
        Algorithm("pc_natgrad", True, _pc_natgrad),
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
