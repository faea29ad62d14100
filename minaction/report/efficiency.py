"""Training efficiency (Finding 3): energy-first architectures against the best
conventional baseline, within each modality.

Definitions (the project's; the paper does not publish its own):

* **target accuracy** of a (dataset, lambda): ``target_frac`` (default 0.95) times the best
  final validation accuracy of any finished run on that dataset at that lambda. Validation,
  because the epochs table records validation accuracy per epoch;
* **epochs to target** / **time to target**: the first epoch whose validation accuracy
  reaches the target, and the cumulative training wall time at the end of that epoch;
* **accuracy per second**: final test accuracy divided by the run's training wall time;
* an architecture's value on a dataset is the mean over its runs that reached the target;
  when fewer than half of its runs reached it, it has no value (it "did not reach");
* **gain** of an energy-first arch against the best conventional baseline (the
  conventional arch with the best value on that dataset): ``(base - ef) / base`` for
  epochs and time (positive = the energy-first arch is faster), ``(ef - base) / base`` for
  accuracy per second; a modality's gain is the mean of its datasets' gains;
* the CI is a percentile bootstrap that resamples runs within each (dataset, arch) cell and
  picks the best baseline again in each resample.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .store import CONVENTIONAL, ENERGY_FIRST

METRICS = {"time": ("time_to_target_s", "lower"), "epochs": ("epochs_to_target", "lower"),
           "acc_per_s": ("acc_per_s", "higher")}


def per_run_efficiency(runs: pd.DataFrame, epochs: pd.DataFrame, target_frac: float = 0.95) -> pd.DataFrame:
    """One row per finished run with an epochs history: ``run_id, dataset, modality, arch,
    lam, seed, target, reached, epochs_to_target, time_to_target_s, acc_per_s``."""
    if not 0 < target_frac <= 1:
        raise ValueError(f"target_frac must be in (0, 1], got {target_frac}")
    if runs.empty or epochs is None or epochs.empty:
        return pd.DataFrame(columns=["run_id", "dataset", "modality", "arch", "lam", "seed", "target", "reached",
                                     "epochs_to_target", "time_to_target_s", "acc_per_s"])
    ep = epochs[epochs["run_id"].isin(runs["run_id"])].sort_values(["run_id", "epoch"])
    last_val = ep.groupby("run_id")["val_acc"].last()
    r = runs.copy()
    final_val = r["val_acc"].where(r["val_acc"].notna(), r["run_id"].map(last_val))
    r["final_val"] = final_val
    r["target"] = target_frac * r.groupby(["dataset", "lam"])["final_val"].transform("max")
    ep = ep.merge(r[["run_id", "target"]], on="run_id")
    hit = ep[ep["val_acc"] >= ep["target"]].groupby("run_id").first()
    r = r[r["run_id"].isin(ep["run_id"])].copy()
    r["reached"] = r["run_id"].isin(hit.index)
    r["epochs_to_target"] = r["run_id"].map(hit["epoch"]).astype(float)
    r["time_to_target_s"] = r["run_id"].map(hit["wall_time_s"]).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r["acc_per_s"] = r["test_acc"] / r["wall_time_s"].where(r["wall_time_s"] > 0)
    return r[["run_id", "dataset", "modality", "arch", "lam", "seed", "target", "reached", "epochs_to_target",
              "time_to_target_s", "acc_per_s"]].reset_index(drop=True)


def _cell_value(vals: np.ndarray, reached: np.ndarray, col: str) -> float:
    if col == "acc_per_s":
        v = vals[np.isfinite(vals)]
        return float(v.mean()) if len(v) else np.nan
    if reached.sum() * 2 < len(reached):
        return np.nan
    return float(vals[reached].mean())


def arch_summary(eff: pd.DataFrame) -> pd.DataFrame:
    """Per (modality, dataset, lam, arch): ``n, n_reached, target, epochs_to_target,
    time_to_target_s, acc_per_s`` (means as defined in the module docstring)."""
    rows = []
    for (mod, ds, lam, arch), g in eff.groupby(["modality", "dataset", "lam", "arch"], sort=True):
        reached = g["reached"].to_numpy(bool)
        row = {"modality": mod, "dataset": ds, "lam": lam, "arch": arch, "n": len(g),
               "n_reached": int(reached.sum()), "target": float(g["target"].iloc[0])}
        for col, _ in METRICS.values():
            row[col] = _cell_value(g[col].to_numpy(float), reached, col)
        rows.append(row)
    return pd.DataFrame(rows)


def _gain(ef, base, direction):
    with np.errstate(divide="ignore", invalid="ignore"):
        return (base - ef) / base if direction == "lower" else (ef - base) / base


def _dataset_gains(cell_vals: dict, datasets, ef_archs, conv_archs, direction):
    """cell_vals[(ds, arch)] -> array [B] of values; returns {ef: [n_ds, B] gains}, best baselines."""
    out, bases = {}, {}
    for ds in datasets:
        conv = [a for a in conv_archs if (ds, a) in cell_vals]
        if not conv:
            continue
        stack = np.stack([cell_vals[(ds, a)] for a in conv])  # [n_conv, B]
        with np.errstate(invalid="ignore"):
            if direction == "lower":
                filled = np.where(np.isfinite(stack), stack, np.inf)
                idx = filled.argmin(0)
            else:
                filled = np.where(np.isfinite(stack), stack, -np.inf)
                idx = filled.argmax(0)
        best = np.take_along_axis(stack, idx[None], 0)[0]
        bases[ds] = [conv[i] for i in idx]
        for ef in ef_archs:
            if (ds, ef) in cell_vals:
                out.setdefault(ef, []).append(_gain(cell_vals[(ds, ef)], best, direction))
    return {k: np.stack(v) for k, v in out.items()}, bases


def efficiency_gains(eff: pd.DataFrame, lam: float, metric: str = "time", n_boot: int = 1000, seed: int = 0,
                     ci: float = 0.95, energy_first=ENERGY_FIRST, conventional=CONVENTIONAL) -> pd.DataFrame:
    """Per (modality, energy-first arch) at ``lam``: the gain on ``metric`` ("time",
    "epochs" or "acc_per_s") against the best conventional baseline, with its bootstrap CI.

    Columns: ``modality, arch, metric, lam, datasets, baseline, gain_pct, gain_pct_lo,
    gain_pct_hi, n_boot`` (gains in percent).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    col, direction = METRICS[metric]
    e = eff[eff["lam"] == lam]
    rng = np.random.default_rng(seed)
    alpha = (1 - ci) / 2
    rows = []
    for mod, gm in e.groupby("modality", sort=True):
        datasets = sorted(gm["dataset"].unique())
        point, boot = {}, {}
        for (ds, arch), g in gm.groupby(["dataset", "arch"]):
            if arch not in energy_first and arch not in conventional:
                continue
            vals = g[col].to_numpy(float)
            reached = g["reached"].to_numpy(bool)
            point[(ds, arch)] = np.array([_cell_value(vals, reached, col)])
            idx = rng.integers(0, len(g), (n_boot, len(g)))
            boot[(ds, arch)] = np.array([_cell_value(vals[i], reached[i], col) for i in idx])
        g_point, bases = _dataset_gains(point, datasets, energy_first, conventional, direction)
        g_boot, _ = _dataset_gains(boot, datasets, energy_first, conventional, direction)
        for ef, gp in g_point.items():
            gain = float(np.mean(gp[:, 0])) if np.all(np.isfinite(gp)) else np.nan
            gb = g_boot[ef].mean(0)
            gb = gb[np.isfinite(gb)]
            lo, hi = (np.quantile(gb, [alpha, 1 - alpha]) if len(gb) >= max(10, n_boot // 2) and np.isfinite(gain)
                      else (np.nan, np.nan))
            ds_used = [d for d in datasets if (d, ef) in point and d in bases]
            rows.append({"modality": mod, "arch": ef, "metric": metric, "lam": lam, "datasets": ", ".join(ds_used),
                         "baseline": ", ".join(f"{d}: {bases[d][0]}" for d in ds_used),
                         "gain_pct": 100 * gain, "gain_pct_lo": 100 * lo, "gain_pct_hi": 100 * hi,
                         "n_boot": n_boot})
    return pd.DataFrame(rows, columns=["modality", "arch", "metric", "lam", "datasets", "baseline", "gain_pct",
                                       "gain_pct_lo", "gain_pct_hi", "n_boot"])
