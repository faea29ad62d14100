"""Study throughput: runs per hour per preset, and the speed-up of batched seeds.

Under pytest-benchmark (``pytest bench/test_bench_study.py``) it times the ``smoke``
preset and the batched-vs-one-at-a-time comparison on a slice of ``lambda-sweep``.
As a script it measures any preset (or the first N runs of it) and prints a Markdown row
for ``bench/RESULTS.md``::

    python bench/test_bench_study.py --preset factorial --workers 2
    python bench/test_bench_study.py --preset lambda-sweep --cells 1 --compare-unbatched

Timings on shared 2-core machines swing with other load: the numbers in RESULTS.md say
when and how they were taken.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import pytest

from minaction.study import expand, load_preset, make_groups, run_study


def _slice(spec: dict, cells: int | None) -> dict:
    """The first ``cells`` (dataset, arch) blocks of a preset, as a preset dict."""
    if not cells:
        return spec
    pairs = []
    for ds in spec["datasets"]:
        for arch in spec["archs"]:
            pairs.append((ds, arch))
    pairs = pairs[:cells]
    out = dict(spec, datasets=sorted({d for d, _ in pairs}, key=spec["datasets"].index),
               archs=sorted({a for _, a in pairs}, key=spec["archs"].index), extra=[])
    return out


def measure(preset, workers=2, cells=None, group_by=None, max_group=None, executor="local") -> dict:
    spec = load_preset(preset)
    spec = _slice(spec, cells)
    if group_by:
        spec["group_by"] = group_by
    if max_group:
        spec["max_group"] = max_group
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = run_study(spec, os.path.join(d, "bench.sqlite"), executor=executor, workers=workers, progress=False)
        wall = time.perf_counter() - t0
    n = len(expand(spec))
    return {"preset": spec["name"], "runs": n, "groups": len(make_groups(expand(spec), spec["group_by"],
                                                                          spec["max_group"])),
            "group_by": spec["group_by"], "max_group": spec["max_group"], "workers": workers,
            "wall_s": round(wall, 1), "runs_per_hour": round(3600 * n / wall), "failed": s["failed"],
            "diverged": s["diverged"]}


def _need_real_stack():
    try:
        import minaction.models  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"minaction.models is not available: {exc}")


def test_bench_smoke(benchmark):
    _need_real_stack()
    out = benchmark.pedantic(measure, args=("smoke",), kwargs={"workers": 2}, rounds=1, iterations=1)
    benchmark.extra_info.update(out)


@pytest.mark.parametrize("group_by", ["seed+lam", "none"])
def test_bench_batched_vs_single(benchmark, group_by):
    _need_real_stack()
    out = benchmark.pedantic(measure, args=("lambda-sweep",), kwargs={"workers": 2, "cells": 1,
                                                                      "group_by": group_by},
                             rounds=1, iterations=1)
    benchmark.extra_info.update(out)


@pytest.mark.parametrize("mode", ["batched", "loop"])
@pytest.mark.parametrize("modality", ["image", "series", "text"])
def test_bench_cnn_member_step(benchmark, modality, mode):
    """One cnn training step for G = 10 members, batched in one module or a loop of 10
    (the table with interleaved medians: ``python bench/cnn_batched.py``)."""
    _need_real_stack()
    import cnn_batched as cb

    meta = cb.Meta(**cb.MODALITIES[modality])
    x, y = cb.make_batch(meta, 128)
    step = cb.batched_stepper(meta, 10)[0] if mode == "batched" else cb.loop_stepper(meta, 10)
    step(x, y)
    benchmark.pedantic(step, args=(x, y), rounds=3, iterations=1)
    benchmark.extra_info.update({"modality": modality, "mode": mode, "G": 10, "batch": 128})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cells", type=int, default=None, help="only the first N (dataset, arch) cells")
    ap.add_argument("--group-by", default=None)
    ap.add_argument("--max-group", type=int, default=None)
    ap.add_argument("--compare-unbatched", action="store_true", help="also run with group_by=none")
    args = ap.parse_args(argv)
    rows = [measure(args.preset, args.workers, args.cells, args.group_by, args.max_group)]
    if args.compare_unbatched:
        rows.append(measure(args.preset, args.workers, args.cells, "none"))
        rows[0]["speedup_vs_unbatched"] = round(rows[1]["wall_s"] / rows[0]["wall_s"], 2)
    host = f"{platform.node()} {os.cpu_count()} cpus"
    for r in rows:
        r["host"] = host
        print(json.dumps(r))


if __name__ == "__main__":
    main()
