"""Training efficiency (Finding 3): energy-first architectures against the best
conventional baseline, within each modality, measured in model terms.

Definitions (the project's; the paper does not publish its own):

* **learning curve** of a run: its validation accuracy at every evaluation the trainer made
  (the ``evals`` table: every ``eval_every`` optimizer steps and at each epoch end), with the
  optimizer steps, training samples and training FLOPs (3 x the forward FLOPs of the dense
  and convolution layers per sample) consumed so far, and the member's training time. Stores
  written before the evals table existed fall back to the per-epoch rows (epochs and time
  only);
* **target accuracy** of a (dataset, lambda): ``target_frac`` (0.95) times the best final
  validation accuracy of any architecture's runs there (``target_by="dataset"``, the report's
  default, the mission's definition), or of the run's own architecture (``target_by="arch"``);
  final = the accuracy of the weights that were tested (the best-validation checkpoint under
  early stopping);
* **steps / samples / FLOPs / epochs to target**: at the first evaluation whose validation
  accuracy reaches the target (headline: steps, samples, FLOPs);
* **time to target** (secondary): steps to target x the run's median seconds per step over its
  evaluation intervals (a stall of the shared machine in a few intervals does not move it; the
  clock's own value is ``time_to_target_clock_s``); accuracy per second divides by the run's
  steps x the same median. The seeds of one batched group share one clock (a batched step's
  time is split equally among its members), so they are not independent replicates of a time:
  time-based metrics (:data:`TIME_METRICS`) get no bootstrap CI;
* an architecture's value on a dataset is the mean over its runs that reached the target;
  when fewer than half of its runs, or fewer than ``MIN_REACHED`` (2), reached it, it has none;
* **gain** of an energy-first arch on a dataset, against the conventional arch with the best
  (lowest) value there: ``(base - ef) / base`` (positive = fewer steps/samples/FLOPs). It is
  computed only on datasets where both reached the target; every other dataset is listed
  with the exact reason. A modality's gain is the mean over its compared datasets;
* CIs: percentile bootstrap over seeds (runs resampled within each dataset x arch cell, the
  baseline picked again in each resample);
* **verdict**: none ("not comparable") unless every modality has both an energy-first and a
  conventional architecture in the store; the missing ones are named. Per modality the
  energy-first architecture with the larger gain (point estimate: a selection) is read: "not
  reproduced" when some modality's CI lies wholly below the paper's 5%; "reproduced" when every
  modality's CI lies above zero and none wholly below 5%; else "inconclusive". The modality
  table also gives Bonferroni-adjusted CIs (over the CIs of the metric) as a sensitivity check.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..data.core import MODALITIES
from .store import CONVENTIONAL, ENERGY_FIRST

#: metric -> (column, direction). The first three are the headline (model terms). Each time-based metric comes
#: twice: stall-robust (``time``, ``acc_per_s``) and on the raw clock (``*_clock``), shown side by side.
METRICS = {"steps": ("steps_to_target", "lower"), "samples": ("samples_to_target", "lower"),
           "flops": ("flops_to_target", "lower"), "epochs": ("epochs_to_target", "lower"),
           "time": ("time_to_target_s", "lower"), "time_clock": ("time_to_target_clock_s", "lower"),
           "acc_per_s": ("acc_per_s", "higher"), "acc_per_s_clock": ("acc_per_s_clock", "higher")}
HEADLINE = ("steps", "samples", "flops")
NAMES = {"steps": "optimizer steps to target", "samples": "training samples to target",
         "flops": "training FLOPs to target", "epochs": "epochs to target",
         "time": "training time to target (s), stall-robust", "time_clock": "training time to target (s), raw clock",
         "acc_per_s": "accuracy per training second, stall-robust",
         "acc_per_s_clock": "accuracy per training second, raw clock"}
_RUN_COLS = ["run_id", "dataset", "modality", "arch", "lam", "seed", "target", "final_val", "reached",
             "steps_to_target", "samples_to_target", "flops_to_target", "epochs_to_target", "time_to_target_s",
             "train_time_s", "acc_per_s", "at_first_eval", "s_per_step", "time_to_target_clock_s",
             "train_time_clock_s", "acc_per_s_clock"]
#: metrics measured on the clock: one clock per batched group, so the seeds of a group are not independent
#: replicates of them and they get no seed-bootstrap CI
TIME_METRICS = ("time", "time_clock", "acc_per_s", "acc_per_s_clock")
#: the time-based quantities, each as (stall-robust metric, raw-clock metric)
TIME_PAIRS = {"time to target": ("time", "time_clock"), "accuracy per second": ("acc_per_s", "acc_per_s_clock")}
#: what each time measures, one sentence each (the report prints them beside every time gain)
TIME_WHAT = ("*Stall-robust* time is the run's optimizer steps × its median seconds per step over its evaluation "
             "intervals: a stall of the shared machine in a minority of intervals does not move it, but neither "
             "does any lasting change of the run's speed partway through (it assumes one speed per run). *Raw "
             "clock* time is the trainer's recorded clock (the run's share of its batched group's step time) as it "
             "ran: every stall and every change of speed is in it.")
_PER_SECOND = ("acc_per_s", "acc_per_s_clock")  # averaged over all runs, not only those that reached the target
NO_CI_WHY = ("no CI: the seeds of one batched group share one clock, so they are not independent replicates of a "
             "time")


def _seconds_per_unit(cur: pd.DataFrame) -> pd.Series:
    """Per run: the median over its evaluation intervals (the first from 0) of seconds per optimizer step (per
    epoch where the curve has no steps)."""
    c = cur.assign(_u=cur["step"].where(cur["step"].notna(), cur["epoch"]))
    c = c[c["_u"].notna() & c["wall_time_s"].notna()]
    if c.empty:
        return pd.Series(dtype=float)
    du = c.groupby("run_id")["_u"].diff().fillna(c["_u"])
    dt = c.groupby("run_id")["wall_time_s"].diff().fillna(c["wall_time_s"])
    ok = du > 0
    return (dt[ok] / du[ok]).groupby(c.loc[ok, "run_id"]).median()


def first_eval_datasets(eff: pd.DataFrame, lam: float) -> list:
    """The datasets at ``lam`` where every run that reached the target reached it at its first evaluation
    (a gain there compares FLOPs per evaluation interval, not learning speed)."""
    e = eff[(eff["lam"] == lam) & eff["reached"].astype(bool)]
    if e.empty:
        return []
    per = e.groupby("dataset")["at_first_eval"].all()
    return sorted(per[per].index)


def curves(runs: pd.DataFrame, epochs: pd.DataFrame | None, evals: pd.DataFrame | None = None) -> pd.DataFrame:
    """Evaluation points of the finished runs: ``run_id, step, samples, flops, epoch, val_acc,
    wall_time_s`` (from ``evals``; runs without evals rows: their epoch rows, steps unknown)."""
    cols = ["run_id", "step", "samples", "flops", "epoch", "val_acc", "wall_time_s"]
    parts = []
    have = set()
    if evals is not None and len(evals):
        ev = evals[evals["run_id"].isin(runs["run_id"])]
        have = set(ev["run_id"])
        parts.append(ev.reindex(columns=cols))
    if epochs is not None and len(epochs):
        ep = epochs[epochs["run_id"].isin(runs["run_id"]) & ~epochs["run_id"].isin(have)]
        ep = ep.reindex(columns=cols)
        parts.append(ep)
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)
    for c in cols[1:]:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    order = out["step"].where(out["step"].notna(), out["epoch"])
    return out.assign(_o=order).sort_values(["run_id", "_o"]).drop(columns="_o").reset_index(drop=True)


def per_run_efficiency(runs: pd.DataFrame, epochs: pd.DataFrame | None, target_frac: float = 0.95,
                       evals: pd.DataFrame | None = None, target_by: str = "arch") -> pd.DataFrame:
    """One row per finished run with a learning curve (columns :data:`_RUN_COLS`).

    ``target_by="dataset"``: the target is ``target_frac`` x the best final validation accuracy
    of any architecture's runs on the run's dataset at its lambda (the report's default,
    ``ReportOptions.target_by``); ``"arch"``: of the run's own architecture there. (This
    function's own default stays ``"arch"``, its definition before the option existed.)
    """
    if not 0 < target_frac <= 1:
        raise ValueError(f"target_frac must be in (0, 1], got {target_frac}")
    if target_by not in ("arch", "dataset"):
        raise ValueError(f"target_by must be 'arch' or 'dataset', got {target_by!r}")
    cur = curves(runs, epochs, evals) if len(runs) else pd.DataFrame()
    if runs.empty or cur.empty:
        return pd.DataFrame(columns=_RUN_COLS)
    last_val = cur.groupby("run_id")["val_acc"].max()
    r = runs[runs["run_id"].isin(cur["run_id"])].copy()
    r["final_val"] = r["val_acc"].where(r["val_acc"].notna(), r["run_id"].map(last_val))
    keys = ["dataset", "lam"] + (["arch"] if target_by == "arch" else [])
    r["target"] = target_frac * r.groupby(keys)["final_val"].transform("max")
    c = cur.merge(r[["run_id", "target"]], on="run_id")
    hit = c[c["val_acc"] >= c["target"] - 1e-12].groupby("run_id").first()
    r["reached"] = r["run_id"].isin(hit.index)
    # reached at the run's first evaluation: its count to target is the evaluation interval, whatever the model
    first = c.groupby("run_id").first().loc[hit.index, ["step", "epoch"]].fillna(-1)
    same = (hit[["step", "epoch"]].fillna(-1) == first).all(axis=1)
    r["at_first_eval"] = r["run_id"].map(same).fillna(False).astype(bool)
    for col, src in (("steps_to_target", "step"), ("samples_to_target", "samples"), ("flops_to_target", "flops"),
                     ("epochs_to_target", "epoch"), ("time_to_target_clock_s", "wall_time_s")):
        r[col] = r["run_id"].map(hit[src]).astype(float)
    # The member clock (its share of a batched group's step time; not runs.wall_time_s, which adds data loading,
    # building and evaluation: 1.03-10x the training time, by architecture; session 24's audit) is shared by the
    # seeds of a group, and one stall of the shared machine (18 s in one lambda-sweep group) dominates a mean. The
    # times the report uses are therefore progress x the run's median seconds per unit of progress (optimizer step;
    # epoch where the store has no steps) over its evaluation intervals, which a stall in a minority of them does
    # not move. The clock's own values stay in the *_clock_s columns.
    rate = _seconds_per_unit(cur)
    unit_to_target = r["steps_to_target"].where(r["steps_to_target"].notna(), r["epochs_to_target"])
    r["s_per_step"] = r["run_id"].map(rate).astype(float)
    r["time_to_target_s"] = unit_to_target * r["s_per_step"]
    last = cur.groupby("run_id").last()
    progress = last["step"].where(last["step"].notna(), last["epoch"])
    r["train_time_clock_s"] = r["run_id"].map(cur.groupby("run_id")["wall_time_s"].max()).astype(float)
    r["train_time_s"] = r["run_id"].map(progress).astype(float) * r["s_per_step"]
    with np.errstate(divide="ignore", invalid="ignore"):
        r["acc_per_s"] = r["test_acc"] / r["train_time_s"].where(r["train_time_s"] > 0)
        r["acc_per_s_clock"] = r["test_acc"] / r["train_time_clock_s"].where(r["train_time_clock_s"] > 0)
    return r.reindex(columns=_RUN_COLS).reset_index(drop=True)


def _cell_value(vals: np.ndarray, reached: np.ndarray, col: str) -> float:
    if col in _PER_SECOND:
        v = vals[np.isfinite(vals)]
        return float(v.mean()) if len(v) else np.nan
    if reached.sum() * 2 < len(reached) or reached.sum() < MIN_REACHED:
        return np.nan
    v = vals[reached & np.isfinite(vals)]
    return float(v.mean()) if len(v) else np.nan


#: the fewest runs of a cell that must reach the target for the cell to have a value (and a CI)
MIN_REACHED = 2


def arch_summary(eff: pd.DataFrame) -> pd.DataFrame:
    """Per (modality, dataset, lam, arch): ``n, n_reached, target, final_val`` and the mean of
    every metric over the runs that reached the target (NaN when fewer than half did)."""
    rows = []
    for (mod, ds, lam, arch), g in eff.groupby(["modality", "dataset", "lam", "arch"], sort=True):
        reached = g["reached"].to_numpy(bool)
        row = {"modality": mod, "dataset": ds, "lam": lam, "arch": arch, "n": len(g),
               "n_reached": int(reached.sum()), "target": float(g["target"].max()),
               "final_val": float(g["final_val"].mean())}
        for col, _ in METRICS.values():
            row[col] = _cell_value(g[col].to_numpy(float), reached, col)
        rows.append(row)
    return pd.DataFrame(rows)


def _gain(ef, base, direction):
    with np.errstate(divide="ignore", invalid="ignore"):
        return (base - ef) / base if direction == "lower" else (ef - base) / base


def _cell_reason(g: pd.DataFrame, col: str) -> str | None:
    n, k = len(g), int(g["reached"].sum())
    if 2 * k < n:
        return f"{g['arch'].iloc[0]} reached the target in {k} of {n} runs (fewer than half)"
    if k < MIN_REACHED:
        return (f"{g['arch'].iloc[0]} reached the target in {k} run (at least {MIN_REACHED} are needed: one run has "
                f"no seed-to-seed spread, and its bootstrap CI would have zero width)")
    if col not in _PER_SECOND and not np.isfinite(g.loc[g["reached"], col].to_numpy(float)).any():
        return f"{g['arch'].iloc[0]} has no {col} recorded (a store without the evals table)"
    return None


def _gain_setup(eff: pd.DataFrame, lam: float, metric: str, seed: int, ci: float) -> tuple:
    """The shared start of the gain tables: ``(column, direction, rows at lam, rng, alpha)``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    col, direction = METRICS[metric]
    return col, direction, eff[eff["lam"] == lam], np.random.default_rng(seed), (1 - ci) / 2


