"""The lambda-sweep (Finding 2): energy and accuracy against lambda = 0, and how much of
the energy drop is real sparsity rather than ReLU rescaling.

For each (dataset, arch, lambda) and each seed the run is compared with the lambda = 0 run
of the same seed (same initialisation) when there is one, otherwise with the mean of the
lambda = 0 runs:

* ``E_ratio = E(lambda) / E(0)`` of the test-split activation energy; summarised as the
  geometric mean over seeds with a t confidence interval on the log scale;
* ``d_acc_pp`` = test accuracy change in percentage points, mean over seeds with a t CI;
* ``Eresc_ratio``: the same ratio for the rescaled energy (each hidden unit's activation
  multiplied by the L2 norm of the weights that read it), which a ReLU network cannot lower
  by shrinking one layer and growing the next;
* ``active_frac``: the fraction of non-zero hidden units.

``orders_E = -log10(E_ratio)`` is the energy drop in orders of magnitude and
``orders_resc = -log10(Eresc_ratio)`` the part that survives rescaling; the rest,
``rescaling_share = 1 - orders_resc / orders_E``, is what rescaling alone explains.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def _t_ci(x: np.ndarray, ci: float):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return np.nan, np.nan, np.nan
    m = float(x.mean())
    if n < 2:
        return m, np.nan, np.nan
    h = float(stats.t.ppf(0.5 + ci / 2, n - 1) * x.std(ddof=1) / np.sqrt(n))
    return m, m - h, m + h


def _log10_ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.asarray(num, float) / np.asarray(den, float)
        return np.where(r > 0, np.log10(np.where(r > 0, r, 1.0)), np.nan)


def lambda_sweep(runs: pd.DataFrame, ci: float = 0.95) -> pd.DataFrame:
    """One row per (dataset, arch, lam) of a dataset/arch that has lambda = 0 runs and at
    least one other lambda. Columns: ``dataset, modality, arch, lam, n, E_ratio, E_ratio_lo,
    E_ratio_hi, orders_E, Eresc_ratio, Eresc_ratio_lo, Eresc_ratio_hi, orders_resc,
    rescaling_share, d_acc_pp, d_acc_pp_lo, d_acc_pp_hi, active_frac, active_frac_0,
    test_acc, E_mean`` (E_mean: mean test energy)."""
    out = []
    for (ds, arch), g in runs.groupby(["dataset", "arch"], sort=True):
        base = g[g["lam"] == 0]
        if base.empty or g["lam"].nunique() < 2:
            continue
        b_by_seed = base.groupby("seed")[["test_energy", "test_energy_rescaled", "test_acc", "test_active_frac"]].mean()
        b_mean = b_by_seed.mean()
        modality = g["modality"].iloc[0]
        for lam, gl in g.groupby("lam", sort=True):
            ref = b_by_seed.reindex(gl["seed"].to_numpy())
            ref = ref.fillna(b_mean)  # unpaired seeds: compare with the lambda=0 mean
            le = _log10_ratio(gl["test_energy"].to_numpy(), ref["test_energy"].to_numpy())
            lr = _log10_ratio(gl["test_energy_rescaled"].to_numpy(), ref["test_energy_rescaled"].to_numpy())
            da = 100.0 * (gl["test_acc"].to_numpy(float) - ref["test_acc"].to_numpy(float))
            me, lo_e, hi_e = _t_ci(le, ci)
            mr, lo_r, hi_r = _t_ci(lr, ci)
            ma, lo_a, hi_a = _t_ci(da, ci)
            orders_e, orders_r = 0.0 - me, 0.0 - mr  # 0.0 - x: no "-0.0" in the tables
            share = 1.0 - orders_r / orders_e if np.isfinite(orders_e) and orders_e > 0.05 else np.nan
            out.append({
                "dataset": ds, "modality": modality, "arch": arch, "lam": float(lam), "n": int(len(gl)),
                "E_ratio": 10 ** me, "E_ratio_lo": 10 ** lo_e, "E_ratio_hi": 10 ** hi_e, "orders_E": orders_e,
                "Eresc_ratio": 10 ** mr, "Eresc_ratio_lo": 10 ** lo_r, "Eresc_ratio_hi": 10 ** hi_r,
                "orders_resc": orders_r, "rescaling_share": share,
                "d_acc_pp": ma, "d_acc_pp_lo": lo_a, "d_acc_pp_hi": hi_a,
                "active_frac": float(gl["test_active_frac"].mean()),
                "active_frac_0": float(b_mean["test_active_frac"]),
                "test_acc": float(gl["test_acc"].mean()), "E_mean": float(gl["test_energy"].mean()),
            })
    return pd.DataFrame(out)


def sweep_verdicts(sweep: pd.DataFrame, datasets=("mnist", "fashion_mnist"), max_acc_pp: float = 0.5,
                   min_orders: float = 2.5) -> pd.DataFrame:
    """Per (dataset, arch) of the paper's datasets: the largest energy cut at a lambda whose
    mean accuracy change stays within ``max_acc_pp`` points, and whether it reaches
    ``min_orders`` orders of magnitude ("about three"). Columns: ``dataset, arch, best_lam,
    orders_E, orders_resc, rescaling_share, d_acc_pp, E_ratio, passes``."""
    rows = []
    if sweep.empty:
        return pd.DataFrame(columns=["dataset", "arch", "best_lam", "orders_E", "orders_resc", "rescaling_share",
                                     "d_acc_pp", "E_ratio", "passes"])
    for (ds, arch), g in sweep[sweep["dataset"].isin(datasets) & (sweep["lam"] > 0)].groupby(["dataset", "arch"]):
        ok = g[g["d_acc_pp"].abs() < max_acc_pp]
        if ok.empty:
            best = g.loc[g["orders_E"].idxmax()]
            passes = False
        else:
            best = ok.loc[ok["orders_E"].idxmax()]
            passes = bool(best["orders_E"] >= min_orders)
        rows.append({"dataset": ds, "arch": arch, "best_lam": best["lam"], "orders_E": best["orders_E"],
                     "orders_resc": best["orders_resc"], "rescaling_share": best["rescaling_share"],
                     "d_acc_pp": best["d_acc_pp"], "E_ratio": best["E_ratio"], "passes": passes})
    return pd.DataFrame(rows)
