"""The benchmark harness (`benchmarks/`): timing rules, result files, the README's tables, the
peer energy check, and a tiny end-to-end run of one task."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax import datasets, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness
import models
import peers
import report
import run
import tasks
from experiments import step as step_experiment

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# ---------------------------------------------------------------------------------------------
# harness


def test_interleave_rotates_blocks_and_counts():
    order = []
    ticks = iter(range(1000))
    calls = {name: (lambda name=name: order.append(name) or jnp.ones(())) for name in "abc"}
    times = harness.interleave(calls, 4, warmup=1, clock=lambda: next(ticks))
    assert order[:3] == ["a", "b", "c"]  # the warm-up round
    rounds = [order[3 + 3 * r : 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t == 1 for v in times.values() for t in v)  # one clock tick per timed call
    with pytest.raises(ValueError, match="repeats"):
        harness.interleave(calls, 0)


def test_summary_median_and_ratio():
    a = harness.summary([0.3, 0.1, 0.2, 10.0])
    assert a == {"median_s": 0.25, "min_s": 0.1, "max_s": 10.0, "repeats": 4}
    assert harness.ratio(a, harness.summary([0.5])) == pytest.approx(0.5)


def test_loop_carries_its_state():
    loop = harness.Loop(lambda a, b, x: (a + x, b * 2, "dropped"), (1, 1), (10,), keep=2)
    loop()
    assert loop() == (21, 4)


def test_compile_step_reports_memory():
    compiled = harness.compile_step(lambda a, b: a @ b, jnp.ones((8, 4)), jnp.ones((4, 2)))
    assert compiled.compile_seconds > 0
    assert compiled.memory_bytes is None or compiled.memory_bytes >= 4 * (32 + 8 + 16)
    np.testing.assert_allclose(compiled.call(jnp.ones((8, 4)), jnp.ones((4, 2))), 4.0)


def test_result_document_round_trip(tmp_path):
    env = harness.environment()
    assert env["jax"] == jax.__version__ and env["device"] and env["backend"]
    document = harness.result_document(
        "demo", {"n": np.int32(3)}, {"x": np.arange(3), "y": np.float32(0.5)}, 1.0, env
    )
    saved = harness.read_result(harness.write_result(tmp_path / "sub" / "r.json", document))
    assert saved["experiment"] == "demo"
    assert saved["config"] == {"n": 3}
    assert saved["results"] == {"x": [0, 1, 2], "y": 0.5}
    assert saved["environment"]["jax"] == jax.__version__


# ---------------------------------------------------------------------------------------------
# report: every table of benchmarks/README.md is generated from the JSON it cites


def test_readme_tables_regenerate_identically_from_results():
    text = (BENCHMARKS / "README.md").read_text()
    cited = report.sources(text)
    assert cited, "the README cites no result file"
    for path in cited:
        assert (BENCHMARKS / path).is_file(), path
        assert path.startswith("results/") and path.endswith(".json"), path
    assert report.regenerate(text) == text, "run: python benchmarks/report.py"


def test_every_readme_table_is_generated():
    text = (BENCHMARKS / "README.md").read_text()
    outside = report.MARKER.sub("", text)
    rows = [line for line in outside.splitlines() if re.match(r"\s*\| ---", line)]
    assert not rows, f"tables not generated from a result file: {rows}"


def test_report_check_flags_a_stale_table(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    document = harness.result_document(
        "gamma",
        {"gammas": [1.0, 0.1], "max_steps": 100, "step_size": 0.05, "tol": 1e-10},
        {"relative_errors": {"net": [0.5, 0.05]}, "inference_steps": {"net": [3, 100]}},
        env={"device": "cpu", "backend": "cpu", "device_count": 1, "host": "h", "jax": "0",
             "date": "d"},
    )  # fmt: skip
    harness.write_result(results / "g.json", document)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- report: results/g.json -->\nold\n<!-- /report -->\ny\n")
    assert report.main(["--readme", str(readme), "--check"]) == 1
    assert report.main(["--readme", str(readme)]) == 0
    assert "| net | 0.5 | 0.05* |" in readme.read_text()  # * : stopped at the step limit
    assert report.main(["--readme", str(readme), "--check"]) == 0


# ---------------------------------------------------------------------------------------------
# models: the references and pcjax's side of the peer check


def test_mlp_and_cnn_references_match_pcjax():
    # One SGD step of pcjax's step and of the hand-written reference give the same parameters
    # (the CNN: both loop forms of each), else check_problem raises.
    step_experiment.check_problem(*step_experiment.mlp_problem([6, 5, 4], 4, 3))
    model, x, y, steps_for = step_experiment.cnn_problem((2,), 2, 2, image_size=4)
    rolled = lambda opt: {k: v for k, v in steps_for(opt).items() if "unrolled" not in k}  # noqa: E731
    step_experiment.check_problem(model, x, y, rolled)
    with pytest.raises(AssertionError):
        step_experiment.check_same({"a": [jnp.ones(3)], "b": [jnp.ones(3) * 1.01]})


def test_relaxed_energy_matches_a_hand_written_relaxation():
    model = nn.MLP([5, 4, 3, 2], key=jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5))
    y = jax.nn.one_hot(jnp.array([0, 1, 1]), 2)
    w = [(layer.weight.T, layer.bias) for layer in model.layers]

    def energy(h):  # pre-activation nodes h0, h1; output clamped to y
        mus = [x @ w[0][0] + w[0][1], jax.nn.gelu(h[0]) @ w[1][0] + w[1][1]]
        mus.append(jax.nn.gelu(h[1]) @ w[2][0] + w[2][1])
        return sum(0.5 * jnp.sum((t - m) ** 2) for t, m in zip([h[0], h[1], y], mus))

    @jax.jit
    def relax():
        h = [x @ w[0][0] + w[0][1]]
        h.append(jax.nn.gelu(h[0]) @ w[1][0] + w[1][1])
        start = energy(h)
        for _ in range(6):
            h = [a - 0.2 * g for a, g in zip(h, jax.grad(energy)(h))]
        return start, energy(h)

    start, relaxed = relax()
    ours = models.relaxed_energy(model, x, y, steps=6, state_step=0.2)
    assert ours["relaxed_energy"] == pytest.approx(float(relaxed), rel=1e-5)
    assert ours["feedforward_energy"] == pytest.approx(float(start), rel=1e-5)
    assert sum(ours["relaxed_energy_nodes"].values()) == pytest.approx(ours["relaxed_energy"])


def test_peer_weights_layout():
    model = nn.VGG(1, [2], [3], 4, image_size=4, key=jax.random.PRNGKey(0))
    weights = models.peer_weights(model)
    assert sorted(weights) == ["b0", "b1", "b2", "w0", "w1", "w2"]
    assert weights["w0"].shape == (3, 3, 1, 2)  # HWIO
    h = np.ones((1, 8), np.float32)
    np.testing.assert_allclose(
        h @ weights["w1"] + weights["b1"], nn.call(model.dense_layers[0], h), rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# peers: the energy check gates the timing

FAKE_PEER = textwrap.dedent(
    """
    import argparse, json, os
    parser = argparse.ArgumentParser()
    parser.add_argument("--data"); parser.add_argument("--config"); parser.add_argument("--weights")
    args = parser.parse_args()
    config = json.load(open(args.config))
    out = {"peer": "fake", "task": config["task"], "step_seconds": 0.002,
           "backprop_step_seconds": 0.001, "x_backprop": 2.0, "jax": "0"}
    energy = os.environ["FAKE_PEER_ENERGY"]
    if args.weights and energy != "none":
        out["relaxed_energy"] = float(energy)
    print(json.dumps(out))
    """
)


@pytest.fixture
def fake_peer(tmp_path, monkeypatch):
    script = tmp_path / "peer_fake.py"
    script.write_text(FAKE_PEER)
    spec = peers.Peer(("fake==1.0",), "json", script, ("mlp",))
    monkeypatch.setitem(peers.PEERS, "fake", spec)
    monkeypatch.setattr(peers, "ensure_venv", lambda name, root: Path(sys.executable))
    monkeypatch.setattr(peers.models, "relaxed_energy", lambda *a, **k: {"relaxed_energy": 100.0})
    task = tasks.Task("tiny_mlp", "MLP 784-8-10", "mnist", (), (8,), 8, 1, 0.5)
    data = datasets.synthetic_images((28, 28), n_train=32, n_test=8)
    return lambda: peers.run_peer("fake", task, data, tmp_path, repeats=2, speed_only=True)


@pytest.mark.parametrize(
    ("energy", "valid"), [("100.00001", True), ("101.0", False), ("none", False)]
)
def test_peer_is_timed_only_if_its_energy_matches(fake_peer, monkeypatch, energy, valid):
    monkeypatch.setenv("FAKE_PEER_ENERGY", energy)
    result = fake_peer()
    assert result["valid"] is valid
    assert result["task"] == "tiny_mlp" and result["name"] == "fake"
    assert result["energy_check"]["ok"] is valid
    if valid:
        assert result["step_seconds"] == 0.002 and result["x_backprop"] == 2.0
    else:
        assert "step_seconds" not in result and "x_backprop" not in result
        assert result["error"]


def test_peer_install_failure_is_reported(tmp_path, monkeypatch):
    spec = peers.Peer(("no-such-package-xyz==1",), "no_such_module", Path("x"), ())
    monkeypatch.setitem(peers.PEERS, "broken", spec)
    monkeypatch.setattr(peers.sys, "executable", str(tmp_path / "no-python-here"))
    with pytest.raises(peers.PeerUnavailable, match="could not install"):
        peers.ensure_venv("broken", tmp_path)


# ---------------------------------------------------------------------------------------------
# one task x algorithm, end to end through the CLI


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    argv = ["suite", "--quick", "--tasks", "mlp_mnist", "--algorithms", "pc,reference"]
    argv += ["--seeds", "1", "--max-steps", "3", "--repeats", "2", "--peers", "nonexistent-peer"]
    argv += ["--data-dir", str(out / "no-mnist-here"), "--out", str(out / "suite.json")]
    run.main(argv)  # no MNIST there: synthetic images of MNIST's shape
    return json.loads((out / "suite.json").read_text())


def test_suite_smoke_run(suite_run):
    assert suite_run["experiment"] == "suite"
    assert suite_run["environment"]["jax"] == jax.__version__
    task = suite_run["results"]["tasks"]["mlp_mnist"]
    assert task["data"] == "synthetic (28, 28)"
    assert list(task["timing"]) == ["backprop", "pc", "reference"]
    assert set(task["training"]) == {"backprop", "pc"}  # the reference is timed only
    assert task["timing"]["backprop"]["x_backprop"] == pytest.approx(1.0)
    assert task["timing"]["pc"]["x_reference"] > 0
    for timing in task["timing"].values():
        assert timing["times"]["repeats"] == 2
        assert timing["step_seconds"] == timing["times"]["median_s"] > 0
    assert task["runs"]["pc"][0]["curve"][-1][0] == 3  # 3 training steps
    assert 0.0 <= task["training"]["pc"]["accuracy_mean"] <= 1.0
    (peer,) = suite_run["results"]["peers"]
    assert peer["valid"] is False and "unknown peer" in peer["error"]
    table = report.render(suite_run)
    assert "x reference" in table and "nonexistent-peer | unavailable" in table


def test_bad_task_name_is_an_error():
    with pytest.raises(SystemExit):
        run.main(["suite", "--tasks", "imagenet", "--peers", "none"])


def test_no_deprecated_pcjax_calls_in_benchmarks():
    patterns = [r"\btrain_step\(", r"fixed_predictions=True", r"\bfisher=", r"precondition=",
                r"incremental=True", r"infer\([^)]*\bsteps="]  # fmt: skip
    for path in BENCHMARKS.rglob("*.py"):
        if path.name.startswith("peer_") or ".venvs" in path.parts:
            continue  # the peers' scripts run other libraries
        text = path.read_text()
        for pattern in patterns:
            assert not re.search(pattern, text, re.DOTALL), (path.name, pattern)


# ---------------------------------------------------------------------------------------------
# deep and deep-align: reusing runs, reading the alignment


def test_deep_reuses_runs_only_with_the_same_settings(tmp_path):
    from experiments import deep

    config = {"depths": "128", "parameterisations": "mupc", "width": 64, "lr": 0.01}
    runs = {"mupc 128": {"final": 0.9, "diverged": False}}
    env = {"date": "2026-11-29"}
    document = harness.result_document("deep", config, {"runs": runs}, 1.0, env)
    path = tmp_path / "earlier.json"
    harness.write_result(path, document)
    # The per-run settings may differ; the run comes back marked with its source.
    ours = {**config, "depths": "16,128", "parameterisations": "mupc,standard"}
    kept = deep.reusable_runs(str(path), ours)
    assert kept == {"mupc 128": {**runs["mupc 128"], "reused_from": "earlier.json (2026-11-29)"}}
    with pytest.raises(ValueError, match=r"differ in \['lr'\]"):
        deep.reusable_runs(str(path), {**config, "lr": 0.1})


def test_deep_records_the_same_settings_with_or_without_checkpoints():
    """Saving checkpoints does not change a run's results, so it must not change the settings
    recorded with them (else `--reuse` refuses every earlier result file)."""
    import argparse

    from experiments import deep

    parser = argparse.ArgumentParser()
    deep.add_arguments(parser)
    plain = deep.result_config(parser.parse_args([]))
    saving = parser.parse_args(["--checkpoint", "somewhere", "--checkpoint-every", "7"])
    assert deep.result_config(saving) == plain
    recorded = json.loads((BENCHMARKS / "results" / "deep-pc-320.json").read_text())["config"]
    assert set(plain) == set(recorded)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint-every", "0"])


def test_alignment_summary_finds_how_far_the_error_reached():
    from experiments import deep_align

    a = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    b = jnp.array([[0.0, 1.0], [0.0, 3.0], [1.0, 1.0], [1.0, 0.0]])
    grads = type("G", (), {"stem": a[0], "blocks": a[:, :, None], "head": a[3]})
    truth = type("T", (), {"stem": b[0], "blocks": b[:, :, None], "head": b[3]})
    cosines = deep_align.summary(deep_align.alignment(grads, truth))
    # Block cosines 0, 1, 1, 1 (hand-computed): aligned from block 1 up to the head.
    assert cosines["blocks"] == [0.0, 1.0, 1.0, 1.0]
    assert cosines["aligned_from"] == 1
    assert (cosines["stem"], cosines["head"], cosines["blocks_min"]) == (0.0, 1.0, 0.0)
    everywhere = {"stem": 1.0, "head": 1.0, "blocks": np.ones(4)}
    assert deep_align.summary(everywhere)["aligned_from"] == 0
    nowhere = {"stem": 1.0, "head": 1.0, "blocks": np.zeros(4)}
    assert deep_align.summary(nowhere)["aligned_from"] == 4
    # A block the error has not reached has a zero gradient: cosine 0, not NaN.
    assert float(deep_align._cosine(jnp.zeros(3), jnp.ones(3))) == 0.0


def test_deep_backprop_step_is_one_hand_written_sgd_step():
    import optax
    from experiments import deep

    model = nn.ResidualMLP(6, 4, 3, 2, key=jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 6))
    y = jax.nn.one_hot(jnp.arange(5) % 2, 2)
    a, b, c = model.multipliers

    def loss(stem, blocks, head):  # the network written out, blocks unrolled
        h = a * x @ stem.T
        for w in blocks:
            h = h + b * jax.nn.relu(h) @ w.T
        return 0.5 * jnp.sum((y - c * jax.nn.relu(h) @ head.T) ** 2)

    expected = jax.grad(loss, (0, 1, 2))(model.stem, model.blocks, model.head)
    optimizer = optax.sgd(1.0)
    step = deep.backprop_step(nn.call, optimizer)
    new, _, info = step(model, optimizer.init(model), x, {deep.OUTPUT: y})
    moved = (model.stem - new.stem, model.blocks - new.blocks, model.head - new.head)
    for got, want in zip(moved, expected):  # measured 9.7e-8: rounding of params - new
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)
    assert not bool(info.diverged) and not info.energy_rose


def test_deep_curve_view_lines_up_the_runs_by_step():
    config = {"inference": "pc", "width": 4}
    runs = {
        "mupc 128": {"curve": [[200, 0.9], [400, 0.95]]},
        "mupc 16": {"curve": [[400, 0.96]]},
    }
    document = harness.result_document("deep", config, {"runs": runs}, 1.0, {"date": "x"})
    rows = report.render_deep(document, "curve").splitlines()[-2:]
    assert rows == ["| 200 | 0.9000 | - |", "| 400 | 0.9500 | 0.9600 |"]


def test_deep_table_says_which_runs_were_resumed():
    config = {"inference": "backprop", "width": 4, "lr": 0.01, "batch": 8, "seed": 0}
    run = {"curve": [], "epochs": [], "steps": 9, "diverged": False, "final": 0.9}
    runs = {"mupc 128": {**run, "resumed_at_steps": [3, 6]}, "mupc 16": run}
    document = harness.result_document("deep", config, {"runs": runs}, 1.0, {"date": "x"})
    text = report.render_deep(document)
    assert "Resumed from its checkpoint: mupc 128 after step 3, 6 (" in text
    assert "mupc 16 after" not in text


def test_deep_resumes_a_checkpointed_run_exactly(tmp_path, monkeypatch):
    """A run interrupted after its step 7 and started again from its checkpoint (saved after
    step 6, mid-way through the second epoch) ends with the same parameters, optimizer state
    and record as the same run made in one go."""
    import argparse

    import equinox as eqx
    from experiments import deep

    import pcjax as pc

    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(32, 784)).astype(np.float32)
    y_train = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]
    data = (x_train, y_train, jnp.asarray(x_train[:16]), y_train[:16].argmax(1))
    args = argparse.Namespace(
        network="ResidualMLP", width=8, batch=8, epochs=2, max_steps=None, lr=0.01, cosine=True,
        inference="pc", inference_steps=4, state_step=0.2, state_momentum=0.0,
        step_over_depth=False, output_precision=1.0, eval_every=2, checkpoint_every=3, seed=0,
    )  # fmt: skip

    def run(directory):
        return deep.train(
            argparse.Namespace(**vars(args), checkpoint=str(directory)), 2, True, data
        )

    whole = run(tmp_path / "whole")
    built = deep.pc_step

    def interrupted(*a):
        step, calls = built(*a), []

        def counted(*b):
            calls.append(1)
            if len(calls) > 7:
                raise KeyboardInterrupt
            return step(*b)

        return counted

    monkeypatch.setattr(deep, "pc_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    assert pc.checkpoint_metadata(tmp_path / "resumed" / "mupc-2.ckpt")["done"] == 6
    monkeypatch.setattr(deep, "pc_step", built)
    resumed = run(tmp_path / "resumed")
    assert resumed["curve"] == whole["curve"] and resumed["steps"] == whole["steps"] == 8
    like = deep.nn.ResidualMLP(784, 8, 2, 10, key=jax.random.PRNGKey(0))
    optimizer = deep.optax.adam(deep.optax.cosine_decay_schedule(0.01, 8))
    like = (like, optimizer.init(eqx.filter(like, eqx.is_inexact_array)))
    trees = [
        pc.load_checkpoint(path / "mupc-2.ckpt", like)[0]
        for path in (tmp_path / "whole", tmp_path / "resumed")
    ]
    for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"other settings: \['lr'\]"):
        deep.train(
            argparse.Namespace(**{**vars(args), "lr": 0.1}, checkpoint=str(tmp_path / "whole")),
            2,
            True,
            data,
        )


def test_deep_transfer_table_bolds_each_rows_best_learning_rate():
    def cell(depth, width, lr, final, diverged=False):
        return {"depth": depth, "width": width, "lr": lr, "final": final, "diverged": diverged}

    cells = [
        cell(16, 64, 0.01, 0.95),
        cell(16, 64, 0.03, 0.96),
        cell(128, 64, 0.01, 0.97),
        cell(128, 64, 0.03, None, diverged=True),
    ]
    config = {"inference": "epc", "inference_steps": 1, "state_step": 0.25, "max_steps": 9}
    config |= {"batch": 8, "seed": 0}
    document = harness.result_document("deep-transfer", config, {"cells": cells}, 1.0, {})
    rows = report.render_deep_transfer(document).splitlines()[-2:]
    assert rows == ["| 16 | 64 | 0.9500 | **0.9600** |", "| 128 | 64 | **0.9700** | diverged |"]


# ---------------------------------------------------------------------------------------------
# equilibrium targets: the budget search against closed forms


def _linear_case(targets):
    """A linear chain x -> h -> y (y clamped): the field is affine in h, g(h) = h H - b with
    H = I + W2 W2^T per sample, so gradient descent's field is g_t = g_0 (I - eta H)^t."""
    key1, key2, key3, key4 = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {"w1": jax.random.normal(key1, (2, 3)), "w2": 0.5 * jax.random.normal(key2, (3, 2))}
    x, y = jax.random.normal(key3, (4, 2)), jax.random.normal(key4, (4, 2))

    def net(p, x):
        import pcjax as pc

        h = pc.node("h", x @ p["w1"])
        return pc.node("y", h @ p["w2"])

    return targets.Case("linear", "linear", net, params, x, y, "y", None, 0.1, "sgd", 8)