def dataset_gains(eff: pd.DataFrame, lam: float, metric: str = "flops", n_boot: int = 1000, seed: int = 0,
                  ci: float = 0.95, energy_first=ENERGY_FIRST, conventional=CONVENTIONAL) -> pd.DataFrame:
    """Per (modality, dataset, energy-first arch) at ``lam``: the gain (%) on ``metric`` against
    the best conventional arch on that dataset, with its bootstrap CI over seeds, or the exact
    reason why there is none. Columns: ``modality, dataset, arch, metric, lam, baseline, ef_value,
    base_value, gain_pct, gain_pct_lo, gain_pct_hi, n_ef, n_base, reason``."""
    col, direction, e, rng, alpha = _gain_setup(eff, lam, metric, seed, ci)
    rows = []
    for (mod, ds), gd in e.groupby(["modality", "dataset"], sort=True):
        cells = {a: g for a, g in gd.groupby("arch")}
        conv = [a for a in conventional if a in cells]
        efs = [a for a in energy_first if a in cells]
        # bootstrap draws per cell (shared by every energy-first arch of this dataset)
        point, boot, why = {}, {}, {}
        for a in conv + efs:
            g = cells[a]
            vals, reached = g[col].to_numpy(float), g["reached"].to_numpy(bool)
            point[a] = _cell_value(vals, reached, col)
            idx = rng.integers(0, len(g), (n_boot, len(g)))
            boot[a] = (np.array([_cell_value(vals[i], reached[i], col) for i in idx]) if metric not in TIME_METRICS
                       else np.full(n_boot, np.nan))
            why[a] = _cell_reason(g, col)
        ok_conv = [a for a in conv if np.isfinite(point[a])]
        for ef in efs:
            row = {"modality": mod, "dataset": ds, "arch": ef, "metric": metric, "lam": lam, "baseline": None,
                   "ef_value": point[ef], "base_value": np.nan, "gain_pct": np.nan, "gain_pct_lo": np.nan,
                   "gain_pct_hi": np.nan, "n_ef": len(cells[ef]), "n_base": 0, "reason": None}
            if not conv:
                row["reason"] = f"no conventional architecture ({', '.join(conventional)}) ran on {ds}"
            elif not ok_conv:
                row["reason"] = "; ".join(why[a] or f"{a}: no value" for a in conv)
            elif not np.isfinite(point[ef]):
                row["reason"] = why[ef] or f"{ef}: no value"
            else:
                vals = np.array([point[a] for a in ok_conv])
                best = ok_conv[int(np.argmin(vals) if direction == "lower" else np.argmax(vals))]
                stack = np.stack([boot[a] for a in ok_conv])
                with np.errstate(invalid="ignore"):
                    fill = np.where(np.isfinite(stack), stack, np.inf if direction == "lower" else -np.inf)
                    bi = fill.argmin(0) if direction == "lower" else fill.argmax(0)
                bbest = np.take_along_axis(stack, bi[None], 0)[0]
                gb = _gain(boot[ef], bbest, direction)
                gb = gb[np.isfinite(gb)]
                g0 = _gain(point[ef], point[best], direction)
                lo, hi = (np.quantile(gb, [alpha, 1 - alpha]) if len(gb) >= max(10, n_boot // 2)
                          and metric not in TIME_METRICS else (np.nan, np.nan))
                row.update(baseline=best, base_value=point[best], gain_pct=100 * g0, gain_pct_lo=100 * lo,
                           gain_pct_hi=100 * hi, n_base=len(cells[best]))
            rows.append(row)
    out = pd.DataFrame(rows, columns=["modality", "dataset", "arch", "metric", "lam", "baseline", "ef_value",
                                      "base_value", "gain_pct", "gain_pct_lo", "gain_pct_hi", "n_ef", "n_base",
                                      "reason"])
    out["ci_note"] = NO_CI_WHY if metric in TIME_METRICS else ""
    return out


def efficiency_gains(eff: pd.DataFrame, lam: float, metric: str = "flops", n_boot: int = 1000, seed: int = 0,
                     ci: float = 0.95, energy_first=ENERGY_FIRST, conventional=CONVENTIONAL) -> pd.DataFrame:
    """Per (modality, energy-first arch) at ``lam``: the mean gain (%) over the datasets of the
    modality where both it and a conventional arch reached the target, with a bootstrap CI
    (each dataset's gains resampled over seeds, then averaged). Columns: ``modality, arch,
    metric, lam, datasets, baseline, gain_pct, gain_pct_lo, gain_pct_hi, n_boot, not_compared``."""
    col, direction, e, rng, alpha = _gain_setup(eff, lam, metric, seed, ci)
    per_ds = dataset_gains(eff, lam, metric, n_boot=2, seed=seed, ci=ci, energy_first=energy_first,
                           conventional=conventional)
    rows = []
    for (mod, ef), gd in per_ds.groupby(["modality", "arch"], sort=True):
        ok = gd[gd["gain_pct"].notna()]
        skipped = "; ".join(f"{r.dataset}: {r.reason}" for r in gd[gd["gain_pct"].isna()].itertuples())
        if ok.empty:
            rows.append({"modality": mod, "arch": ef, "metric": metric, "lam": lam, "datasets": "",
                         "baseline": "", "gain_pct": np.nan, "gain_pct_lo": np.nan, "gain_pct_hi": np.nan,
                         "n_boot": n_boot, "not_compared": skipped, "ci_note": ""})
            continue
        if metric in TIME_METRICS:  # one clock per batched group: no seed-bootstrap CI
            rows.append({"modality": mod, "arch": ef, "metric": metric, "lam": lam,
                         "datasets": ", ".join(ok["dataset"]),
                         "baseline": ", ".join(f"{r.dataset}: {r.baseline}" for r in ok.itertuples()),
                         "gain_pct": float(ok["gain_pct"].mean()), "gain_pct_lo": np.nan, "gain_pct_hi": np.nan,
                         "n_boot": 0, "not_compared": skipped, "ci_note": NO_CI_WHY})
            continue
        boots = []
        for r in ok.itertuples():
            cell = lambda a: e[(e["dataset"] == r.dataset) & (e["arch"] == a)]
            ge, gb = cell(ef), cell(r.baseline)
            conv_cells = {a: cell(a) for a in conventional if len(cell(a))}
            draws = []
            for _ in range(n_boot):
                ie = rng.integers(0, len(ge), len(ge))
                v_ef = _cell_value(ge[col].to_numpy(float)[ie], ge["reached"].to_numpy(bool)[ie], col)
                vb = []
                for a, ga in conv_cells.items():
                    ia = rng.integers(0, len(ga), len(ga))
                    vb.append(_cell_value(ga[col].to_numpy(float)[ia], ga["reached"].to_numpy(bool)[ia], col))
                vb = np.array(vb)
                vb = vb[np.isfinite(vb)]
                base = (vb.min() if direction == "lower" else vb.max()) if len(vb) else np.nan
                draws.append(_gain(v_ef, base, direction))
            boots.append(np.array(draws))
        with warnings.catch_warnings():  # a draw with no finite gain in any dataset: NaN, dropped below
            warnings.simplefilter("ignore", RuntimeWarning)
            gbm = np.nanmean(np.stack(boots), axis=0) if boots else np.array([])
        gbm = gbm[np.isfinite(gbm)]
        enough = len(gbm) >= max(10, n_boot // 2)
        lo, hi = (np.quantile(gbm, [alpha, 1 - alpha]) if enough else (np.nan, np.nan))
        rows.append({"modality": mod, "arch": ef, "metric": metric, "lam": lam,
                     "datasets": ", ".join(ok["dataset"]),
                     "baseline": ", ".join(f"{r.dataset}: {r.baseline}" for r in ok.itertuples()),
                     "gain_pct": float(ok["gain_pct"].mean()), "gain_pct_lo": 100 * lo, "gain_pct_hi": 100 * hi,
                     "n_boot": n_boot, "not_compared": skipped, "ci_note": "", "_draws": gbm if enough else None})
    # Bonferroni over the CIs of this metric that the report shows (one per modality x energy-first arch)
    m = sum(r.get("_draws") is not None for r in rows)
    a_adj = alpha / m if m else np.nan
    for r in rows:
        dr = r.pop("_draws", None)
        lo, hi = (np.quantile(dr, [a_adj, 1 - a_adj]) if dr is not None else (np.nan, np.nan))
        r.update(m_adj=m if dr is not None else np.nan, ci_adj_pct=100 * (1 - 2 * a_adj) if dr is not None else np.nan,
                 gain_pct_lo_adj=100 * lo, gain_pct_hi_adj=100 * hi)
    return pd.DataFrame(rows, columns=["modality", "arch", "metric", "lam", "datasets", "baseline", "gain_pct",
                                       "gain_pct_lo", "gain_pct_hi", "n_boot", "not_compared", "ci_note", "m_adj",
                                       "ci_adj_pct", "gain_pct_lo_adj", "gain_pct_hi_adj"])


def time_gains_side_by_side(gains: pd.DataFrame) -> pd.DataFrame:
    """The time-based gains of ``gains`` (the output of :func:`efficiency_gains` or :func:`dataset_gains`, any
    metrics) with the stall-robust and the raw-clock value of each quantity side by side. One row per (modality,
    [dataset,] arch, quantity): ``stall_robust_pct, raw_clock_pct, signs_disagree`` (True where both are finite,
    non-zero and of opposite sign: the two clocks disagree on which architecture is faster)."""
    keys = [k for k in ("modality", "dataset", "arch") if k in gains.columns]
    rows = []
    for quantity, (robust, clock) in TIME_PAIRS.items():
        a = gains[gains["metric"] == robust].set_index(keys)["gain_pct"]
        b = gains[gains["metric"] == clock].set_index(keys)["gain_pct"]
        for key in a.index.union(b.index, sort=False):
            ra, rb = float(a.get(key, np.nan)), float(b.get(key, np.nan))
            rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "quantity": quantity,
                         "stall_robust_pct": ra, "raw_clock_pct": rb,
                         "signs_disagree": bool(np.isfinite(ra) and np.isfinite(rb) and ra * rb < 0)})
    return pd.DataFrame(rows, columns=keys + ["quantity", "stall_robust_pct", "raw_clock_pct", "signs_disagree"])


