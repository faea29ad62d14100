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


def load_extension(name: str, sources: list, keep_fds: tuple = (), **kwargs):
    """Compile (or reuse torch's cache of) the extension ``name`` and load it into this process;
    returns ``torch.ops.minaction``, whose primitives the extension implements. The build tool runs
    through :func:`run_build` (it does not outlive this process); ``keep_fds`` are handed down to it."""
    import torch
    from torch.utils import cpp_extension

    from . import library  # noqa: F401  (declares the schemas the extension implements)

    kwargs.setdefault("verbose", verbose_build())
    real = getattr(cpp_extension, "subprocess", None)
    if real is not None:  # torch starts ninja with its module's subprocess.run: ours for this call
        cpp_extension.subprocess = _BuildSubprocess(real, tuple(keep_fds))
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in sources], is_python_module=False, **kwargs)
    finally:
        if real is not None:
            cpp_extension.subprocess = real
    return torch.ops.minaction


class _BuildSubprocess:
    """The ``subprocess`` module as ``torch.utils.cpp_extension`` sees it during a build: ``run`` is
    :func:`run_build`; everything else is the real module's."""

    def __init__(self, real, keep_fds: tuple):
        self._real, self._keep_fds = real, keep_fds

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, *args, **kwargs):
        return run_build(*args, keep_fds=self._keep_fds, **kwargs)


def _die_with_parent_fn():
    """A function for ``preexec_fn``: the child asks for SIGTERM when this process dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; libc resolved here, before the fork); None elsewhere."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None
    parent = os.getpid()

    def preexec():
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request: as if it had come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


#: seconds a build tool may take to stop after SIGTERM before it is killed (a guard: ninja stops at once)
STOP_GRACE_S = 30.0


def run_build(*popenargs, check: bool = False, timeout=None, input=None, capture_output: bool = False,
              keep_fds: tuple = (), **kwargs):
    """``subprocess.run`` for a build tool (ninja) that must not outlive the build.

    ``subprocess.run`` answers an exception in the caller (Ctrl-C; SIGTERM, which the ``minaction``
    command raises as one) with SIGKILL to the tool alone: ninja could not pass it on to its compile
    jobs (each in a process group of its own), which went on compiling into the build folder after
    this process had released its locks, and the next build ran a second ninja in the same folder.
    Here the tool gets SIGTERM and is waited for: ninja sends it to its jobs, removes their partial
    outputs and exits. It also gets SIGTERM when this process dies, even by ``kill -9`` (Linux).
    ``keep_fds`` (the build folder's lock) are inherited by the tool and its jobs, so a lock held on
    them stays held until the last of them has exited."""
    import signal
    import subprocess

    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if keep_fds:
        kwargs["pass_fds"] = tuple(kwargs.get("pass_fds", ())) + tuple(keep_fds)
    preexec = _die_with_parent_fn()
    if preexec is not None and kwargs.get("preexec_fn") is None:
        kwargs["preexec_fn"] = preexec
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with subprocess.Popen(*popenargs, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:  # pragma: no cover - a tool that ignores SIGTERM
                    proc.kill()
            raise  # (Popen's exit waits for it)
        code = proc.poll()
    if check and code:
        raise subprocess.CalledProcessError(code, proc.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(proc.args, code, stdout, stderr)


def load_library(so) -> object:
    """Load an already built extension (no build, no lock: works from a read-only cache)."""
    import torch

    from . import library  # noqa: F401

    torch.ops.load_library(str(so))
    return torch.ops.minaction
