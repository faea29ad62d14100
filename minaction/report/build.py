"""``build_report(db, out_dir)``: the three findings of the paper, reproduced or not.

Writes into ``out_dir``:

* ``report.md`` - the report (figures linked);
* ``report.html`` - the same, self-contained (figures embedded as base64 PNG);
* ``figures/*.png`` - every figure;
* ``tables/*.csv`` - every table, at full precision. Each number of ``report.md`` is one of
  these values rounded to at most 4 significant digits (:func:`render.check_traceable`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from . import definitions, finding1, finding2, finding3, limitations, overview
from . import efficiency as _eff
from .context import ReportContext
from .render import to_html, to_markdown
from .store import CONVENTIONAL, ENERGY_FIRST, load_store, select_budget

@dataclass
class ReportOptions:
    """Every choice the report makes that the paper does not fix (all documented in the report)."""

    n_boot: int = 1000  # bootstrap resamples for every CI that is not a t interval
    seed: int = 0  # bootstrap seed
    ci: float = 0.95  # confidence level
    anova_type: int = 3  # the ANOVA type the verdict of Finding 1 reads (both are reported)
    negligible_np2: float = 0.01  # "negligible" partial eta^2 (Cohen's small effect)
    large_np2: float = 0.14  # "large" partial eta^2 (Cohen's large effect)
    alpha: float = 0.001  # the paper's p threshold for the interaction
    lam: float | None = None  # lambda of Findings 1 and 3 (None: the lambda with the most runs)
    sweep_datasets: tuple = ("mnist", "fashion_mnist")  # the paper's lambda-sweep datasets
    sweep_max_acc_pp: float = 0.5  # "< 0.5 percentage points"
    sweep_min_orders: float = 2.5  # "about three orders of magnitude"
    sweep_moderate_lam: float = 1e-3  # v1's "moderate lambda" (E "to 6% of baseline")
    target_frac: float = 0.95  # target accuracy = target_frac x best final val accuracy on the dataset
    target_by: str = "dataset"  # whose best: "dataset" (any architecture there, MISSION) or "arch" (its own)
    efficiency_metric: str = "flops"  # headline metric of Finding 3: steps, samples or flops (time: secondary)
    finding3_reading: str = "each"  # Finding 3's verdict reads every energy-first arch ("each") or the best per modality
    energy_first: tuple = ENERGY_FIRST
    conventional: tuple = CONVENTIONAL
    preset: str | None = None  # report only this preset's runs (needed when the store mixes budgets)
    budget: tuple = ()  # ... or only these budget ids (prefixes; one per dataset)
    design: str | None = None  # the preset this store is measured against: the report names its missing runs
    quick_preset_words: tuple = ("smoke", "quick")  # a preset whose name has one of these is a quick look
    eta_kind: str = "partial"  # the eta squared the Finding 1 verdict reads: partial or plain (both are shown)
    eta_reading_margin: float = 1.0  # log10 distances closer than this do not tell which eta^2 the paper reports
    min_replicates: int = 2  # runs (seeds) every cell of a design needs before a verdict ...
    max_thin_frac: float = 0.25  # ... except this fraction of Finding 1's cells (e.g. one failed run)
    finding1_min_modalities: int = 2  # Finding 1 needs datasets of this many modalities (and every architecture)
    tost_alpha: float = 0.05  # TOST level of Finding 2 (each one-sided test; margin: sweep_max_acc_pp)
    noisy_test_se_pp: float = 1.0  # Limitations names datasets whose one-run binomial SE is at least this (pp)
    source: str | None = None  # what the report names as the runs' source (None: the store path as given)
    extra: dict = field(default_factory=dict)


def choose_main_lam(runs: pd.DataFrame) -> float:
    """The lambda with the most finished runs (ties: the smallest)."""
    if runs.empty:
        raise ValueError("no finished runs in the store")
    counts = runs.groupby("lam").size()
    return float(counts[counts == counts.max()].index.min())


def _build(rep) -> dict:
    runs = rep.store.runs
    if runs.empty:
        raise ValueError(f"{rep.store.path}: no finished runs (status 'done') to report on")
    rep.main_lam = float(rep.opt.lam) if rep.opt.lam is not None else choose_main_lam(runs)
    if not (runs["lam"] == rep.main_lam).any():  # selected as the findings select it
        have = ", ".join(f"{v:g}" for v in sorted(runs["lam"].astype(float).unique()))
        raise ValueError(f"--lam {rep.main_lam:g}: no finished run at that λ (the store's finished runs have λ in "
                         f"{{{have}}})")
    archs = set(runs["arch"])
    for key, default in (("energy_first", ENERGY_FIRST), ("conventional", CONVENTIONAL)):
        named = tuple(getattr(rep.opt, key))
        absent = [a for a in named if a not in archs]
        if named != tuple(default) and absent:  # a name given by hand that no run has: a typo, or another store's
            rep.notices.append(f"--{key.replace('_', '-')} names {', '.join(map(repr, absent))}, of which no run has "
                               f"finished (the finished runs are of {', '.join(sorted(archs))}): Finding 3 reads "
                               f"without {'it' if len(absent) == 1 else 'them'}")
    overview.section(rep)
    body_start = len(rep.doc.blocks)
    finding1.section(rep)
    finding2.section(rep)
    finding3.section(rep)
    body = rep.doc.blocks[body_start:]
    rep.doc.blocks = rep.doc.blocks[:body_start]
    definitions.section(rep)
    comp = pd.DataFrame(rep.comparison)
    comp_rel = rep.csv("paper_comparison", comp)
    rep.doc.h(1, "Summary: the paper's findings beside ours")
    rep.doc.table(comp, comp_rel, "Paper against this study")
    defs = pd.DataFrame(rep.definitions)
    defs_rel = rep.csv("definitions", defs)
    rep.doc.h(1, "Definitions (this project's, where the paper is silent)")
    rep.doc.table(defs, defs_rel, "Definitions and options")
    limitations.section(rep)
    rep.doc.blocks += body
    (rep.out / "report.md").write_text(to_markdown(rep.doc, rep.out), encoding="utf-8")
    (rep.out / "report.html").write_text(to_html(rep.doc), encoding="utf-8")
    (rep.out / "tables" / "options.json").write_text(json.dumps(asdict(rep.opt), indent=2, default=str))
    return {"out_dir": str(rep.out), "report_md": str(rep.out / "report.md"),
            "report_html": str(rep.out / "report.html"), "tables": [str(rep.out / c) for c in rep.csvs],
            "figures": sorted(str(p) for p in rep.fig_dir.glob("*.png")),
            "verdicts": {int(c["finding"]): c["verdict"] for c in rep.comparison}, "notices": list(rep.notices)}


def build_report(db, out_dir, options: ReportOptions | None = None, **kwargs) -> dict:
    """Build the report of the study store ``db`` into ``out_dir`` (created if needed).

    ``options`` (or keyword overrides of :class:`ReportOptions` fields, e.g. ``n_boot=200``)
    sets every choice the paper leaves open. Returns a dict with the paths written and the
    verdict of each finding ("reproduced", "not reproduced", "inconclusive" or "not comparable"); every
    path in it includes ``out_dir`` (the tables' too).
    """
    opt = options or ReportOptions()
    if kwargs:
        unknown = set(kwargs) - set(ReportOptions.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown report options: {sorted(unknown)}")
        opt = ReportOptions(**{**asdict(opt), **kwargs})
    check_options(opt)
    store = select_budget(load_store(db), preset=opt.preset, budget=tuple(opt.budget or ()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _build(ReportContext(store, out, opt))


def check_options(opt: ReportOptions) -> None:
    """Raise ValueError naming the first option out of its range (before any store is read: ``replicate``
    checks them before it trains)."""
    if opt.lam is not None and (isinstance(opt.lam, bool) or not isinstance(opt.lam, (int, float))
                                or not opt.lam >= 0):
        raise ValueError(f"lam must be a number >= 0 (a λ of the study), got {opt.lam!r}")
    if opt.eta_kind not in ("partial", "plain"):
        raise ValueError(f"eta_kind must be 'partial' or 'plain', got {opt.eta_kind!r}")
    if opt.min_replicates < 2:
        raise ValueError(f"min_replicates must be >= 2 (a cell needs replicates for a residual), got {opt.min_replicates}")
    if opt.anova_type not in (2, 3):
        raise ValueError(f"anova_type must be 2 or 3, got {opt.anova_type}")
    if opt.target_by not in ("dataset", "arch"):
        raise ValueError(f"target_by must be 'dataset' or 'arch', got {opt.target_by!r}")
    if opt.finding3_reading not in _eff.READINGS:
        raise ValueError(f"finding3_reading must be one of {list(_eff.READINGS)}, got {opt.finding3_reading!r}")
    if opt.efficiency_metric not in _eff.METRICS:
        raise ValueError(f"efficiency_metric must be one of {sorted(_eff.METRICS)}, got {opt.efficiency_metric!r}")
    for name, hi, closed in (("ci", 1.0, False), ("target_frac", 1.0, True), ("tost_alpha", 0.5, False),
                             ("alpha", 1.0, False)):
        v = getattr(opt, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < hi or (closed and v == hi)):
            raise ValueError(f"{name} must be a number in (0, {hi:g}{']' if closed else ')'}, got {v!r}")
    if isinstance(opt.n_boot, bool) or not isinstance(opt.n_boot, int) or opt.n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2 (bootstrap resamples), got {opt.n_boot!r}")
