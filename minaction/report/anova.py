"""Factorial ANOVA with partial eta squared and bootstrap confidence intervals (Finding 1).

The model is OLS ``dv ~ C(f1, Sum) * C(f2, Sum) * ...`` (full factorial, sum-to-zero
contrasts). Type II and Type III sums of squares are always asked for explicitly
(statsmodels' default, Type I, depends on the order of the terms), and Type III is only
meaningful with sum-to-zero coding, which is why the coding is fixed here.

``partial eta^2 = SS_effect / (SS_effect + SS_residual)`` and
``plain eta^2 = SS_effect / SS_total`` with ``SS_total = sum (y - mean y)^2`` (the corrected
total). In a balanced design the Type II/III sums of squares add up to SS_total; in an
unbalanced one they do not, and SS_total is still the denominator here (pingouin's unbalanced
``n2`` divides by the sum of the table's rows instead; the two agree when balanced).

Partial eta^2 divides by the effect plus the seed-to-seed noise only, so with a few seeds
of small noise every real effect has partial eta^2 near 1; plain eta^2 is the share of all
the variance (datasets included), which is what "architecture alone explains little" reads
most naturally as.

Two implementations agree (tested to 1e-10 against statsmodels and ``pingouin.anova``):

* :func:`anova_table` calls statsmodels' ``anova_lm`` - the reference numbers of the report;
* :class:`FastAnova` builds the design matrix once and computes the sums of squares of the
  nested models by least squares on row subsets, which makes a bootstrap of a few thousand
  refits cost seconds (:func:`bootstrap_partial_eta`).

The primary CI of partial eta^2 is exact (:func:`ncf_partial_eta_ci`, Steiger 2004): the
noncentral F distribution's cdf is inverted for the noncentrality lambda at the observed F,
and ``eta_p^2 = lambda / (lambda + df1 + df2 + 1)``. It can reach 0, which a percentile
bootstrap cannot: resampling adds noise to every effect, so bootstrap intervals of partial
eta^2 lean upwards and exclude 0 even for null effects.

The bootstrap (a robustness column for partial eta^2, the only CI of plain eta^2) resamples
runs *within cells* (each combination of the factors keeps its size), so an unbalanced
design stays exactly as unbalanced as the study made it, and no cell ever becomes empty.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .paper import PAPER

TERM_SEP = ":"


def _check(df: pd.DataFrame, dv: str, factors: Sequence[str]) -> pd.DataFrame:
    if not factors:
        raise ValueError("at least one factor is needed for an ANOVA")
    missing = [c for c in [dv, *factors] if c not in df.columns]
    if missing:
        raise ValueError(f"columns missing from the data: {missing}")
    data = df[[dv, *factors]].dropna().reset_index(drop=True)
    for f in factors:
        if data[f].nunique() < 2:
            raise ValueError(f"factor {f!r} has fewer than 2 levels; it cannot be in the ANOVA")
    n_cells = int(np.prod([data[f].nunique() for f in factors]))
    if data.groupby(list(factors), observed=True).ngroups < n_cells:
        raise ValueError(f"the design {' x '.join(factors)} has empty cells; the interaction cannot be estimated")
    if len(data) <= n_cells:
        raise ValueError(f"{len(data)} observations for {n_cells} cells: no residual degrees of freedom")
    data = data.copy()
    for f in factors:
        data[f] = data[f].astype(str)
    return data


def _formula(dv: str, factors: Sequence[str]) -> str:
    return "Q('%s') ~ " % dv + " * ".join(f"C(Q('{f}'), Sum)" for f in factors)


def _term_name(term_label: str, factors: Sequence[str]) -> str:
    """'C(Q('arch'), Sum):C(Q('dataset'), Sum)' -> 'arch:dataset'."""
    if term_label == "Residual":
        return "Residual"
    parts = []
    for p in term_label.split(":"):
        for f in factors:
            if p == f"C(Q('{f}'), Sum)":
                parts.append(f)
                break
        else:
            parts.append(p)
    return TERM_SEP.join(parts)


def anova_table(df: pd.DataFrame, dv: str, factors: Sequence[str], typ: int) -> pd.DataFrame:
    """Type II or III ANOVA table of the full factorial model, via statsmodels.

    Returns a frame indexed by term (``arch``, ``dataset``, ``arch:dataset``, ...,
    ``Residual``) with columns ``sum_sq, df, F, p, np2, eta2`` (partial eta squared, NaN for
    the residual row; plain eta squared = SS / SS_total, for the residual row its share).
    """
    if typ not in (2, 3):
        raise ValueError(f"typ must be 2 or 3 (Type I depends on term order), got {typ!r}")
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    data = _check(df, dv, factors)
    model = ols(_formula(dv, factors), data=data).fit()
    aov = anova_lm(model, typ=typ)
    aov = aov.drop(index="Intercept", errors="ignore")
    aov.index = [_term_name(t, factors) for t in aov.index]
    out = pd.DataFrame({"sum_sq": aov["sum_sq"], "df": aov["df"], "F": aov["F"], "p": aov["PR(>F)"]})
    ss_res = out.loc["Residual", "sum_sq"]
    out["np2"] = out["sum_sq"] / (out["sum_sq"] + ss_res)
    out.loc["Residual", "np2"] = np.nan
    y = data[dv].to_numpy(float)
    out["eta2"] = out["sum_sq"] / float(((y - y.mean()) ** 2).sum())  # the residual row: its share too
    out.index.name = "term"
    return out


class FastAnova:
    """Type II / III sums of squares of the full factorial model by direct least squares.

    The design matrix (sum-to-zero coding) is built once; :meth:`table` takes an optional
    array of row indices (a bootstrap resample) and refits only the nested models it needs.
    """

    def __init__(self, df: pd.DataFrame, dv: str, factors: Sequence[str]):
        import patsy

        self.factors = list(factors)
        self.data = _check(df, dv, factors)
        rhs = _formula(dv, factors).split("~", 1)[1]
        X = patsy.dmatrix(rhs, self.data, return_type="matrix")
        self.X = np.asarray(X, dtype=float)
        self.y = self.data[dv].to_numpy(dtype=float)
        info = X.design_info
        self.terms = []  # (name, factor set, column slice)
        for term in info.terms:
            sl = info.term_slices[term]
            if not term.factors:
                self.intercept = sl
                continue
            name = _term_name(term.name(), factors)
            self.terms.append((name, frozenset(name.split(TERM_SEP)), sl))
        cells = self.data.groupby(self.factors, observed=True).indices
        self.cells = [np.asarray(v) for v in cells.values()]
        self.cell_id = np.empty(len(self.y), dtype=np.int64)
        for k, c in enumerate(self.cells):
            self.cell_id[c] = k
        n_c = np.array([len(c) for c in self.cells], float)
        self.cell_n = n_c
        # sqrt(n/(n-1)): a resample of n runs has on average (n-1)/n of the within-cell
        # sum of squares; stretching its deviations by this factor removes that bias.
        self.cell_stretch = np.where(n_c > 1, np.sqrt(n_c / np.maximum(n_c - 1, 1)), 1.0)
        self.Xc = self.X[[c[0] for c in self.cells]]  # one design row per cell (all its runs share it)
        self._inv_key, self._inv, self._G = None, {}, None

    def _cols(self, exclude):
        keep = [np.arange(self.intercept.start, self.intercept.stop)]
        for name, _, sl in self.terms:
            if name not in exclude:
                keep.append(np.arange(sl.start, sl.stop))
        return np.concatenate(keep)

    def _submodels(self, typ):
        """For each term, the (reduced, larger) column sets whose RSS difference is its SS."""
        full = self._cols(set())
        out = {}
        for name, fs, _ in self.terms:
            if typ == 3:
                out[name] = (self._cols({name}), full)
            elif typ == 2:
                higher = {n for n, f2, _ in self.terms if fs < f2}
                out[name] = (self._cols(higher | {name}), self._cols(higher))
            else:
                raise ValueError(f"typ must be 2 or 3, got {typ!r}")
        return full, out

    def _inverse(self, Wc: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(X_s' W X_s)^-1 for the columns ``cols``, cached per cell-weight vector: a
        within-cell resample keeps every cell's size, so all its resamples share them."""
        key = Wc.tobytes()
        if self._inv_key != key:
            self._inv_key, self._inv = key, {}
            self._G = self.Xc.T @ (Wc[:, None] * self.Xc)
        ck = cols.tobytes()
        if ck not in self._inv:
            Gs = self._G[np.ix_(cols, cols)]
            try:
                self._inv[ck] = np.linalg.inv(Gs)
            except np.linalg.LinAlgError:  # rank deficient: the pseudo-inverse gives the same fit
                self._inv[ck] = np.linalg.pinv(Gs)
        return self._inv[ck]

    def sums_of_squares(self, typ: int, rows=None, y=None, total: bool = False) -> dict:
        """``{term: SS, ..., 'Residual': SS_res}`` on all rows or on the rows ``rows``
        (indices, repeats allowed: a bootstrap resample); ``y`` replaces the response.

        All runs of a cell share one design row, so with w = how often each run is drawn,
        X'WX = Xc' diag(W_c) Xc and X'Wy = Xc' s_c, where W_c and s_c are the cell totals of
        w and w*y: each nested model's RSS is y'Wy - b_s' (X_s'WX_s)^-1 b_s, and the inverses
        are computed once for all resamples that keep the cell sizes.
        """
        w = np.ones(len(self.y)) if rows is None else np.bincount(rows, minlength=len(self.y)).astype(float)
        y = self.y if y is None else np.asarray(y, float)
        # Every model has the intercept, so centring y (weighted) leaves each RSS unchanged
        # and avoids cancellation in y'y - b'beta.
        y = y - float(w @ y) / float(w.sum())
        n_cells = len(self.cells)
        Wc = np.bincount(self.cell_id, weights=w, minlength=n_cells)
        b = self.Xc.T @ np.bincount(self.cell_id, weights=w * y, minlength=n_cells)
        yy = float(y @ (w * y))
        full, subs = self._submodels(typ)
        cache = {}

        def rss(cols):
            key = cols.tobytes()
            if key not in cache:
                bs = b[cols]
                cache[key] = float(yy - bs @ (self._inverse(Wc, cols) @ bs))
            return cache[key]

        out = {name: rss(red) - rss(big) for name, (red, big) in subs.items()}
        out["Residual"] = rss(full)
        if total:  # SS_total = the weighted corrected sum of squares (y is centred above)
            out["Total"] = yy
        return out

    def partial_eta(self, typ: int, rows=None, y=None) -> dict:
        return self.eta(typ, rows, y)[0]

    def plain_eta(self, typ: int, rows=None, y=None) -> dict:
        return self.eta(typ, rows, y)[1]

    def eta(self, typ: int, rows=None, y=None):
        """``(partial, plain)``: two ``{term: eta^2}`` dicts from one set of sums of squares."""
        ss = self.sums_of_squares(typ, rows, y, total=True)
        tot = ss.pop("Total")
        res = ss.pop("Residual")
        partial = {k: v / (v + res) if (v + res) > 0 else np.nan for k, v in ss.items()}
        plain = {k: v / tot if tot > 0 else np.nan for k, v in ss.items()}
        return partial, plain

    def resample_rows(self, rng: np.random.Generator) -> np.ndarray:
        """Row indices of one within-cell bootstrap resample."""
        return np.concatenate([c[rng.integers(0, len(c), len(c))] for c in self.cells])

    def stretched_y(self, rows: np.ndarray) -> np.ndarray:
        """The response for the resample ``rows`` with each cell's deviations from its
        resample mean stretched by sqrt(n/(n-1)) (see ``bootstrap_partial_eta``)."""
        w = np.bincount(rows, minlength=len(self.y)).astype(float)
        m = np.bincount(self.cell_id, weights=w * self.y, minlength=len(self.cells)) / self.cell_n
        mc = m[self.cell_id]
        return mc + self.cell_stretch[self.cell_id] * (self.y - mc)


