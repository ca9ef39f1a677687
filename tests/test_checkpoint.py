"""Checkpoints (round trip, atomic writes, clear errors), resumed training bit for bit, and
determinism: the same seed gives the same bits on the CPU."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import trees_equal

import pcjax as pc
from pcjax import demo, nn

DEMO_ARGS = ["--no-download", "--epochs", "2", "--hidden", "32", "--inference-steps", "3"]
DEMO_ARGS += ["--batch-size", "128", "--lr", "3e-3"]


def _state(key):
    model = nn.MLP([5, 4, 3], key=key)
    optimizer = optax.adam(1e-2)
    return {
        "model": model,
        "opt_state": optimizer.init(eqx.filter(model, eqx.is_inexact_array)),
        "precision": {"h1": pc.DiagonalPrecision(jnp.arange(1.0, 4.0)), "h0": pc.FullPrecision(
            jnp.eye(4) * 2.0
        )},
        "half": jnp.linspace(0, 1, 3).astype(jnp.bfloat16),
        "double": jnp.linspace(0, 1, 3, dtype=jnp.float64),
        "step": 7,
    }  # fmt: skip


def test_round_trip_is_exact(tmp_path):
    state = _state(jax.random.PRNGKey(0))
    path = pc.save_checkpoint(tmp_path / "run.ckpt", state, metadata={"epoch": 3, "tag": "a"})
    restored, meta = pc.load_checkpoint(path, _state(jax.random.PRNGKey(1)))
    assert meta == {"epoch": 3, "tag": "a"} == pc.checkpoint_metadata(path)
    assert trees_equal(restored, state) and restored["step"] == 7
    assert restored["half"].dtype == jnp.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary files left


def test_mismatch_and_foreign_files_are_clear_errors(tmp_path):
    path = pc.save_checkpoint(tmp_path / "run.ckpt", _state(jax.random.PRNGKey(0)))
    other = _state(jax.random.PRNGKey(0))
    other["half"] = jnp.zeros(4, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\['half'\] has shape \(3,\).*shape \(4,\)"):
        pc.load_checkpoint(path, other)
    with pytest.raises(ValueError, match="holds 17 arrays but `like` has 16"):
        pc.load_checkpoint(path, {k: v for k, v in other.items() if k != "double"})
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a pcjax checkpoint"):
        pc.load_checkpoint(tmp_path / "notes.txt", other)


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = pc.save_checkpoint(tmp_path / "run.ckpt", {"w": jnp.ones(3)}, metadata={"epoch": 1})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(eqx, "tree_serialise_leaves", crash)
    with pytest.raises(KeyboardInterrupt):
        pc.save_checkpoint(path, {"w": jnp.zeros(3)}, metadata={"epoch": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


def _problem():
    key_x, key_y, key_m = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(key_x, (6, 16, 5))
    y = jax.random.normal(key_y, (6, 16, 3))
    model = nn.MLP([5, 8, 3], key=key_m)
    optimizer = optax.adam(1e-2)
    step = jax.jit(
        functools.partial(pc.train_step, nn.call, optimizer=optimizer, steps=4, step_size=0.2)
    )
    return model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)), step, x, y


def _train(model, opt_state, step, x, y, batches):
    for i in batches:
        model, opt_state, _ = step(model, opt_state, x[i], {"h1": y[i]})
    return model, opt_state


def test_resumed_training_matches_uninterrupted_bit_for_bit(tmp_path):
    model, opt_state, step, x, y = _problem()
    straight = _train(model, opt_state, step, x, y, range(6))
    first = _train(model, opt_state, step, x, y, range(3))
    pc.save_checkpoint(tmp_path / "half.ckpt", first, metadata={"batches": 3})
    fresh_model, fresh_state, *_ = _problem()
    restored, meta = pc.load_checkpoint(tmp_path / "half.ckpt", (fresh_model, fresh_state))
    resumed = _train(*restored, step, x, y, range(meta["batches"], 6))
    assert trees_equal(resumed, straight)


def test_same_seed_same_bits():
    runs = []
    for _ in range(2):
        model, opt_state, step, x, y = _problem()
        runs.append(_train(model, opt_state, step, x, y, range(6)))
    assert trees_equal(*runs)
    # Monte Carlo PC (Langevin inference) is deterministic given its key.
    model, _, _, x, y = _problem()
    states = {"h0": pc.forward_init(nn.call, model, x[0])["h0"]}

    def sample(key):
        return pc.infer(
            nn.call, model, states, x[0], {"h1": y[0]}, steps=5,
            optimizer=pc.langevin(0.05, key),
        )[0]  # fmt: skip

    key = jax.random.PRNGKey(3)
    assert trees_equal(sample(key), sample(key))
    assert not trees_equal(sample(key), sample(jax.random.PRNGKey(4)))


def test_demo_killed_and_resumed_ends_bit_for_bit_like_an_uninterrupted_run(tmp_path, capsys):
    data = ["--data-dir", str(tmp_path / "no-mnist")]
    straight, resumed = tmp_path / "straight.ckpt", tmp_path / "resumed.ckpt"
    accuracy = demo.main([*DEMO_ARGS, *data, "--checkpoint", str(straight)])
    demo.main([*DEMO_ARGS, *data, "--checkpoint", str(resumed), "--stop-after", "1"])
    assert pc.checkpoint_metadata(resumed)["epoch"] == 1
    out = capsys.readouterr().out
    assert "stopped after epoch 1 of 2" in out
    resumed_accuracy = demo.main([*DEMO_ARGS, *data, "--checkpoint", str(resumed)])
    assert "resumed from" in capsys.readouterr().out
    assert resumed.read_bytes() == straight.read_bytes()
    assert resumed_accuracy == accuracy
    with pytest.raises(SystemExit, match="other settings"):
        demo.main([*DEMO_ARGS[:-1], "1e-3", *data, "--checkpoint", str(resumed)])
