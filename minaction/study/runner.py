"""The study driver: expand a preset, skip finished runs, train the rest, record each result.

The driver is the only process that writes the database. Groups of runs (see
:mod:`minaction.study.trainer`) go to an executor; as each group comes back, each of its
runs is committed in its own transaction. Killing the driver at any moment loses only the
groups in flight; the next call with the same preset and database trains exactly those.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time
import traceback
from concurrent.futures.process import BrokenProcessPool

from . import store
from .executors import make_executor
from .presets import expand, load_preset, make_groups
from .trainer import failed_records, run_group


def _progress(total, initial, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="run", dynamic_ncols=True, smoothing=0.1)


def study_status(db, preset=None) -> dict:
    """Counts of runs by status in ``db`` (restricted to ``preset``'s runs when given)."""
    con = store.connect(db, readonly=True)
    try:
        out = {"db": str(db)}
        if preset is not None:
            spec = load_preset(preset)
            runs = expand(spec)
            ids = [r["run_id"] for r in runs]
            counts = store.status_counts(con, ids)
            out.update(preset=spec["name"], total=len(ids), counts=counts,
                       pending=len(ids) - sum(counts.values()))
        else:
            counts = store.status_counts(con)
            out.update(total=sum(counts.values()), counts=counts)
        row = con.execute("SELECT SUM(wall_time_s * 1.0), COUNT(*) FROM runs WHERE status = 'done'").fetchone()
        out["done_wall_time_s"] = row[0] or 0.0
        out["presets"] = dict(con.execute("SELECT preset, COUNT(*) FROM runs GROUP BY preset").fetchall())
        return out
    finally:
        con.close()


def run_study(preset, db, executor="local", workers=None, scheduler=None, progress=True, limit=None,
              retry_failed=False, max_attempts=2, threads=1) -> dict:
    """Run (or resume) a study; returns a summary dict.

    Args:
        preset: a preset name (``minaction/study/presets/<name>.toml``), a path, or a dict.
        db: path of the SQLite store (created if missing).
        executor: ``"local"`` (process pool), ``"dask"`` or ``"ray"``.
        workers: parallel worker processes (default: the CPUs this process may use).
        scheduler: dask/ray scheduler address for a real cluster.
        progress: show a tqdm bar over runs (starting at the finished count).
        limit: train at most this many of the pending runs in this call.
        retry_failed: also rerun runs recorded as ``failed`` (``done`` and ``diverged``
            runs are always skipped).
        max_attempts: tries for a group whose worker process died (a lost process, not a
            Python exception: those are recorded as ``failed`` at once with their traceback).
            Groups that were in flight when a pool broke rerun one at a time, so only the group
            that really kills its worker is blamed.
        threads: torch threads per worker (1 is steadiest on small machines).
    """
    t0 = time.perf_counter()
    spec = load_preset(preset)
    runs = expand(spec)
    con = store.connect(db)
    skip_status = ("done", "diverged") if retry_failed else store.STATUSES
    finished = store.finished_ids(con, skip_status)
    todo = [r for r in runs if r["run_id"] not in finished]
    already = len(runs) - len(todo)
    if limit is not None:
        todo = todo[:max(0, int(limit))]
    groups = make_groups(todo, spec["group_by"], spec["max_group"])
    store.set_meta(con, f"preset:{spec['name']}", json.dumps(spec, sort_keys=True, default=str))
    counts = {s: 0 for s in store.STATUSES}
    summary = {"preset": spec["name"], "db": str(db), "executor": executor, "total": len(runs),
               "already_finished": already, "pending_before": len(runs) - already, "scheduled": len(todo),
               "groups": len(groups)}
    bar = _progress(len(runs), already, progress and bool(todo))
    ex = None
    recorded = 0
    completed = False

    def record(records):
        nonlocal recorded
        for rec in records:
            row = dict(rec["run"], preset=spec["name"])
            store.record_run(con, row, rec["epochs"], rec.get("evals", ()))
            counts[row["status"]] += 1
            recorded += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            el = time.perf_counter() - t0
            bar.set_postfix({"runs/h": f"{3600 * recorded / max(el, 1e-9):.0f}", "failed": counts["failed"],
                             "diverged": counts["diverged"]}, refresh=False)

    try:
        if groups:
            ex = make_executor(executor, workers, scheduler, threads)
            summary["workers"] = ex.workers
            window = 2 * ex.workers
            queue = [{"group_id": i, "runs": g, "threads": threads, "attempt": 0} for i, g in enumerate(groups)]
            queue.reverse()  # pop() from the end keeps the preset order
            inflight = {}
            generation = 0
            isolated = False  # a task suspected of killing its worker runs alone, so blame is certain
            while queue or inflight:
                while queue and not isolated and len(inflight) < window:
                    if queue[-1].get("suspect") and inflight:
                        break  # wait until the pool is empty, then run the suspect alone
                    task = queue.pop()
                    isolated = bool(task.get("suspect"))
                    inflight[ex.submit(run_group, task)] = (task, generation)
                done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    task, gen = inflight.pop(fut)
                    if task.get("suspect"):
                        isolated = False
                    try:
                        res = fut.result()
                    except Exception as exc:  # the worker died, or the executor lost the task
                        if isinstance(exc, BrokenProcessPool) and gen == generation:
                            ex.restart()
                            generation += 1
                        alone = bool(task.get("suspect")) or not isinstance(exc, BrokenProcessPool)
                        attempt = task["attempt"] + (1 if alone else 0)
                        if attempt < max_attempts:
                            # a task that shared the pool when it broke is not blamed yet: it reruns alone
                            queue.append(dict(task, attempt=attempt, suspect=True))
                        else:
                            err = (f"worker lost in {attempt} attempts (the process died: out of memory, "
                                   f"a crash in native code, or killed): "
                                   + "".join(traceback.format_exception_only(type(exc), exc)).strip())
                            record(failed_records(task["runs"], err))
                        continue
                    record(res["records"])
        completed = True
    finally:
        if bar is not None:
            bar.close()
        if ex is not None:
            ex.close(abort=not completed)  # on Ctrl-C, do not wait for the groups in flight
        con.close()
    wall = time.perf_counter() - t0
    summary.update(counts, recorded=recorded, wall_s=wall, runs_per_hour=3600 * recorded / wall if wall > 0 else 0.0,
                   remaining=len(runs) - already - recorded)
    return summary
