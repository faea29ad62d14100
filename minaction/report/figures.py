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


#: Width (CSS px) of the report.html column a figure is shown in (max-width 1100 px minus padding).
SHOWN_WIDTH_PX = 1068
#: Smallest text height (px, at the size shown) that stays legible.
MIN_TEXT_PX = 7.5
#: Layout problems found when each figure was saved: {file name: [problem, ...]}.
PROBLEMS: dict = {}
REF = "ref"  # gid of reference lines/bands (they do not make a panel non-empty)


def layout_problems(fig, shown_width_px: float = SHOWN_WIDTH_PX, min_text_px: float = MIN_TEXT_PX) -> list:
    """What is wrong with ``fig`` as shown in the report, one sentence per problem.

    Checks, after drawing: every visible axes shows data besides reference lines (no empty
    panel); no two texts (tick labels, axis labels, titles, legends) overlap; no text leaves
    the figure; a legend outside every axes covers none of them; and the smallest text is at
    least ``min_text_px`` pixels high once the figure is scaled to ``shown_width_px``.
    """
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    scale = min(1.0, shown_width_px / W)
    probs, boxes = [], []
    for k, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = ax.get_title() or ax.get_ylabel().replace("\n", " ") or f"axes {k}"
        data = [a for a in (*ax.lines, *ax.collections, *ax.patches, *ax.images) if a.get_gid() != REF]
        if not data:
            probs.append(f"empty panel: {name!r}")
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts = [(t, f"{name}: x tick {t.get_text()!r}") for t in ax.get_xticklabels()
                 if x0 <= t.get_position()[0] <= x1]  # matplotlib keeps (undrawn) ticks outside the view
        texts += [(t, f"{name}: y tick {t.get_text()!r}") for t in ax.get_yticklabels()
                  if y0 <= t.get_position()[1] <= y1]
        texts += [(ax.xaxis.label, f"{name}: x label"), (ax.yaxis.label, f"{name}: y label"),
                  (ax.title, f"{name}: title")]
        for t, what in texts:
            if t.get_visible() and t.get_text().strip():
                boxes.append((t.get_window_extent(r), what, t.get_fontsize()))
        leg = ax.get_legend()
        if leg is not None:
            boxes.append((leg.get_window_extent(r), f"{name}: legend", min(t.get_fontsize() for t in leg.get_texts())))
    for leg in fig.legends:
        bb = leg.get_window_extent(r)
        boxes.append((bb, "figure legend", min(t.get_fontsize() for t in leg.get_texts())))
        for ax in fig.axes:
            if ax.get_visible() and bb.overlaps(ax.get_window_extent(r)):
                probs.append("the figure legend covers a panel")
                break
    for i, (b1, w1, _) in enumerate(boxes):
        if b1.x0 < -1 or b1.y0 < -1 or b1.x1 > W + 1 or b1.y1 > H + 1:
            probs.append(f"{w1} is cut off at the figure's edge")
        for b2, w2, _ in boxes[i + 1:]:
            if b1.overlaps(b2) and (min(b1.x1, b2.x1) - max(b1.x0, b2.x0)) > 1 and \
                    (min(b1.y1, b2.y1) - max(b1.y0, b2.y0)) > 1:
                probs.append(f"{w1} overlaps {w2}")
    if boxes:
        px = min(fs for _, _, fs in boxes) * fig.dpi / 72 * scale
        if px < min_text_px:
            probs.append(f"smallest text is {px:.1f} px high when shown {min(W, shown_width_px):.0f} px wide "
                         f"(at least {min_text_px} needed)")
    return probs


