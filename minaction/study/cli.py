"""``minaction study run|status``."""
from __future__ import annotations

import json
import sys


def _run(args) -> int:
    from .presets import PresetError
    from .runner import run_study

    from .plan import announce
    announce(args.preset, args.db, args.workers)  # runs and estimated wall time before the study starts
    try:
        summary = run_study(args.preset, args.db, executor=args.executor, workers=args.workers,
                            scheduler=args.scheduler, progress=not args.no_progress, limit=args.limit,
                            retry_failed=args.retry_failed)
    except (PresetError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"minaction study run: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 1 if summary.get("failed") else 0


def _status(args) -> int:
    from .presets import PresetError
    from .runner import study_status

    try:
        st = study_status(args.db, args.preset)
    except (PresetError, FileNotFoundError) as exc:
        print(f"minaction study status: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(st, indent=2))
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
    r.add_argument("--workers", type=int, default=None, help="worker processes (default: available CPUs)")
    r.add_argument("--scheduler", default=None, help="dask/ray scheduler address, e.g. tcp://host:8786")
    r.add_argument("--limit", type=int, default=None, help="train at most this many pending runs")
    r.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_run)
    s = sub.add_parser("status", help="count finished/failed/diverged/pending runs")
    s.add_argument("--db", required=True)
    s.add_argument("--preset", default=None, help="restrict to (and count pending runs of) this preset")
    s.set_defaults(func=_status)
    from .plan import register as _register_plan
    _register_plan(sub)  # study plan --preset NAME
