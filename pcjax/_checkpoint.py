r"""Checkpoints: any pytree of arrays (parameters, optimizer states, precisions) to one file.

Layout (integers little-endian):

    b"PCJAX-CHECKPOINT-2\n"   the magic line
    8 bytes                   n, the length of the header
    4 bytes                   the CRC-32 of the header
    n bytes                   the header, UTF-8 JSON: {"metadata": {...}, "leaves": [...],
                              "containers": [...], "arrays": {"bytes": m, "crc32": c}}
    m bytes                   the stored leaves in equinox's serialisation format (one .npy
                              record per array or scalar leaf), with CRC-32 c

`leaves` describes every leaf of the tree, stored or not, as `[path, keys, kind, shape, dtype]`:
the leaf's `jax.tree_util.keystr` path, one letter per path entry for the kind of container
(`d` dict key, `s` sequence index, `a` attribute, `f` flattened index, `?` other), and `kind`
`"array"` (with shape and dtype), `"scalar"` (a Python or NumPy scalar, with its type name) or
`"static"` (not stored; it comes from `like`). `containers` lists, for every leaf, the class names
of the containers on its path from the root (e.g. `["dict", "Linear"]`), so that a tuple is not
taken for a list, nor an `eqx.nn.Linear` for another module with the same fields (files written
before this record was added lack it and are checked by the path records alone). Loading compares
these records with those of `like` exactly, so renamed keys, other containers and other shapes or
dtypes are refused before any array is read; the sizes and checksums catch truncated, extended and
corrupted files. The loaded tree has the structure of `like`.

Writes are atomic: the data go to a temporary file in the same directory, are flushed to disk,
and only then replace the target, so a crash leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

MAGIC = b"PCJAX-CHECKPOINT-2\n"
_FAMILY = b"PCJAX-CHECKPOINT-"
_PREFIX = len(MAGIC) + 12  # magic line, header length, header CRC-32
_HEADER_KEYS = ("metadata", "leaves", "arrays")
_OPTIONAL_KEYS = ("containers",)
_KEY_LETTERS = {jtu.DictKey: "d", jtu.SequenceKey: "s", jtu.GetAttrKey: "a"}
_KEY_LETTERS[jtu.FlattenedIndexKey] = "f"
_KEY_WORDS = {"d": "dict key", "s": "sequence index", "a": "attribute", "f": "flattened index"}
_KEY_WORDS["?"] = "other key"
_JSON_SCALARS = (str, int, float, bool, type(None))

Record = list[Any]  # [path, keys, kind, shape, dtype]


# ----------------------------------------------------------------------------- leaf records


def _record(key_path: tuple[Any, ...], leaf: Any) -> Record:
    """The header record of one leaf (see the module docstring)."""
    path = jtu.keystr(key_path)
    keys = "".join(_KEY_LETTERS.get(type(k), "?") for k in key_path)
    if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return [path, keys, "array", [int(d) for d in leaf.shape], str(leaf.dtype)]
    if eqx.is_array_like(leaf):  # stored by equinox, loaded back as type(leaf)
        return [path, keys, "scalar", None, type(leaf).__name__]
    return [path, keys, "static", None, None]


def _records(tree: Any) -> list[Record]:
    return [_record(p, leaf) for p, leaf in jtu.tree_flatten_with_path(tree)[0]]


def _containers(tree: Any) -> list[list[str]]:
    """For every leaf of `tree` (in flattening order), the class names of the containers on its
    path from the root."""
    chains: list[list[str]] = []

    def walk(treedef: Any, chain: list[str]) -> None:
        data = treedef.node_data()
        if data is None:  # a leaf
            chains.append(chain)
            return
        inner = [*chain, data[0].__qualname__]
        for child in treedef.children():
            walk(child, inner)

    walk(jax.tree.structure(tree), [])
    return chains


def _container_difference(
    stored: list[list[str]], expected: list[list[str]], paths: list[str]
) -> str | None:
    """The first leaf whose containers differ between the checkpoint and `like`, in words."""
    for path, s, e in zip(paths, stored, expected):
        if s == e:
            continue
        depth = next((i for i, (a, b) in enumerate(zip(s, e)) if a != b), min(len(s), len(e)))
        saved = s[depth] if depth < len(s) else "nothing"
        wanted = e[depth] if depth < len(e) else "nothing"
        where = "the root" if depth == 0 else f"depth {depth} of its path"
        return (
            f"leaf {path} sits in a {saved} in the checkpoint but in a {wanted} in `like` (at "
            f"{where}); build `like` with the saved classes ({' > '.join(s)})"
        )
    return None


def _unsavable(leaf: Any) -> str | None:
    """Why `leaf` cannot be stored, or None."""
    if isinstance(leaf, jax.core.Tracer):
        return (
            "is traced (save_checkpoint was called inside jit, vmap or grad); save concrete "
            "values outside the transformation"
        )
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return "is a jax.ShapeDtypeStruct, which holds no values"
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return (
            "is a typed PRNG key array; store jax.random.key_data(key) and rebuild the key with "
            "jax.random.wrap_key_data"
        )
    if isinstance(leaf, np.ndarray) and leaf.dtype.hasobject:
        return "is a NumPy array of dtype object, which cannot be stored without pickling"
    return None


def _describe(record: Record) -> str:
    _, _, kind, shape, dtype = record
    if kind == "array":
        return f"{dtype}{shape} array"
    return f"{dtype} scalar" if kind == "scalar" else "non-array leaf (not stored)"


def _difference(stored: list[Record], expected: list[Record]) -> str | None:
    """The first difference between the checkpoint's records and `like`'s, in words."""
    for i in range(max(len(stored), len(expected))):
        s = stored[i] if i < len(stored) else None
        e = expected[i] if i < len(expected) else None
        if s == e:
            continue
        if s is None or e is None or s[0] != e[0]:
            if s is not None and s[0] not in {r[0] for r in expected}:
                there = "" if e is None else f" (`like` has {e[0]} there)"
                return f"the checkpoint has leaf {s[0]}, which `like` lacks{there}"
            if e is not None and e[0] not in {r[0] for r in stored}:
                there = "" if s is None else f" (the checkpoint has {s[0]} there)"
                return f"`like` has leaf {e[0]}, which the checkpoint lacks{there}"
            assert s is not None and e is not None  # a path on both sides, in another order
            return f"leaf {i} is {s[0]} in the checkpoint but {e[0]} in `like` (another order)"
        if s[1] != e[1]:
            words = [", ".join(_KEY_WORDS[c] for c in r[1]) for r in (s, e)]
            return (
                f"leaf {s[0]} is reached through ({words[0]}) in the checkpoint but through "
                f"({words[1]}) in `like`: other containers, e.g. a dict where `like` has a list"
            )
        return f"leaf {s[0]} differs: {_describe(s)} in the checkpoint, {_describe(e)} in `like`"
    return None


# ----------------------------------------------------------------------------- metadata


def _check_metadata(value: Any, where: str, open_containers: set[int]) -> str | None:
    """Why `value` (found at `metadata{where}`) cannot round-trip through JSON, or None.

    JSON keeps str, int, float, bool, None, lists (tuples come back as lists) and dicts with
    string keys; anything else (NumPy scalars, arrays, sets, other keys, cycles) is refused."""
    if isinstance(value, _JSON_SCALARS):
        return None
    if not isinstance(value, (dict, list, tuple)):
        return (
            f"`metadata`{where} is a {type(value).__name__} ({value!r:.60}), which JSON cannot "
            "store; convert it to Python numbers, strings, lists and dicts (e.g. float(x), "
            "x.tolist())"
        )
    if id(value) in open_containers:
        return f"`metadata`{where} refers to itself (a cycle), which JSON cannot store"
    open_containers.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(value, dict) and not isinstance(key, str):
            return (
                f"`metadata`{where} has key {key!r} ({type(key).__name__}); JSON keys are "
                "strings, so it would come back changed"
            )
        problem = _check_metadata(item, f"{where}[{key!r}]", open_containers)
        if problem is not None:
            return problem
    open_containers.discard(id(value))
    return None


# ----------------------------------------------------------------------------- files


def _as_path(path: Any) -> Path:
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"pcjax: `path` must be a str or os.PathLike, got {type(path).__name__}.")
    path = Path(os.fsdecode(path))
    if "\0" in str(path):
        raise ValueError(f"pcjax: `path` {str(path)!r} contains a NUL character.")
    return path


def _os_error(error: OSError, what: str) -> OSError:
    """`error` again (same type, so e.g. PermissionError stays one) with a pcjax message."""
    return type(error)(f"pcjax: {what}: {error.strerror or error}.")


def _open(path: Path) -> BinaryIO:
    if path.is_dir():
        raise ValueError(f"pcjax: checkpoint `path` {path} is a directory, not a checkpoint file.")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"pcjax: checkpoint `path` {path} does not exist.") from None
    except OSError as error:
        raise _os_error(error, f"cannot read checkpoint `path` {path}") from error


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _valid_record(record: Any) -> bool:
    if not (isinstance(record, list) and len(record) == 5):
        return False
    path, keys, kind, shape, dtype = record
    if not (isinstance(path, str) and isinstance(keys, str) and set(keys) <= set(_KEY_WORDS)):
        return False
    if kind == "array":
        shape_ok = isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
        return shape_ok and isinstance(dtype, str)
    if kind == "scalar":
        return shape is None and isinstance(dtype, str)
    return kind == "static" and shape is None and dtype is None


def _header_problem(header: Any) -> str | None:
    """What is wrong with a decoded header, or None."""
    if not isinstance(header, dict):
        return f"it is not a JSON object but a {type(header).__name__}"
    if not set(_HEADER_KEYS) <= set(header) <= {*_HEADER_KEYS, *_OPTIONAL_KEYS}:
        return f"its keys are {sorted(header)}, expected {sorted(_HEADER_KEYS)} (and `containers`)"
    if not isinstance(header["metadata"], dict):
        return "its `metadata` is not a JSON object"
    if not isinstance(header["leaves"], list):
        return "its `leaves` is not a list"
    for i, record in enumerate(header["leaves"]):
        if not _valid_record(record):
            return f"leaves[{i}] = {record!r:.80} is not a [path, keys, kind, shape, dtype] record"
    containers = header.get("containers", [])
    if "containers" in header and not (
        isinstance(containers, list)
        and len(containers) == len(header["leaves"])
        and all(isinstance(c, list) and all(isinstance(n, str) for n in c) for c in containers)
    ):
        return "its `containers` is not a list of lists of class names, one per leaf"
    arrays = header["arrays"]
    if not (
        isinstance(arrays, dict)
        and sorted(arrays) == ["bytes", "crc32"]
        and _is_int(arrays["bytes"])
        and arrays["bytes"] >= 0
        and _is_int(arrays["crc32"])
        and 0 <= arrays["crc32"] < 2**32
    ):
        return f'its `arrays` = {arrays!r:.80} is not {{"bytes": n >= 0, "crc32": c}}'
    return None


def _read_header(f: BinaryIO, path: Path) -> dict[str, Any]:
    """Check the layout of the open checkpoint `f` and return its header; `f` is then at the
    start of the arrays, which fill the rest of the file exactly."""
    where = f"pcjax: checkpoint `path` {path}"
    size = os.fstat(f.fileno()).st_size
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        if not magic:
            raise ValueError(f"{where} is empty (0 bytes).")
        if MAGIC.startswith(magic):
            raise ValueError(f"{where} is truncated: it ends within its first line.")
        if magic.startswith(_FAMILY) and magic.endswith(b"\n"):
            raise ValueError(
                f"{where} is in an older or newer checkpoint format "
                f"({magic.decode(errors='replace').strip()!r}); this pcjax reads "
                f"{MAGIC.decode().strip()!r} only: write the checkpoint again with this version."
            )
        raise ValueError(f"{where} is not a pcjax checkpoint (it does not start with {MAGIC!r}).")
    prefix = f.read(12)
    if len(prefix) < 12:
        raise ValueError(f"{where} is truncated: it ends within the length of its header.")
    length, crc = int.from_bytes(prefix[:8], "little"), int.from_bytes(prefix[8:], "little")
    if length > size - _PREFIX:
        raise ValueError(
            f"{where} is truncated or corrupted: its header should have {length} bytes, but only "
            f"{size - _PREFIX} follow."
        )
    raw = f.read(length)
    if zlib.crc32(raw) != crc:
        raise ValueError(f"{where}: its header is corrupted (its CRC-32 does not match).")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError, JSONDecodeError, ...
        raise ValueError(f"{where}: its header is not UTF-8 JSON ({error}).") from None
    problem = _header_problem(header)
    if problem is not None:
        raise ValueError(f"{where}: its header is malformed: {problem}.")
    stored, present = header["arrays"]["bytes"], size - _PREFIX - length
    if present < stored:
        raise ValueError(
            f"{where} is truncated: its arrays should have {stored} bytes, but only {present} "
            "are there."
        )
    if present > stored:
        raise ValueError(
            f"{where} has {present - stored} unexpected bytes after its arrays (it was appended "
            "to or corrupted)."
        )
    return header


# ----------------------------------------------------------------------------- public API


def save_checkpoint(
    path: str | os.PathLike, tree: Any, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `tree` (any pytree of arrays: params, optimizer states, precision modules, ...) and
    JSON-serialisable `metadata` (step counters, RNG state, settings) to `path`, atomically.

    Python and NumPy scalars in `tree` are stored too; other non-array leaves (functions, static
    fields) are not, and come from `like` when loading. `metadata` is a dict of str, int, float,
    bool, None, lists and str-keyed dicts (tuples come back as lists).

    **Arguments:**

    - `path`: the file to write (its folder must exist); an existing file is replaced only
      once the new one is complete.
    - `tree`: the pytree to store.
    - `metadata`: keyword; a JSON-serialisable dict, default None (empty).

    **Returns:** the path written, a `pathlib.Path`.

    **Raises:** `ValueError`, before anything is written, if `path` is a directory, if
    `metadata` holds something JSON cannot store (the key is named), or if a leaf of `tree`
    cannot be stored (traced values, typed PRNG keys, object arrays; the leaf is named).

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "step100.ckpt"
    >>> opt_state = optax.adam(1e-3).init(params)
    >>> pc.save_checkpoint(path, (params, opt_state), metadata={"step": 100}).name
    'step100.ckpt'
    >>> (params2, opt_state2), metadata = pc.load_checkpoint(path, like=(params, opt_state))
    >>> metadata, bool(jnp.all(params2["w1"] == params["w1"]))
    ({'step': 100}, True)

    ```
    """
    path = _as_path(path)
    where = f"pcjax: cannot save checkpoint `path` {path}"
    if path.is_dir():
        raise ValueError(f"pcjax: checkpoint `path` {path} is a directory; pass a file path.")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise ValueError(
            f"{where}: `metadata` must be a dict (or None), got {type(metadata).__name__}."
        )
    try:
        problem = _check_metadata(metadata, "", set())
    except RecursionError:
        problem = "`metadata` is nested too deeply"
    if problem is not None:
        raise ValueError(f"{where}: {problem}.")
    for key_path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        problem = _unsavable(leaf)
        if problem is not None:
            raise ValueError(f"{where}: `tree` leaf {jtu.keystr(key_path)} {problem}.")
    buffer = io.BytesIO()
    try:
        eqx.tree_serialise_leaves(buffer, tree)
    except Exception as error:
        raise ValueError(f"{where}: `tree` cannot be serialised ({error}).") from error
    arrays = buffer.getbuffer()
    header = {"metadata": metadata, "leaves": _records(tree), "containers": _containers(tree)}
    header["arrays"] = {"bytes": arrays.nbytes, "crc32": zlib.crc32(arrays)}
    raw = json.dumps(header).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _os_error(error, f"cannot save checkpoint `path` {path}") from error
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(len(raw).to_bytes(8, "little") + zlib.crc32(raw).to_bytes(4, "little"))
            f.write(raw)
            f.write(arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # e.g. a full disk
            raise _os_error(error, f"cannot save checkpoint `path` {path}") from error
        raise
    return path


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored with a checkpoint, without reading its arrays (the file's layout,
    header checksum and size are checked; the arrays' checksum only by `load_checkpoint`).

    **Arguments:**

    - `path`: the checkpoint file.

    **Returns:** the metadata dict passed to [pcjax.save_checkpoint][] (empty if none was).

    **Example:**

    ```pycon
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.ckpt"
    >>> path = pc.save_checkpoint(path, {"w": jnp.ones(3)}, metadata={"epoch": 2})
    >>> pc.checkpoint_metadata(path)
    {'epoch': 2}

    ```

    **Raises:** `FileNotFoundError`; `ValueError` if the file is not an intact checkpoint.
    """
    path = _as_path(path)
    with _open(path) as f:
        return _read_header(f, path)["metadata"]


def load_checkpoint(path: str | os.PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`.

    `like` is a pytree of the same structure (e.g. freshly initialised params and optimizer
    state, or their `eqx.filter_eval_shape`): it supplies the structure and the non-array
    leaves. Every leaf's path, containers (their kinds and classes: a saved tuple does not load
    into a list, nor an `eqx.nn.Linear` into another module class), kind, shape and dtype must
    equal the saved ones.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: the pytree whose structure, kinds, shapes and dtypes the saved tree must have.

    **Returns:** `(tree, metadata)`: the tree with the structure of `like` and the saved
    metadata dict.

    **Raises:** `FileNotFoundError`; `ValueError` if the file is not an intact checkpoint
    (empty, truncated, extended, corrupted, malformed header), or if it does not match `like`
    (the first differing leaf is named).

    **Example:** see [pcjax.save_checkpoint][]; a tree of another shape is refused.

    ```pycon
    >>> import pathlib, tempfile
    >>> path = pc.save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "w.ckpt", {"w": jnp.ones(3)})
    >>> pc.load_checkpoint(path, like={"w": jnp.ones(4)})
    Traceback (most recent call last):
    ...
    ValueError: ...

    ```
    """
    path = _as_path(path)
    where = f"pcjax: checkpoint `path` {path}"
    with _open(path) as f:
        header = _read_header(f, path)
        stored, expected = header["leaves"], _records(like)
        difference = _difference(stored, expected)
        if difference is None and "containers" in header:
            paths = [record[0] for record in expected]
            difference = _container_difference(header["containers"], _containers(like), paths)
        if difference is not None:
            raise ValueError(
                f"{where} does not match `like`: {difference} (leaves: {len(stored)} in the "
                f"checkpoint, {len(expected)} in `like`)."
            )
        arrays = f.read(header["arrays"]["bytes"])
    if zlib.crc32(arrays) != header["arrays"]["crc32"]:
        raise ValueError(f"{where}: its arrays are corrupted (their CRC-32 does not match).")
    buffer = io.BytesIO(arrays)
    try:
        tree = eqx.tree_deserialise_leaves(buffer, like)
    except Exception as error:
        raise ValueError(f"{where}: its arrays cannot be read into `like` ({error}).") from error
    if buffer.tell() != len(arrays):
        raise ValueError(
            f"{where}: its arrays cannot be read into `like`: {len(arrays) - buffer.tell()} "
            "bytes are left over."
        )
    return tree, header["metadata"]
