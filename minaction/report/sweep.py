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
                   min_orders: float = 2.5, tost: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (dataset, arch) of the paper's datasets: the largest energy cut at a lambda whose
    accuracy stays within ``max_acc_pp`` points of lambda = 0, and whether it reaches
    ``min_orders`` orders of magnitude ("about three"). "Within" is the TOST equivalence of
    ``tost`` (:func:`tost_equivalence`) when given - rows without a test are left out - else
    the mean change. Columns: ``dataset, arch, best_lam, orders_E, orders_resc,
    rescaling_share, d_acc_pp, E_ratio, equivalent, passes``."""
    rows = []
    if sweep.empty:
        return pd.DataFrame(columns=["dataset", "arch", "best_lam", "orders_E", "orders_resc", "rescaling_share",
                                     "d_acc_pp", "E_ratio", "equivalent", "passes"])
    sw = sweep[sweep["dataset"].isin(datasets) & (sweep["lam"] > 0)].copy()
    if tost is not None:
        eq = tost.set_index(["dataset", "arch", "lam"])["equivalent"]
        sw["equivalent"] = [eq.get((r.dataset, r.arch, r.lam), np.nan) for r in sw.itertuples()]
        sw = sw[sw["equivalent"].notna()]
    else:
        sw["equivalent"] = sw["d_acc_pp"].abs() < max_acc_pp
    for (ds, arch), g in sw.groupby(["dataset", "arch"]):
        ok = g[g["equivalent"].astype(bool)]
        if ok.empty:
            best = g.loc[g["orders_E"].idxmax()]
            passes = False
        else:
            best = ok.loc[ok["orders_E"].idxmax()]
            passes = bool(best["orders_E"] >= min_orders)
        rows.append({"dataset": ds, "arch": arch, "best_lam": best["lam"], "orders_E": best["orders_E"],
                     "orders_resc": best["orders_resc"], "rescaling_share": best["rescaling_share"],
                     "d_acc_pp": best["d_acc_pp"], "E_ratio": best["E_ratio"],
                     "equivalent": bool(best["equivalent"]), "passes": passes})
    return pd.DataFrame(rows)


def _tost_row(d_pp, margin_pp: float, alpha: float, se: float, df: float) -> dict:
    """The two one-sided t tests of H0: diff <= -margin and H0: diff >= +margin."""
    if not (np.isfinite(se) and np.isfinite(df)) or df <= 0:
        return {"se_pp": se, "df": df, "t_lower": np.nan, "p_lower": np.nan, "t_upper": np.nan, "p_upper": np.nan,
                "p_tost": np.nan, "ci_lo": np.nan, "ci_hi": np.nan}
    if se == 0:  # no spread at all: t is undefined, and a zero-width CI would claim a certainty 10 seeds lack
        return {"se_pp": 0.0, "df": df, "t_lower": np.nan, "p_lower": np.nan, "t_upper": np.nan, "p_upper": np.nan,
                "p_tost": np.nan, "ci_lo": np.nan, "ci_hi": np.nan}
    t_lo = (d_pp + margin_pp) / se
    t_hi = (d_pp - margin_pp) / se
    p_lo = float(stats.t.sf(t_lo, df))  # H0: diff <= -margin
    p_hi = float(stats.t.cdf(t_hi, df))  # H0: diff >= +margin
    h = float(stats.t.ppf(1 - alpha, df) * se)  # the (1 - 2 alpha) CI: equivalent <=> inside +-margin
    return {"se_pp": float(se), "df": float(df), "t_lower": float(t_lo), "p_lower": p_lo, "t_upper": float(t_hi),
            "p_upper": p_hi, "p_tost": max(p_lo, p_hi), "ci_lo": d_pp - h, "ci_hi": d_pp + h}


def tost_equivalence(runs: pd.DataFrame, margin_pp: float = 0.5, alpha: float = 0.05,
                     min_replicates: int = 2) -> pd.DataFrame:
    """TOST equivalence test of "test accuracy within +-``margin_pp`` points of lambda = 0",
    per (dataset, arch, lambda > 0) of a dataset/arch with lambda = 0 runs.

    **Paired t** (on the per-seed differences acc(lambda, s) - acc(0, s), df = n - 1) when
    every run at lambda has a lambda = 0 run of the same seed and there are at least
    ``min_replicates`` pairs: a seed fixes the initialisation (and the data order), so the
    pair differs only by lambda and the difference removes the seed's own variation - the
    claim is about the change that lambda causes in the same model. Otherwise **Welch t**
    (two independent samples, unequal variances: the penalty may change the spread), with the
    Welch-Satterthwaite df. Equivalence: both one-sided p-values below ``alpha``, the same
    as the (1 - 2 alpha) CI of the difference lying inside +-margin.

    Columns: ``dataset, arch, lam, test, n, n0, d_acc_pp, se_pp, df, t_lower, p_lower,
    t_upper, p_upper, p_tost, ci_lo, ci_hi, margin_pp, alpha, equivalent, note``
    (``equivalent`` is NaN and ``note`` says why when there are too few replicates).
    """
    rows = []
    for (ds, arch), g in runs.groupby(["dataset", "arch"], sort=True):
        base = g[g["lam"] == 0]
        if base.empty:
            continue
        b_seed = base.groupby("seed")["test_acc"].mean()
        for lam, gl in g[g["lam"] > 0].groupby("lam", sort=True):
            x1 = gl.groupby("seed")["test_acc"].mean()
            row = {"dataset": ds, "arch": arch, "lam": float(lam), "n": int(len(x1)), "n0": int(len(b_seed)),
                   "margin_pp": margin_pp, "alpha": alpha, "note": ""}
            paired = x1.index.isin(b_seed.index).all() and len(x1) >= min_replicates
            row.update(_welch_tost(x1, b_seed, margin_pp, alpha, min_replicates))
            if paired:
                pa, pb = x1.to_numpy(float), b_seed.reindex(x1.index).to_numpy(float)
                row["seed_corr"] = (float(np.corrcoef(pa, pb)[0, 1]) if len(pa) > 2 and np.ptp(pa) > 0
                                    and np.ptp(pb) > 0 else np.nan)
                dd = 100.0 * (x1.to_numpy(float) - b_seed.reindex(x1.index).to_numpy(float))
                m = float(dd.mean())
                se = float(dd.std(ddof=1) / np.sqrt(len(dd)))
                row.update(test="paired t", d_acc_pp=m, **_tost_row(m, margin_pp, alpha, se, len(dd) - 1))
            elif len(x1) >= min_replicates and len(b_seed) >= min_replicates:
                a1, a0 = 100.0 * x1.to_numpy(float), 100.0 * b_seed.to_numpy(float)
                v1, v0 = a1.var(ddof=1) / len(a1), a0.var(ddof=1) / len(a0)
                se = float(np.sqrt(v1 + v0))
                df = (v1 + v0) ** 2 / (v1 ** 2 / (len(a1) - 1) + v0 ** 2 / (len(a0) - 1)) if se > 0 else float(
                    len(a1) + len(a0) - 2)
                m = float(a1.mean() - a0.mean())
                row.update(test="Welch t", d_acc_pp=m, **_tost_row(m, margin_pp, alpha, se, df))
            else:
                m = float(100.0 * (x1.mean() - b_seed.mean()))
                row.update(test="none", d_acc_pp=m, **_tost_row(m, margin_pp, alpha, np.nan, np.nan))
                row["note"] = (f"fewer than {min_replicates} seeds (λ: {len(x1)}, λ = 0: {len(b_seed)}): "
                               "no equivalence test")
            if row["se_pp"] == 0:
                row["note"] = (f"no spread: every {'pair' if paired else 'run'} gives the same difference "
                               f"({row['d_acc_pp']:+.3g} pp), so the t test is undefined: no equivalence test")
            row["equivalent"] = (bool(row["p_tost"] < alpha) if np.isfinite(row["p_tost"]) else np.nan)
            rows.append(row)
    cols = ["dataset", "arch", "lam", "test", "n", "n0", "d_acc_pp", "se_pp", "df", "t_lower", "p_lower", "t_upper",
            "p_upper", "p_tost", "ci_lo", "ci_hi", "margin_pp", "alpha", "equivalent", "note", "seed_corr",
            "welch_d_acc_pp", "welch_se_pp", "welch_df", "welch_p_tost", "welch_ci_lo", "welch_ci_hi",
            "welch_equivalent"]
    return pd.DataFrame(rows, columns=cols)


def _welch_tost(x1: pd.Series, x0: pd.Series, margin_pp: float, alpha: float, min_replicates: int) -> dict:
    """The unpaired TOST (Welch t) of the seeds at lambda against those at lambda = 0, as ``welch_*`` columns:
    the sensitivity column beside a paired test (pairing on seed helps only in so far as same-seed accuracies
    correlate)."""
    out = {"welch_d_acc_pp": np.nan, "welch_se_pp": np.nan, "welch_df": np.nan, "welch_p_tost": np.nan,
           "welch_ci_lo": np.nan, "welch_ci_hi": np.nan, "welch_equivalent": np.nan}
    if len(x1) < min_replicates or len(x0) < min_replicates:
        return out
    a1, a0 = 100.0 * x1.to_numpy(float), 100.0 * x0.to_numpy(float)
    v1, v0 = a1.var(ddof=1) / len(a1), a0.var(ddof=1) / len(a0)
    se = float(np.sqrt(v1 + v0))
    df = (v1 + v0) ** 2 / (v1 ** 2 / (len(a1) - 1) + v0 ** 2 / (len(a0) - 1)) if se > 0 else np.nan
    m = float(a1.mean() - a0.mean())
    r = _tost_row(m, margin_pp, alpha, se, df)
    out.update(welch_d_acc_pp=m, welch_se_pp=r["se_pp"], welch_df=r["df"], welch_p_tost=r["p_tost"],
               welch_ci_lo=r["ci_lo"], welch_ci_hi=r["ci_hi"],
               welch_equivalent=bool(r["p_tost"] < alpha) if np.isfinite(r["p_tost"]) else np.nan)
    return out


def tost_multiplicity(tost: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """``tost`` with two adjusted readings of its (unadjusted, per-row) equivalences: ``holm_equivalent`` (Holm
    over every tested row: the family-wise error over all of them) and ``fixed_seq_equivalent`` (per (dataset,
    arch), the lambdas tested in increasing order, each at ``alpha``, stopping at the first not shown: a
    fixed-sequence procedure, which controls the family-wise error of each combination without a penalty).
    ``prefix``: whether the combination's equivalent lambdas are a prefix of its lambdas in increasing order
    (then fixed-sequence gives the unadjusted result)."""
    out = tost.copy()
    tested = out["p_tost"].notna()
    nan_col = lambda: pd.Series([np.nan] * len(out), index=out.index, dtype=object)  # noqa: E731
    out["holm_equivalent"] = nan_col()
    if tested.any():
        p = out.loc[tested, "p_tost"].to_numpy(float)
        order = np.argsort(p, kind="stable")
        m = len(p)
        rej = np.zeros(m, bool)
        for k, i in enumerate(order):  # Holm: the k-th smallest p against alpha / (m - k), stop at the first failure
            if p[i] < alpha / (m - k):
                rej[i] = True
            else:
                break
        out.loc[tested, "holm_equivalent"] = pd.Series(list(rej), index=out.index[tested], dtype=object)
    out["fixed_seq_equivalent"] = nan_col()
    out["prefix"] = nan_col()
    for _, g in out[tested].groupby(["dataset", "arch"], sort=True):
        g = g.sort_values("lam")
        eq = g["equivalent"].astype(bool).to_numpy()
        seq = np.cumprod(eq).astype(bool)
        out.loc[g.index, "fixed_seq_equivalent"] = pd.Series(list(seq), index=g.index, dtype=object)
        out.loc[g.index, "prefix"] = bool((seq == eq).all())
    return out


def sweep_design_gaps(runs: pd.DataFrame, datasets=("mnist", "fashion_mnist"), min_replicates: int = 2) -> list:
    """What the store lacks for the paper's lambda-sweep, one sentence per gap (empty: nothing).

    Each of ``datasets`` needs at least one architecture with ``min_replicates`` or more
    seeds at lambda = 0 and at some lambda > 0.
    """
    gaps = []
    for ds in datasets:
        g = runs[runs["dataset"] == ds]
        if g.empty:
            gaps.append(f"no finished runs on {ds}")
            continue
        ok, why = False, []
        for arch, ga in g.groupby("arch", sort=True):
            n0 = ga.loc[ga["lam"] == 0, "seed"].nunique()
            pos = ga[ga["lam"] > 0].groupby("lam")["seed"].nunique()
            if n0 >= min_replicates and (pos >= min_replicates).any():
                ok = True
                break
            if n0 == 0:
                why.append(f"{arch}: no λ = 0 runs")
            elif pos.empty:
                why.append(f"{arch}: no λ > 0 runs")
            else:
                why.append(f"{arch}: {n0} seed(s) at λ = 0, at most {int(pos.max())} at a λ > 0")
        if not ok:
            gaps.append(f"{ds} has no architecture with at least {min_replicates} seeds at λ = 0 and at a λ > 0 ("
                        + "; ".join(why) + ")")
    return gaps
