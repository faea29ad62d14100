"""The report's Limitations section: what this store can and cannot say, from its own data
(scale, λ values, test-set sizes, seed-to-seed spread per dataset) plus the facts every
replication of a paper without public code shares (the architectures are reconstructions)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .context import fmt_p
from .paper import PAPER
from .render import fmt

#: what a dataset's "whole split" is where that is not the dataset everyone knows by its name
DATASET_NOTES = {
    "nmnist": "N-MNIST small (slayerPytorch's NMNISTsmall: 1,000 train / 100 test recordings), a subset of "
              "N-MNIST (60,000 / 10,000)",
}


def inferred_test_size(acc, max_n: int = 100_000, rel_tol: float = 1e-7):
    """The test-set size the accuracies ``acc`` imply: the smallest n for which every accuracy is a
    whole number of samples out of n (within ``rel_tol`` of a sample), or None (none up to ``max_n``,
    e.g. accuracies stored in single precision or averaged)."""
    a = np.asarray(acc, float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return None
    a = np.unique(a)[:64]  # enough to pin n; bounds the work
    for start in range(1, max_n + 1, 4096):
        n = np.arange(start, min(start + 4096, max_n + 1), dtype=float)
        x = a[:, None] * n[None, :]
        ok = np.all(np.abs(x - np.round(x)) <= rel_tol * n[None, :], axis=0)
        if ok.any():
            return int(n[int(np.argmax(ok))])
    return None


def machine_label(prov) -> str:
    """A run's machine as its provenance names it: CPU model name and vendor/family/model (stores of session 27
    on), else model name and kernel ISA; "unknown" for a run recorded without provenance."""
    if not prov:
        return "unknown"
    name = prov.get("cpu") or "unknown CPU"
    if prov.get("cpu_id"):
        return f"{name} ({prov['cpu_id']})"
    return f"{name} ({prov.get('isa') or 'ISA n/a'}; family not recorded)"


def machine_table(runs: pd.DataFrame, provenance: dict) -> pd.DataFrame:
    """``arch, dataset, machine, runs``: where each architecture's runs on each dataset were trained."""
    df = pd.DataFrame({"arch": runs["arch"].to_numpy(), "dataset": runs["dataset"].to_numpy(),
                       "machine": [machine_label(provenance.get(r)) for r in runs["run_id"]]})
    return df.groupby(["arch", "dataset", "machine"]).size().rename("runs").reset_index()


