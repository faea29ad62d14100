"""``minaction report`` and ``minaction replicate`` (registered by ``minaction.cli``)."""
from __future__ import annotations

import argparse
import math
import sys


def _add_report_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report options (defaults: docs/report.md)")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per CI (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    g.add_argument("--ci", type=float, default=0.95, help="confidence level (default 0.95)")
    g.add_argument("--anova-type", type=int, choices=(2, 3), default=3,
                   help="ANOVA type the Finding 1 verdict reads; both are reported (default 3)")
    g.add_argument("--lam", type=float, default=None,
                   help="lambda of Findings 1 and 3 (default: the lambda with the most finished runs)")
    g.add_argument("--target-frac", type=float, default=0.95,
                   help="target accuracy = this x best final validation accuracy on the dataset (default 0.95)")
    g.add_argument("--target-by", choices=("dataset", "arch"), default="dataset",
                   help="whose best final validation accuracy the target is a fraction of: any architecture's on "
                        "the dataset (default) or the run's own architecture's")
    g.add_argument("--source", default=None, metavar="TEXT",
                   help="what the report names as the runs' source, e.g. the archive a store was imported from "
                        "(default: the --db path as given)")
    g.add_argument("--energy-first", default=None, metavar="A,B",
                   help="the energy-first architectures of Finding 3, comma-separated (default: bimodal_true,"
                        "physics_lagrangian); name your own registered architectures here")
    g.add_argument("--conventional", default=None, metavar="A,B",
                   help="the conventional baselines of Finding 3, comma-separated (default: mlp,cnn)")
    g.add_argument("--efficiency-metric", choices=("flops", "steps", "samples"), default="flops",
                   help="headline metric of Finding 3: training FLOPs, optimizer steps or training samples to "
                        "the target (default flops; wall time is always a secondary column)")
    g.add_argument("--finding3-reading", choices=("each", "best"), default="each",
                   help="how the Finding 3 verdict reads the paper's claim: every energy-first architecture in every "
                        "modality (default; the claim names both) or, per modality, only the one with the larger gain")


def _options(args):
    """The report's options from the command line, checked (ValueError names the first bad one)."""
    from .build import ReportOptions, check_options

    groups = {}
    for key in ("energy_first", "conventional"):
        text = getattr(args, key, None)
        if text is not None:
            names = tuple(n.strip() for n in text.split(",") if n.strip())
            if not names:
                raise ValueError(f"--{key.replace('_', '-')} needs at least one architecture name")
            groups[key] = names
    opt = ReportOptions(n_boot=args.n_boot, seed=args.seed, ci=args.ci, anova_type=args.anova_type, lam=args.lam,
                        target_frac=args.target_frac, target_by=args.target_by, **groups,
                        efficiency_metric=args.efficiency_metric, finding3_reading=args.finding3_reading,
                        source=args.source,
                        preset=getattr(args, "preset", None), budget=tuple(getattr(args, "budget", None) or ()),
                        design=getattr(args, "design", None))
    check_options(opt)
    return opt


def _out_error(out):
    """Why ``--out`` cannot be the report folder (it is a file), or None."""
    from pathlib import Path

    p = Path(out)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            return f"--out {str(out)!r}: {str(q)!r} is a file, not a folder; give a folder for the report"
    return None


