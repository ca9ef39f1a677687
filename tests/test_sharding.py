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

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "benchmarks" / "sharded_training.py"


def _run(args, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env.pop("JAX_ENABLE_X64", None)
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sharded_training_matches_single_device(tmp_path):
    # SGD: no division by tiny second moments (as in Adam) to magnify rounding differences.
    optimizer, tolerance = "sgd", 1e-6
    out = tmp_path / "result.json"
    args = [str(EXAMPLE), "--devices", "4", "--steps", "6", "--batch", "64", "--hidden", "32"]
    _run([*args, "--optimizer", optimizer, "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["devices"] == 4
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
