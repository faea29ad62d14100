"""Synthetic study stores with known effects, for developing and testing the report.

The generator writes the study store schema (the contract of ``minaction.study.store``)
with runs whose accuracy follows a known model::

    acc = base + dataset_effect[dataset] + arch_effect * a[arch]
          + interaction * b[arch, dataset] + lam_effect(lam) + noise

so the factorial analysis has a known answer: a large arch x dataset interaction, a
(near) null architecture main effect when ``arch_effect=0``. A lambda-sweep on the sweep
datasets cuts the energy by ``energy_drop`` orders of magnitude at the largest lambda, of
which a known part (``rescale_share``) is pure ReLU rescaling (the rescaled energy falls
by the rest only). The epochs table has learning curves in which the energy-first
architectures reach their plateau faster (``ef_speedup``), so Finding 3 has a known gain.

Nothing here is used by the real study or the report (a test double, outside the package);
it needs the standard library, numpy, pandas and sqlite3, and the study store's schema.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from minaction.study.store import SCHEMA  # one schema: the store the study runner writes


ARCHS = ("mlp", "cnn", "bimodal_true", "physics_lagrangian")
DATASETS = {"mnist": "vision", "fashion_mnist": "vision", "sst2": "text", "nmnist": "neuromorphic",
            "ecg5000": "physiological"}
LAMS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
#: The budget recorded in every synthetic run's configuration (the full splits, like a faithful preset).
SYNTHETIC_BUDGET = {"epochs": 8, "batch_size": 128, "lr": 1e-3, "optimizer": "adam", "train_subset": 0,
                    "val_subset": 0, "test_subset": 0, "data_seed": 0}


def factorial_frame(levels_a: int = 4, levels_b: int = 5, n_per_cell=6, a_effect: float = 0.0,
                    b_effect: float = 0.05, interaction: float = 0.04, noise: float = 0.01,
                    drop_frac: float = 0.0, seed: int = 0, extra_null_factor: int = 0) -> pd.DataFrame:
    """A two-factor (``arch`` x ``dataset``) data frame with known effects.

    ``a_effect`` scales the architecture main effect (0: null factor), ``b_effect`` the
    dataset main effect and ``interaction`` a zero-sum arch x dataset interaction. With
    ``drop_frac`` > 0 some runs are dropped at random (never a cell's last), giving an
    unbalanced design. ``extra_null_factor`` > 0 adds a third factor ``lam`` with that
    many levels and no effect at all.
    """
    rng = np.random.default_rng(seed)
    a_lv = [f"a{i}" for i in range(levels_a)]
    b_lv = [f"d{j}" for j in range(levels_b)]
    a_main = rng.normal(size=levels_a)
    a_main -= a_main.mean()
    b_main = rng.normal(size=levels_b)
    b_main -= b_main.mean()
    inter = rng.normal(size=(levels_a, levels_b))
    inter -= inter.mean(axis=0, keepdims=True)
    inter -= inter.mean(axis=1, keepdims=True)
    c_lv = [str(k) for k in range(max(extra_null_factor, 1))]
    rows = []
    for i, a in enumerate(a_lv):
        for j, b in enumerate(b_lv):
            for c in c_lv:
                n = n_per_cell if np.isscalar(n_per_cell) else int(rng.integers(n_per_cell[0], n_per_cell[1] + 1))
                mu = 0.8 + a_effect * a_main[i] + b_effect * b_main[j] + interaction * inter[i, j]
                ys = mu + noise * rng.normal(size=n)
                keep = np.ones(n, bool)
                if drop_frac > 0 and n > 1:
                    drop = rng.random(n) < drop_frac
                    drop[rng.integers(n)] = False
                    keep = ~drop
                for y in ys[keep]:
                    row = {"arch": a, "dataset": b, "accuracy": float(y)}
                    if extra_null_factor:
                        row["lam"] = c
                    rows.append(row)
    return pd.DataFrame(rows)


def make_synthetic_store(path, *, archs: Sequence[str] = ARCHS, datasets: dict | None = None,
                         seeds: int = 4, lams: Sequence[float] = LAMS,
                         sweep_datasets: Sequence[str] = ("mnist", "fashion_mnist"), main_lam: float = 0.0,
                         arch_effect: float = 0.0, interaction: float = 0.05, noise: float = 0.005,
                         energy_drop: float = 3.0, rescale_share: float = 0.4, acc_cost_pp: float = 0.3,
                         ef_speedup: float = 0.25, epochs: int = 8, unbalanced: bool = True,
                         n_failed: int = 2, seed: int = 0, preset: str = "synthetic", budget: dict | None = None,
                         append: bool = False, design: str | dict | None = None) -> Path:
    """Write a synthetic store at ``path`` (overwritten) and return its path.

    The design: every (arch, dataset) at ``main_lam`` with ``seeds`` seeds (one seed
    dropped from some cells when ``unbalanced``), plus a lambda-sweep over ``lams`` on
    ``sweep_datasets`` for every architecture. At the largest lambda the test energy is
    ``10**-energy_drop`` times the lambda=0 energy and the accuracy is ``acc_cost_pp``
    percentage points lower; the rescaled energy falls by ``(1-rescale_share)`` of the
    orders of magnitude only. Energy-first architectures (bimodal_true,
    physics_lagrangian) learn ``ef_speedup`` faster per epoch at equal cost per epoch.
    ``n_failed`` runs are stored as failed/diverged (the report must ignore them).

    Every run's ``config_json`` holds ``budget`` (default: :data:`SYNTHETIC_BUDGET` with
    ``epochs``), as the study runner records it. ``append=True`` adds the runs to an existing
    store (run ids prefixed with ``preset``): a store mixing two budgets. ``design`` (a preset name or
    specification): every run's configuration outside its cell is that preset's for the run's dataset (its
    budget, data options and trainer version), as if the study had trained it.
    """
    rest_of = {}
    if design is not None:
        from minaction.report.store import DESIGN_KEYS
        from minaction.study.presets import expand

        for r in expand(design):
            rest_of.setdefault(r["config"]["dataset"], {k: v for k, v in r["config"].items() if k not in DESIGN_KEYS})
    datasets = dict(DATASETS if datasets is None else datasets)
    budget = {**SYNTHETIC_BUDGET, "epochs": epochs, **(budget or {})}
    path = Path(path)
    if path.exists() and not append:
        path.unlink()
    rng = np.random.default_rng(seed)
    archs = list(archs)
    ds_names = list(datasets)
    ds_main = dict(zip(ds_names, np.linspace(0.06, -0.06, len(ds_names))))
    inter = rng.normal(size=(len(archs), len(ds_names)))
    inter -= inter.mean(axis=0, keepdims=True)
    inter -= inter.mean(axis=1, keepdims=True)
    if np.abs(inter).max() > 0:
        inter /= np.abs(inter).max()
    a_main = np.linspace(-1, 1, len(archs))
    lam_pos = sorted(l for l in lams if l > 0)
    lmax = max(lam_pos) if lam_pos else 1.0

    def lam_frac(lam):  # 0 at lam=0, 1 at the largest lambda, log-spaced in between
        if lam <= 0:
            return 0.0
        k = lam_pos.index(lam) + 1 if lam in lam_pos else 1
        return k / len(lam_pos) if lam < lmax else 1.0

    cells = []
    for ai, arch in enumerate(archs):
        for di, ds in enumerate(ds_names):
            cell_lams = list(lams) if ds in sweep_datasets else [main_lam]
            for lam in cell_lams:
                n = seeds
                if unbalanced and lam == main_lam and rng.random() < 0.4 and seeds > 2:
                    n = seeds - 1
                for s in range(n):
                    cells.append((ai, arch, di, ds, lam, s))

    con = sqlite3.connect(str(path))
    con.executescript(SCHEMA)
    run_rows, epoch_rows = [], []
    for k, (ai, arch, di, ds, lam, s) in enumerate(cells):
        f = lam_frac(lam)
        acc = (0.85 + ds_main[ds] + arch_effect * a_main[ai] + interaction * inter[ai, di]
               - acc_cost_pp / 100 * f + noise * rng.normal())
        acc = float(np.clip(acc, 0.05, 0.999))
        e0 = 50.0 * (1 + 0.2 * ai) * (1 + 0.1 * di)
        energy = e0 * 10 ** (-energy_drop * f) * float(np.exp(0.05 * rng.normal()))
        e_resc0 = 5.0 * (1 + 0.2 * ai)
        energy_resc = e_resc0 * 10 ** (-energy_drop * (1 - rescale_share) * f) * float(np.exp(0.05 * rng.normal()))
        active = float(np.clip(0.5 * 10 ** (-0.3 * f) + 0.01 * rng.normal(), 0.01, 1.0))
        energy_first = arch in ("bimodal_true", "physics_lagrangian")
        rate = 0.6 * (1 + ef_speedup) if energy_first else 0.6
        per_epoch = 2.0 * (1 + 0.05 * rng.normal())
        run_id = (f"{preset}-" if append else "") + f"{arch}-{ds}-lam{lam:g}-s{s}"
        curve = [acc * (1 - np.exp(-rate * e)) + 0.002 * rng.normal() for e in range(1, epochs + 1)]
        for e, va in enumerate(curve, start=1):
            epoch_rows.append((run_id, e, float(1.5 * np.exp(-0.5 * e)), float(va), float(1.6 * np.exp(-0.5 * e)),
                               float(np.clip(va, 0, 1)), energy * 1.1, energy, per_epoch * e))
        status = "done"
        if k < n_failed:
            status = "failed" if k % 2 == 0 else "diverged"
        run_rows.append((run_id, preset, arch, ds, datasets[ds], float(lam), s,
                         json.dumps({"arch": arch, "dataset": ds, "lam": lam, "seed": s,
                                     **rest_of.get(ds, {"budget": budget, "data_opts": {}, "trainer_version": 1})}),
                         status,
                         "synthetic failure" if status != "done" else None, epochs, 0.1,
                         float(np.clip(curve[-1], 0, 1)), acc, 0.3, energy, active, energy_resc, 10000,
                         per_epoch * epochs, "composite", 1, "2026-01-01T00:00:00"))
    con.executemany(f"INSERT INTO runs VALUES ({','.join('?' * 23)})", run_rows)
    con.executemany(f"INSERT INTO epochs VALUES ({','.join('?' * 9)})", epoch_rows)
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("preset", preset), ("generator", "synthetic")])
    con.commit()
    con.close()
    return path


def timed_runs(interval_s, archs=("mlp", "bimodal_true"), seeds=4):
    """Runs and evaluations (DataFrames) of ``archs`` x ``seeds`` on mnist: five evaluations 100 steps apart,
    every run reaching the target (0.9) at step 300; ``interval_s(arch, seed, k)`` is the wall time of the
    k-th interval (a stall, a slow stretch of the machine), so a test sets the clock the time metrics read."""
    runs, evals = [], []
    for arch in archs:
        for seed in range(seeds):
            rid = f"{arch}-{seed}"
            runs.append({"run_id": rid, "dataset": "mnist", "modality": "vision", "arch": arch, "lam": 0.0,
                         "seed": seed, "val_acc": 0.9, "test_acc": 0.9})
            t = 0.0
            for k, step in enumerate((100, 200, 300, 400, 500)):
                t += interval_s(arch, seed, k)
                evals.append({"run_id": rid, "step": step, "samples": 128 * step, "flops": 1e6 * step,
                              "epoch": step / 500, "val_acc": min(0.9, 0.3 * (k + 1)), "wall_time_s": t})
    return pd.DataFrame(runs), pd.DataFrame(evals)
