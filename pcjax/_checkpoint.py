"""Checkpoints: any pytree of arrays (parameters, optimizer states, precisions) to one file.

The file holds a short header (a magic line, then JSON with the caller's metadata and the path,
shape and dtype of every array leaf) followed by the leaves in equinox's serialisation format.
Writes are atomic: the data go to a temporary file in the same directory, are flushed to disk,
and only then replace the target, so a crash leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

MAGIC = b"PCJAX-CHECKPOINT-1\n"


def _array_leaves(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in leaves
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic))
    ]


def _describe(tree: Any) -> list[list[Any]]:
    return [[path, list(np.shape(leaf)), str(leaf.dtype)] for path, leaf in _array_leaves(tree)]


def save_checkpoint(
    path: str | os.PathLike, tree: Any, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `tree` (any pytree of arrays: params, optimizer states, precision modules, ...) and
    JSON-serialisable `metadata` (step counters, RNG state, settings) to `path`, atomically.

    Python scalars in `tree` are stored too; other non-array leaves (functions, static fields)
    are not, and come from `like` when loading. Returns the path.
    """
    path = Path(path)
    header = json.dumps({"metadata": metadata or {}, "leaves": _describe(tree)}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            eqx.tree_serialise_leaves(f, tree)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_header(f, path: Path) -> dict[str, Any]:
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError(f"pcjax: {path} is not a pcjax checkpoint (no {MAGIC!r} header).")
    size = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(size))


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored with a checkpoint, without reading its arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        return _read_header(f, path)["metadata"]


def load_checkpoint(path: str | os.PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`.

    `like` is a pytree of the same structure (e.g. freshly initialised params and optimizer
    state): it supplies the structure and the non-array leaves. Returns `(tree, metadata)`.

    **Raises:** `FileNotFoundError`; `ValueError` if the file is not a checkpoint, or if its
    arrays do not match `like` (the first mismatching leaf is named with both shapes/dtypes).
    """
    path = Path(path)
    with open(path, "rb") as f:
        header = _read_header(f, path)
        stored, expected = header["leaves"], _describe(like)
        if len(stored) != len(expected):
            raise ValueError(
                f"pcjax: checkpoint {path} holds {len(stored)} arrays but `like` has "
                f"{len(expected)}; it was written for a different structure."
            )
        for (s_path, s_shape, s_dtype), (e_path, e_shape, e_dtype) in zip(stored, expected):
            if (s_shape, s_dtype) != (e_shape, e_dtype):
                raise ValueError(
                    f"pcjax: checkpoint {path}: leaf {s_path} has shape {tuple(s_shape)} and "
                    f"dtype {s_dtype}, but `like` expects {e_path} with shape {tuple(e_shape)} "
                    f"and dtype {e_dtype}."
                )
        tree = eqx.tree_deserialise_leaves(f, like)
    return tree, header["metadata"]
