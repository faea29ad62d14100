"""How a compiled backend (``cpu``, ``cuda``) loads its C++ extension: one helper for both.

:class:`Once` runs a loader at most once per process and remembers its result, or its
exception (a failed build is not retried in the same process: the automatic choice falls
back and says why). :func:`load_extension` builds/loads the sources with
``torch.utils.cpp_extension`` after the ``minaction::`` schemas are declared
(``minaction/backends/library.py``), since the extensions only register implementations
(``TORCH_LIBRARY_IMPL(minaction, CPU|CUDA, m)``) of schemas declared there.
"""
from __future__ import annotations

import os
import threading


def verbose_build() -> bool:
    """``MINACTION_VERBOSE_BUILD=1`` shows the compiler's output."""
    return os.environ.get("MINACTION_VERBOSE_BUILD", "") not in ("", "0")


class Once:
    """``once(fn)`` runs ``fn`` the first time only; later calls return its result or re-raise its error."""

    def __init__(self):
        self._lock = threading.Lock()
        self.done = False
        self.value = None
        self.error: BaseException | None = None

    def __call__(self, fn):
        if self.done:  # the hot path: no lock
            return self.value
        with self._lock:
            if self.error is not None:
                raise self.error
            if not self.done:
                try:
                    self.value = fn()
                except Exception as exc:
                    self.error = exc
                    raise
                self.done = True
            return self.value


def load_extension(name: str, sources: list, **kwargs):
    """Compile (or reuse torch's cache of) the extension ``name`` and load it into this process;
    returns ``torch.ops.minaction``, whose primitives the extension implements."""
    import torch
    from torch.utils import cpp_extension

    from . import library  # noqa: F401  (declares the schemas the extension implements)

    kwargs.setdefault("verbose", verbose_build())
    cpp_extension.load(name=name, sources=[str(s) for s in sources], is_python_module=False, **kwargs)
    return torch.ops.minaction


def load_library(so) -> object:
    """Load an already built extension (no build, no lock: works from a read-only cache)."""
    import torch

    from . import library  # noqa: F401

    torch.ops.load_library(str(so))
    return torch.ops.minaction
