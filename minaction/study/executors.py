"""Where groups of runs train: ``local`` (process pool), ``dask`` (dask.distributed), ``ray``.

Every executor exposes the same small interface, built on ``concurrent.futures``:
``submit(fn, task) -> concurrent.futures.Future``, ``restart()`` (after a lost worker),
``close()``, and ``workers`` (its parallelism). The driver waits on the futures with
``concurrent.futures.wait`` and is the only process that writes the database.

- ``local``: a ``ProcessPoolExecutor`` in the ``forkserver`` context (``spawn`` where
  forkserver does not exist); each worker runs with one torch thread. No server needed.
  The forkserver preloads torch, the data/model packages and the CPU kernels
  (:mod:`minaction.study._preload`), so a (re)started worker is ready in milliseconds.
  The forkserver and the workers die with the driver, even after ``kill -9`` of it: on
  Linux each asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
  and each worker also watches the driver's pid (a ``pidfd``, else polling) and exits when
  it is gone. Their environment carries ``MINACTION_STUDY_DRIVER=<driver pid>``.
- ``dask``: a ``dask.distributed.Client`` on a ``LocalCluster`` of ``workers`` processes
  with one thread each, bound to 127.0.0.1 with no dashboard, or on ``scheduler``
  (``tcp://host:port``) for a real cluster. ``client.get_executor()`` gives standard futures.
- ``ray``: ``ray.init()`` (or ``ray.init(address=scheduler)``), one CPU per task; optional,
  needs ``pip install 'minaction[ray]'``.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import sys
import threading
import time

EXECUTORS = ("local", "dask", "ray")
#: Set in the driver before it starts the forkserver; the forkserver and the workers inherit it.
DRIVER_ENV = "MINACTION_STUDY_DRIVER"
_ORPHAN_EXIT = 70  # exit status of a worker that found its driver gone


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def check_workers(workers):
    """``workers`` as a positive int, or None (the default: one per available CPU)."""
    if workers is None:
        return None
    try:
        n = int(workers)
    except (TypeError, ValueError):
        raise ValueError(f"workers must be a positive integer, got {workers!r}") from None
    if n < 1 or n != workers:
        raise ValueError(f"workers must be a positive integer (omit it for one per available CPU), got {workers!r}")
    return n


def die_with_parent(sig=signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        return True
    return True


def watch_driver(pid: int) -> None:
    """End this process (``os._exit``) as soon as process ``pid`` has exited.

    Waits on a pidfd (Linux >= 5.3: readable when the process exits), else polls every
    second, in a daemon thread. Exits at once when ``pid`` is already gone.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(_ORPHAN_EXIT)
    except (AttributeError, OSError):
        fd = None
    if fd is None and not _alive(pid):
        os._exit(_ORPHAN_EXIT)

    def wait():
        if fd is not None:
            import select

            while not select.select([fd], [], [])[0]:
                pass
        else:
            while _alive(pid):
                time.sleep(1.0)
        os._exit(_ORPHAN_EXIT)

    threading.Thread(target=wait, name="minaction-driver-watch", daemon=True).start()


def _init_local_worker(threads, driver_pid=None):
    die_with_parent()  # the parent is the forkserver (or, with spawn, the driver)
    if driver_pid:
        watch_driver(int(driver_pid))
    from .trainer import init_worker

    init_worker(threads)


