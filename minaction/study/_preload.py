"""Imported once by the local executor's forkserver, before it forks any worker.

Workers forked from the server start with torch, the data and model packages and the
compiled CPU kernels already loaded, instead of paying seconds for each on startup.
Only imports and library loading happen here: no parallel region runs before the fork
(and no thread is started: the parent-death signal needs none).
"""
import os
import signal
import warnings

from .executors import DRIVER_ENV, die_with_parent

# Ctrl-C in a terminal reaches the whole process group: during these imports (seconds) the server printed a
# KeyboardInterrupt traceback beside the driver's one-line "interrupted" (the driver stops, and the server dies
# with it). Ignored while preloading; restored after, for the workers it forks.
_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)

# The forkserver dies with the driver that started it (even after kill -9 of the driver), and
# with it, through their own parent-death signal, every worker it forked.
_driver = os.environ.get(DRIVER_ENV)
if _driver:
    die_with_parent()
    if str(os.getppid()) != _driver:  # the driver is already gone (we were re-parented)
        os._exit(70)

import torch  # noqa: F401,E402

from . import trainer  # noqa: F401

for _mod in ("minaction.data", "minaction.models"):
    try:
        __import__(_mod)
    except ImportError:  # not installed: the worker reports it when a run needs it
        pass
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        from ..backends import cpu as _cpu
        from ..backends import select as _backend

        # loads the cpu backend's extension once, if it is built. The first build is the driver's, after it has
        # checked the datasets: `study run` starts this server at once, and a build here ran beside the data
        # check (its message next to a missing dataset's error, and the driver "waiting for another process's
        # build" on a first start). Workers forked before then load the finished build themselves
        if _cpu.built():
            _backend.select("cpu")
    except Exception:  # a failure here is reported again, properly, inside the run
        pass
if _sigint is not None:  # (None: a handler not set from Python, which cannot be put back)
    signal.signal(signal.SIGINT, _sigint)
