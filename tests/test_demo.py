"""The main job's command line, run small on the bundled digits (no MNIST, no network)."""

from __future__ import annotations

import re

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
        ]
    )
    captured = capsys.readouterr()
    assert "UCI handwritten digits" in captured.err
    assert re.search(r"epoch 3/3 \| PC: train .* \| backprop: train", captured.out)
    assert f"test accuracy: {accuracy:.4f}" in captured.out.splitlines()[-1]
    assert accuracy > 0.85


def test_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])
