"""Data-parallel PC training on JAX's own sharding machinery.

PC inference is per sample (the energy is a sum over the batch), so data parallelism needs no
new algorithm: shard the batch axis of the inputs and observed nodes over the devices, replicate
the parameters, and let the compiler insert the one all-reduce that learning needs (the
parameter gradient is a sum over samples). Two ways:

- **`jax.jit` with shardings** (GSPMD): put the batch on a `NamedSharding(mesh, P("data"))`
  (`shard_batch`) and the parameters and optimizer state on a replicated sharding
  (`replicate`), then call the jitted training step ([pcjax.make_train_step][]) as usual. The
  program is the single-device one; XLA partitions it.
- **`jax.shard_map`**: write the per-device program yourself. Each device runs the training
  step of [pcjax.make_train_step][] on its shard of the batch; chain `cross_device_mean(axis)`
  in front of the optimizer so that every device applies the same, globally averaged, update
  (with or without `shard_map`'s type checks, `check_vma`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A one-axis mesh over `devices` (default: all devices, across hosts) for data parallelism.

    **Arguments:**

    - `devices`: the devices to use; default None (`jax.devices()`, every device of every
      host).
    - `axis`: the mesh axis name; default `"data"`.

    **Returns:** a `jax.sharding.Mesh` of shape `(len(devices),)`, for [pcjax.shard_batch][]
    and [pcjax.replicate][].

    **Raises:** nothing of its own (JAX's error for devices that do not form a mesh).

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> mesh = pc.data_mesh()
    >>> mesh.axis_names, mesh.shape["data"] == jax.device_count()
    (('data',), True)

    ```
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis,))


def shard_batch(tree: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Place every array of `tree` (inputs, observed nodes, states) with its leading (batch) axis
    split over the mesh axis `axis`.

    **Arguments:**

    - `tree`: any pytree; its array leaves are placed, other leaves are kept.
    - `mesh`: the mesh, e.g. from [pcjax.data_mesh][].
    - `axis`: the mesh axis to split the batch over; default `"data"`.

    **Returns:** the tree with its arrays sharded along their first axis.

    **Raises:** `ValueError` naming the leaf if it is a scalar or its batch size is not a
    multiple of the number of devices on `axis`.

    **Example** ([setup][examples-setup]): a jitted training step on sharded data runs data
    parallel.

    ```pycon
    >>> mesh = pc.data_mesh()
    >>> batch = pc.shard_batch({"x": x, "y": y}, mesh)
    >>> batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    True

    ```
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
    """Place every array of `tree` (parameters, optimizer state) whole on every device.

    **Arguments:**

    - `tree`: any pytree; its array leaves are placed, other leaves are kept.
    - `mesh`: the mesh, e.g. from [pcjax.data_mesh][].

    **Returns:** the tree with every array replicated over the mesh.

    **Raises:** nothing of its own (JAX's `device_put` errors).

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> replicated = pc.replicate(params, pc.data_mesh())
    >>> replicated["w1"].sharding.is_fully_replicated
    True

    ```
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: jax.device_put(a, sharding) if eqx.is_array(a) else a, tree)


def cross_device_mean(
    axis_name: str, *, summed: bool | None = None
) -> optax.GradientTransformation:
    r"""An optax transform that makes the updates the mean over the devices of `axis_name`, for
    use inside `jax.shard_map` (either `check_vma` mode): chain it first,
    `optax.chain(pcjax.cross_device_mean("data"), optax.adam(1e-3))`.

    With $N$ devices, device $d$ computing the gradient $g_d$ of its shard's loss, the update
    on every device becomes $\bar g = \frac1N \sum_d g_d$. With the default
    `mean_over_batch=True` of [pcjax.make_train_step][] each $g_d$ is the mean over its shard;
    with equal shards $\bar g$ is the mean over the global batch, so every device applies the
    single-device update and the replicated parameters stay identical.

    How the gradient of a replicated parameter (`in_specs=P()`) arrives depends on
    `shard_map`'s mode. With the default `check_vma=True` autodiff has already summed it over
    the devices (the transpose of broadcasting the parameter to them is a `psum`): every device
    holds $S = \sum_d g_d$, and $\bar g = S / N$. With `check_vma=False` (and in `pmap`) it is
    the device-local $g_d$, and $\bar g = \operatorname{pmean}(g_d)$. `summed` says which:

    - `None` (default), for replicated parameters in either mode: autodiff is asked, not the
      types (which `check_vma=False` leaves unchecked). A replicated scalar $p$ used as
      $p + 0 \cdot i_d$ on device $d$ ($i_d$ the device index) has gradient $k = N$ where
      autodiff sums over the devices and $k = 1$ where it does not; the update is
      $\operatorname{pmean}(u) / k$, which is $\bar g$ in both cases ($\operatorname{pmean}$
      of the replicated $S$ is $S$). Costs one extra all-reduce where the updates were summed.
    - `True`: the updates are $S$ (replicated parameters under `check_vma=True`): $S / N$, no
      communication.
    - `False`: the updates are the local $g_d$ (`check_vma=False`, `pmap`, or parameters made
      device-varying): $\operatorname{pmean}(g_d)$.

    A wrong `summed` gives updates $N$ times too large, or replicas that drift apart.

    **Arguments:**

    - `axis_name`: the mesh axis of the batch, as in `jax.shard_map`.
    - `summed`: keyword; whether the updates arrive summed over the devices (above); default
      None (ask autodiff).

    **Returns:** an `optax.GradientTransformation` with an empty state.

    **Raises:** `TypeError` if `summed` is not None, True or False.

    **Example** ([setup][examples-setup]): the mean of per-device updates.

    ```pycon
    >>> from jax.sharding import PartitionSpec as P
    >>> mean = pc.cross_device_mean("data", summed=False)
    >>> def local(g):
    ...     return mean.update(g, mean.init(g))[0]
    >>> n = jax.device_count()
    >>> per_device = jnp.arange(float(n)).reshape(n, 1)
    >>> out = jax.shard_map(local, mesh=pc.data_mesh(), in_specs=P("data"), out_specs=P("data"),
    ...                     check_vma=False)(per_device)
    >>> bool(jnp.allclose(out, per_device.mean()))
    True

    ```
    """
    if summed is not None and not isinstance(summed, bool):
        raise TypeError(
            f"pcjax.cross_device_mean: `summed` must be None, True or False, got {summed!r}."
        )

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return device_mean(updates, axis_name, summed), state

    return optax.GradientTransformation(init, update)


def device_mean(updates: Any, axis_name: str, summed: bool | None) -> Any:
    """The mean of `updates` over the devices of `axis_name` (see `cross_device_mean`)."""
    if summed:
        size = jax.lax.axis_size(axis_name)
        return jax.tree.map(lambda u: u / size, updates)
    means = jax.lax.pmean(updates, axis_name)
    if summed is False:
        return means
    count = _summed_count(axis_name)
    return jax.tree.map(lambda u: u / count.astype(u.dtype), means)


def _summed_count(axis_name: str) -> jax.Array:
    r"""How many devices' contributions autodiff sums into the gradient of a replicated value
    on mesh axis `axis_name`: $N$ under `shard_map(check_vma=True)`, 1 where gradients stay
    device-local (`check_vma=False`, `pmap`). It is the gradient of a replicated scalar $p$
    through $p + 0 \cdot i_d$, made device-varying by the device index $i_d$."""
    index = jax.lax.axis_index(axis_name).astype(jnp.float32)
    return jax.grad(lambda p: p + 0.0 * index)(jnp.zeros((), jnp.float32))