def design_gaps(runs: pd.DataFrame, energy_first=ENERGY_FIRST, conventional=CONVENTIONAL,
                modalities=MODALITIES) -> list:
    """What the store lacks for a Finding 3 verdict: one sentence per modality that has no
    energy-first or no conventional architecture (or no runs at all). Empty = comparable."""
    # (report/sweep.py's sweep_design_gaps has the same loop shape over datasets; the checks differ)
    gaps = []
    for mod in modalities:
        r = runs[runs["modality"] == mod]
        if r.empty:
            gaps.append(f"{mod}: no runs")
            continue
        archs = set(r["arch"])
        miss = []
        if not archs & set(energy_first):
            miss.append(f"no energy-first architecture ({', '.join(energy_first)})")
        if not archs & set(conventional):
            miss.append(f"no conventional architecture ({', '.join(conventional)})")
        if miss:
            gaps.append(f"{mod}: " + " and ".join(miss))
    return gaps


#: how Finding 3's claim ("two energy-first architectures give 5–33% within-modality gains") is read:
#: ``each`` - every energy-first architecture in every modality (the claim names both; the default since session
#: 26); ``best`` - per modality only the energy-first architecture with the larger gain (the reading before it)
READINGS = ("each", "best")
#: a gain's CI against the paper's range (lo, hi): -> what it says
STATUS = {"below": "CI wholly below the paper's lower bound: the claimed gain is ruled out",
          "above": "CI wholly above the paper's upper bound: a gain, larger than the paper's range",
          "shown": "CI above zero and reaching into the paper's range: the gain is shown",
          "open": "CI includes zero but reaches the paper's range: neither shown nor ruled out"}


