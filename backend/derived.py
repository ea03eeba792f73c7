"""Values derived from a checkpoint component, computed once per checkpoint and kept: in memory, and
as files in one folder named by the component's fingerprint (backend/fingerprints.py) and the kind
of value. The kinds:
- the MoVQ's latent -> RGB preview factors (backend/previews.py `PREVIEW_FACTORS`: JSON,
  `<fingerprint>.json`, the name those files have always had);
- a pipeline's `derived_values` (backend/pipelines/base.py), numpy arrays stored bit for bit as .npy
  (`array_kind`): the 2.x prior's zero-image embedding, so that text-only jobs never load its image
  encoder (backend/manager.py).

A file that cannot be used (damaged, truncated, another format version) is logged and computed
again, never fatal; so is a folder that cannot be written. A file is written under a temporary
name and renamed, so a crash or another process reading the folder never sees half of it.

No MindSpore here; `compute` callbacks that run models belong on the engine thread.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

# What reading a file that is not what it should be raises (json's errors are ValueErrors; np.load
# raises EOFError on an empty file).
UNREADABLE = (ValueError, KeyError, TypeError, OSError, EOFError)


@dataclass(frozen=True)
class Kind:
    """One kind of derived value and its file format."""

    name: str                              # what messages call it
    suffix: str                            # the file name is the key followed by this
    read: Callable[[Path], Any]            # a file -> the value; raises one of UNREADABLE when unusable
    write: Callable[[Path, Any], None]     # the value -> a file


def _read_array(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.float32 or array.ndim != 2 or array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"expected a finite float32 2-D array; got {array.dtype} {array.shape}")
    return array


def _write_array(path: Path, array) -> None:
    with open(path, "wb") as f:   # a file object: np.save(path) would append ".npy" to the temporary name
        np.save(f, np.asarray(array), allow_pickle=False)


def array_kind(name: str) -> Kind:
    """A float32 (N, D) array named `name`, stored exactly as .npy."""
    return Kind(name, f".{name}.npy", _read_array, _write_array)


class DerivedValueCache:
    """Derived values by kind and key (a fingerprint, qualified as the kind needs): in memory, and
    as files in `folder` (None = memory only)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder else None
        self._memory: dict[tuple[str, str], Any] = {}

    def path(self, kind: Kind, key: str) -> Path | None:
        return self.folder / f"{key}{kind.suffix}" if self.folder else None

    def peek(self, kind: Kind, key: str):
        """The value from memory or from its file, or None when neither has a usable one."""
        if (kind.suffix, key) in self._memory:
            return self._memory[(kind.suffix, key)]
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            value = kind.read(path)
        except UNREADABLE as error:
            logger.warning("ignoring unreadable %s %s (it will be computed again): %s", kind.name, path, error)
            return None
        self._memory[(kind.suffix, key)] = value
        return value

    def put(self, kind: Kind, key: str, value) -> None:
        """Keep `value` in memory and write its file (a folder that cannot be written is logged)."""
        self._memory[(kind.suffix, key)] = value
        path = self.path(kind, key)
        if path is None:
            return
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            kind.write(temporary, value)
            os.replace(temporary, path)
        except OSError as error:
            logger.warning("could not store %s in %s (kept in memory only): %s", kind.name, path, error)
            with contextlib.suppress(OSError):
                temporary.unlink()

    def get(self, kind: Kind, key: str, compute: Callable[[], Any]):
        """The cached value, or `compute()` it and store it."""
        value = self.peek(kind, key)
        if value is None:
            value = compute()
            self.put(kind, key, value)
        return value
