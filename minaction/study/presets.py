"""Study presets (TOML files) and their expansion into runs.

A preset file (``minaction/study/presets/<name>.toml``, or any path) holds::

    name = "smoke"
    description = "..."
    archs = ["mlp", "cnn"]
    datasets = ["mnist", "sst2", ...]
    lams = [0.0, 1e-3]
    seeds = [0, 1]
    group_by = "seed"          # which runs share one batched model: "seed", "seed+lam" or "none"
    max_group = 10             # at most this many members per batched model

    [budget]                   # the training budget: part of every run's configuration
    name = "quick"             # a label reports print ("quick", "faithful", ...)
    epochs = 2                 # the epoch cap (with early stopping, the most epochs a run may train)
    batch_size = 64
    lr = 1e-3
    optimizer = "adam"
    train_subset = 512         # samples drawn (seeded) from the train split; 0 = all
    val_subset = 256
    test_subset = 256
    eval_every = 25            # evaluate on validation every this many optimizer steps (and at each epoch end)
    patience_epochs = 3.0      # early stopping: stop a member after this many epochs without a better
                               # validation accuracy (0 = off: train every epoch)
    restore_best = true        # test the best-validation checkpoint (false: the last weights)
    data_order = "seed"        # "seed": each run's seed draws its own batch order and train subset;
                               # "shared": every seed uses the order drawn from data_seed
    data_seed = 0
    dtype = "float32"          # or "float64" (tests)
    width = 64                 # passed to minaction.models.build (omit or 0 for the default)
    depth = 0
    energy = "l2"
    activation = "relu"
    energy_reduction = "sum"

    [budget_by_dataset.sst2]   # optional per-dataset overrides of [budget]
    epochs = 3

    [data_opts.nmnist]         # optional keyword options for minaction.data.load(name, ...)
    T = 8

    [[extra]]                  # optional further (arch, dataset) blocks with their own lists
    archs = [...]; datasets = [...]; lams = [...]; seeds = [...]

A run's configuration is the dict returned by :func:`run_config`; its identity
(``run_id``) is a hash of that whole dict, so any change to the budget, the data options
or the trainer version makes a new run, and the same configuration reached from two
presets is the same run (trained once per database).

With ``data_order = "seed"`` (the default) a run's ``seed`` fixes everything random about
it: its initialisation, its training subset and its batch order (members of one batched
model each get their own batches). ``data_order = "shared"`` draws subset and order from
``data_seed`` for every seed (the order then varies with ``data_seed`` only). Validation and
test subsets always come from ``data_seed`` (every run is evaluated on the same samples).
Either way a run's result does not depend on which other runs shared its batched model.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

#: Bumped whenever the trainer changes in a way that changes results (part of every run_id).
TRAINER_VERSION = 2  # 2: per-seed data order, early stopping, evaluation every N steps

PRESET_DIR = Path(__file__).parent / "presets"

DEFAULT_BUDGET = {
    "name": "custom", "epochs": 2, "batch_size": 64, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0,
    "train_subset": 0, "val_subset": 0, "test_subset": 0, "eval_batch_size": 512,
    "eval_every": 0, "patience_epochs": 0.0, "restore_best": True, "data_order": "seed", "data_seed": 0,
    "dtype": "float32", "width": 0, "depth": 0, "energy": "l2", "activation": "relu", "energy_reduction": "sum",
}
DATA_ORDERS = ("seed", "shared")
DTYPES = ("float32", "float64")
GROUP_MODES = ("seed", "seed+lam", "none")
_TOP_KEYS = {"name", "description", "archs", "datasets", "lams", "seeds", "group_by", "max_group", "budget",
             "budget_by_dataset", "data_opts", "extra", "notes"}


class PresetError(ValueError):
    """A preset file is missing, unreadable or malformed."""


def available_presets() -> list:
    """The names of the presets shipped with minaction (``minaction/study/presets/*.toml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(preset) -> Path:
    """The file of preset ``preset`` (a name in ``presets/`` or a path)."""
    p = Path(str(preset))
    if p.suffix == ".toml" or p.exists() or "/" in str(preset):
        if not p.exists():
            raise PresetError(f"preset file {str(p)!r} does not exist")
        return p
    p = PRESET_DIR / f"{preset}.toml"
    if not p.exists():
        raise PresetError(f"unknown preset {preset!r}; available: {', '.join(available_presets())} "
                          f"(or give the path of a .toml file)")
    return p


def load_preset(preset) -> dict:
    """Read and validate a preset (name, path or an already-loaded dict); returns a dict."""
    if isinstance(preset, dict):
        spec = copy.deepcopy(preset)
        src = "<dict>"
    else:
        path = preset_path(preset)
        src = str(path)
        try:
            spec = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale says
        except tomllib.TOMLDecodeError as exc:
            raise PresetError(f"preset {src}: invalid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise PresetError(f"preset {src}: not UTF-8 text, as TOML must be ({exc.reason} at byte {exc.start})") \
                from None
        spec.setdefault("name", path.stem)
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise PresetError(f"preset {src}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("archs", "datasets", "lams", "seeds"):
        v = spec.get(key)
        if not isinstance(v, list) or not v:
            raise PresetError(f"preset {src}: {key!r} must be a non-empty list")
    spec["lams"] = _lams(spec["lams"], src)
    for s in spec["seeds"]:
        if not _integer(s):  # (true is an int to Python: it was recorded as seed 1)
            raise PresetError(f"preset {src}: seeds must be integers, got {s!r}")
    for blk in spec.get("extra", []):
        for key in ("archs", "datasets", "lams", "seeds"):
            if key in blk and (not isinstance(blk[key], list) or not blk[key]):
                raise PresetError(f"preset {src}: extra block {key!r} must be a non-empty list")
        if "lams" in blk:
            blk["lams"] = _lams(blk["lams"], f"{src}, extra block")
    spec.setdefault("group_by", "seed")
    if spec["group_by"] not in GROUP_MODES:
        raise PresetError(f"preset {src}: group_by must be one of {GROUP_MODES}, got {spec['group_by']!r}")
    spec.setdefault("max_group", 10)
    if not isinstance(spec["max_group"], int) or spec["max_group"] < 1:
        raise PresetError(f"preset {src}: max_group must be a positive integer")
    budget = dict(DEFAULT_BUDGET)
    bad = set(spec.get("budget", {})) - set(DEFAULT_BUDGET)
    if bad:
        raise PresetError(f"preset {src}: unknown budget keys {sorted(bad)}; allowed: {sorted(DEFAULT_BUDGET)}")
    budget.update(spec.get("budget", {}))
    spec["budget"] = budget
    for ds, over in spec.get("budget_by_dataset", {}).items():
        bad = set(over) - set(DEFAULT_BUDGET)
        if bad:
            raise PresetError(f"preset {src}: unknown budget keys for {ds}: {sorted(bad)}")
    check_budget(budget, f"preset {src}")
    for ds, over in spec.get("budget_by_dataset", {}).items():
        check_budget({**budget, **over}, f"preset {src}, budget_by_dataset.{ds}")
    return spec


def _lams(values: list, src: str) -> list:
    """The lambdas as floats: numbers, finite, >= 0 (a quoted "1e-3" is a TOML string, not a number)."""
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise PresetError(f"preset {src}: lams must be numbers, got {x!r}"
                              + (" (a string: write it without quotes)" if isinstance(x, str) else ""))
        if not math.isfinite(x) or x < 0:
            raise PresetError(f"preset {src}: lams must be finite and >= 0 (the weight of the energy in the loss), "
                              f"got {x!r}")
        out.append(float(x))
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_budget(budget: dict, where: str = "budget") -> None:
    """Raise :class:`PresetError` naming the key when a budget value is out of range. (The model options
    ``activation``, ``energy`` and ``energy_reduction`` are checked against the layers' own lists by the study
    driver and the planner before anything runs: ``runner.check_config``.)"""
    for key in ("epochs", "batch_size"):
        if not isinstance(budget[key], int) or budget[key] < 1:
            raise PresetError(f"{where}: {key} must be an integer >= 1, got {budget[key]!r}")
    if budget["optimizer"] not in ("adam", "sgd"):
        raise PresetError(f"{where}: optimizer must be 'adam' or 'sgd', got {budget['optimizer']!r}")
    if not isinstance(budget["eval_every"], int) or budget["eval_every"] < 0:
        raise PresetError(f"{where}: eval_every must be an integer >= 0 (optimizer steps; 0 = at epoch ends "
                          f"only), got {budget['eval_every']!r}")
    if not isinstance(budget["patience_epochs"], (int, float)) or budget["patience_epochs"] < 0:
        raise PresetError(f"{where}: patience_epochs must be a number >= 0 (0 = no early stopping), "
                          f"got {budget['patience_epochs']!r}")
    if not isinstance(budget["restore_best"], bool):
        raise PresetError(f"{where}: restore_best must be true or false, got {budget['restore_best']!r}")
    if budget["data_order"] not in DATA_ORDERS:
        raise PresetError(f"{where}: data_order must be one of {DATA_ORDERS}, got {budget['data_order']!r}")
    if budget["dtype"] not in DTYPES:
        raise PresetError(f"{where}: dtype must be one of {DTYPES}, got {budget['dtype']!r}")
    for key in ("train_subset", "val_subset", "test_subset"):
        if not isinstance(budget[key], int) or budget[key] < 0:
            raise PresetError(f"{where}: {key} must be an integer >= 0 (0 = the whole split), got {budget[key]!r}")
    if not _number(budget["lr"]) or budget["lr"] <= 0:
        raise PresetError(f"{where}: lr must be a number > 0, got {budget['lr']!r}")
    if not _number(budget["weight_decay"]) or budget["weight_decay"] < 0:
        raise PresetError(f"{where}: weight_decay must be a number >= 0, got {budget['weight_decay']!r}")
    for key, what in (("width", "0 = the architecture's default"), ("depth", "0 = the default, 2")):
        if not _integer(budget[key]) or budget[key] < 0:
            raise PresetError(f"{where}: {key} must be an integer >= 0 ({what}), got {budget[key]!r}")
    if not _integer(budget["eval_batch_size"]) or budget["eval_batch_size"] < 1:
        raise PresetError(f"{where}: eval_batch_size must be an integer >= 1, got {budget['eval_batch_size']!r}")
    if not _integer(budget["data_seed"]):
        raise PresetError(f"{where}: data_seed must be an integer, got {budget['data_seed']!r}")
    for key in ("activation", "energy", "energy_reduction", "name"):
        if not isinstance(budget[key], str) and not (key == "energy" and budget[key] is None):
            raise PresetError(f"{where}: {key} must be a string, got {budget[key]!r}"
                              + (' (energy = "none" for no energy)' if key == "energy" else ""))


def run_config(spec: dict, arch: str, dataset: str, lam: float, seed: int) -> dict:
    """The full configuration of one run (what its run_id hashes)."""
    budget = dict(spec["budget"])
    budget.update(spec.get("budget_by_dataset", {}).get(dataset, {}))
    return {
        "arch": arch, "dataset": dataset, "lam": float(lam), "seed": int(seed),
        "budget": budget, "data_opts": dict(spec.get("data_opts", {}).get(dataset, {})),
        "trainer_version": TRAINER_VERSION,
    }


def run_id(config: dict) -> str:
    """Stable identity of a run: sha256 of its canonical JSON configuration (20 hex digits)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def expand(spec) -> list:
    """Every run of a preset, in a stable order, as ``{"run_id", "config"}`` dicts (no duplicates)."""
    spec = load_preset(spec) if not isinstance(spec, dict) or "budget" not in spec else spec
    blocks = [spec] + [{**{k: spec[k] for k in ("archs", "datasets", "lams", "seeds")}, **b}
                       for b in spec.get("extra", [])]
    out, seen = [], set()
    for b in blocks:
        for ds, arch, lam, seed in itertools.product(b["datasets"], b["archs"], b["lams"], b["seeds"]):
            cfg = run_config(spec, arch, ds, lam, seed)
            rid = run_id(cfg)
            if rid not in seen:
                seen.add(rid)
                out.append({"run_id": rid, "config": cfg})
    return out


def group_key(config: dict, group_by: str) -> str:
    """Runs with equal keys may share one batched model."""
    c = dict(config)
    if group_by == "none":
        return run_id(c)
    c.pop("seed")
    if group_by == "seed+lam":
        c.pop("lam")
    return run_id(c)


def _check_max_group(max_group) -> None:
    if isinstance(max_group, bool) or not isinstance(max_group, int) or max_group < 1:
        raise ValueError(f"max_group must be a positive integer, got {max_group!r}")


def with_max_group(spec: dict, max_group) -> dict:
    """``spec`` with at most ``max_group`` runs per batched group (None: unchanged). Groups can only
    be made smaller than the preset's; a run's identity does not depend on its group."""
    if max_group is None:
        return spec
    _check_max_group(max_group)
    if max_group > spec["max_group"]:
        raise ValueError(f"max_group {max_group} exceeds the preset's max_group {spec['max_group']} "
                         f"(groups can only be made smaller)")
    return {**spec, "max_group": max_group}


def make_groups(runs: list, group_by: str = "seed", max_group: int = 10) -> list:
    """Split ``runs`` into lists of runs trained together (each at most ``max_group`` long). ``group_by``:
    one of :data:`GROUP_MODES` ("seed": runs differing only in their seed share a batched model;
    "seed+lam": in seed or lambda; "none": every run alone)."""
    if group_by not in GROUP_MODES:
        raise ValueError(f"group_by must be one of {GROUP_MODES}, got {group_by!r}")
    _check_max_group(max_group)
    by: dict = {}
    for r in runs:
        by.setdefault(group_key(r["config"], group_by), []).append(r)
    groups = []
    for members in by.values():
        for i in range(0, len(members), max_group):
            groups.append(members[i:i + max_group])
    return groups
