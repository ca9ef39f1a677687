"""One process of a multi-host data-parallel PC training run (driven by tests/test_multihost.py).

    python tests/multihost_worker.py --process-id I --num-processes N --port P --out FILE
    python tests/multihost_worker.py --single --out FILE

Every process initialises `jax.distributed` (coordinator 127.0.0.1:P, gloo CPU collectives),
builds the same global batch, feeds its own rows with `jax.make_array_from_process_local_data`,
and runs a few jitted PC training steps on a mesh over all processes' devices; process 0 writes
the final parameters to FILE (npz). `--single` runs the same code in one process over the whole
batch, the reference. Simulate several CPU devices per process with
`XLA_FLAGS=--xla_force_host_platform_device_count=2` (set by the test).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pcjax as pc

SIZES = (8, 16, 4)
BATCH = 16
TRAIN_STEPS = 5
INFERENCE_STEPS = 8


def mlp(params, x):
    h = pc.node("h", jnp.tanh(x @ params["w1"] + params["b1"]))
    return pc.node("y", h @ params["w2"] + params["b2"])


def init_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    (a, b, c) = SIZES
    return {
        "w1": jax.random.normal(k1, (a, b)) / np.sqrt(a),
        "b1": jnp.zeros(b),
        "w2": jax.random.normal(k2, (b, c)) / np.sqrt(b),
        "b2": jnp.zeros(c),
    }


def global_batch():
    """The same batch on every process (numpy, deterministic)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = np.tanh(x[:, : SIZES[-1]] + x[:, SIZES[-1] : 2 * SIZES[-1]]).astype(np.float32)
    return x, {"y": y}


# --- The training step: the one place that builds and calls pcjax's step. --------------------
def make_step(fn, optimizer):
    rule = pc.Equilibrium(pc.GradientDescent(INFERENCE_STEPS))
    return jax.jit(pc.make_train_step(fn, rule, optimizer))  # step(params, opt_state, x, observed)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int)
    parser.add_argument("--out", required=True, help="npz file for the final parameters")
    parser.add_argument("--single", action="store_true", help="one process, the whole batch")
    args = parser.parse_args(argv)

    if not args.single:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
        assert jax.process_count() == args.num_processes, jax.process_count()

    mesh = pc.data_mesh()  # every process's devices
    sharding = NamedSharding(mesh, P("data"))
    x, observed = global_batch()
    rows = BATCH // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    local = jax.tree.map(lambda a: a[mine], (x, observed))  # this process's rows
    batch = jax.make_array_from_process_local_data(sharding, local)
    # The assembled global batch is the full batch, in order.
    gathered = multihost_utils.process_allgather(batch, tiled=True)
    for got, want in zip(jax.tree.leaves(gathered), jax.tree.leaves((x, observed))):
        np.testing.assert_array_equal(got, want)

    optimizer = optax.sgd(0.1)
    params = init_params()
    params, opt_state = pc.replicate((params, optimizer.init(params)), mesh)
    step = make_step(mlp, optimizer)
    energies = []
    for _ in range(TRAIN_STEPS):
        params, opt_state, info = step(params, opt_state, *batch)
        energies.append(float(info.energy))

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert all(leaf.is_fully_replicated for _, leaf in leaves)
    arrays = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in leaves}
    if jax.process_index() == 0:
        np.savez(
            args.out,
            devices=jax.device_count(),
            processes=jax.process_count(),
            energies=np.asarray(energies),
            **{f"param{k}": v for k, v in arrays.items()},
        )
    if not args.single:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