def _panel_grid(n: int, max_cols: int, panel_w: float, panel_h: float, **kw):
    """A figure of ``n`` panels (at least one), at most ``max_cols`` per row, each ``panel_w`` x ``panel_h``
    inches; returns it and its panels in reading order. The grid's spare cells are hidden, not blanked with
    ``axis("off")``, which the layout check counts as empty panels."""
    nc = max(1, min(max_cols, n))
    nr = max(1, -(-n // nc))
    fig, axes = _plt().subplots(nr, nc, figsize=(panel_w * nc, panel_h * nr), squeeze=False, **kw)
    flat = list(axes.flat)
    for ax in flat[max(1, n):]:
        ax.set_visible(False)
    return fig, flat


def _save(fig, path: Path, dpi: float):
    """Save ``fig`` at ``dpi`` and record its layout problems (at that dpi) in :data:`PROBLEMS`."""
    plt = _plt()
    fig.set_dpi(dpi)
    PROBLEMS[Path(path).name] = layout_problems(fig)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def interaction_plot(cells: pd.DataFrame, path: Path) -> Path:
    """Mean accuracy per dataset (x) with one line per architecture, 95% CI error bars.

    ``cells``: columns ``arch, dataset, mean, ci_lo, ci_hi``. The legend sits above the
    panel (it never hides a point); the architectures are spread a little along x so that
    their error bars do not cover each other.
    """
    plt = _plt()
    datasets = sorted(cells["dataset"].unique())
    archs = sorted(cells["arch"].unique())
    x = np.arange(len(datasets))
    fig, ax = plt.subplots(figsize=(max(7.0, min(13.0, 1.2 * len(datasets) + 2)), 4.6))
    spread = min(0.3, 0.6 / max(1, len(archs)))
    for k, arch in enumerate(archs):
        g = cells[cells["arch"] == arch].set_index("dataset").reindex(datasets)
        m = 100 * g["mean"].to_numpy(float)
        err = np.abs(100 * np.vstack([g["mean"] - g["ci_lo"], g["ci_hi"] - g["mean"]]).astype(float))
        err = np.nan_to_num(err)
        ax.errorbar(x + spread * (k - (len(archs) - 1) / 2), m, yerr=err, marker="o", ms=4, capsize=3, lw=1.2,
                    label=arch)
    ax.set_xticks(x)
    width_in = fig.get_size_inches()[0] * 0.85
    label_in = max(len(d) for d in datasets) * 0.6 * 9 / 72  # ~0.6 em per character
    slot_in = width_in / len(datasets)
    # level if the longest name fits its slot; else slanted 45° where the slanted names' boxes still clear each
    # other (30° left fashion_mnist and fashion_mnist_spikes overlapping on a 10-dataset store); else upright
    rot = {} if label_in < slot_in else ({"rotation": 45, "ha": "right", "rotation_mode": "anchor"}
                                         if label_in * 0.72 < 0.9 * slot_in else {"rotation": 90})
    ax.set_xticklabels(datasets, fontsize=9, **rot)
    ax.set_xlim(-0.6, len(datasets) - 0.4)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title("Architecture × dataset: mean test accuracy (95% CI)", pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(archs), 5), fontsize=9, frameon=False)
    fig.tight_layout()
    _save(fig, path, 90)
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
    archs = sorted(sw["arch"].unique())  # one colour per architecture in every row (a row's own order shifted them)
    color_of = {a: colors[k % len(colors)] for k, a in enumerate(archs)}
    for j, ds in enumerate(datasets):
        g = sw[sw["dataset"] == ds]
        for arch, ga in g.groupby("arch", sort=True):
            c = color_of[arch]
            ga = ga.sort_values("lam")
            lam = ga["lam"].to_numpy(float)
            ax = axes[j, 0]
            ax.plot(lam, ga["E_ratio"], "-o", color=c, label=arch)
            ax.fill_between(lam, ga["E_ratio_lo"].fillna(ga["E_ratio"]), ga["E_ratio_hi"].fillna(ga["E_ratio"]),
                            color=c, alpha=0.15)
            ax.plot(lam, ga["Eresc_ratio"], "--s", color=c, ms=4)
            ax = axes[j, 1]
            ax.errorbar(lam, ga["d_acc_pp"],
                        yerr=np.nan_to_num(np.abs(np.vstack([ga["d_acc_pp"] - ga["d_acc_pp_lo"],
                                                             ga["d_acc_pp_hi"] - ga["d_acc_pp"]]).astype(float))),
                        fmt="-o", color=c, capsize=3, label=arch)
            axes[j, 2].plot(lam, ga["active_frac"], "-o", color=c, label=arch)
            axes[j, 2].axhline(ga["active_frac_0"].iloc[0], color=c, lw=0.8, ls=":", gid=REF)
        ratios = g[["E_ratio", "Eresc_ratio"]].to_numpy(float)
        if np.any(np.isfinite(ratios) & (ratios > 0)):
            axes[j, 0].set_yscale("log")
        axes[j, 0].axhline(1.0, color="k", lw=0.8, gid=REF)
        axes[j, 0].set_ylabel(f"{ds}\nE(λ) / E(0), test split")
        axes[j, 1].axhline(0.0, color="k", lw=0.8, gid=REF)
        for s in (-0.5, 0.5):
            axes[j, 1].axhline(s, color="r", lw=0.6, ls="--", gid=REF)
        axes[j, 1].set_ylabel("accuracy change (pp)")
        axes[j, 2].set_ylabel("fraction of active units")
        for i in range(3):
            axes[j, i].set_xscale("log")
            axes[j, i].grid(alpha=0.3)
    for i in range(3):
        axes[-1, i].set_xlabel("λ (log scale)")
    if datasets:  # one legend for the whole figure, above the panels (never over the data)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=color_of[a], ls="-", marker="o") for a in archs]  # every row's archs
        labels = list(archs)
        handles += [Line2D([], [], color="0.3", ls="-", marker="o"), Line2D([], [], color="0.3", ls="--", marker="s",
                                                                             ms=4),
                    Line2D([], [], color="r", ls="--", lw=0.6), Line2D([], [], color="0.3", ls=":", lw=0.8)]
        labels += ["E(λ)/E(0)", "rescaled E ratio", "±0.5 pp", "active fraction at λ = 0"]
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, 1.0))
    # fixed margins: tight_layout costs seconds per figure on a tall grid of log axes
    height = 3.2 * nr + 0.5
    fig.set_size_inches(13, height)
    longest = max((len(d) for d in datasets), default=4)  # the row label is the dataset's name: room for it
    fig.subplots_adjust(left=min(0.16, 0.045 + 0.0055 * longest), right=0.98, bottom=0.6 / height,
                        top=1 - 0.75 / height, wspace=0.3, hspace=0.3)
    _save(fig, path, 80)
    return path


