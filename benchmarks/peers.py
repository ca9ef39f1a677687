"""Peer PC libraries on the suite's tasks, each in its own virtual environment, energy-checked.

A peer pins its own JAX (pcx 0.6 needs jax < 0.5), so it cannot share pcjax's environment:
`ensure_venv` creates `<venv root>/<peer>` with `python -m venv` and installs the peer from
PyPI once (a marker file records it; an environment that already imports the peer is used as
it is). The peer's script then runs there under the contract documented in
`benchmarks/peer_fabricpc.py` (the same for `peer_pcx.py`):

    <venv>/bin/python peer_<name>.py --data data.npz --config config.json [--weights weights.npz]

printing one JSON line (step time, the time of a backprop step of the same network in the
same process, and with weights the `relaxed_energy`).

Before a peer is timed, `run_peer` checks that it computes the same network: pcjax's weights
(`models.peer_weights`) go to the peer, which relaxes the first `batch` training samples
(feedforward initialisation, label clamped, T state steps) and reports the relaxed energy;
pcjax computes the same quantity (`models.relaxed_energy`). Only if they agree within
`rtol` is the peer timed (from the same weights); otherwise, or if the peer reports no energy,
the result is marked invalid (`"valid": false`, with the two energies) and carries no timings.
When the environment cannot be made (offline, no wheel) or the run fails, the result says why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import data as bdata
import jax
import jax.numpy as jnp
import models
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_VENV_ROOT = HERE / ".venvs"
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 3600
DEFAULT_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Peer:
    requirements: tuple[str, ...]
    module: str  # what the peer's environment must import
    script: Path
    kinds: tuple[str, ...]  # network kinds of the contract it implements ("mlp", "cnn")

    @property
    def version(self) -> str:
        return self.requirements[0].partition("==")[2]


PEERS: dict[str, Peer] = {
    "pcx": Peer(("pcx==0.6.3",), "pcx", HERE / "peer_pcx.py", ("mlp", "cnn")),
    "fabricpc": Peer(("fabricpc==0.6.0",), "fabricpc", HERE / "peer_fabricpc.py", ("mlp", "cnn")),
}


class PeerUnavailable(RuntimeError):
    """The peer's environment could not be created or its run failed."""


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _imports(python: Path, module: str) -> bool:
    if not python.is_file():
        return False
    try:
        done = subprocess.run(
            [str(python), "-c", f"import {module}"], capture_output=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_venv(name: str, root: Path) -> Path:
    """The peer's interpreter, creating its virtual environment on first use."""
    spec = PEERS[name]
    venv = Path(root) / name
    marker = venv / "pcjax-peer-installed.txt"
    wanted = " ".join(spec.requirements)
    if marker.is_file() and marker.read_text() == wanted:
        return _python(venv)
    if _imports(_python(venv), spec.module):
        return _python(venv)  # made by hand (or by an older harness): use it as it is
    print(f"  creating {venv} and installing {wanted} (once)...", flush=True)
    commands = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(_python(venv)), "-m", "pip", "install", "--quiet", *spec.requirements],
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


def peer_config(task: Any, repeats: int, speed_only: bool, seed: int = 0) -> dict[str, Any]:
    """The contract's `config.json` for a suite task."""
    config = {
        "task": task.kind,
        "hidden": list(task.hidden),
        "batch": task.batch,
        "inference_steps": task.inference_steps,
        "state_step": task.state_step,
        "lr": task.lr,
        "epochs": task.epochs,
        "seed": seed,
        "repeats": repeats,
        "speed_only": speed_only,
        "classes": 10,
        "activation": "relu" if task.kind == "cnn" else "gelu",  # pcjax.nn.VGG / pcjax.nn.MLP
    }
    if task.kind == "cnn":
        config["channels"] = list(task.channels)
    return config


