"""The report's figures (matplotlib, Agg backend: no display needed), written as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def interaction_plot(cells: pd.DataFrame, path: Path) -> Path:
    """Mean accuracy per dataset (x) with one line per architecture, 95% CI error bars.

    ``cells``: columns ``arch, dataset, mean, ci_lo, ci_hi``.
    """
    plt = _plt()
    datasets = sorted(cells["dataset"].unique())
    x = np.arange(len(datasets))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(datasets)), 4.2))
    for k, (arch, g) in enumerate(cells.groupby("arch", sort=True)):
        g = g.set_index("dataset").reindex(datasets)
        m = 100 * g["mean"].to_numpy(float)
        err = np.abs(100 * np.vstack([g["mean"] - g["ci_lo"], g["ci_hi"] - g["mean"]]).astype(float))
        err = np.nan_to_num(err)
        ax.errorbar(x + 0.04 * (k - 1.5), m, yerr=err, marker="o", capsize=3, label=arch)
    ax.set_xticks(x)
    ax.set_xticklabels(datasets, rotation=20)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Architecture x dataset: mean test accuracy (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def sweep_plot(sweep: pd.DataFrame, path: Path) -> Path:
    """One row per dataset: E/E(0) and rescaled E/E(0) (log-log), accuracy change (pp),
    and the fraction of active units, against lambda on a log axis (lambda = 0 is the
    reference, drawn as a horizontal line)."""
    plt = _plt()
    sw = sweep[sweep["lam"] > 0]
    datasets = sorted(sw["dataset"].unique())
    nr = max(1, len(datasets))
    fig, axes = plt.subplots(nr, 3, figsize=(13, 3.2 * nr), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, ds in enumerate(datasets):
        g = sw[sw["dataset"] == ds]
        for k, (arch, ga) in enumerate(g.groupby("arch", sort=True)):
            c = colors[k % len(colors)]
            ga = ga.sort_values("lam")
            lam = ga["lam"].to_numpy(float)
            ax = axes[j, 0]
            ax.plot(lam, ga["E_ratio"], "-o", color=c, label=f"{arch}: E")
            ax.fill_between(lam, ga["E_ratio_lo"].fillna(ga["E_ratio"]), ga["E_ratio_hi"].fillna(ga["E_ratio"]),
                            color=c, alpha=0.15)
            ax.plot(lam, ga["Eresc_ratio"], "--s", color=c, ms=4, label=f"{arch}: rescaled E")
            ax = axes[j, 1]
            ax.errorbar(lam, ga["d_acc_pp"],
                        yerr=np.nan_to_num(np.abs(np.vstack([ga["d_acc_pp"] - ga["d_acc_pp_lo"],
                                                             ga["d_acc_pp_hi"] - ga["d_acc_pp"]]).astype(float))),
                        fmt="-o", color=c, capsize=3, label=arch)
            axes[j, 2].plot(lam, ga["active_frac"], "-o", color=c, label=arch)
            axes[j, 2].axhline(ga["active_frac_0"].iloc[0], color=c, lw=0.8, ls=":")
        ratios = g[["E_ratio", "Eresc_ratio"]].to_numpy(float)
        if np.any(np.isfinite(ratios) & (ratios > 0)):
            axes[j, 0].set_yscale("log")
        axes[j, 0].axhline(1.0, color="k", lw=0.8)
        axes[j, 0].set_ylabel(f"{ds}\nE(λ) / E(0), test split")
        axes[j, 1].axhline(0.0, color="k", lw=0.8)
        for s in (-0.5, 0.5):
            axes[j, 1].axhline(s, color="r", lw=0.6, ls="--")
        axes[j, 1].set_ylabel("accuracy change (pp)")
        axes[j, 2].set_ylabel("fraction of active units")
        for i in range(3):
            axes[j, i].set_xscale("log")
            axes[j, i].grid(alpha=0.3)
    for i in range(3):
        axes[-1, i].set_xlabel("λ (log scale)")
    if datasets:
        axes[0, 0].legend(fontsize=6, loc="lower left")
        axes[0, 1].legend(fontsize=7)
    # fixed margins: tight_layout costs seconds per figure on a tall grid of log axes
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.6 / (3.2 * nr), top=1 - 0.2 / (3.2 * nr), wspace=0.3,
                        hspace=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def efficiency_plot(gains: pd.DataFrame, path: Path) -> Path:
    """Relative gain (%) of each energy-first arch per modality, with CI, per metric."""
    plt = _plt()
    metrics = list(dict.fromkeys(gains["metric"]))
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 4), squeeze=False)
    for j, metric in enumerate(metrics):
        ax = axes[0, j]
        g = gains[gains["metric"] == metric].reset_index(drop=True)
        labels = [f"{m}\n{a}" for m, a in zip(g["modality"], g["arch"])]
        y = g["gain_pct"].to_numpy(float)
        err = np.nan_to_num(np.abs(np.vstack([y - g["gain_pct_lo"], g["gain_pct_hi"] - y]).astype(float)))
        ax.bar(np.arange(len(g)), np.nan_to_num(y), yerr=err, capsize=3,
               color=["tab:green" if v > 0 else "tab:red" for v in np.nan_to_num(y)])
        for k in np.where(~np.isfinite(y))[0]:
            ax.text(k, 0, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")
        ax.axhspan(5, 33, color="tab:blue", alpha=0.12, label="paper: 5–33%")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(g)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(f"gain vs best conventional (%), {metric}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def curves_plot(runs: pd.DataFrame, epochs: pd.DataFrame, lam: float, path: Path) -> Path:
    """Validation accuracy against cumulative training time, mean per (dataset, arch)."""
    plt = _plt()
    r = runs[runs["lam"] == lam][["run_id", "dataset", "arch"]]
    ep = epochs.merge(r, on="run_id")
    datasets = sorted(ep["dataset"].unique())
    nc = max(1, len(datasets))
    fig, axes = plt.subplots(1, nc, figsize=(3.6 * nc, 3.4), squeeze=False)
    for j, ds in enumerate(datasets):
        ax = axes[0, j]
        for arch, g in ep[ep["dataset"] == ds].groupby("arch", sort=True):
            m = g.groupby("epoch")[["wall_time_s", "val_acc"]].mean()
            ax.plot(m["wall_time_s"], 100 * m["val_acc"], "-o", ms=3, label=arch)
        ax.set_title(ds)
        ax.set_xlabel("training time (s)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("validation accuracy (%)")
    if datasets:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
