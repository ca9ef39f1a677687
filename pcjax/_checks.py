"""Argument checks shared across pcjax's modules (this module imports no other pcjax module).

Hyperparameters may be traced (under `jax.jit`, or passed by `optax.inject_hyperparams`) or be
schedules; they are validated only when their value is known now (`concrete`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax


def concrete_value(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array when it is known now, else None.

    None while `value` is traced (a `jax.core.Tracer`, or a container of tracers) and for a
    schedule (a callable, validated by whoever calls it)."""
    if isinstance(value, jax.core.Tracer) or callable(value):
        return None
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_no_python_floats(params: Any) -> None:
    """Refuse Python float leaves in `params`: `jax.jit` would trace and train them, while an
    eager call (which keeps them as Python numbers) would leave them fixed.

    **Raises:** `TypeError` naming the leaf's path."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, (float, complex)) and not isinstance(leaf, np.generic):
            raise TypeError(
                f"pcjax: the parameter at params{jax.tree_util.keystr(path)} is a Python float "
                f"({leaf!r}); `jax.jit` would train it while an eager call leaves it fixed. Make "
                "it an array (jnp.asarray) to train it, or a static field "
                "(eqx.field(static=True)) or a constant of the function to freeze it."
            )


def check_optimizer_state(
    optimizer: optax.GradientTransformation,
    opt_state: Any,
    trainable: Any,
    where: str = "pcjax.make_train_step",
) -> None:
    """`optimizer` must be an optax transform and `opt_state` must have the structure and
    shapes of `optimizer.init(trainable)` (checked abstractly, at no run-time cost).

    **Raises:** `TypeError` for a non-optax `optimizer`; `ValueError` naming the first
    mismatching entry of `opt_state`. Messages start with `where`."""
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{where}: `optimizer` must be an optax GradientTransformation (e.g. "
            f"optax.adam(1e-3)), got {type(optimizer).__name__}."
        )
    expected = jax.eval_shape(optimizer.init, trainable)
    hint = (
        "initialise it with `optimizer.init(eqx.filter(params, eqx.is_inexact_array))` for the "
        "same optimizer"
    )
    if jax.tree.structure(expected) != jax.tree.structure(opt_state):
        raise ValueError(
            f"{where}: `opt_state` does not match `optimizer`: the optimizer's state has "
            f"the structure {jax.tree.structure(expected)}, but `opt_state` has "
            f"{jax.tree.structure(opt_state)}; {hint}."
        )
    paths = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    for (path, leaf), want in zip(paths, jax.tree.leaves(expected)):
        if np.shape(leaf) != tuple(want.shape):
            raise ValueError(
                f"{where}: `opt_state` does not match `optimizer`: the entry at "
                f"opt_state{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, but the "
                f"optimizer expects {tuple(want.shape)}; {hint}."
            )
