"""The ``minaction`` command line.

Subcommands live next to the code they drive: each of ``minaction.data.cli``,
``minaction.study.cli`` and ``minaction.report.cli`` defines ``register(subparsers)``,
which adds its parsers and sets ``func`` (called with the parsed args; its return value
is the exit code).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

_SUBMODULES = ("minaction.data.cli", "minaction.study.cli", "minaction.report.cli")


def _info(args) -> int:
    import os

    import minaction

    try:
        info = minaction.backend_info()
    except ValueError as exc:  # an unknown MINACTION_BACKEND
        env = os.environ.get("MINACTION_BACKEND")
        where = f"MINACTION_BACKEND={env!r}: " if env else ""
        print(f"minaction info: error: {where}{exc} (or unset MINACTION_BACKEND for the automatic choice)",
              file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minaction", description=__doc__.splitlines()[0].replace("``", ""))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"minaction {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="which kernel backend is active, and why")
    p.set_defaults(func=_info)
    for name in _SUBMODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the package is not present
            raise
        mod.register(sub)
    return parser


def _start_study_workers_early(argv) -> None:
    """``study run`` or ``replicate`` on the local executor, torch not yet imported: start the
    workers' forkserver first, so that its imports (torch, the kernels: ~1.2 s) overlap the
    driver's own instead of following them. Anything unexpected leaves it to the executor,
    which starts it as before."""
    if "torch" in sys.modules or (argv[:2] != ["study", "run"] and argv[:1] != ["replicate"]) \
            or "-h" in argv or "--help" in argv:
        return
    for i, a in enumerate(argv):
        if (a == "--executor" and argv[i + 1:i + 2] != ["local"]) or (a.startswith("--executor=")
                                                                      and a != "--executor=local"):
            return
    try:
        from .study.executors import start_forkserver

        start_forkserver()
    except Exception:  # pragma: no cover - the executor starts it (and reports a failure) later
        pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _start_study_workers_early(argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread where the signal arrives: a KeyboardInterrupt, so
    every path that stops cleanly on Ctrl-C (worker pools shut down, the store closed) does on these too."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _stop_on_signals() -> None:
    """The ``minaction`` command stops on SIGTERM and SIGHUP as on Ctrl-C, with one line naming the
    signal, rather than dying silently (rc 143). A signal the caller set to be ignored (``nohup``) or
    handled stays as it was."""
    import signal

    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)  # a second one while stopping ends the process at once
        raise _Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, stop)


def console_main() -> int:
    """The ``minaction`` command: :func:`main`, then a quicker interpreter exit. With torch
    loaded, Python's shutdown spends 0.3-0.5 s (2-core AMD EPYC) in full garbage collections
    over the million objects torch's import made. Frozen (``gc.freeze``), the collector no
    longer walks them (0.45 -> 0.13 s); ``atexit`` handlers and ``weakref.finalize`` still run
    and objects are still freed by reference counting, only garbage that a reference cycle
    alone keeps is left to the OS (nothing of ours needs it: the study commits every record
    and closes its store before returning). Only for the process's last act: a script that
    calls :func:`main` and goes on keeps its collector as it was."""
    _stop_on_signals()
    try:
        rc = main()
        sys.stdout.flush()  # what is still buffered fails here, not in the interpreter's exit
        return rc
    except _Terminated as exc:  # `kill`, a scheduler's time limit, a closed terminal: as Ctrl-C, named
        print(f"minaction: stopped by {exc.name}. A study's finished runs are in its store: the same command "
              "resumes after them", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a study commits each group as it finishes)
        print("minaction: interrupted. A study's finished runs are in its store: the same command resumes after them",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minaction study status --db X | head`: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        return 1
    finally:
        import gc

        gc.freeze()


if __name__ == "__main__":
    sys.exit(console_main())
