"""What every section of the report writes into: the document, its tables (CSV), figures,
the verdict rows of the paper comparison and the definitions; number formats shared by the
sections."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .render import Document, fmt
from .store import Store

if TYPE_CHECKING:  # the options live with the builder, which imports this module
    from .build import ReportOptions

P_FLOOR = 1e-16  # p-values below this are shown as "< 1e-16" (beyond it they measure the assumed tails, not the data)


def fmt_p(v, with_op: bool = False) -> str:
    """A p-value as shown: 3 significant digits, '< 1e-16' below the floor."""
    if v is not None and np.isfinite(v) and v < P_FLOOR:
        return f"< {fmt(P_FLOOR)}"
    return ("= " if with_op else "") + fmt(v, 3, zeros=True)  # 0.9999999 reads '1.00', a rounded p, not '1'


def sentence(text: str) -> str:
    """``text`` with its first letter capitalised (a verdict's reason follows a bold sentence)."""
    return text[:1].upper() + text[1:]


def span(n) -> str:
    lo, hi = int(n.min()), int(n.max())
    return str(lo) if lo == hi else f"{lo} to {hi}"


class ReportContext:
    """The report being written: ``store``, ``opt`` (the ReportOptions), ``doc``, the output
    folders, and (set by the builder) ``main_lam``. Each section is a function of it."""

    def __init__(self, store: Store, out_dir: Path, opt: ReportOptions):
        self.store, self.out, self.opt = store, out_dir, opt
        self.tables_dir = out_dir / "tables"
        self.fig_dir = out_dir / "figures"
        self.tables_dir.mkdir(parents=True, exist_ok=True)
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.doc = Document("minaction replication report: Frasch, minAction.net (arXiv 2604.24805)")
        self.comparison = []
        self.definitions = []
        self.csvs = []
        self.notices = []  # one-line cautions the command prints beside the verdicts (PARTIAL, the FLOPs rule)
        self.coverage = None  # the design's runs per dataset x arch (overview.coverage), when there is a design

    def csv(self, name: str, frame: pd.DataFrame) -> str:
        rel = f"tables/{name}.csv"
        frame.to_csv(self.out / rel, index=False)
        if rel not in self.csvs:  # a table may be written again, completed
            self.csvs.append(rel)
        return rel

    def define(self, name, value, meaning):
        self.definitions.append({"name": name, "value": value, "meaning": meaning})

    def verdict(self, finding, claim, paper, ours, verdict, why):
        why = sentence(why)
        self.comparison.append({"finding": finding, "claim": claim, "paper": paper, "ours": ours,
                                "verdict": verdict, "why": why})
        return f"**Finding {finding}: {verdict}.** {why}"
