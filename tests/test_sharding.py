"""Data-parallel training on 4 simulated CPU devices gives the single-device parameters.

JAX fixes its device count when it starts, so these run in subprocesses with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pcjax as pc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "benchmarks" / "sharded_training.py"


def _run_raw(args, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )


def _run(args, tmp_path) -> str:
    done = _run_raw(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sharded_training_matches_single_device(tmp_path):
    # SGD: no division by tiny second moments (as in Adam) to magnify rounding differences.
    optimizer, tolerance = "sgd", 5e-7  # measured 4.7e-8 (jit and shard_map)
    out = tmp_path / "result.json"
    args = [str(EXAMPLE), "--devices", "4", "--steps", "6", "--batch", "64", "--hidden", "32"]
    # shard_map without type checks: the mode whose device-local gradients need a pmean.
    _run([*args, "--optimizer", optimizer, "--check-vma", "false", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["devices"] == 4
    assert result["check_vma"] is False
    scale = result["param_scale"]
    # Same parameters to float tolerance (the reductions run in a different order).
    assert result["jit_max_abs_diff"] <= tolerance * scale
    assert result["shard_map_max_abs_diff"] <= tolerance * scale
    assert set(result["throughput"]) >= {
        "1 device (no sharding)",
        "4 devices (jit + NamedSharding)",
        "4 devices (shard_map)",
    }


def test_shard_batch_errors_and_placement(tmp_path):
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        import pcjax as pc

        mesh = pc.data_mesh()
        assert mesh.shape["data"] == 4
        x = pc.shard_batch({"x": jnp.ones((8, 3))}, mesh)["x"]
        assert len(x.addressable_shards) == 4
        assert x.addressable_shards[0].data.shape == (2, 3)
        w = pc.replicate(jnp.ones((3, 2)), mesh)
        assert all(s.data.shape == (3, 2) for s in w.addressable_shards)
        for bad, message in [({"x": jnp.ones((6, 3))}, "['x'] has shape (6, 3)"),
                             (jnp.ones(()), "leading (batch) axis")]:
            try:
                pc.shard_batch(bad, mesh)
            except ValueError as error:
                assert message in str(error), error
            else:
                raise AssertionError("no error")
        print("ok")
        """
    )
    assert _run(["-c", script], tmp_path).strip() == "ok"