def bootstrap_partial_eta(df: pd.DataFrame, dv: str, factors: Sequence[str], typs=(2, 3), n_boot: int = 1000,
                          seed: int = 0, ci: float = 0.95, stretch: bool = True) -> pd.DataFrame:
    """Percentile bootstrap CI of partial eta squared per term, resampling runs within cells.

    A resample of a cell's n runs keeps on average only (n-1)/n of the cell's residual sum
    of squares, which biases every partial eta squared upwards (with 3-4 seeds per cell
    the percentile interval can miss the estimate altogether). With ``stretch`` (default)
    the resampled runs' deviations from their cell's resample mean are stretched by
    sqrt(n/(n-1)), which removes that bias; ``stretch=False`` gives the plain bootstrap.

    The same resamples give the CI of plain eta squared (SS_effect / SS_total).

    Returns a frame with columns ``typ, term, np2_lo, np2_hi, eta2_lo, eta2_hi, n_boot``.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    fa = FastAnova(df, dv, factors)
    rng = np.random.default_rng(seed)
    draws = {t: [] for t in typs}
    plain = {t: [] for t in typs}
    for _ in range(n_boot):
        rows = fa.resample_rows(rng)
        y = fa.stretched_y(rows) if stretch else None
        for t in typs:
            pe, ee = fa.eta(t, rows, y)
            draws[t].append(pe)
            plain[t].append(ee)
    alpha = (1 - ci) / 2
    out = []
    for t in typs:
        d, e = pd.DataFrame(draws[t]), pd.DataFrame(plain[t])
        for term in d.columns:
            lo, hi = np.nanquantile(d[term].to_numpy(), [alpha, 1 - alpha])
            elo, ehi = np.nanquantile(e[term].to_numpy(), [alpha, 1 - alpha])
            out.append({"typ": t, "term": term, "np2_lo": float(lo), "np2_hi": float(hi), "eta2_lo": float(elo),
                        "eta2_hi": float(ehi), "n_boot": n_boot})
    return pd.DataFrame(out)


def _ncp_at(F: float, df1: float, df2: float, q: float) -> float:
    """The noncentrality lambda >= 0 at which the noncentral F cdf at ``F`` equals ``q`` (0 when even
    lambda = 0 gives a cdf below ``q``). The cdf falls as lambda grows."""
    from scipy import optimize, stats

    f = lambda nc: float(stats.ncf.cdf(F, df1, df2, nc)) - q  # noqa: E731
    if f(0.0) <= 0:
        return 0.0
    hi = max(10.0, 2.0 * F * df1)
    while f(hi) > 0:
        hi *= 2.0
        if hi > 1e12:
            return np.nan
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-10 * max(1.0, hi), rtol=1e-12, maxiter=500))


def ncf_partial_eta_ci(F: float, df1: float, df2: float, ci: float = 0.95) -> tuple:
    """Exact CI of partial eta squared from an ANOVA F test (Steiger 2004): the noncentrality
    bounds solve ``ncf.cdf(F; df1, df2, lambda) = 1 - a/2`` (lower) and ``= a/2`` (upper), and each
    becomes ``lambda / (lambda + df1 + df2 + 1)``. A bound is 0 where even lambda = 0 cannot reach
    it (a small F: the interval then starts, or lies, at 0). NaN for a non-finite F."""
    if not (np.isfinite(F) and np.isfinite(df1) and np.isfinite(df2)) or df1 <= 0 or df2 <= 0:
        return np.nan, np.nan
    a = (1 - ci) / 2
    conv = lambda nc: nc / (nc + df1 + df2 + 1)  # noqa: E731
    return conv(_ncp_at(F, df1, df2, 1 - a)), conv(_ncp_at(F, df1, df2, a))


def null_upper_bound(df1: float, df2: float, ci: float = 0.95, F: float = 1.0) -> float:
    """The exact CI's upper bound of partial eta squared at ``F`` (default 1, what an effect of
    nothing gives on average): the smallest upper bound a null effect typically gets at these df."""
    return ncf_partial_eta_ci(F, df1, df2, ci)[1]


def f_for_upper_bound(bound: float, df1: float, df2: float, ci: float = 0.95) -> float:
    """The F below which the exact CI's upper bound of partial eta squared lies below ``bound``."""
    from scipy import optimize

    g = lambda F: null_upper_bound(df1, df2, ci, F) - bound  # noqa: E731
    if g(1e-12) >= 0:
        return 0.0
    hi = 1.0
    while g(hi) < 0:
        hi *= 2.0
    return float(optimize.brentq(g, 1e-12, hi, xtol=1e-10))