def test_equilibrium_targets_finds_the_closed_form_count_of_gradient_descent():
    from experiments import equilibrium_targets as targets

    case = _linear_case(targets)
    w1, w2 = (np.asarray(case.params[k], np.float64) for k in ("w1", "w2"))
    x, y = np.asarray(case.x, np.float64), np.asarray(case.y, np.float64)
    hessian = np.eye(3) + w2 @ w2.T
    field = x @ w1 @ hessian - x @ w1 - y @ w2.T  # g(h0) at the feedforward h0 = x W1
    ratios, g = [], field
    for _ in range(400):
        ratios.append(np.max(np.linalg.norm(g, axis=1) / np.linalg.norm(field, axis=1)))
        g = g @ (np.eye(3) - case.step * hessian)
    steps = next(t for t, r in enumerate(ratios) if r <= targets.TARGET)
    # away from the threshold, so float32 cannot move the count (measured 8.9e-4 and 1.0e-3)
    assert ratios[steps] < 0.95e-3 and ratios[steps - 1] > 1e-3, ratios[steps - 1 : steps + 1]
    start = np.linalg.norm(field, axis=1)  # only the ODE row uses them
    row = targets.measure(targets.SOLVERS[0], case, 400, 1, start)
    assert row["reached"] and row["size"] == steps
    assert row["evaluations"] == steps + 1  # the caller's final evaluation included
    assert row["certificate"] <= targets.TARGET


def test_backtracking_trace_places_accepted_proposals_and_all_rejected_iterations():
    from experiments import equilibrium_targets as targets

    # (energy, field norm) of each evaluation: the start; iteration 0: one rejected proposal,
    # then an accepted one; iteration 1: two rejected (the states stay); iteration 2: rejected,
    # accepted; iteration 3: accepted at once
    pairs = [(5, 8), (9, 50), (4, 4), (9, 60), (9.2, 70), (9.5, 90), (3, 3), (1, 1)]
    stream = [(float(e), np.array([float(n)])) for e, n in pairs]
    info = type("Info", (), {"energies": np.array([5.0, 4.0, 4.0, 3.0]), "energy": 1.0})()
    trace = targets.trace_backtracking(stream, info, 4)
    assert trace == [(0, 1.0), (1, 0.5), (2, 0.5), (3, 3 / 8), (4, 1 / 8)]