def _build(db, out, args, cmd: str = "report") -> int:
    from .build import build_report

    err = _out_error(out)
    if err:
        print(f"minaction {cmd}: error: {err}", file=sys.stderr)
        return 2
    try:
        res = build_report(db, out, _options(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"minaction {cmd}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the output folder cannot be created or written
        print(f"minaction {cmd}: error: cannot write the report to {str(out)!r}: {exc}", file=sys.stderr)
        return 2
    print(f"report written: {res['report_md']} and {res['report_html']}")
    for k, v in sorted(res["verdicts"].items()):
        print(f"  Finding {k}: {v}")
    for n in res.get("notices", []):  # what the report says first, not only inside it
        print(f"  note: {n}")
    return 0


def _report(args) -> int:
    return _build(args.db, args.out, args)


def _replicate(args) -> int:
    try:
        from minaction.study.cli import RUN_ERRORS, run_from_args
    except ImportError as exc:
        print(f"minaction replicate: error: the study runner (minaction.study) is not available: {exc}",
              file=sys.stderr)
        return 2
    err = _out_error(args.out)  # before training, not after
    if err is None:
        try:
            _options(args)
            if args.lam is not None:  # a λ the preset does not train would fail the report after the whole study
                from minaction.study.presets import expand, load_preset

                lams = sorted({float(r["config"]["lam"]) for r in expand(load_preset(args.preset))})  # extra blocks too
                if not any(math.isclose(args.lam, v, rel_tol=1e-9, abs_tol=0.0) for v in lams):
                    err = (f"--lam {args.lam:g}: preset {args.preset!r} trains λ in "
                           f"{{{', '.join(f'{v:g}' for v in lams)}}}")
        except ValueError as exc:
            err = str(exc)
    if err:
        print(f"minaction replicate: error: {err}", file=sys.stderr)
        return 2
    try:
        from minaction.study.cli import load_plugins

        load_plugins(args.plugin)
    except RuntimeError as exc:
        print(f"minaction replicate: error: {exc}", file=sys.stderr)
        return 2
    try:  # as `study run` starts it: the plan's estimate printed first, groups balanced by measured cost
        summary = run_from_args(args)
    except RUN_ERRORS as exc:
        print(f"minaction replicate: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"study finished: {summary}")
    args.design = args.preset  # the report says which of the preset's runs are missing (failed ones)
    return _build(args.db, args.out, args, "replicate")


def register(subparsers) -> None:
    """Add ``report`` and ``replicate`` to the ``minaction`` command line."""
    p = subparsers.add_parser("report", help="analyse a study store: the paper's three findings, reproduced or not",
                              description="Write report.md, a self-contained report.html, figures/*.png and "
                                          "tables/*.csv from a study store.")
    p.add_argument("--db", required=True, help="the study store (SQLite) to read")
    p.add_argument("--out", required=True, help="output directory (created if needed)")
    p.add_argument("--preset", default=None,
                   help="report only the runs of this preset (name or .toml path); needed when the store holds "
                        "runs of one dataset under different training budgets")
    p.add_argument("--budget", action="append", default=None, metavar="ID",
                   help="report only the runs of this budget id (see tables/budgets.csv or the error that lists "
                        "them); repeatable, one per dataset")
    p.add_argument("--design", default=None, metavar="PRESET",
                   help="the preset (name or .toml path) this store is a run of: the report opens with how many "
                        "of its runs finished and names the missing ones (PARTIAL), per dataset x architecture")
    _add_report_options(p)
    p.set_defaults(func=_report)

    p = subparsers.add_parser("replicate", help="run a study preset, then write its report",
                              description="minaction.study.run_study(PRESET, DB) then the report of DB into OUT. "
                                          "Resumable: finished runs in DB are skipped.")
    p.add_argument("--preset", required=True, help="preset name (minaction/study/presets/NAME.toml) or path")
    p.add_argument("--db", default="results.sqlite", help="study store (default results.sqlite)")
    p.add_argument("--out", default="report", help="report directory (default report/)")
    p.add_argument("--executor", default="local", help="study executor (default local)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the study's choice)")
    p.add_argument("--retry-failed", action="store_true", help="train again the runs recorded as failed")
    p.add_argument("--max-group", type=_positive_int, default=None, metavar="N",
                   help="train at most N runs per batched group (default: the preset's max_group); smaller groups "
                        "lose less work when the machine is taken away, results do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module (or .py file) first (repeatable): it registers your own "
                        "architectures/datasets; the workers import it too")
    _add_report_options(p)
    p.set_defaults(func=_replicate)


def _positive_int(text: str) -> int:
    from minaction.study.cli import positive_int

    return positive_int(text)
