"""Data-parallel PC training on JAX's own sharding machinery.

PC inference is per sample (the energy is a sum over the batch), so data parallelism needs no
new algorithm: shard the batch axis of the inputs and observed nodes over the devices, replicate
the parameters, and let the compiler insert the one all-reduce that learning needs (the
parameter gradient is a sum over samples). Two ways:

- **`jax.jit` with shardings** (GSPMD): put the batch on a `NamedSharding(mesh, P("data"))`
  (`shard_batch`) and the parameters and optimizer state on a replicated sharding
  (`replicate`), then call the jitted `pcjax.train_step` as usual. The program is the
  single-device one; XLA partitions it.
- **`jax.shard_map`**: write the per-device program yourself. Each device runs
  `pcjax.train_step` on its shard of the batch; chain `cross_device_mean(axis)` in front of the
  optimizer so that every device applies the same, globally averaged, update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A one-axis mesh over `devices` (default: all devices, across hosts) for data parallelism."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis,))


def shard_batch(tree: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Place every array of `tree` (inputs, observed nodes, states) with its leading (batch) axis
    split over the mesh axis `axis`.

    **Raises:** `ValueError` naming the leaf if it is a scalar or its batch size is not a
    multiple of the number of devices on `axis`.
    """
    size = mesh.shape[axis]
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not eqx.is_array(leaf):
            continue
        shape = np.shape(leaf)
        if not shape or shape[0] % size:
            raise ValueError(
                f"pcjax.shard_batch: leaf {jax.tree_util.keystr(path) or '(root)'} has shape "
                f"{shape}; its leading (batch) axis must be a multiple of the {size} devices "
                f"on mesh axis {axis!r}."
            )
    return jax.tree.map(lambda a: jax.device_put(a, sharding) if eqx.is_array(a) else a, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of `tree` (parameters, optimizer state) whole on every device."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: jax.device_put(a, sharding) if eqx.is_array(a) else a, tree)


def cross_device_mean(axis_name: str) -> optax.GradientTransformation:
    """An optax transform that makes the updates the mean over the devices of `axis_name`, for
    use inside `jax.shard_map`: chain it first,
    `optax.chain(pcjax.cross_device_mean("data"), optax.adam(1e-3))`.

    With `train_step`'s default `mean_over_batch=True` each device's gradient is the mean over
    its shard; with equal shards the mean of those is the mean over the global batch, so every
    device applies the single-device update and the replicated parameters stay identical.

    Under `shard_map`'s default type checking (`check_vma=True`) autodiff already sums the
    gradient of a replicated parameter over the devices (the transpose of broadcasting it);
    such updates are divided by the number of devices. Updates that still vary across devices
    (`check_vma=False`) are averaged with `lax.pmean`.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def mean(update):
        if _varies_over(update, axis_name) is False:
            return update / jax.lax.axis_size(axis_name)  # already a sum over the devices
        return jax.lax.pmean(update, axis_name)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(mean, updates), state

    return optax.GradientTransformation(init, update)


def _varies_over(value: Any, axis_name: str) -> bool | None:
    """Whether `value` differs across the devices of `axis_name` inside `shard_map`, from its
    type (`manual_axis_type` in JAX >= 0.9, `vma` before); None if the type does not say."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return None
    aval = typeof(value)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return axis_name in manual.varying
    vma = getattr(aval, "vma", None)
    return None if vma is None else axis_name in vma
