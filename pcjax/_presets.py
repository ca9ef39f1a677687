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

from ._backtracking import Backtracking
from ._models import EnergyModel, error_parameterised
from ._rules import Equilibrium
from ._solvers import GradientDescent


def _fast(fn: Callable[..., Any]) -> tuple[EnergyModel, Equilibrium]:
    # ePC, one error update of size 1 from the feedforward pass: at epsilon = 0 the error
    # field of every free node is the backprop gradient of the output energy, so one step
    # hands every hidden layer its error; learning then takes dF/dtheta at those states (the
    # output layer's signal is the error after the step: see `preset`).
    return error_parameterised(fn), Equilibrium(GradientDescent(1, step_size=1.0))


def _standard(fn: Callable[..., Any]) -> tuple[Callable[..., Any], Equilibrium]:
    # Backtracking, not fixed-step gradient descent: a step of 0.1 diverges once the state
    # Hessian's largest eigenvalue passes 20, which training can reach (the layer-norm MLP of
    # `notebooks/bring_your_own_model.ipynb`: 15 at initialisation, 30-60 after an epoch, and
    # the run collapsed; `benchmarks/experiments/collapse_byom.py`).
    return fn, Equilibrium(Backtracking(8, step_size=0.1))


PRESETS: dict[str, tuple[Callable[[Callable[..., Any]], tuple[Any, Equilibrium]], str]] = {
    "fast": (
        _fast,
        "ePC (pcjax.error_parameterised), one inference step of size 1.0 from the feedforward "
        "pass: on the demo's MNIST MLP, time to 98% test accuracy equal to backprop's",
    ),
    "standard": (
        _standard,
        "standard PC, 8 backtracking gradient steps on the states from a step size of 0.1 (a "
        "step that would raise the energy is retried smaller)",
    ),
}


def preset(name: str, fn: Callable[..., Any]) -> tuple[Any, Equilibrium]:
    r"""`(model, rule)` of the named configuration for the tagged function `fn`, to pass to
    `pcjax.make_train_step(model, rule, optimizer)`.

    - `"fast"`: error-parameterised PC (`pcjax.error_parameterised(fn)`) with
      `pcjax.Equilibrium(pcjax.GradientDescent(1, step_size=1.0))`, at about 1.3x a backprop
      step. Not an equilibrium and not backprop: from the feedforward pass ($\varepsilon = 0$)
      the one step sets every free node's error to its backprop gradient,
      $\varepsilon_i = -\partial L / \partial x_i$ ($L$ the observed nodes' energy), and
      learning then takes $\partial F / \partial \theta$ at the moved states. So a layer fed
      by no free node (the first layer of an MLP) gets exactly its backprop gradient; a layer
      fed by free nodes sees inputs moved by their $\varepsilon$; and the output layer learns
      from the output error after the step, $e' = y - \hat y(x(\varepsilon))
      \approx (I - \sum_i J_i J_i^\top)\, e$ per sample, $J_i = \partial \hat y /
      \partial x_i$ (exactly $e' = e\,(I - W^\top W)$ for a linear output layer
      $\hat y = h W$, row vectors, on one free node $h$), which need not point like $e$.
      Measured (cosine of each layer's gradient with backprop, tanh MLP 20-w-w-10,
      LeCun-normal weights, median of 5 seeds, `python benchmarks/fast_preset_alignment.py`):
      input layer 1.00 at every width; hidden layer -0.41 / 0.80 / 0.95 and output layer
      0.71 / 0.23 / 0.21 at w = 4 / 64 / 256. For exact backprop gradients through PC use
      `pcjax.preconditioned(pcjax.fixed_predictions(fn))` with
      `GradientDescent(depth, step_size=1.0)` (cosine 1.000 in the same script). On the demo's
      MLP (784-1024-1024-10, AdamW 1e-3, batch 128) the preset still reaches 98% MNIST test
      accuracy in the same training time as backprop (the table on the benchmark results page):
      a learning rule that trains well by measurement, only partly aligned with backprop.
    - `"standard"`: standard PC, `pcjax.Equilibrium(pcjax.Backtracking(8, step_size=0.1))` on
      `fn` itself: 8 gradient steps on the states from a step size of 0.1, each retried smaller
      if it would raise the energy. Fixed-step gradient descent with step $\eta$ diverges once
      the state Hessian's largest eigenvalue passes $2 / \eta$, which training can reach: on the
      layer-norm MLP of `notebooks/bring_your_own_model.ipynb` it is 15 at initialisation and
      30-60 after one epoch (the layer norm divides by the first hidden layer's spread); with
      `GradientDescent(8, step_size=0.1)` the energy rose in 45-100% of the steps from the second
      epoch on, the second layer's PC gradient lost its alignment with backprop's (cosine 0.95
      at initialisation, median 0.06 later), its weights grew 3-8x and test accuracy fell from
      96-97% to 71-91% (3 seeds);
      with backtracking the energy never rose and the 3 seeds ended at 97.5-98.3% against
      backprop's 97.8-98.1% (`python benchmarks/experiments/collapse_byom.py`).

    **Arguments:**

    - `name`: `"fast"` or `"standard"`.
    - `fn`: the tagged forward function.

    **Returns:** `(model, rule)`: the energy model (`fn` or a transformation of it) and the
    learning rule, the first two arguments of [pcjax.make_train_step][].

    **Raises:** `ValueError` for an unknown name (listing the known ones).

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> model, rule = pc.preset("fast", fn)
    >>> step = pc.make_train_step(model, rule, optax.adam(1e-3))
    >>> params, opt_state, info = step(params, optax.adam(1e-3).init(params), x, {"y": y})
    >>> int(info.inference_steps)
    1

    ```
    """
    if name not in PRESETS:
        raise ValueError(f"pcjax.preset: unknown preset {name!r}; known: {sorted(PRESETS)}.")
    if isinstance(fn, EnergyModel) or not callable(fn):
        raise TypeError(
            f"pcjax.preset: `fn` must be a tagged forward function fn(params, x), got "
            f"{type(fn).__name__}; a preset chooses the energy transformation itself."
        )
    return PRESETS[name][0](fn)