def efficiency_plot(gains: pd.DataFrame, path: Path, names: dict | None = None) -> Path:
    """Relative gain (%) of each energy-first arch per modality, per metric (one panel each, in the order of
    ``gains``): horizontal bars, one labelled row per (modality, architecture), so the labels never overlap.
    Whiskers are the CI (``gain_pct_lo`` / ``gain_pct_hi``) and are drawn only where it exists: the time-based
    metrics have none, and a zero-width whisker would read as a certain value. ``names``: metric -> panel label."""
    _save(efficiency_figure(gains, names), path, 80)
    return path


def efficiency_figure(gains: pd.DataFrame, names: dict | None = None):
    """The figure of :func:`efficiency_plot`, not saved (tests inspect it)."""
    metrics = list(dict.fromkeys(gains["metric"]))
    n = max((int((gains["metric"] == m).sum()) for m in metrics), default=1)
    # at most two panels per row: four side by side were 1,536 px wide, shown at 1,068, their 7-point text 5 px
    fig, panels = _panel_grid(len(metrics), 2, 5.2, 1.6 + 0.38 * n, sharey=True)
    for metric, ax in zip(metrics, panels):
        g = gains[gains["metric"] == metric].reset_index(drop=True)
        labels = [f"{m} · {a}" for m, a in zip(g["modality"], g["arch"])]
        y = g["gain_pct"].to_numpy(float)
        lo, hi = g["gain_pct_lo"].to_numpy(float), g["gain_pct_hi"].to_numpy(float)
        pos = np.arange(len(g))[::-1]  # first row on top
        ax.barh(pos, np.nan_to_num(y), color=["tab:green" if v > 0 else "tab:red" for v in np.nan_to_num(y)])
        has = np.isfinite(y) & np.isfinite(lo) & np.isfinite(hi)
        if has.any():
            ax.errorbar(y[has], pos[has], xerr=np.abs(np.vstack([y[has] - lo[has], hi[has] - y[has]])), fmt="none",
                        ecolor="k", capsize=3, lw=1)
        for k in np.where(~np.isfinite(y))[0]:
            ax.text(0, pos[k], " n/a", ha="left", va="center", fontsize=8, color="0.4")
        ax.axvspan(5, 33, color="tab:blue", alpha=0.12, label="paper: 5–33%")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=8)
        what = (names or {}).get(metric, metric)
        ax.set_xlabel(f"gain vs best conventional (%)\n{what}" + ("" if has.any() else " (no CI)"), fontsize=9)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


