"""The main job's command line, run small on the bundled digits (no MNIST, no network)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from pcjax import demo


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--epochs" in out and "--data-dir" in out


def test_offline_fallback_trains_and_reports(tmp_path, capsys):
    accuracy = demo.main(
        [
            "--data-dir",
            str(tmp_path),
            "--no-download",
            "--epochs",
            "3",
            "--hidden",
            "64",
            "--inference-steps",
            "4",
            "--batch-size",
            "64",
            "--lr",
            "3e-3",
            "--certify",
        ]
    )
    captured = capsys.readouterr()
    assert "UCI handwritten digits" in captured.err
    assert re.search(r"epoch 3/3 \| PC: train .* equilibrium [0-9.e-]+\) \| backprop", captured.out)
    assert f"test accuracy: {accuracy:.4f}" in captured.out.splitlines()[-1]
    assert accuracy > 0.85
    # --certify: the demo's T=4 inference against a certified reference (measured: the
    # reference at 1.9e-6 of its start, the demo's gradient 62.5% from the reference's).
    found = re.search(
        r"ends at ([0-9.e-]+) of .* gradient is ([0-9.]+)% from .* certificate ([0-9.e-]+)\)",
        captured.out,
    )
    assert found is not None, captured.out
    own, gap, reference = (float(v) for v in found.groups())
    assert reference <= 1e-3 < own  # the reference is at equilibrium, 4 steps are not
    assert 0 < gap < 1000


def test_fast_preset_trains(tmp_path, capsys):
    options = ["--epochs", "2", "--hidden", "32", "--batch-size", "64", "--lr", "3e-3"]
    accuracy = demo.main(
        [
            "--data-dir",
            str(tmp_path),
            "--no-download",
            "--preset",
            "fast",
            "--no-backprop",
            *options,
        ]
    )
    out = capsys.readouterr().out
    assert "preset fast" in out.splitlines()[0]
    assert accuracy > 0.6  # measured 0.749 (digits fallback; chance is 0.1)


def test_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])


def _numpy_predictions(params, x):
    """The demo MLP's argmax class in float64 NumPy (tanh-approximate GELU, as jax.nn.gelu)."""
    h = np.asarray(x, np.float64)
    for i, (w, b) in enumerate(params):
        h = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
        if i < len(params) - 1:
            h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    return h.argmax(-1)


def test_accuracy_compiles_once_across_epochs(monkeypatch):
    """Two epochs of train and test accuracy (both sets ragged in chunks of 16) trace and compile
    the evaluation once, and count exactly the rows whose label is the predicted class."""
    rng = np.random.default_rng(0)
    # Shapes no other test uses, so the first call finds no compiled function (NumPy parameters:
    # no eager JAX random ops to compile).
    params = [
        (rng.standard_normal((a, b)).astype(np.float32) / np.sqrt(a), np.zeros(b, np.float32))
        for a, b in [(7, 9), (9, 10)]
    ]
    sets = {}
    for name, n in [("train", 50), ("test", 20)]:
        x = rng.standard_normal((n, 7)).astype(np.float32)
        y = _numpy_predictions(params, x).astype(np.int32)
        wrong = rng.permutation(n)[: n // 3]
        y[wrong] = (y[wrong] + 1) % 10
        sets[name] = (x, y, (n - len(wrong)) / n)

    traces = []
    forward = demo.mlp
    monkeypatch.setattr(demo, "mlp", lambda p, x: traces.append(x.shape) or forward(p, x))
    compiles = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            for x, y, expected in sets.values():
                assert demo.accuracy(params, x, y, batch=16) == expected
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(traces) == 1, traces
    assert len(compiles) == 1
