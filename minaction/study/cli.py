"""``minaction study run|status``.

Exit codes: 0 success; 1 some run of this call failed (recorded with its error); 2 the
study could not start or could not go on (bad input, environment, store, another driver
on the same store): one line on stderr names the cause, and the store is left as it was.
"""
from __future__ import annotations

import argparse
import json
import sys


def int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n

    parse.__name__ = f"int_at_least_{lo}"  # (argparse names the type in its messages)
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def _error(cmd: str, exc: BaseException) -> int:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"minaction study {cmd}: error: {text}", file=sys.stderr)
    return 2


def load_plugins(modules) -> None:
    """Import each ``--plugin`` module (the current folder on the path, as for ``python -m``),
    so that the architectures and datasets it registers exist for this study; a module that
    cannot be imported raises ``RuntimeError`` naming it."""
    import os

    from .plugins import import_plugins

    for name in modules or ():
        root = os.getcwd()
        if name.endswith(".py") or os.sep in name:  # a file path (./myplug.py): its folder on the path, its stem
            path = os.path.abspath(name if name.endswith(".py") else name + ".py")
            if not os.path.isfile(path):
                raise RuntimeError(f"--plugin {name!r}: no such file {path!r} (give a module name, or the path of "
                                   f"a .py file)")
            root, name = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
        try:
            import_plugins([(name, root)])
        except Exception as exc:  # any failure of a user's module: one line, rc 2
            raise RuntimeError(f"--plugin {name!r} could not be imported ({type(exc).__name__}: {exc}); it must be "
                               f"an importable module (on PYTHONPATH or in the current folder) that registers its "
                               f"architectures/datasets with minaction.models.register_architecture / "
                               f"minaction.data.register_dataset") from None


#: what a study run started from the command line reports as one line (rc 2) rather than a traceback
RUN_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError)


def run_from_args(args):
    """``run_study`` as ``study run`` and ``replicate`` start it: the runs and the estimated wall time
    printed once the environment and the store have been checked, groups balanced by their measured
    cost. Raises one of :data:`RUN_ERRORS` (PresetError is a ValueError)."""
    from .plan import announce, cost_lookup, measure_timeout_s
    from .runner import run_study

    measure_timeout_s()  # a bad MINACTION_PLAN_MEASURE_TIMEOUT_S is refused here, before the store is touched
    # (read later, inside the estimate, it only turned the estimate into "no time estimate" and trained on)
    return run_study(args.preset, args.db, executor=args.executor, workers=args.workers,
                     scheduler=getattr(args, "scheduler", None), progress=not args.no_progress,
                     limit=getattr(args, "limit", None), retry_failed=args.retry_failed,
                     on_start=lambda: announce(args.preset, args.db, args.workers, max_group=args.max_group,
                                               retry_failed=args.retry_failed),
                     balance=cost_lookup, max_group=args.max_group)


def _run(args) -> int:
    try:
        load_plugins(args.plugin)
    except RuntimeError as exc:
        return _error("run", exc)
    try:
        summary = run_from_args(args)
    except RUN_ERRORS as exc:
        return _error("run", exc)
    print(json.dumps(summary, indent=2))
    if summary.get("failed_skipped"):
        print(f"minaction study run: note: {summary['failed_skipped']} run(s) of preset {summary['preset']!r} are "
              f"recorded as failed and were not retried; add --retry-failed to train them again "
              f"(`minaction study status --db {args.db}` shows the counts)", file=sys.stderr)
    return 1 if summary.get("failed") else 0


def _status(args) -> int:
    from .presets import PresetError
    from .runner import study_status

    try:
        st = study_status(args.db, args.preset)
    except (PresetError, FileNotFoundError, ValueError, OSError) as exc:
        return _error("status", exc)
    print(json.dumps(st, indent=2))
    if st.get("note"):
        print(f"minaction study status: note: {st['note']}", file=sys.stderr)
    return 0


