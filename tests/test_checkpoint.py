"""Checkpoints (round trip, atomic writes, clear errors), resumed training bit for bit, and
determinism: the same seed gives the same bits on the CPU."""

from __future__ import annotations

import json
import re
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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


@pytest.mark.x64
def test_round_trip_is_exact(tmp_path):
    state = _state(jax.random.PRNGKey(0))
    path = pc.save_checkpoint(tmp_path / "run.ckpt", state, metadata={"epoch": 3, "tag": "a"})
    restored, meta = pc.load_checkpoint(path, _state(jax.random.PRNGKey(1)))
    assert meta == {"epoch": 3, "tag": "a"} == pc.checkpoint_metadata(path)
    assert trees_equal(restored, state) and restored["step"] == 7
    assert restored["half"].dtype == jnp.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary files left


@pytest.mark.x64
def test_mismatch_and_foreign_files_are_clear_errors(tmp_path):
    path = pc.save_checkpoint(tmp_path / "run.ckpt", _state(jax.random.PRNGKey(0)))
    other = _state(jax.random.PRNGKey(0))
    other["half"] = jnp.zeros(4, jnp.bfloat16)
    with pytest.raises(
        ValueError, match=r"\['half'\] differs: bfloat16\[3\] array .*bfloat16\[4\] array"
    ):
        pc.load_checkpoint(path, other)
    with pytest.raises(ValueError, match=r"has leaf \['double'\], which `like` lacks"):
        pc.load_checkpoint(path, {k: v for k, v in other.items() if k != "double"})
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a pcjax checkpoint"):
        pc.load_checkpoint(tmp_path / "notes.txt", other)


def _arrays():
    return np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)


@pytest.mark.parametrize(
    ("saved", "like", "first"),
    [
        # renamed keys, same shapes and dtypes
        (lambda a, b: {"w1": a, "w2": b}, lambda a, b: {"layer1": a, "layer2": b}, r"\['w1'\]"),
        # a dict loaded into a list
        (lambda a, b: {"w1": a, "w2": b}, lambda a, b: [a, b], r"\['w1'\]"),
        # a dict with integer keys loaded into a list: same key strings, other containers
        (lambda a, b: {0: a, 1: b}, lambda a, b: [a, b], r"\[0\] .*dict key.*sequence index"),
        # non-array leaves count too: a stored scalar of another type, a leaf `like` lacks
        (lambda a, b: (a, 7), lambda a, b: (a, 0.0), r"\[1\] differs: int scalar.* float scalar"),
        (lambda a, b: {"w": a, "act": jnp.tanh}, lambda a, b: {"w": a}, r"\['act'\]"),
    ],
    ids=["renamed-keys", "dict-into-list", "int-keyed-dict-into-list", "scalar-type", "static"],
)
def test_load_compares_leaf_paths_and_structure(tmp_path, saved, like, first):
    path = pc.save_checkpoint(tmp_path / "run.ckpt", saved(*_arrays()))
    with pytest.raises(ValueError, match=rf"^pcjax: .*{re.escape(str(path))}.*{first}"):
        pc.load_checkpoint(path, like(*_arrays()))
    restored, _ = pc.load_checkpoint(path, saved(*_arrays()))  # the same structure loads
    assert trees_equal(restored, saved(*_arrays()))


def test_shape_only_like_and_numpy_leaves(tmp_path):
    tree = {"w": jnp.arange(3.0), "n": np.arange(4, dtype=np.int16), "step": 7}
    path = pc.save_checkpoint(tmp_path / "run.ckpt", tree)
    restored, _ = pc.load_checkpoint(path, eqx.filter_eval_shape(lambda: tree))
    assert trees_equal(restored, tree) and isinstance(restored["n"], jax.Array)
    restored, _ = pc.load_checkpoint(path, {**tree, "n": np.zeros(4, np.int16)})
    assert trees_equal(restored, tree) and isinstance(restored["n"], np.ndarray)


MAGIC = b"PCJAX-CHECKPOINT-2\n"