# Trains a small MLP 10 steps on one device, then with `jax.shard_map` on 4 devices in both of
# its modes (check_vma=True: autodiff has already summed the replicated parameters' gradients
# over the devices; check_vma=False: they are device-local), with SGD and Adam. Every device's
# replica is compared with the single-device parameters. Then checks `cross_device_mean` on one
# gradient with `summed` stated explicitly. Results go to argv[1] as JSON after each part.
SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import equinox as eqx, jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    import pcjax as pc
    from pcjax import nn

    mesh = pc.data_mesh()
    results = {"devices": mesh.shape["data"], "training": {}, "transform": {}}

    def save():
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)

    def leaves(tree):
        return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))

    def max_diff(replicated, reference):
        # Over every device's copy: replicas that drift apart must not hide behind device 0.
        return max(
            float(np.abs(np.asarray(shard.data) - np.asarray(ref)).max())
            for leaf, ref in zip(leaves(replicated), leaves(reference))
            for shard in leaf.addressable_shards
        )

    model = nn.MLP([6, 16, 3], key=jax.random.PRNGKey(0), activation=jnp.tanh)
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32))
        for _ in range(10)
    ]

    def train(optimizer):
        rule = pc.Equilibrium(pc.GradientDescent(4, step_size=0.1))
        return pc.make_train_step(nn.call, rule, optimizer)

    scale = max(float(np.abs(np.asarray(a)).max()) for a in leaves(model))
    results["param_scale"] = scale

    for name, optimizer in [("sgd", optax.sgd(0.1)), ("adam", optax.adam(1e-2))]:
        step = jax.jit(train(optimizer))
        reference, state = model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        for x, y in batches:
            reference, state, _ = step(reference, state, x, {"h1": y})
        results["training"][f"{name} moved"] = max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(leaves(reference), leaves(model))
        )
        averaged = optax.chain(pc.cross_device_mean("data"), optimizer)

        def local_step(params, state, x, y):
            params, state, _ = train(averaged)(params, state, x, {"h1": y})
            return params, state

        for check_vma in (True, False):
            step = jax.jit(
                jax.shard_map(
                    local_step,
                    mesh=mesh,
                    in_specs=(P(), P(), P("data"), P("data")),
                    out_specs=(P(), P()),
                    check_vma=check_vma,
                )
            )
            params = pc.replicate(model, mesh)
            state = pc.replicate(averaged.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
            for batch in batches:
                params, state = step(params, state, *pc.shard_batch(batch, mesh))
            results["training"][f"{name} check_vma={check_vma}"] = max_diff(params, reference)
    save()

    # One gradient of a mean over the batch: the device mean of the local means is the global
    # mean, whether the transform finds out how the gradient arrives or is told.
    w = jnp.linspace(-1.0, 1.0, 6)
    x, _ = batches[0]
    loss = lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)
    expected = jax.grad(loss)(w, x)
    for check_vma in (True, False):
        for summed in (None, check_vma):
            transform = pc.cross_device_mean("data", summed=summed)

            def mean_gradient(w, x):
                update, _ = transform.update(jax.grad(loss)(w, x), transform.init(w))
                return update

            got = jax.jit(
                jax.shard_map(
                    mean_gradient, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
                    check_vma=check_vma,
                )
            )(pc.replicate(w, mesh), pc.shard_batch(x, mesh))
            results["transform"][f"check_vma={check_vma} summed={summed}"] = max(
                float(np.abs(np.asarray(shard.data) - expected).max() / np.abs(expected).max())
                for shard in got.addressable_shards
            )
    save()
    """
)


@pytest.fixture(scope="module")
def shard_map_results(tmp_path_factory):
    """Run SHARD_MAP_SCRIPT once on 4 simulated devices: (the finished process, its JSON)."""
    tmp_path = tmp_path_factory.mktemp("shard_map")
    out = tmp_path / "results.json"
    done = _run_raw(["-c", SHARD_MAP_SCRIPT, str(out)], tmp_path)
    results = json.loads(out.read_text()) if out.exists() else {}
    return done, results


def test_shard_map_training_matches_single_device_in_both_modes(shard_map_results):
    done, results = shard_map_results
    assert "training" in results, done.stderr[-3000:]
    assert results["devices"] == 4
    training, scale = results["training"], results["param_scale"]
    # Training moved the parameters far beyond the tolerance, so equality means something.
    assert training["sgd moved"] > 1e-2 * scale  # measured 0.15 * scale
    assert training["adam moved"] > 1e-2 * scale  # measured 0.086 * scale
    for optimizer in ("sgd", "adam"):
        for check_vma in (True, False):
            # Same parameters on every device as on one device, to float32 rounding (the
            # reductions run in another order). Before the fix check_vma=False was 0.12 off.
            diff = training[f"{optimizer} check_vma={check_vma}"]
            assert diff <= 5e-7 * scale, (optimizer, check_vma, diff)  # measured 5.4e-8 * scale


def test_cross_device_mean_with_summed_stated(shard_map_results):
    done, results = shard_map_results
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(results["transform"]) == {
        "check_vma=True summed=None",
        "check_vma=True summed=True",
        "check_vma=False summed=None",
        "check_vma=False summed=False",
    }
    for key, error in results["transform"].items():
        assert error <= 1e-6, (key, error)  # measured 1.2e-7 (relative to the largest entry)


def test_cross_device_mean_rejects_a_non_bool_summed():
    with pytest.raises(TypeError, match="`summed` must be None, True or False, got 'yes'"):
        pc.cross_device_mean("data", summed="yes")