def _export(args) -> int:
    from .archive import export_runs

    try:
        out = export_runs(args.db, args.out, skip=args.skip)
    except (FileNotFoundError, ValueError, OSError) as exc:
        return _error("export", exc)
    if out["not_exported"]:
        left = ", ".join(f"{n} {st}" for st, n in out["not_exported"].items())
        print(f"minaction study export: {out['runs']} finished run(s) exported; not exported: {left} (an archive "
              f"holds finished runs only: a store that imports it plans these again)", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


def _import(args) -> int:
    from .archive import import_runs

    try:
        out = import_runs(args.db, args.archive)
    except (FileNotFoundError, ValueError, OSError) as exc:
        return _error("import", exc)
    print(json.dumps(out, indent=2))
    return 0


def _recount(args) -> int:
    from .recount import recount_flops

    try:
        load_plugins(args.plugin)
        out = recount_flops(args.db, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except RUN_ERRORS as exc:
        return _error("recount-flops", exc)
    print(json.dumps(out, indent=2))
    return 0


def register(subparsers) -> None:
    """Add ``study run`` and ``study status`` to the ``minaction`` command line."""
    from .executors import EXECUTORS
    from .presets import available_presets

    p = subparsers.add_parser("study", help="run the replication study (presets of many training runs)")
    sub = p.add_subparsers(dest="study_command", required=True)
    r = sub.add_parser("run", help="run or resume a study preset into a SQLite database")
    r.add_argument("--preset", required=True,
                   help=f"preset name ({', '.join(available_presets())}) or path of a .toml file")
    r.add_argument("--db", required=True, help="SQLite results file (created if missing; resumed if present)")
    r.add_argument("--executor", choices=EXECUTORS, default="local")
    r.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes, >= 1 (default: one per available CPU)")
    r.add_argument("--scheduler", default=None, help="dask/ray scheduler address, e.g. tcp://host:8786")
    r.add_argument("--limit", type=nonnegative_int, default=None, help="train at most this many pending runs")
    r.add_argument("--retry-failed", action="store_true",
                   help="train again the runs recorded as failed (by default they count as finished)")
    r.add_argument("--max-group", type=positive_int, default=None, metavar="N",
                   help="train at most N runs per batched group (default: the preset's max_group); smaller groups "
                        "lose less work when the machine is taken away, results do not depend on it")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module (or .py file) first (repeatable): it registers your own architectures/datasets "
                        "(minaction.models.register_architecture, minaction.data.register_dataset); the workers "
                        "import it too")
    r.set_defaults(func=_run)
    s = sub.add_parser("status", help="count planned / done / failed / diverged / pending runs",
                       description="Print, as JSON, the runs planned (by every preset run into the store, or by "
                                   "--preset) and how many are done, failed, diverged and pending, and which "
                                   "driver is writing the store now (running). Reads only; works while a study "
                                   "runs and in a read-only folder.")
    s.add_argument("--db", required=True)
    s.add_argument("--preset", default=None, help="restrict to (and count pending runs of) this preset")
    s.set_defaults(func=_status)
    e = sub.add_parser("export", help="write a store's finished runs to a portable archive (.jsonl.gz)",
                       description="Write the done and diverged runs of a study store (their runs, epochs and evals "
                                   "rows, and the presets' specifications) to gzip JSON lines, sorted by run. Reads "
                                   "only; safe while a study runs. `study import` puts them into another store, so a "
                                   "study can move between machines and resume there.")
    e.add_argument("--db", required=True)
    e.add_argument("--out", required=True, help="archive file to write, e.g. runs.jsonl.gz")
    e.add_argument("--skip", action="append", default=[], metavar="ARCHIVE",
                   help="leave out the runs this archive holds (repeatable): export only what a store trained after "
                        "importing it")
    e.set_defaults(func=_export)
    i = sub.add_parser("import", help="write an archive's finished runs into a store, so `study run` resumes after them",
                       description="Import the runs of a `study export` archive into a store (created if missing). "
                                   "Runs already done or diverged in the store are kept; runs recorded as failed "
                                   "are replaced. Refused while a `study run` writes the store.")
    i.add_argument("--db", required=True)
    i.add_argument("archive", help="a file written by `minaction study export`")
    i.set_defaults(func=_import)
    c = sub.add_parser("recount-flops", help="recount the training FLOPs of a store's runs on a measured training step",
                       description="Rewrite every finished run's training FLOPs (evals.flops) as its samples times "
                                   "the FLOPs of one training step of its configuration per sample, counted as "
                                   "torch.utils.flop_counter counts them (docs/study.md, 'Training FLOPs'). For "
                                   "stores written before minaction counted FLOPs that way (3 x the forward FLOPs "
                                   "of the energy layers); nothing is retrained. Needs the runs' datasets. Refused while a "
                                   "`study run` writes the store.")
    c.add_argument("--db", required=True)
    c.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module (or .py file) first: it registers the architectures/datasets of the runs")
    c.set_defaults(func=_recount)
    from .plan import register as _register_plan
    _register_plan(sub)  # study plan --preset NAME