def range_status(lo: float, hi: float, band=(5.0, 33.0)) -> str:
    """Where a gain's CI ``[lo, hi]`` (%) lies against the paper's range ``band``: ``below`` (hi < band[0]),
    ``above`` (lo > band[1]), ``shown`` (lo > 0, the interval reaching into the band) or ``open`` (anything else,
    a missing CI included)."""
    lo, hi = float(lo), float(hi)
    if np.isfinite(hi) and hi < band[0]:
        return "below"
    if np.isfinite(lo) and lo > band[1]:
        return "above"
    if np.isfinite(lo) and lo > 0:
        return "shown"
    return "open"


def _judge(rows: pd.DataFrame, modalities, band) -> tuple:
    """``(verdict, sentence)`` of one reading's rows (one per modality: one architecture's, or the best of each
    modality); modalities of ``modalities`` without a row make it "not comparable" unless another rules the claim
    out."""
    from .render import ci as _ci

    st = {r.modality: range_status(r.gain_pct_lo, r.gain_pct_hi, band) for r in rows.itertuples()}
    pick = lambda k: [m for m, v in st.items() if v == k]  # noqa: E731
    below, above, shown, open_ = pick("below"), pick("above"), pick("shown"), pick("open")
    missing = sorted(set(modalities) - set(st))
    inside = [r.modality for r in rows.itertuples() if band[0] <= r.gain_pct <= band[1]]
    names = lambda ms: f" ({', '.join(ms)})" if 0 < len(ms) < len(st) else ""  # noqa: E731
    txt = (f"its CI lies above zero in {len(shown) + len(above)}{names(shown + above)} of {len(st)} compared "
           f"modalities, wholly below the paper's {band[0]:g}% in {len(below)}{names(below)}, wholly above its "
           f"{band[1]:g}% in {len(above)}{names(above)}, and its point estimate inside the paper's "
           f"{band[0]:g}–{band[1]:g}% in {len(inside)}{names(inside)}. Per modality: ")
    txt += "; ".join(f"{r.modality}: {_ci(r.gain_pct, r.gain_pct_lo, r.gain_pct_hi, 3)}%"
                     + (f" on {r.datasets}" if getattr(r, "datasets", "") else "") for r in rows.itertuples()) + "."
    if below:
        txt += (f" In {', '.join(below)} the CI lies wholly below the paper's {band[0]:g}%: the claimed gain is ruled "
                f"out there.")
    if above:
        txt += (f" In {', '.join(above)} the CI lies wholly above the paper's {band[1]:g}%: a gain, but larger than "
                f"the paper's range.")
    if below or above:
        return "not reproduced", txt
    if missing:
        return "not comparable", txt + f" Not compared in {', '.join(missing)}."
    if len(shown) == len(st):
        return "reproduced", txt
    return "inconclusive", txt + (f" In {', '.join(open_)} the CI includes zero but also reaches the paper's "
                                  f"{band[0]:g}%: the data neither show the gain nor rule it out there.")


