"""The benchmark suite runs end to end (tiny settings) and writes its JSON and markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers
import suite


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    argv = ["--quick", "--tasks", "mlp_mnist", "--seeds", "2", "--max-steps", "4"]
    argv += ["--repeats", "2", "--peers", "nonexistent-peer", "--out", str(out)]
    argv += ["--data-dir", str(out / "no-mnist-here")]  # falls back to synthetic images
    return suite.main(argv), out


def test_suite_writes_json_and_markdown(report):
    _, out = report
    saved = json.loads((out / "suite-quick.json").read_text())
    table = (out / "suite-quick.md").read_text()
    task = saved["tasks"]["mlp_mnist"]
    assert task["data"] == "synthetic (28, 28)"
    assert set(task["timing"]) == {*suite.ALGORITHMS, "reference"}
    assert set(task["training"]) == set(suite.ALGORITHMS)
    assert task["timing"]["backprop"]["x_backprop"] == pytest.approx(1.0)
    for algorithm, timing in task["timing"].items():
        assert timing["step_seconds"] > 0
        assert timing["peak_memory_bytes"] > 0
        assert f"| {algorithm} |" in table
    for algorithm, summary in task["training"].items():
        assert summary["seeds"] == 2
        assert 0.0 <= summary["accuracy_mean"] <= 1.0, algorithm
        runs = task["runs"][algorithm]
        assert all(run["curve"][-1][0] == 4 for run in runs)  # 4 training steps each
    assert task["training"]["pc"]["equilibrium_steps"] is None or (
        task["training"]["pc"]["equilibrium_steps"] > 0
    )
    assert "x reference" in table


def test_unavailable_peer_is_reported_not_fatal(report):
    result, out = report
    (peer,) = result["peers"]
    assert peer["name"] == "nonexistent-peer" and "unknown peer" in peer["error"]
    assert "nonexistent-peer | unavailable" in (out / "suite-quick.md").read_text()


def test_peer_install_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(
        peers.PEERS, "broken", {"requirements": ["--no-index", "no-such-package-xyz"]}
    )
    with pytest.raises(peers.PeerUnavailable, match="could not install"):
        peers.ensure_venv("broken", tmp_path)


def test_bad_task_name_is_an_error():
    with pytest.raises(SystemExit):
        suite.main(["--tasks", "imagenet", "--peers", "none"])
