"""Read a study store (SQLite, the schema of ``minaction.study.store``) into data frames.

Runs are loaded in ``run_id`` order, epochs and evaluations in ``(run_id, epoch)`` and
``(run_id, step)`` order, whatever order the store holds them in: the report's bootstraps
draw runs by position, so a store imported from an archive gives the same tables as the
store the study wrote.

The report only reads: it opens the database read-only (``mode=ro`` URI), so it can run
while the study is still writing (WAL mode lets readers see the last committed runs).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..models import BASELINES as CONVENTIONAL  # noqa: F401  (one definition: the architectures' own package)
from ..models import ENERGY_FIRST  # noqa: F401

RUN_COLUMNS = ("run_id", "preset", "arch", "dataset", "modality", "lam", "seed", "status", "epochs", "val_acc",
               "test_acc", "test_energy", "test_active_frac", "test_energy_rescaled", "wall_time_s")


@dataclass
class Store:
    """The contents of a study store: every run, the finished ones, the epochs, the meta table."""

    path: str
    runs_all: pd.DataFrame
    epochs: pd.DataFrame
    meta: dict = field(default_factory=dict)
    budgets: dict = field(default_factory=dict)  # budget_id -> the budget (None: not recorded)
    selection: str = ""  # how the runs were selected (preset / budget), empty: all
    evals: pd.DataFrame | None = None  # validation every N steps (study trainer v2); None in older stores
    provenance: dict = field(default_factory=dict)  # run_id -> where it came from (stores of session 24 on)

    @property
    def runs(self) -> pd.DataFrame:
        """Runs with status ``done`` (failed and diverged runs are counted, never analysed)."""
        return self.runs_all[self.runs_all["status"] == "done"].reset_index(drop=True)


def _open_readonly(path: Path) -> sqlite3.Connection:
    """The study commands' read-only opener (:func:`minaction.study.store.open_readonly`): the file's
    header, a damaged file (SQLite's quick_check) and a foreign database are refused before SQLite
    creates anything beside it; in a folder this process cannot write, an ``immutable`` snapshot unless
    a ``-wal`` file holds changes that would be missed. Before session 22 the report opened the file
    itself with ``mode=ro``: it made ``-wal``/``-shm`` files beside a truncated store and reported from a
    store with damaged pages."""
    from minaction.study import store as study_store

    return study_store.open_readonly(path)


#: the store's meta key that says how its training FLOPs were counted ("step": on a training step;
#: minaction.study.recount writes it)
FLOPS_META = "flops_count"


def old_flops_rule(store: "Store") -> bool:
    """Whether the store has training FLOPs and they were counted by the rule before a training step was
    counted (its meta table lacks ``FLOPS_META = "step"``): the report says so, and how to recount."""
    ev = getattr(store, "evals", None)
    return (ev is not None and "flops" in ev and bool(ev["flops"].notna().any())
            and store.meta.get(FLOPS_META) != "step")


def load_store(db) -> Store:
    """Load ``db`` (a path to a study store). Raises ``FileNotFoundError`` / ``ValueError``
    with the problem named when the file is missing or is not a study store."""
    from minaction.study import store as study_store

    study_store.check_name(db)
    path = Path(db)
    if path.name.endswith((".jsonl.gz", ".gz")) and path.is_file():
        raise ValueError(f"{path} is a run archive, not a study store: import it first (minaction study import "
                         f"{path} --db study.sqlite), then report on that store")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a study store; give the .sqlite file")
    if not path.is_file():
        raise FileNotFoundError(f"study store not found: {path}")
    try:
        con = _open_readonly(path)
    except sqlite3.Error as exc:  # pragma: no cover - depends on the filesystem
        raise ValueError(f"cannot open {path} as SQLite: {exc}") from exc
    try:
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{path} is not an SQLite database: {exc}") from exc
        if "runs" not in tables:
            raise ValueError(f"{path} is not a study store: it has no 'runs' table (tables: {sorted(tables)})")
        runs = pd.read_sql_query("SELECT * FROM runs", con)
        missing = [c for c in RUN_COLUMNS if c not in runs.columns]
        if missing:
            raise ValueError(f"{path}: the runs table lacks the columns {missing}")
        epochs = (pd.read_sql_query("SELECT * FROM epochs", con) if "epochs" in tables
                  else pd.DataFrame(columns=["run_id", "epoch", "val_acc", "wall_time_s"]))
        evals = pd.read_sql_query("SELECT * FROM evals", con) if "evals" in tables else None
        # A defined row order (without ORDER BY SQLite gives no order; in practice insertion order, which
        # differs between the store a study wrote and one imported from its archive): the bootstraps
        # draw runs by position.
        runs = _sorted(runs, ["run_id"])
        epochs = _sorted(epochs, ["run_id", "epoch"])
        evals = _sorted(evals, ["run_id", "step", "epoch"]) if evals is not None else None
        meta = (dict(con.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {})
        prov = ({r: json.loads(j) for r, j in con.execute("SELECT run_id, json FROM provenance")}
                if "provenance" in tables else {})
    finally:
        con.close()
    runs["lam"] = runs["lam"].astype(float)
    runs["budget_id"], budgets = _budget_ids(runs)
    return Store(path=str(path), runs_all=runs, epochs=epochs, meta=meta, budgets=budgets, evals=evals,
                 provenance=prov)


def _sorted(frame: pd.DataFrame, keys) -> pd.DataFrame:
    """``frame`` in the order of ``keys`` (those it has; stable), index reset."""
    keys = [k for k in keys if k in frame.columns]
    return frame.sort_values(keys, kind="mergesort").reset_index(drop=True) if keys else frame


# --- training budgets ------------------------------------------------------------------
#
# A run's configuration (``config_json``, see ``minaction.study.presets.run_config``) is its
# design cell (arch, dataset, lam, seed) plus everything else that decides how it was
# trained: the budget, the data options, the trainer version. That remainder is the run's
# *training budget*; runs of one dataset trained under different budgets (a 256-sample smoke
# run and a 4,000-sample lambda-sweep run) measure different things and are never pooled.

#: Keys of a run configuration that place the run in the design; all others are its budget.
DESIGN_KEYS = ("arch", "dataset", "lam", "seed")


def budget_of(config_json) -> dict | None:
    """The training budget of a run: its configuration without the design keys, or None
    when the configuration is missing or holds no budget (then the preset name stands in)."""
    if not isinstance(config_json, str) or not config_json:
        return None
    try:
        cfg = json.loads(config_json)
    except ValueError:
        return None
    if not isinstance(cfg, dict) or "budget" not in cfg:
        return None
    return {k: v for k, v in cfg.items() if k not in DESIGN_KEYS}


def _budget_ids(runs: pd.DataFrame):
    ids, budgets = [], {}
    for cfg, preset in zip(runs["config_json"] if "config_json" in runs.columns else [None] * len(runs),
                           runs["preset"]):
        b = budget_of(cfg)
        if b is None:  # no recorded budget: the preset name is all we know
            bid = f"preset:{preset}"
        else:
            bid = hashlib.sha256(json.dumps(b, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]
        budgets.setdefault(bid, b)
        ids.append(bid)
    return ids, budgets


def _flat(budget: dict | None) -> dict:
    """A budget as one level of ``key: value`` (``budget.`` prefix dropped, nested dicts dotted)."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k in sorted(v):
                walk(f"{prefix}{k}." if prefix or k != "budget" else "", v[k])
        else:
            out[prefix.rstrip(".")] = v

    walk("", budget or {})
    return out


#: Budget fields shown in the report's budget table (all of them are in the CSV).
SHOWN_BUDGET_KEYS = ("epochs", "batch_size", "lr", "optimizer", "train_subset", "val_subset", "test_subset",
                     "width", "data_seed")
#: Model options shown in the budget table where a budget differs from the project's default.
MODEL_DEFAULTS = {"activation": "relu", "energy": "l2", "energy_reduction": "sum"}


def budget_table(runs: pd.DataFrame, budgets: dict) -> pd.DataFrame:
    """One row per budget: ``budget_id, presets, datasets, runs, budget`` (the budget's main
    fields as ``key=value`` text) and ``all_fields`` (every field, JSON)."""
    rows = []
    for bid, g in runs.groupby("budget_id", sort=True):
        flat = _flat(budgets.get(bid))
        shown = {k: flat[k] for k in SHOWN_BUDGET_KEYS if k in flat}
        shown.update({k: flat[k] for k, default in MODEL_DEFAULTS.items() if flat.get(k, default) != default})
        rest = {k: v for k, v in flat.items() if k not in SHOWN_BUDGET_KEYS}
        text = ", ".join(f"{k}={v}" for k, v in shown.items()) if flat else "unknown (no budget recorded)"
        rows.append({"budget_id": bid, "presets": ", ".join(sorted(str(p) for p in g["preset"].dropna().unique())),
                     "datasets": ", ".join(sorted(str(d) for d in g["dataset"].unique())), "runs": int(len(g)),
                     "budget": text, "all_fields": json.dumps({**shown, **rest}, sort_keys=True)})
    return pd.DataFrame(rows, columns=["budget_id", "presets", "datasets", "runs", "budget", "all_fields"])


class MixedBudgetError(ValueError):
    """The store holds runs of one dataset trained under different budgets."""


def _differences(flats: list) -> list:
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def mixed_budgets(runs: pd.DataFrame, budgets: dict) -> dict:
    """``{dataset: [budget_id, ...]}`` for every dataset with runs of more than one budget."""
    per = runs.groupby("dataset")["budget_id"].unique()
    return {ds: sorted(ids) for ds, ids in per.items() if len(ids) > 1}


def describe_mixed(runs: pd.DataFrame, budgets: dict, mixed: dict) -> str:
    """One paragraph naming, per mixed dataset, each budget: id, presets, runs, what differs."""
    parts = []
    for ds, ids in mixed.items():
        flats = {b: _flat(budgets.get(b)) for b in ids}
        diff = _differences([f for f in flats.values() if f])
        items = []
        for b in ids:
            g = runs[(runs["dataset"] == ds) & (runs["budget_id"] == b)]
            presets = ", ".join(sorted(str(p) for p in g["preset"].dropna().unique())) or "?"
            what = ", ".join(f"{k}={flats[b].get(k)}" for k in diff) if flats[b] else "budget not recorded"
            items.append(f"budget {b} (preset {presets}; {len(g)} runs; {what})")
        parts.append(f"{ds}: " + " vs ".join(items))
    return "; ".join(parts)


def select_budget(store: "Store", preset: str | None = None, budget=()) -> "Store":
    """The runs of one training budget per dataset.

    With neither ``preset`` nor ``budget``: the store itself when no dataset mixes budgets,
    else :class:`MixedBudgetError` naming every budget found (id, presets, runs, the fields
    that differ). ``preset``: the runs recorded under that preset name, plus (when it names a
    preset file) every stored run of that preset's configurations (a run shared by two presets
    is stored once, under the first). ``budget``: budget ids (or unique prefixes) to keep.
    The selection must leave one budget per dataset.
    """
    runs = store.runs_all
    keep = pd.Series(True, index=runs.index)
    what = []
    if preset is not None:
        sel = runs["preset"].astype(str) == str(preset)
        try:  # the preset's own run ids, where its file is readable
            from minaction.study.presets import PresetError, expand

            try:
                ids = {r["run_id"] for r in expand(preset)}
                sel |= runs["run_id"].isin(ids)
            except PresetError:
                pass
        except ImportError:  # pragma: no cover - the study package is part of minaction
            pass
        if not sel.any():
            found = ", ".join(sorted(str(p) for p in runs["preset"].dropna().unique())) or "none"
            raise ValueError(f"{store.path}: no runs of preset {preset!r} (presets in the store: {found})")
        keep &= sel
        what.append(f"preset {preset}")
    budget = [str(b) for b in (budget or ())]
    if budget:
        ids = sorted(runs["budget_id"].unique())
        chosen = set()
        for b in budget:
            m = [i for i in ids if i.startswith(b)]
            if len(m) != 1:
                raise ValueError(f"{store.path}: budget {b!r} matches {len(m)} budgets of the store "
                                 f"(budgets: {', '.join(ids)})")
            chosen.add(m[0])
        keep &= runs["budget_id"].isin(chosen)
        what.append("budget " + ", ".join(sorted(chosen)))
    sub = runs[keep].reset_index(drop=True)
    mixed = mixed_budgets(sub, store.budgets)
    if mixed:
        names = sorted(str(p) for p in sub["preset"].dropna().unique())
        # a name whose own runs mix budgets (a preset edited, or two files of one stem) selects nothing apart
        itself = [n for n in names if mixed_budgets(sub[sub["preset"].astype(str) == n], store.budgets)]
        clean = [n for n in names if n not in itself]
        scope = f" after selecting {' and '.join(what)}" if what else ""
        how = [f"--preset NAME (presets here: {', '.join(clean)})"] if clean else []
        if itself:
            how.append(f"--preset FILE.toml (the file of the version to report: the "
                       f"name{'s' if len(itself) > 1 else ''} {', '.join(itself)} recorded runs of more than one "
                       f"budget)")
        how.append("--budget ID (repeatable, one per dataset)")
        raise MixedBudgetError(
            f"{store.path}: runs of different training budgets would be pooled{scope}: "
            f"{describe_mixed(sub, store.budgets, mixed)}. Report one budget at a time: pass "
            + " or ".join(how) + ".")
    ids = set(sub["run_id"])
    epochs = store.epochs[store.epochs["run_id"].isin(ids)].reset_index(drop=True)
    evals = store.evals
    if evals is not None:
        evals = evals[evals["run_id"].isin(ids)].reset_index(drop=True)
    return Store(path=store.path, runs_all=sub, epochs=epochs, meta=store.meta, budgets=store.budgets,
                 selection="; ".join(what), evals=evals,
                 provenance={r: p for r, p in store.provenance.items() if r in ids})