def cell_counts(df: pd.DataFrame, factors: Sequence[str]) -> pd.DataFrame:
    """Number of runs in each cell of the design (long form: factors..., n)."""
    return df.groupby(list(factors), observed=True).size().rename("n").reset_index()


def factorial_analysis(df: pd.DataFrame, dv: str, factors: Sequence[str], n_boot: int = 1000, seed: int = 0,
                       ci: float = 0.95) -> pd.DataFrame:
    """Type II and Type III tables with partial and plain eta squared and their CIs, long form.

    Columns: ``typ, term, sum_sq, df, F, p, np2, eta2, np2_lo, np2_hi, np2_boot_lo, np2_boot_hi,
    eta2_lo, eta2_hi``: ``np2_lo/hi`` is the exact noncentral-F CI (:func:`ncf_partial_eta_ci`, the
    primary one), ``np2_boot_lo/hi`` the within-cell bootstrap's (stretched, a robustness column) and
    ``eta2_lo/hi`` the bootstrap CI of plain eta squared.
    """
    y = df[dv].to_numpy(float)
    total = float(((y - y.mean()) ** 2).sum())
    if not total > 1e-12 * max(1.0, float((y ** 2).sum())):
        raise ValueError(f"every run has the same {dv} ({y[0]:.6g}): there is no variance to apportion")
    within = float(df.groupby(list(factors))[dv].transform(lambda v: (v - v.mean()) ** 2).sum())
    if not within > 1e-12 * total:
        raise ValueError(f"the runs within every cell have the same {dv} (no seed-to-seed variance): there is no "
                         f"residual to test the effects against, and every partial eta squared would read 1")
    parts = []
    for t in (2, 3):
        tab = anova_table(df, dv, factors, t).reset_index()
        tab.insert(0, "typ", t)
        parts.append(tab)
    tab = pd.concat(parts, ignore_index=True)
    res_df = tab.set_index(["typ", "term"])["df"]
    exact = [ncf_partial_eta_ci(f, d1, res_df[(t, "Residual")], ci) if term != "Residual" else (np.nan, np.nan)
             for t, term, f, d1 in zip(tab["typ"], tab["term"], tab["F"], tab["df"])]
    tab["np2_lo"] = [e[0] for e in exact]
    tab["np2_hi"] = [e[1] for e in exact]
    if n_boot:
        boot = bootstrap_partial_eta(df, dv, factors, n_boot=n_boot, seed=seed, ci=ci)
        boot = boot.drop(columns="n_boot").rename(columns={"np2_lo": "np2_boot_lo", "np2_hi": "np2_boot_hi"})
        tab = tab.merge(boot, on=["typ", "term"], how="left")
    else:
        for c in ("np2_boot_lo", "np2_boot_hi", "eta2_lo", "eta2_hi"):
            tab[c] = np.nan
    cols = ["typ", "term", "sum_sq", "df", "F", "p", "np2", "eta2", "np2_lo", "np2_hi", "np2_boot_lo",
            "np2_boot_hi", "eta2_lo", "eta2_hi"]
    return tab[cols + [c for c in tab.columns if c not in cols]]


