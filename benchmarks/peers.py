"""Run peer PC libraries on the suite's MLP task, each in its own virtual environment.

A peer pins its own JAX (pcx 0.6 needs jax < 0.5), so it cannot share pcjax's environment:
the harness creates `<venv root>/<peer>` with `python -m venv`, installs the peer from PyPI
(once; a marker file records success), writes the task's data to a temporary `.npz` file and
runs the peer's script there. The script prints one JSON line with its step time, the time of
a backprop step of the same network measured in the same process, and its test accuracy. When
the environment cannot be made (no network, no wheel for this platform) the result says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_VENV_ROOT = HERE / ".venvs"
PEERS = {"pcx": {"requirements": ["pcx==0.6.3"], "script": HERE / "peer_pcx.py"}}
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 3600


class PeerUnavailable(RuntimeError):
    """The peer's environment could not be created or its run failed."""


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(name: str, root: Path) -> Path:
    """The peer's interpreter, creating its virtual environment on first use."""
    spec = PEERS[name]
    venv = root / name
    marker = venv / "pcjax-peer-installed.txt"
    wanted = " ".join(spec["requirements"])
    if marker.is_file() and marker.read_text() == wanted:
        return _python(venv)
    print(f"  creating {venv} and installing {wanted} (once)...", flush=True)
    commands = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(_python(venv)), "-m", "pip", "install", "--quiet", *spec["requirements"]],
    ]
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PeerUnavailable(f"could not install {wanted}: {error}") from error
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise PeerUnavailable(f"could not install {wanted}: {tail[0]}")
    marker.write_text(wanted)
    return _python(venv)


def run_peer(
    name: str, task: Any, data: Any, root: Path, repeats: int, speed_only: bool
) -> dict[str, Any]:
    """Run peer `name` on the MLP `task`; a dict with its numbers, or with `error`."""
    if name not in PEERS:
        return {"name": name, "error": f"unknown peer (known: {sorted(PEERS)})"}
    try:
        python = ensure_venv(name, root)
        with tempfile.TemporaryDirectory() as tmp:
            data_file, config_file = Path(tmp) / "data.npz", Path(tmp) / "config.json"
            np.savez(
                data_file,
                x_train=data.x_train.reshape(len(data.x_train), -1),
                y_train=data.y_train,
                x_test=data.x_test.reshape(len(data.x_test), -1),
                y_test=data.y_test,
            )
            config = {
                "batch": task.batch,
                "inference_steps": task.inference_steps,
                "hidden": list(task.hidden),
                "epochs": task.epochs,
                "lr": task.lr,
                "state_step": task.state_step,
                "seed": 0,
                "repeats": repeats,
                "speed_only": speed_only,
            }
            config_file.write_text(json.dumps(config))
            command = [str(python), str(PEERS[name]["script"])]
            command += ["--data", str(data_file), "--config", str(config_file)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise PeerUnavailable(f"run failed: {tail[0]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (PeerUnavailable, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        print(f"  peer {name}: unavailable ({error})", flush=True)
        return {"name": name, "error": str(error)}
    version = PEERS[name]["requirements"][0].partition("==")[2]
    return {"name": name, "version": version, **result}