def _craft(path, header, payload=b""):
    """A checkpoint written by hand from the documented layout: the magic line, the header's length
    (8 bytes) and CRC-32 (4 bytes), both little-endian, the UTF-8 JSON header, the arrays."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size, crc = len(raw).to_bytes(8, "little"), zlib.crc32(raw).to_bytes(4, "little")
    path.write_bytes(MAGIC + size + crc + raw + payload)
    return path


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1 :]


def _header_end(good: bytes) -> int:
    return len(MAGIC) + 12 + int.from_bytes(good[len(MAGIC) : len(MAGIC) + 8], "little")


# Damaged copies of a good checkpoint: (name, damage, phrase of the error).
DAMAGED = [
    ("empty", lambda g: b"", "empty"),
    ("half-magic", lambda g: g[:7], "truncated"),
    ("magic-only", lambda g: g[: len(MAGIC)], "truncated"),
    ("cut-in-length", lambda g: g[: len(MAGIC) + 5], "truncated"),
    ("cut-in-header", lambda g: g[: len(MAGIC) + 30], "truncated"),
    ("no-arrays", lambda g: g[: _header_end(g)], "truncated"),
    ("cut-in-arrays", lambda g: g[:-9], "truncated"),
    ("trailing-bytes", lambda g: g + b"\0" * 5, "5 unexpected bytes after"),
    ("header-flipped", lambda g: _flip(g, _header_end(g) - 20), "header is corrupted"),
    ("huge-length", lambda g: g[: len(MAGIC)] + b"\xff" * 8 + g[len(MAGIC) + 8 :], "truncated"),
    ("foreign", lambda g: b"hello, world", "not a pcjax checkpoint"),
    ("old-format", lambda g: b"PCJAX-CHECKPOINT-1\n" + g[len(MAGIC) :], "older"),
]
# Hand-made headers with a valid checksum but the wrong content: (name, header, phrase).
GOOD_LEAVES = [["['step']", "d", "scalar", None, "int"], ["['w']", "d", "array", [3], "float32"]]
EMPTY = {"metadata": {}, "leaves": [], "arrays": {"bytes": 0, "crc32": 0}}
CRAFTED = [
    ("not-utf8", b"\xff\xfe{}", "not UTF-8 JSON"),
    ("not-json", b"{metadata: 1", "not UTF-8 JSON"),
    ("deep-json", b"[" * 100_000, "not UTF-8 JSON"),
    ("a-list", [], "not a JSON object"),
    ("missing-keys", {"metadata": {}}, "keys"),
    ("extra-key", {**EMPTY, "more": 1}, "keys"),
    ("metadata-list", {**EMPTY, "metadata": []}, "metadata"),
    ("leaves-dict", {**EMPTY, "leaves": {}}, "leaves"),
    ("bad-kind", {**EMPTY, "leaves": [["[0]", "s", "blob", None, None]]}, r"leaves\[0\]"),
    ("bad-shape", {**EMPTY, "leaves": [["[0]", "s", "array", [-1], "float32"]]}, r"leaves\[0\]"),
    ("bad-keys", {**EMPTY, "leaves": [GOOD_LEAVES[0], ["[0]", "x", "array", [1], "f4"]]},
     r"leaves\[1\]"),
    ("short-record", {**EMPTY, "leaves": [["[0]", "s", "static"]]}, r"leaves\[0\]"),
    ("bad-bytes", {**EMPTY, "arrays": {"bytes": True, "crc32": 0}}, "arrays"),
    ("bad-crc", {**EMPTY, "arrays": {"bytes": 0, "crc32": -1}}, "arrays"),
]  # fmt: skip


def _like():
    return {"w": np.zeros(3, np.float32), "step": 0}


@pytest.mark.parametrize(
    ("damage", "phrase"), [c[1:] for c in DAMAGED], ids=[c[0] for c in DAMAGED]
)
def test_damaged_files_are_clear_errors(tmp_path, damage, phrase):
    good = pc.save_checkpoint(
        tmp_path / "good.ckpt",
        {"w": np.arange(3, dtype=np.float32), "step": 3},
        metadata={"epoch": 2},
    )
    path = tmp_path / "bad.ckpt"
    path.write_bytes(damage(good.read_bytes()))
    pattern = rf"^pcjax: .*`path` {re.escape(str(path))}.*{phrase}"
    with pytest.raises(ValueError, match=pattern):
        pc.load_checkpoint(path, _like())
    with pytest.raises(ValueError, match=pattern):
        pc.checkpoint_metadata(path)


@pytest.mark.parametrize(
    ("header", "phrase"), [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED]
)
def test_malformed_headers_are_clear_errors(tmp_path, header, phrase):
    path = _craft(tmp_path / "bad.ckpt", header)
    pattern = rf"^pcjax: .*`path` {re.escape(str(path))}.*{phrase}"
    with pytest.raises(ValueError, match=pattern):
        pc.checkpoint_metadata(path)
    with pytest.raises(ValueError, match=pattern):
        pc.load_checkpoint(path, _like())


def test_every_truncation_and_bit_flip_is_a_clear_error(tmp_path):
    good = pc.save_checkpoint(
        tmp_path / "good.ckpt",
        {"w": np.arange(3, dtype=np.float32), "step": 3},
        metadata={"epoch": 2},
    ).read_bytes()
    # every position in the magic line, lengths, checksum and header; every 5th in the arrays
    end = _header_end(good)
    positions = [*range(end), *range(end, len(good), 5)]
    damaged = [good[:n] for n in positions]
    damaged += [good[:i] + bytes([good[i] ^ 1]) + good[i + 1 :] for i in positions]
    for i, data in enumerate(damaged):
        path = tmp_path / f"bad-{i}.ckpt"  # new files: rewriting one is slow on some disks
        path.write_bytes(data)
        pattern = rf"^pcjax: .*`path` {re.escape(str(path))}"
        with pytest.raises(ValueError, match=pattern):
            pc.load_checkpoint(path, _like())
        if data[:end] != good[:end] or len(data) < len(good):
            with pytest.raises(ValueError, match=pattern):  # unless only the arrays changed
                pc.checkpoint_metadata(path)


def test_corrupted_or_inconsistent_arrays_are_clear_errors(tmp_path):
    good = pc.save_checkpoint(
        tmp_path / "good.ckpt",
        {"w": np.arange(3, dtype=np.float32), "step": 3},
        metadata={"epoch": 2},
    )
    data = good.read_bytes()
    path = tmp_path / "bad.ckpt"
    path.write_bytes(_flip(data, len(data) - 3))  # a flipped bit in the last array
    assert pc.checkpoint_metadata(path) == {"epoch": 2}  # the header alone is intact
    with pytest.raises(
        ValueError, match=rf"^pcjax: .*{re.escape(str(path))}.*arrays are corrupted"
    ):
        pc.load_checkpoint(path, _like())
    # Arrays with a valid checksum that do not hold what the header lists.
    payload = b"not numpy data"
    header = {"metadata": {}, "leaves": GOOD_LEAVES,
              "arrays": {"bytes": len(payload), "crc32": zlib.crc32(payload)}}  # fmt: skip
    _craft(path, header, payload)
    with pytest.raises(ValueError, match=rf"^pcjax: .*{re.escape(str(path))}.*cannot be read"):
        pc.load_checkpoint(path, _like())


def test_missing_files_and_directories_are_clear_errors(tmp_path):
    missing = tmp_path / "missing.ckpt"
    for read in (pc.checkpoint_metadata, lambda p: pc.load_checkpoint(p, _like())):
        with pytest.raises(FileNotFoundError, match=rf"^pcjax: .*{re.escape(str(missing))}"):
            read(missing)
        with pytest.raises(ValueError, match=rf"^pcjax: .*{re.escape(str(tmp_path))} is a dir"):
            read(tmp_path)
    with pytest.raises(ValueError, match=rf"^pcjax: .*{re.escape(str(tmp_path))} is a dir"):
        pc.save_checkpoint(tmp_path, _like())
    blocked = tmp_path / "a-file" / "run.ckpt"  # its parent directory cannot be created
    blocked.parent.write_text("")
    with pytest.raises(OSError, match=rf"^pcjax: .*{re.escape(str(blocked))}"):
        pc.save_checkpoint(blocked, _like())


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        ({"epoch": 2, "opt": {"lr": np.float32(0.1)}}, r"\['opt'\]\['lr'\].*float32"),
        ({"epoch": 2, "tags": ["a", {"b"}]}, r"\['tags'\]\[1\].*set"),
        ({"epoch": 2, "runs": {1: "a"}}, r"\['runs'\].*key 1"),
        ([("epoch", 2)], "must be a dict"),
        ("cyclic", r"\['self'\].*refers to itself"),
    ],
    ids=["numpy-scalar", "set", "int-key", "not-a-dict", "cyclic"],
)
def test_unserialisable_metadata_is_refused_before_writing(tmp_path, metadata, where):
    path = pc.save_checkpoint(tmp_path / "run.ckpt", _like(), metadata={"epoch": 1})
    before = path.read_bytes()
    if metadata == "cyclic":
        metadata = {"epoch": 2}
        metadata["self"] = metadata
    with pytest.raises(ValueError, match=rf"^pcjax: .*`metadata`.*{where}"):
        pc.save_checkpoint(path, _like(), metadata=metadata)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


@pytest.mark.parametrize(
    ("tree", "where"),
    [
        (lambda: {"ok": np.ones(2), "x": np.array([1, "a"], dtype=object)}, r"\['x'\].*object"),
        (lambda: {"key": jax.random.key(0)}, r"\['key'\].*key_data"),
        (lambda: {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, r"\['w'\].*ShapeDtypeStruct"),
        (lambda: {"w": jnp.ones(2)}, r"\['w'\].*traced"),  # saved inside jit, see below
    ],
    ids=["object-array", "typed-key", "shape-only", "traced"],
)
def test_unsavable_leaves_are_refused_before_writing(tmp_path, tree, where):
    def save(tree):
        return pc.save_checkpoint(tmp_path / "run.ckpt", tree)

    with pytest.raises(ValueError, match=rf"^pcjax: .*`tree`.*{where}"):
        jax.jit(save)(tree()) if "traced" in where else save(tree())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("crash_in", ["serialisation", "fsync"])
def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch, crash_in):
    path = pc.save_checkpoint(tmp_path / "run.ckpt", {"w": jnp.ones(3)}, metadata={"epoch": 1})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    if crash_in == "serialisation":
        monkeypatch.setattr(eqx, "tree_serialise_leaves", crash)
    else:  # the new file is written but not yet on disk
        monkeypatch.setattr("os.fsync", crash)
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
        pc.make_train_step(nn.call, pc.Equilibrium(pc.GradientDescent(4, step_size=0.2)), optimizer)
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
            nn.call,
            model,
            states,
            x[0],
            {"h1": y[0]},
            key=key,
            solver=pc.GradientDescent(5, pc.langevin(0.05)),
        )[0]

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
