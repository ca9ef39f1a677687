r"""Named training configurations: an energy transformation and a learning rule, measured.

A preset is nothing but a choice among the composable pieces, so that a measured configuration
can be named instead of re-typed:

    model, rule = pcjax.preset("fast", fn)
    step = pcjax.make_train_step(model, rule, optax.adamw(1e-3))

The numbers behind each preset are in `benchmarks/README.md` ("PC within 2x of backprop",
`python benchmarks/run.py fast`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._models import EnergyModel, error_parameterised
from ._rules import Equilibrium
from ._solvers import GradientDescent


def _fast(fn: Callable[..., Any]) -> tuple[EnergyModel, Equilibrium]:
    # ePC, one error update of size 1 from the feedforward pass: at epsilon = 0 the error
    # field of every free node is the backprop gradient of the output energy, so one step
    # hands every layer its error; learning then takes dF/dtheta at those states.
    return error_parameterised(fn), Equilibrium(GradientDescent(1, step_size=1.0))


def _standard(fn: Callable[..., Any]) -> tuple[Callable[..., Any], Equilibrium]:
    return fn, Equilibrium(GradientDescent(8, step_size=0.1))


PRESETS: dict[str, tuple[Callable[[Callable[..., Any]], tuple[Any, Equilibrium]], str]] = {
    "fast": (
        _fast,
        "ePC (pcjax.error_parameterised), one inference step of size 1.0 from the feedforward "
        "pass: on the demo's MNIST MLP, time to 98% test accuracy equal to backprop's",
    ),
    "standard": (
        _standard,
        "standard PC, 8 gradient-descent steps of size 0.1 on the states (the demo's default)",
    ),
}


def preset(name: str, fn: Callable[..., Any]) -> tuple[Any, Equilibrium]:
    r"""`(model, rule)` of the named configuration for the tagged function `fn`, to pass to
    `pcjax.make_train_step(model, rule, optimizer)`.

    - `"fast"`: error-parameterised PC (`pcjax.error_parameterised(fn)`) with
      `pcjax.Equilibrium(pcjax.GradientDescent(1, step_size=1.0))`. From the feedforward pass
      ($\varepsilon = 0$) the error field of every free node is the backprop gradient of the
      output energy, so a single step of size 1 gives every layer its error and the learning
      signal $\partial F / \partial \theta$ at the resulting states is backprop-like, at about
      1.3x a backprop step. Measured on the demo's MLP (784-1024-1024-10, AdamW 1e-3, batch
      128): 98% MNIST test accuracy in the same training time as backprop (the table in
      `benchmarks/README.md`). Not an equilibrium: the states move one step.
    - `"standard"`: standard PC, `pcjax.Equilibrium(pcjax.GradientDescent(8,
      step_size=0.1))` on `fn` itself (the demo's default).

    Raises `ValueError` for an unknown name (listing the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"pcjax.preset: unknown preset {name!r}; known: {sorted(PRESETS)}.")
    if isinstance(fn, EnergyModel) or not callable(fn):
        raise TypeError(
            f"pcjax.preset: `fn` must be a tagged forward function fn(params, x), got "
            f"{type(fn).__name__}; a preset chooses the energy transformation itself."
        )
    return PRESETS[name][0](fn)