def run_peer_script(
    python: Path,
    script: Path,
    data_file: Path,
    config: dict[str, Any],
    weights_file: Path | None = None,
    timeout: float = RUN_TIMEOUT,
) -> dict[str, Any]:
    """ADAPT HERE if the peer contract changes: run one peer script and parse its JSON line.

    Contract: `python script --data data.npz --config config.json [--weights weights.npz]`;
    the last stdout line is a JSON object; failure is a non-zero exit with the reason as the
    last stderr line."""
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config))
        command = [str(python), str(script), "--data", str(data_file), "--config", str(config_file)]
        if weights_file is not None:
            command += ["--weights", str(weights_file)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PeerUnavailable(f"run failed: {error}") from error
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise PeerUnavailable(f"run failed: {tail[0]}")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as error:
        raise PeerUnavailable(f"run printed no JSON line: {error}") from error


def energy_check(peer: dict[str, Any], pcjax: dict[str, Any], rtol: float) -> dict[str, Any]:
    """Compare the peer's `relaxed_energy` with pcjax's; `ok` False if missing or off."""
    theirs, ours = peer.get("relaxed_energy"), pcjax["relaxed_energy"]
    check = {"pcjax": ours, "peer": theirs, "rtol": rtol, "samples": peer.get("check_samples")}
    check["pcjax_feedforward"] = pcjax.get("feedforward_energy")
    check["peer_feedforward"] = peer.get("feedforward_energy")
    if not isinstance(theirs, (int, float)) or not np.isfinite(theirs):
        check.update(ok=False, reason="the peer reported no relaxed_energy")
        return check
    difference = abs(theirs - ours) / max(abs(ours), 1e-30)
    check.update(relative_difference=difference, ok=bool(difference <= rtol))
    if not check["ok"]:
        check["reason"] = (
            f"relaxed energy {theirs:.6g} vs pcjax {ours:.6g} (relative difference "
            f"{difference:.2e} > {rtol:g})"
        )
    return check


def run_peer(
    name: str,
    task: Any,
    data: bdata.Dataset,
    root: Path,
    repeats: int,
    speed_only: bool,
    rtol: float = DEFAULT_RTOL,
) -> dict[str, Any]:
    """Run peer `name` on a suite `task`: energy check, then (if it passes) the timed run.

    Returns `{"name", "task", "valid", ...}`: with `error` when the peer cannot run; with
    `energy_check` always once it ran; timings (and accuracy unless `speed_only`) only when
    valid."""
    base = {"name": name, "task": task.name}
    if name not in PEERS:
        return {**base, "valid": False, "error": f"unknown peer (known: {sorted(PEERS)})"}
    spec = PEERS[name]
    if task.kind not in spec.kinds:
        return {**base, "valid": False, "error": f"implements {list(spec.kinds)} tasks only"}
    base["version"] = spec.version
    model = models.network(
        data.x_train.shape[1:], task.channels, task.hidden, jax.random.PRNGKey(0)
    )
    x = jnp.asarray(models.inputs_for(model, data.x_train[: task.batch]))
    y = jnp.asarray(bdata.onehot(data.y_train[: task.batch]))
    ours = models.relaxed_energy(model, x, y, task.inference_steps, task.state_step)
    try:
        python = ensure_venv(name, root)
        with tempfile.TemporaryDirectory() as tmp:
            data_file = bdata.save_npz(Path(tmp) / "data.npz", data, flatten=task.kind == "mlp")
            weights_file = Path(tmp) / "weights.npz"
            np.savez(weights_file, **models.peer_weights(model))
            check_config = peer_config(task, 1, True)
            checked = run_peer_script(python, spec.script, data_file, check_config, weights_file)
            check = energy_check(checked, ours, rtol)
            if not check["ok"]:
                print(f"  peer {name} on {task.name}: INVALID ({check['reason']})", flush=True)
                return {**base, "valid": False, "error": check["reason"], "energy_check": check}
            config = peer_config(task, repeats, speed_only)
            result = run_peer_script(python, spec.script, data_file, config, weights_file)
    except PeerUnavailable as error:
        print(f"  peer {name} on {task.name}: unavailable ({error})", flush=True)
        return {**base, "valid": False, "error": str(error)}
    result.pop("relaxed_energy_nodes", None)
    base["version"] = result.get("version", spec.version)
    return {**result, **base, "valid": True, "energy_check": check}