def verdict_table(gains: pd.DataFrame, energy_first=ENERGY_FIRST, band=(5.0, 33.0)) -> pd.DataFrame:
    """Per (energy-first arch, modality) of the headline ``gains``: the gain, its CI, ``status`` (see
    :func:`range_status`; ``not compared`` where there is no gain) and ``in_range`` (the point estimate within
    the paper's range)."""
    rows = []
    for r in gains[gains["arch"].isin(energy_first)].itertuples():
        ok = np.isfinite(r.gain_pct)
        rows.append({"arch": r.arch, "modality": r.modality, "gain_pct": r.gain_pct, "gain_pct_lo": r.gain_pct_lo,
                     "gain_pct_hi": r.gain_pct_hi, "range_lo_pct": band[0], "range_hi_pct": band[1],
                     "status": range_status(r.gain_pct_lo, r.gain_pct_hi, band) if ok else "not compared",
                     "in_range": bool(ok and band[0] <= r.gain_pct <= band[1])})
    return pd.DataFrame(rows, columns=["arch", "modality", "gain_pct", "gain_pct_lo", "gain_pct_hi", "range_lo_pct",
                                       "range_hi_pct", "status", "in_range"])


def verdict(gains: pd.DataFrame, runs: pd.DataFrame, energy_first=ENERGY_FIRST, conventional=CONVENTIONAL,
            modalities=MODALITIES, band=(5.0, 33.0), reading: str = "each") -> tuple:
    """``(verdict, why)`` for Finding 3 from the headline ``gains`` (one metric) and the runs.

    A modality's CI is read against the paper's whole range ``band`` (5–33%, :func:`range_status`): wholly below
    5% rules the claimed gain out, wholly above 33% is a gain larger than the paper's range; both are "not
    reproduced". ``reading="each"`` (default): every energy-first architecture gets a verdict of its own over the
    modalities ("reproduced" when its CI is above zero in every one and none is outside the range; "not
    reproduced" when one is outside it; else "inconclusive"), and the claim, which names both, is reproduced
    when every architecture is, not reproduced when some architecture is not. ``reading="best"``: per modality
    only the energy-first architecture with the larger gain (point estimate: a selection) is read, by the same
    rule."""
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    gaps = design_gaps(runs, energy_first, conventional, modalities)
    if gaps:
        return "not comparable", ("no verdict: the store lacks the design of Finding 3 (every modality needs an "
                                  "energy-first and a conventional architecture). Missing: " + "; ".join(gaps) + ".")
    head = gains[gains["gain_pct"].notna()]
    none = sorted(set(modalities) - set(head["modality"]))
    reasons = "; ".join(f"{m}: " + ", ".join(f"{r.arch} ({r.not_compared})" for r in
                                             gains[gains["modality"] == m].itertuples()) for m in none)
    if head.empty:
        return "not comparable", ("no dataset has both an energy-first and a conventional architecture that "
                                  "reached the target: " + reasons + ".")
    if reading == "best":
        best = head.loc[head.groupby("modality")["gain_pct"].idxmax()]
        v, txt = _judge(best, modalities, band)
        why = ("In each modality the energy-first architecture with the larger gain (point estimate) is read ("
               + ", ".join(f"{r.modality}: {r.arch}" for r in best.itertuples()) + "): a selection after seeing the "
               f"data, so its CI is somewhat optimistic. Read so, {txt}")
        if none:
            why += f" Not compared (no dataset where both reached the target): {reasons}."
        return v, why
    archs = [a for a in energy_first if a in set(gains["arch"])]
    per = {a: _judge(head[head["arch"] == a], modalities, band) for a in archs}
    by = {k: [a for a in archs if per[a][0] == k] for k in ("reproduced", "not reproduced", "inconclusive",
                                                             "not comparable")}
    if by["not reproduced"]:
        v = "not reproduced"
    elif by["not comparable"]:
        v = "not comparable"
    elif len(by["reproduced"]) == len(archs):
        v = "reproduced"
    else:
        v = "inconclusive"
    why = (f"The paper's claim is about each of its energy-first architectures, so every one ({', '.join(archs)}) "
           f"is read in every modality, its CI against the paper's whole {band[0]:g}–{band[1]:g}% range (wholly below "
           f"{band[0]:g}%: ruled out; wholly above {band[1]:g}%: larger than claimed; above zero and reaching into "
           f"the range: shown). ")
    why += " ".join(f"{a} — {per[a][0]}: {per[a][1]}" for a in archs)
    why += (" So the claim is reproduced by " + (", ".join(by["reproduced"]) or "none") + "; not reproduced by "
            + (", ".join(by["not reproduced"]) or "none") + "; undecided for "
            + (", ".join(by["inconclusive"] + by["not comparable"]) or "none") + ".")
    if none:
        why += f" Not compared (no dataset where both reached the target): {reasons}."
    return v, why