def start_forkserver():
    """The local executor's multiprocessing context; with ``forkserver`` (Linux), also start the
    server now, preloading torch, the data and model packages and the kernels
    (:mod:`minaction.study._preload`). Idempotent. ``minaction study run`` calls it before the
    driver imports torch, so the server's imports and the driver's overlap."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    os.environ[DRIVER_ENV] = str(os.getpid())  # read by _preload in the forkserver; marks our processes
    if ctx.get_start_method() == "forkserver":
        # workers fork from a server that already imported torch and loaded the kernels
        ctx.set_forkserver_preload(["minaction.study._preload"])
        # Start it from the main thread: PR_SET_PDEATHSIG fires when the *thread* that started a
        # process exits, and this one lives as long as the study (a pool thread would not).
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return ctx


class LocalExecutor:
    """A process pool; a dead worker breaks the pool, so :meth:`restart` builds a new one."""

    name = "local"

    def __init__(self, workers=None, threads=1):
        self.workers = check_workers(workers) or default_workers()
        self.threads = threads
        methods = mp.get_all_start_methods()
        self._ctx = start_forkserver()
        self._pool = None
        self.restart()

    def restart(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=_init_local_worker,
                                            initargs=(self.threads, os.getpid()))

    def submit(self, fn, task) -> cf.Future:
        return self._pool.submit(fn, task)

    def close(self, abort: bool = False):
        """Shut the pool down; ``abort=True`` (Ctrl-C, an error in the driver) also
        terminates the workers instead of waiting for the groups they are training."""
        if self._pool is None:
            return
        if abort:
            procs = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


class DaskExecutor:
    """dask.distributed: a loopback ``LocalCluster`` by default, or an existing scheduler."""

    name = "dask"

    def __init__(self, workers=None, scheduler=None, threads=1):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - dask is a test dependency
            raise RuntimeError(_MISSING["dask"]) from exc
        self.threads = threads
        self._cluster = None
        if scheduler:
            self._client = Client(scheduler)
            info = self._client.scheduler_info()
            self.workers = max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))
        else:
            self.workers = check_workers(workers) or default_workers()
            self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                         host="127.0.0.1", dashboard_address=None, silence_logs=40)
            self._client = Client(self._cluster)
        self._executor = self._client.get_executor(pure=False, retries=1)

    def restart(self):
        pass  # the scheduler replaces lost workers and retries the task itself

    def submit(self, fn, task) -> cf.Future:
        return self._executor.submit(fn, task)

    def close(self, abort: bool = False):
        try:
            self._client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()


class RayExecutor:
    """Ray tasks with one CPU each (``pip install 'minaction[ray]'``)."""

    name = "ray"

    def __init__(self, workers=None, scheduler=None, threads=1):
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError(_MISSING["ray"]) from exc
        self._ray = ray
        self.threads = threads
        if not ray.is_initialized():
            if scheduler:
                ray.init(address=scheduler)
            else:
                ray.init(num_cpus=check_workers(workers) or default_workers(), include_dashboard=False)
        self.workers = check_workers(workers) or int(ray.available_resources().get("CPU", 1))
        self._remote = {}

    def restart(self):
        pass  # tasks are retried by Ray (max_retries)

    def submit(self, fn, task) -> cf.Future:
        r = self._remote.get(fn)
        if r is None:
            r = self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=1)(fn)
        return r.remote(task).future()

    def close(self, abort: bool = False):
        pass  # leave a user's Ray session to them


def check_executor(name: str, scheduler=None) -> None:
    """``name`` is one of :data:`EXECUTORS`, and a scheduler address goes with dask or ray only."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    if scheduler and name == "local":
        raise ValueError("--scheduler applies to the dask and ray executors, not local")
    import importlib.util

    # installed? asked before the store exists (a missing Ray was found after the store and its plan were written)
    if name in _MISSING and importlib.util.find_spec(_PACKAGE[name]) is None:
        raise RuntimeError(_MISSING[name])


#: the package each distributed executor imports, and what to say when it is not installed
_PACKAGE = {"dask": "distributed", "ray": "ray"}
_MISSING = {"dask": "the dask executor needs dask.distributed: pip install 'minaction[dask]'",
            "ray": "the ray executor needs Ray, which is not installed: pip install 'minaction[ray]' (or use "
                   "--executor local or dask)"}


def make_executor(name: str, workers=None, scheduler=None, threads: int = 1):
    """An executor by name (see :data:`EXECUTORS`)."""
    check_workers(workers)
    check_executor(name, scheduler)
    if name == "local":
        return LocalExecutor(workers, threads)
    if name == "dask":
        return DaskExecutor(workers, scheduler, threads)
    return RayExecutor(workers, scheduler, threads)
