"""Imported once by the local executor's forkserver, before it forks any worker.

Workers forked from the server start with torch, the data and model packages and the
compiled CPU kernels already loaded, instead of paying seconds for each on startup.
Only imports and library loading happen here: no parallel region runs before the fork.
"""
import warnings

import torch  # noqa: F401

from . import trainer  # noqa: F401

for _mod in ("minaction.data", "minaction.models"):
    try:
        __import__(_mod)
    except ImportError:  # not installed: the worker reports it when a run needs it
        pass
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        from .. import backend as _backend

        _backend.select("cpu")  # builds or loads the cpu backend's extension once
    except Exception:  # a failure here is reported again, properly, inside the run
        pass