def dataset_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset: ``dataset, modality, runs, test_n`` (inferred, :func:`inferred_test_size`), ``mean_test_acc``,
    ``binomial_se_pp`` (sqrt(p (1 - p) / n) at the mean, in percentage points), ``within_cell_sd`` (the
    seed-to-seed SD of test accuracy, pooled over the dataset's (architecture, λ) cells), the smallest and
    largest SD of one cell (``cell_sd_min``, ``cell_sd_max``, with the cell) and ``note``."""
    rows = []
    for (mod, ds), g in runs.groupby(["modality", "dataset"], sort=True):
        n = inferred_test_size(g["test_acc"])
        p = float(g["test_acc"].mean())
        se = 100 * float(np.sqrt(p * (1 - p) / n)) if n else np.nan
        dev = g.groupby(["arch", "lam"])["test_acc"].agg(["var", "size"])
        dev = dev[dev["size"] > 1]
        dof = float((dev["size"] - 1).sum())
        sd = float(np.sqrt(((dev["size"] - 1) * dev["var"]).sum() / dof)) if dof > 0 else np.nan
        cell_sd = g.groupby(["arch", "lam"])["test_acc"].std(ddof=1).dropna()
        several = g["lam"].nunique() > 1
        cell = lambda k: f"{ds}/{k[0]}" + (f"/λ={k[1]:g}" if several else "")  # noqa: E731
        rows.append({"dataset": ds, "modality": mod, "runs": int(len(g)), "test_n": n, "mean_test_acc": p,
                     "binomial_se_pp": se, "within_cell_sd": sd,
                     "cell_sd_min": float(cell_sd.min()) if len(cell_sd) else np.nan,
                     "cell_sd_min_cell": cell(cell_sd.idxmin()) if len(cell_sd) else "",
                     "cell_sd_max": float(cell_sd.max()) if len(cell_sd) else np.nan,
                     "cell_sd_max_cell": cell(cell_sd.idxmax()) if len(cell_sd) else "",
                     "note": DATASET_NOTES.get(ds, "")})
    return pd.DataFrame(rows, columns=["dataset", "modality", "runs", "test_n", "mean_test_acc", "binomial_se_pp",
                                       "within_cell_sd", "cell_sd_min", "cell_sd_min_cell", "cell_sd_max",
                                       "cell_sd_max_cell", "note"])


def section(rep) -> None:
    """Write the Limitations section into ``rep``."""
    opt, runs, d = rep.opt, rep.store.runs, rep.doc
    table = dataset_table(runs)
    rel = rep.csv("limitations", table)
    d.h(1, "Limitations")
    items = []
    backends = sorted(str(b) for b in rep.store.runs_all.get("backend", pd.Series(dtype=str)).dropna().unique())
    cpu_only = bool(backends) and set(backends) == {"cpu"}
    items.append(f"Scale: {len(runs)} finished runs of {runs['dataset'].nunique()} datasets and "
                 f"{runs['arch'].nunique()} architectures against the paper's {PAPER['n_experiments']} experiments"
                 + (f"; trained with the `{'`, `'.join(backends)}` backend" + ("s" if len(backends) > 1 else "")
                    + (" (CPU only, no GPU)" if cpu_only else "") if backends else "") + ".")
    lams = sorted(runs["lam"].unique())
    if len(lams) == 1:
        items.append(f"Every run is at λ = {fmt(lams[0])}: Findings 1 and 3 describe that λ only, not λ = 0 and "
                     "not the other λ values of the paper's grid.")
    noisy = table[table["binomial_se_pp"] >= opt.noisy_test_se_pp]
    if len(noisy):
        parts = [f"{r.dataset} ({fmt(int(r.test_n))} test samples, ±{fmt(r.binomial_se_pp, 2, zeros=True)} pp at its mean "
                 f"accuracy {fmt(r.mean_test_acc, 3, zeros=True)})" for r in noisy.itertuples()]
        items.append("Small test sets: " + "; ".join(parts) + ". The binomial standard error of one run's test "
                     "accuracy is that large there, so differences of 1–2 pp between architectures on these "
                     "datasets are within the noise of a single run (test sizes inferred from the accuracies: "
                     "the smallest n for which each is a whole number of samples out of n).")
    sd = table.dropna(subset=["within_cell_sd", "cell_sd_min", "cell_sd_max"])
    if len(sd) > 1:
        lo, hi = sd.loc[sd["cell_sd_min"].idxmin()], sd.loc[sd["cell_sd_max"].idxmax()]
        plo, phi = sd.loc[sd["within_cell_sd"].idxmin()], sd.loc[sd["within_cell_sd"].idxmax()]
        diag = getattr(rep, "finding1_diag", None)
        checks = ""
        if diag is not None and np.isfinite(diag["shapiro_w"]):
            checks = (f" The residuals of Finding 1's model fail both checks of its assumptions: Levene's test of "
                      f"equal variances over its {diag['cells']} cells gives p {fmt_p(diag['levene_p'], True)}, and "
                      f"Shapiro–Wilk gives W = {fmt(diag['shapiro_w'], 3)} (p {fmt_p(diag['shapiro_p'], True)}; 1 for "
                      f"normal residuals) (`anova_diagnostics.csv`)."
                      if diag["levene_p"] < 0.05 and diag["shapiro_p"] < 0.05 else
                      f" Levene's test of equal variances over Finding 1's {diag['cells']} cells gives p "
                      f"{fmt_p(diag['levene_p'], True)}; Shapiro–Wilk on its residuals W = {fmt(diag['shapiro_w'], 3)} "
                      f"(p {fmt_p(diag['shapiro_p'], True)}) (`anova_diagnostics.csv`).")
        items.append(f"The seed-to-seed SD of test accuracy in one cell (architecture × dataset × λ) ranges from "
                     f"{fmt(lo['cell_sd_min'], 3)} ({lo['cell_sd_min_cell']}) to {fmt(hi['cell_sd_max'], 3)} "
                     f"({hi['cell_sd_max_cell']}); pooled per dataset, from {fmt(plo['within_cell_sd'], 3)} "
                     f"({plo['dataset']}) to {fmt(phi['within_cell_sd'], 3)} ({phi['dataset']}). The ANOVA of "
                     "Finding 1 pools one residual variance over all cells: its F tests, p-values and partial η² "
                     "(and the exact CIs) assume that every cell has the same seed-to-seed variance and normal "
                     "residuals." + checks)
    judged = any(int(c["finding"]) == 1 and c["verdict"] != "not comparable" for c in rep.comparison)
    bound = getattr(rep, "finding1_bound", None)
    if judged and bound is not None and opt.eta_kind == "partial" and bound["np2_hi_at_F1"] >= opt.negligible_np2:
        items.append(f"Finding 1's rule cannot, in practice, return \"reproduced\" at this number of runs: with df "
                     f"({fmt(bound['df1'])}, {fmt(bound['df2'])}) an architecture effect of nothing (F = "
                     f"{fmt(bound['F_null'])}) has an exact CI of partial η² reaching {fmt(bound['np2_hi_at_F1'], 3)}, "
                     f"above the {fmt(bound['negligible'])} that \"negligible\" needs (`finding1_null_bound.csv`). "
                     f"A \"not reproduced\" is informative; a null architecture effect would read \"inconclusive\".")
    dup = getattr(rep, "finding1_derived", None)
    if judged and dup:
        items.append(f"Near-duplicate datasets: {dup['text']} They weaken the independence that the test with "
                     f"datasets as a random factor assumes; without them it gives F({fmt(dup['df_num'])}, "
                     f"{fmt(dup['df_den'])}) = {fmt(dup['F'], 3)}, p = {fmt_p(dup['p'])} (`anova_datasets_random.csv`).")
    if getattr(rep, "finding3_read", False):
        items.append("Training time (to target, and per accuracy) comes from one clock per batched group: the "
                     "seeds trained together share it, and a stall of the shared machine slows all of them at once. "
                     "They are not independent replicates of a time, so time-based metrics get no seed-bootstrap CI. "
                     "Each is shown twice: stall-robust (steps × the run's median seconds per step, which a stall "
                     "does not move, but which also hides a lasting change of speed within a run) and on the raw "
                     "clock (which carries both); where the two disagree in sign, neither tells which architecture "
                     "trains faster in seconds.")
        mix = machine_table(runs, rep.store.provenance)
        if mix["machine"].nunique() > 1:
            mrel = rep.csv("machines", mix)
            per = mix.groupby("machine")["runs"].sum()
            rep.csv("machines_summary", per.rename("runs").reset_index())  # (the counts the text below gives)
            unknown = int(per.pop("unknown")) if "unknown" in per.index else 0
            parts = "; ".join(f"{m}: {fmt(int(n))} runs" for m, n in per.items())
            more = (f", and {fmt(unknown)} runs do not record theirs (recorded before the store kept provenance)"
                    if unknown else "")
            items.append(f"The runs were trained on {len(per)} machine{'s' if len(per) > 1 else ''} ({parts}){more}; "
                         f"runs per architecture, dataset and machine are in `{mrel}`. A time comparison between "
                         "groups trained on different CPUs measures the CPUs as well as the architectures (cloud "
                         "CPUs of one model name differ severalfold in speed), and both of its readings share that; "
                         "accuracy, FLOPs, epochs and steps do not depend on the machine.")
        items.append("Finding 3's value of an architecture on a dataset is the mean over the runs that reached the "
                     "target; runs that did not are left out (censored), not counted as slow, so an architecture "
                     "that misses the target in some seeds looks as fast as its successful seeds (the `reached` "
                     "column says how many did; fewer than half gives no value).")
    notes = table[table["note"] != ""]
    for r in notes.itertuples():
        items.append(f"{r.dataset}: its data is {r.note}. A budget's full split (`train_subset = 0`) is the whole "
                     f"of it; a smaller `train_subset` draws from it.")
    items.append("The architectures are this project's reconstructions of the paper's Figure 1 (the caption names "
                 "bimodal_true and physics_lagrangian; the paper's code and equations are not public, "
                 "docs/models.md): a verdict on them is a verdict on our reading of the paper.")
    d.bullets(items)
    disp = pd.DataFrame({"dataset": table["dataset"], "modality": table["modality"], "runs": table["runs"],
                         "test n": table["test_n"].map(lambda v: "n/a" if v is None or pd.isna(v) else str(int(v))),
                         "mean test acc": table["mean_test_acc"].map(lambda v: fmt(v, zeros=True)),
                         "binomial SE (pp)": table["binomial_se_pp"].map(lambda v: fmt(v, 2, zeros=True)),
                         "seed-to-seed SD": table["within_cell_sd"].map(fmt)})
    d.table(disp, rel, "Per dataset: test-set size (inferred), the binomial standard error of one run's test "
                       "accuracy at the dataset's mean, and the seed-to-seed SD of test accuracy pooled over the "
                       "dataset's (architecture, λ) cells")