#: the learning-curve figure draws a (dataset, architecture) curve while at least this share of its runs trains
MIN_SHARE_TRAINING = 0.5


def curves_plot(runs: pd.DataFrame, epochs: pd.DataFrame, lam: float, path: Path,
                evals: pd.DataFrame | None = None) -> Path:
    """Validation accuracy against the *stall-robust* training time, mean per (dataset, arch): each evaluation
    point of a run (``efficiency.curves``: every evaluation where the store has them, else every epoch) is placed
    at its progress (optimizer steps; epochs without steps) × the run's median seconds per unit of progress, the
    time the report's tables use, so that figure and tables measure time alike."""
    _save(curves_figure(runs, epochs, lam, evals), path, 80)
    return path


def curves_figure(runs: pd.DataFrame, epochs: pd.DataFrame | None, lam: float, evals: pd.DataFrame | None = None):
    """The figure of :func:`curves_plot`, not saved (tests inspect it)."""
    from .efficiency import _seconds_per_unit, curves

    r = runs[runs["lam"] == lam][["run_id", "dataset", "arch"]]
    cur = curves(runs[runs["lam"] == lam], epochs, evals)
    rate = _seconds_per_unit(cur) if len(cur) else pd.Series(dtype=float)
    cur = cur.assign(unit=cur["step"].where(cur["step"].notna(), cur["epoch"]))
    cur = cur.assign(robust_s=cur["unit"] * cur["run_id"].map(rate)).merge(r, on="run_id")
    cur = cur[cur["unit"].notna() & cur["robust_s"].notna()]
    datasets = sorted(cur["dataset"].unique())
    # a grid of at most 4 panels per row: one row of 10 panels was 2880 px wide, and report.html (figures at
    # most ~1070 px wide) showed it 100 px tall, its text unreadable (session 24's audit)
    fig, panels = _panel_grid(len(datasets), 4, 3.6, 3.0)
    for ds, ax in zip(datasets, panels):
        for arch, g in cur[cur["dataset"] == ds].groupby("arch", sort=True):
            m = g.groupby("unit").agg(robust_s=("robust_s", "mean"), val_acc=("val_acc", "mean"),
                                      n=("run_id", "nunique"))
            # drawn while at least half of the runs still train: past that a point averaged the one or two seeds
            # that stopped last, and the tail jumped with them (MIN_SHARE_TRAINING)
            m = m[m["n"] >= MIN_SHARE_TRAINING * g["run_id"].nunique()]
            ax.plot(m["robust_s"], 100 * m["val_acc"], "-", marker="o" if len(m) <= 40 else None, ms=3, lw=1,
                    label=arch)
        ax.set_title(ds)
        ax.set_xlabel("training time (s), stall-robust")
        ax.grid(alpha=0.3)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("validation accuracy (%)")
    if datasets:
        panels[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
