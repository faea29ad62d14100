"""Recount the training FLOPs of a store's runs (``minaction study recount-flops``).

``evals.flops`` is ``samples x`` the training FLOPs of one member on one sample, a constant of
the run's configuration (architecture, dataset, width, data options, budget). Stores written
before minaction counted them on a measured training step (:func:`minaction.study.trainer.
training_flops_per_sample`) hold ``3 x`` the forward FLOPs of the energy layers instead: that
rule missed physics_lagrangian's force product and charged every first layer an input gradient
it does not compute, which favoured physics_lagrangian by up to 1.25x against the MLP. Training
did not depend on the count, so a recount needs no retraining: it rebuilds one member of each
configuration, counts one step and rewrites ``flops`` from ``samples``.

The store's ``meta`` key :data:`FLOPS_META` says how its FLOPs were counted: ``"step"`` once
every run in it was counted the new way (a store created by this version, or recounted);
absent, the report warns.
"""
from __future__ import annotations

import json

from . import store
from .presets import group_key

FLOPS_META = "flops_count"


def recount_flops(db, progress=None) -> dict:
    """Rewrite ``evals.flops`` of every run of the store ``db`` from its ``samples`` and a
    count of one training step of its configuration; needs the runs' datasets (for the input
    shapes) and their architectures (plugins imported first). Takes the writer lock. Returns
    ``{"runs", "configurations", "per_sample": {"arch x dataset": flops}}``."""
    from pathlib import Path

    from .trainer import config_training_flops

    if not Path(db).is_file():  # a mistyped path made a new, empty store and marked it recounted
        raise FileNotFoundError(f"no study store at {str(db)!r} (recount-flops rewrites an existing store)")
    con = store.connect(db)
    lock = None
    try:
        lock = store.acquire_writer_lock(db)
        rows = con.execute("SELECT run_id, config_json FROM runs WHERE status IN ('done', 'diverged')").fetchall()
        groups: dict = {}
        for run_id, cj in rows:
            cfg = json.loads(cj)
            groups.setdefault(group_key(cfg, "seed+lam"), (cfg, []))[1].append(run_id)  # one count per configuration
        per_sample = {}
        for i, (cfg, ids) in enumerate(groups.values()):
            c = config_training_flops(cfg)
            per_sample[f"{cfg['arch']} x {cfg['dataset']}"] = c
            if progress:
                progress(f"[{i + 1}/{len(groups)}] {cfg['arch']} x {cfg['dataset']}: {c:,.0f} training FLOPs per "
                         f"sample ({len(ids)} runs)")
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany("UPDATE evals SET flops = samples * ? WHERE run_id = ?", [(c, r) for r in ids])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        store.set_meta(con, FLOPS_META, "step")
        return {"runs": len(rows), "configurations": len(groups), "per_sample": per_sample, "db": str(db)}
    finally:
        con.close()
        store.release_writer_lock(lock)


def counted_by_step(con) -> bool:
    """Whether the store's FLOPs were all counted on a training step (see the module docstring)."""
    return store.get_meta(con, FLOPS_META) == "step"
