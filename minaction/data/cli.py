"""``minaction data list`` and ``minaction data fetch NAME...``."""
from __future__ import annotations

import argparse
import os
import sys


def _list(args) -> int:
    from . import cache_dir, list_datasets

    rows = list_datasets()
    width = max(len(r["name"]) for r in rows)
    print(f"cache: {cache_dir()}")
    for r in rows:
        mark = "cached" if r["cached"] else "-"
        print(f"{r['name']:<{width}}  {r['modality'] or '?':<13}  {mark:<6}  {r['description']}")
        if args.verbose:
            opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items())
            print(f"{'':<{width}}  options: {opts}")
            for s in r["sources"]:
                print(f"{'':<{width}}  source: {s}")
    return 0


def _fetch(args) -> int:
    from . import DataError, _known_names, fetch

    known = _known_names()
    names = args.names or known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"minaction data fetch: error: unknown dataset(s): {', '.join(unknown)}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    if args.data_dir is not None and not os.path.isdir(os.path.expanduser(args.data_dir)):
        print(f"minaction data fetch: error: --data-dir {args.data_dir!r} is not a folder", file=sys.stderr)
        return 2
    failed = 0
    for n in names:
        try:
            origin = fetch(n, data_dir=args.data_dir, progress=not args.quiet, refresh=args.refresh)[n]
        except DataError as exc:
            failed += 1
            print(f"{n}: FAILED\n{exc}", file=sys.stderr)
            continue
        print(f"{n}: ok ({origin})")
    return 1 if failed else 0


def register(subparsers) -> None:
    """Add ``data list`` and ``data fetch`` to the ``minaction`` command line."""
    p = subparsers.add_parser("data", help="list and fetch the study's datasets")
    sub = p.add_subparsers(dest="data_command", required=True)
    pl = sub.add_parser("list", help="datasets, their modality and whether they are cached")
    pl.add_argument("-v", "--verbose", action="store_true", help="also show options and sources")
    pl.set_defaults(func=_list)
    pf = sub.add_parser("fetch", help="obtain, verify (sha256), decode and cache datasets (all if none named)")
    pf.add_argument("names", nargs="*", metavar="NAME", help="dataset names (see 'minaction data list')")
    pf.add_argument("--data-dir", default=None, help="folder searched first for the dataset files")
    pf.add_argument("--refresh", action="store_true", help="decode again even if a decoded cache exists")
    pf.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pf.set_defaults(func=_fetch)


def main(argv=None) -> int:
    """Run the ``data`` subcommands on their own (``python -m minaction.data.cli list``)."""
    parser = argparse.ArgumentParser(prog="minaction")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
