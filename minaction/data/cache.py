"""The decoded-array cache: each family's arrays, decoded once and kept as ``.npz`` under
``$MINACTION_CACHE`` (and in memory per process), built under a file lock so that workers
loading the same dataset at once fetch and decode it only once."""
from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .catalogue import FAMILIES, Family
from .sources import DataUnavailableError, DirSource, SourceUnavailable, TreeSource, cache_dir

_MEMO: Dict[str, Dict[str, np.ndarray]] = {}
_LOCK = threading.Lock()


def _read_cache(path: Path) -> Optional[Dict[str, np.ndarray]]:
    key = str(path)
    if key in _MEMO:
        return _MEMO[key]
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None
    _MEMO[key] = arrays
    return arrays


def _remove_dead_writers_files(path: Path) -> None:
    """``<path>.<pid>.tmp`` files of writers that are gone (killed while decoding: 8-17 MB each, never removed)."""
    for old in path.parent.glob(f"{path.name}.*.tmp"):
        pid = old.name[len(path.name) + 1:-len(".tmp")]
        try:
            os.kill(int(pid), 0)
            continue  # (that writer still runs)
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue  # not ours to judge
        old.unlink(missing_ok=True)


def _write_cache(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: a killed writer leaves no half file under the real name
    except OSError:
        tmp.unlink(missing_ok=True)  # (a directory in the cache file's place, a full disk): no leftover
        raise


class _FileLock:
    """An exclusive lock across processes (``fcntl.flock``; a no-op where it is missing), so
    that workers loading the same dataset at once fetch and decode it only once."""

    def __init__(self, path: Path):
        self.path, self.f = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a+")
        except OSError:  # an unwritable cache: go on unlocked (each process decodes for itself)
            self.f = None
            return self
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
            self.f = None


def _cached(fam: Family):
    for cand in fam.candidates:
        arrays = _read_cache(cand.cache_path(fam.name))
        if arrays is not None:
            first = str(arrays["_origin"]) if "_origin" in arrays else "?"
            return arrays, f"{first} (decoded cache {cand.cache_path(fam.name)})"
    return None


def family_arrays(family: str, data_dir=None, progress: bool = False, refresh: bool = False):
    """Decoded arrays of a dataset family and where they came from: ``(arrays, origin)``.

    The decoded cache is tried first (any candidate's); then the sources in order.
    Raises :class:`ChecksumError` on a mismatch and :class:`DataUnavailableError`
    (listing every source and why it failed) when nothing works."""
    fam = FAMILIES[family]
    with _LOCK:
        hit = None if refresh else _cached(fam)
        if hit is not None:
            return hit
        with _FileLock(cache_dir() / "locks" / f"{family}.lock"):
            hit = None if refresh else _cached(fam)  # another process may have just built it
            if hit is not None:
                return hit
            return _fetch_and_decode(fam, family, data_dir, progress)


def _fetch_and_decode(fam: Family, family: str, data_dir, progress: bool):
    tried = []
    for cand in fam.candidates:
        src = cand.source
        if (isinstance(src, DirSource) and src.kind == "user") or (isinstance(src, TreeSource)
                                                                  and not src.base_url):
            src = dataclasses.replace(src, data_dir=data_dir)
        try:
            files = src.fetch(cand.specs, progress=progress)
        except SourceUnavailable as exc:
            tried.append(f"{src.describe()}: {exc}")
            continue
        arrays = cand.decode(files)
        arrays["_origin"] = np.array(src.describe())
        path = cand.cache_path(family)
        try:
            _write_cache(path, arrays)
        except OSError as exc:
            warnings.warn(f"cannot write the decoded cache {path} ({exc}); the arrays are kept in memory only",
                          RuntimeWarning, stacklevel=3)
        _MEMO[str(path)] = arrays
        return arrays, src.describe()
    raise DataUnavailableError(
        f"dataset {family!r}: no source could provide its files. Tried, in order:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + "\nPut the files in a folder and pass data_dir= (or set MINACTION_DATA to it, for the command line and the "
          "study), or set MINACTION_SHARED_DATA to a shared data folder; docs/data.md, 'Sources', lists each "
          "dataset's sources and files.", tried=tried)


def clear_memo() -> None:
    """Forget the in-process copies of decoded arrays (the on-disk cache stays)."""
    _MEMO.clear()
