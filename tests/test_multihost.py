"""The README's multi-host recipe, run for real: two processes on 127.0.0.1 joined by
`jax.distributed.initialize` (gloo CPU collectives), two simulated CPU devices each, train a PC
MLP data-parallel on one global batch, each process feeding its own rows with
`jax.make_array_from_process_local_data`; the parameters equal a one-process, one-device run.

The worker is tests/multihost_worker.py; JAX fixes its devices and cluster when it starts, so
every run is a fresh subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
TIMEOUT = 120  # seconds for all processes together; the test takes about 6 s on 2 cores
# Measured max abs difference from the single-device parameters (of size ~1): 6.0e-8 (the
# cross-process all-reduce sums in another order than one device does).
TOLERANCE = 5e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_ENABLE_X64", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _run_all(jobs, tmp_path) -> None:
    """Start every `(name, args, env)` job at once and wait for all of them; if one fails or
    time runs out, kill the others and fail with every job's exit status and stderr."""
    procs, timed_out = {}, False
    try:
        for name, args, env in jobs:
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
            procs[name] = (proc, log)
        deadline = time.monotonic() + TIMEOUT
        while True:
            codes = [proc.poll() for proc, _ in procs.values()]
            if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
    if any(proc.returncode != 0 for proc, _ in procs.values()):
        killed = f"timed out after {TIMEOUT} s" if timed_out else "another job failed"
        report = "\n".join(
            f"--- {name}: exit {proc.returncode}"
            + (f" (killed: {killed})" if proc.returncode < 0 else "")
            + f"\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
            for name, (proc, _) in procs.items()
        )
        raise AssertionError(f"multi-host worker failed:\n{report}")


def test_two_processes_match_one_device(tmp_path):
    port, n = _free_port(), 2
    multi, single = tmp_path / "multi.npz", tmp_path / "single.npz"
    cluster = ["--num-processes", str(n), "--port", str(port), "--out", str(multi)]
    jobs = [(f"process{i}", ["--process-id", str(i), *cluster], _env(devices=2)) for i in range(n)]
    jobs.append(("single", ["--single", "--out", str(single)], _env(devices=1)))
    _run_all(jobs, tmp_path)

    got, want = np.load(multi), np.load(single)
    assert (int(got["processes"]), int(got["devices"])) == (2, 4)
    assert (int(want["processes"]), int(want["devices"])) == (1, 1)
    names = sorted(k for k in want.files if k.startswith("param"))
    assert names == sorted(k for k in got.files if k.startswith("param")) and names
    # Training happened (the energy fell) and saw the same data.
    energies = want["energies"]
    assert energies[-1] < 0.6 * energies[0], energies
    np.testing.assert_allclose(got["energies"], energies, rtol=1e-6)  # measured 7.1e-8
    for name in names:
        diff = float(np.max(np.abs(got[name] - want[name])))
        assert diff <= TOLERANCE, (name, diff)
