r"""Langevin dynamics for the states: Monte Carlo predictive coding.

Monte Carlo PC (Oliviers, Bogacz & Meulemans 2024, "Learning probability distributions of sensory
inputs with Monte Carlo predictive coding") replaces gradient descent on the states by the
unadjusted Langevin algorithm

$$x \leftarrow x - \eta \nabla_x F + \sqrt{2\eta T}\,\xi, \quad \xi \sim N(0, I),$$

whose stationary distribution is $p(x) \propto e^{-F(x)/T}$: at $T = 1$ the posterior of the
latent states (up to an $O(\eta)$ discretisation bias), instead of its mode. Learning from the
sampled states then follows the gradient of the marginal likelihood rather than of the joint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checks import concrete_value


def _check(name: str, value: Any, valid: Callable[[float], bool], requirement: str) -> None:
    """Validate a scalar hyperparameter when its value is known now (it may be traced)."""
    known = concrete_value(value)
    if callable(value) or (
        known is not None and (known.ndim != 0 or not np.issubdtype(known.dtype, np.number))
    ):
        raise TypeError(f"pcjax.langevin: `{name}` must be a number, got {value!r}.")
    if known is not None and not valid(float(known)):
        raise ValueError(f"pcjax.langevin: `{name}` must be {requirement}, got {value!r}.")


class LangevinState(NamedTuple):
    """The (empty) state of [pcjax.langevin][]: its noise comes from the key of each update.

    **Example:**

    ```pycon
    >>> pc.langevin(0.05).init({"h": jnp.zeros(3)})
    LangevinState()

    ```
    """


def langevin(
    step_size: float, key: None = None, *, temperature: float = 1.0
) -> optax.GradientTransformationExtraArgs:
    r"""An optax transform for the *states*: a Langevin step on the energy.

    $$x_{t+1} = x_t - \eta\, \partial F / \partial x_t + \sqrt{2 \eta T}\, \xi_t,
    \qquad \xi_t \sim \mathcal N(0, I),$$

    whose samples are distributed as $\propto e^{-F(x) / T}$ for small $\eta$. Pass it as the
    optimizer of the state solver, and a random key to [pcjax.infer][] or to the training
    step (see the example).

    Inference hands update `t` the key `jax.random.fold_in(key, t)`, so every step draws fresh
    noise, the same key replays the same run, and a new key per training step (e.g.
    `jax.random.fold_in(key, i)` at step `i`) gives new noise per step. Each sample of a batch
    is an independent chain. Used directly, `update(grads, state, params, key=...)` needs the
    key.

    **Arguments:**

    - `step_size`: $\eta > 0$ (a number, or a traced value).
    - `key`: must be None (pcjax 0.1's argument): the key comes with each update.
    - `temperature`: $T \ge 0$; default 1 (0 is plain gradient descent).

    **Returns:** an `optax.GradientTransformationExtraArgs` whose `update` takes `key=`; its
    state is a [pcjax.LangevinState][].

    **Raises:** `TypeError` for a `key` given here; `ValueError` for a step size that is not
    positive or a negative temperature (when they are concrete). [pcjax.infer][] raises a
    `ValueError` without a key.

    **Example** ([setup][examples-setup]): sample the hidden node given the label. In a
    training loop, pass `step(params, opt_state, x, observed, jax.random.fold_in(key, i))`.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> solver = pc.GradientDescent(2, pc.langevin(0.05, temperature=0.1))
    >>> samples, info = pc.infer(
    ...     fn, params, {"h": start["h"]}, x, {"y": y}, solver=solver, key=jax.random.key(0)
    ... )
    >>> samples["h"].shape
    (2, 4)
    >>> cold = pc.langevin(0.1, temperature=0.0)  # T = 0: a plain gradient step
    >>> step, _ = cold.update({"h": jnp.ones(2)}, cold.init(None), key=jax.random.key(1))
    >>> step["h"]
    Array([-0.1, -0.1], dtype=float32)

    ```
    """
    if key is not None:
        raise TypeError(
            "pcjax.langevin takes no key: pass key= to pcjax.infer or to the training step "
            "(step(params, opt_state, x, observed, key)) instead, so that every call (and every "
            "step) draws fresh noise."
        )
    _check("step_size", step_size, lambda v: v > 0, "positive")
    _check("temperature", temperature, lambda v: v >= 0, ">= 0")
    # Validated only when concrete, so that both may be traced (jit, schedules).
    scale = jnp.sqrt(2.0 * step_size * temperature)

    def init(params):
        del params
        return LangevinState()

    def update(grads, state, params=None, *, key=None, **extra_args):
        del params, extra_args
        if key is None:
            raise ValueError(
                "pcjax.langevin needs a random key for its noise: pass key= to pcjax.infer or to "
                "the training step of pcjax.make_train_step (or to update() when used directly)."
            )
        leaves, treedef = jax.tree.flatten(grads)
        keys = jax.random.split(key, max(len(leaves), 1))
        updates = [
            -step_size * g + scale * jax.random.normal(k, jnp.shape(g), jnp.result_type(g))
            for g, k in zip(leaves, keys)
        ]
        return jax.tree.unflatten(treedef, updates), state

    return optax.GradientTransformationExtraArgs(init, update)