def _names(items, limit: int = 8) -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def factorial_design_gaps(df: pd.DataFrame, factors: Sequence[str] = ("arch", "dataset"), min_levels: int = 2,
                          min_reps: int = 2, max_thin_frac: float = 0.0) -> list:
    """What a factorial analysis of ``df`` lacks, one sentence per gap (empty: nothing).

    The design needs every factor at ``min_levels`` levels or more, every combination of
    the levels present (no empty cell) and ``min_reps`` runs (replicates, e.g. seeds) in
    every cell - except that up to ``max_thin_frac`` of the cells may have fewer (a run
    that failed in one cell); without replicates there is no residual to test against.
    """
    gaps = []
    factors = list(factors)
    for f in factors:
        lv = sorted(str(x) for x in df[f].dropna().unique()) if f in df.columns else []
        if len(lv) < min_levels:
            gaps.append(f"{len(lv)} {f} level(s) ({', '.join(lv) or 'none'}); at least {min_levels} are needed")
    if df.empty or any(f not in df.columns for f in factors):
        return gaps
    sizes = df.groupby(factors, observed=True).size()
    levels = [sorted(df[f].unique(), key=str) for f in factors]
    full = pd.MultiIndex.from_product(levels, names=factors) if len(factors) > 1 else pd.Index(levels[0])
    empty = [c for c in full if c not in sizes.index]
    if empty:
        gaps.append(f"{len(empty)} empty cell(s) of the {' x '.join(factors)} design: "
                    + _names("/".join(str(x) for x in (c if isinstance(c, tuple) else (c,))) for c in empty))
    thin = sizes[sizes < min_reps]
    if len(thin) > max_thin_frac * len(full):
        gaps.append(f"{len(thin)} of {len(full)} cell(s) with fewer than {min_reps} runs (no replicate seeds): "
                    + _names(f"{'/'.join(str(x) for x in (k if isinstance(k, tuple) else (k,)))} (n = {v})"
                             for k, v in thin.items()))
    return gaps


#: The paper's Finding 1 effect sizes (its abstract calls them partial eta squared).
PAPER_ETA = {"arch": PAPER["np2_arch"], "arch:dataset": PAPER["np2_interaction"]}


def eta_reading(tab: pd.DataFrame, typ: int, paper=PAPER_ETA) -> pd.DataFrame:
    """Which eta squared the paper's Finding 1 numbers most plausibly are, on this store's evidence.

    Rows: the paper's pair, this store's partial pair and plain pair (``arch``,
    ``arch_dataset``), each with ``log_distance`` = sum over the two terms of
    |log10(ours / paper)| (values floored at 1e-6), and the residual (seed-to-seed) share of
    the total variance plus SS_interaction / SS_residual, which the paper's pair fixes if it
    is partial: SS_int / SS_res = np2 / (1 - np2).
    """
    t = tab[tab["typ"] == typ].set_index("term")
    inter = "arch:dataset"

    def dist(a, i):
        return float(abs(np.log10(max(a, 1e-6) / paper["arch"])) + abs(np.log10(max(i, 1e-6) / paper[inter])))

    ss_ratio = float(t.loc[inter, "sum_sq"] / t.loc["Residual", "sum_sq"]) if t.loc["Residual", "sum_sq"] > 0 \
        else np.nan
    res_share = float(t.loc["Residual", "eta2"])
    rows = [{"reading": "paper (abstract: partial)", "arch": paper["arch"], "arch_dataset": paper[inter],
             "log_distance": 0.0, "ss_int_over_ss_res": paper[inter] / (1 - paper[inter]),
             "residual_share": np.nan},
            {"reading": "ours, partial η²", "arch": float(t.loc["arch", "np2"]),
             "arch_dataset": float(t.loc[inter, "np2"]),
             "log_distance": dist(t.loc["arch", "np2"], t.loc[inter, "np2"]), "ss_int_over_ss_res": ss_ratio,
             "residual_share": res_share},
            {"reading": "ours, plain η²", "arch": float(t.loc["arch", "eta2"]),
             "arch_dataset": float(t.loc[inter, "eta2"]),
             "log_distance": dist(t.loc["arch", "eta2"], t.loc[inter, "eta2"]), "ss_int_over_ss_res": ss_ratio,
             "residual_share": res_share}]
    return pd.DataFrame(rows)
