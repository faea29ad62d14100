"""Training one group of runs: the function every executor's workers call.

A *group* is a list of runs whose configurations differ only in ``seed`` (and, with
``group_by = "seed+lam"``, in ``lam``). It trains as **one** model built with
``num_models = len(group)`` and ``seeds = [run seeds]``: every member sees the same batches
(the data order comes from the budget's ``data_seed``), and the loss is

    loss = sum_g ( CE_g + lam_g * E_g )

which, with an element-wise optimizer (Adam, SGD), is exactly ``len(group)`` independent
trainings. A member whose objective becomes non-finite is marked *diverged* at that step
and frozen: its term is masked out of the loss and its non-finite gradients are zeroed,
so the other members train on unaffected; it is recorded with status ``diverged`` and the
epoch rows it completed. The same holds for a member whose parameters or optimizer state
stop being finite while its objective stays finite (checked after every epoch): with a huge
``lam``, Adam's second moment overflows to inf and its updates become exactly 0, a frozen
model that must not be recorded as ``done``.

:func:`run_group` never raises: an exception anywhere in a group yields a ``failed``
record for each member, with the traceback in ``error``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

from . import synthetic

_WORKER_READY = False


def init_worker(threads: int = 1) -> None:
    """Per-process setup: one torch thread, deterministic algorithms where cheap."""
    global _WORKER_READY
    if _WORKER_READY:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.filterwarnings("ignore", message=r"minaction: using the slow 'reference' backend")
    _WORKER_READY = True


# ----------------------------------------------------------------------------- data and models
def _data_module(name):
    if name in synthetic.DATASETS:
        return synthetic
    import minaction.data as data

    return data


def _model_module(arch):
    if arch in synthetic.ARCHITECTURES:
        return synthetic
    import minaction.models as models

    return models


@functools.lru_cache(maxsize=16)
def _load_split(name: str, split: str, opts_json: str):
    """Loaded once per worker process and kept (subsets are taken from it per run)."""
    opts = json.loads(opts_json)
    return _data_module(name).load(name, split, **opts)


def load_splits(dataset: str, budget: dict, data_opts: dict):
    """(train, val, test) datasets for one configuration, subset as the budget says."""
    opts = json.dumps(data_opts, sort_keys=True)
    out = []
    for split, key in (("train", "train_subset"), ("val", "val_subset"), ("test", "test_subset")):
        ds = _load_split(dataset, split, opts)
        n = int(budget.get(key) or 0)
        if n > 0 and n < len(ds):
            ds = ds.subset(n, seed=int(budget["data_seed"]))
        out.append(ds)
    return tuple(out)


def _as_group(t: torch.Tensor, G: int) -> torch.Tensor:
    """Logits [B, C] (one model) -> [1, B, C]; energies 0-dim -> [1]."""
    if G == 1 and t.dim() in (0, 2):
        return t.unsqueeze(0)
    return t


def _energy(model, G):
    from ..utils import total_energy

    return _as_group(total_energy(model), G).reshape(G)


@torch.no_grad()
def evaluate(model, ds, G: int, batch_size: int, stats_fn=None):
    """Per member: mean CE, accuracy, mean E (and, with ``stats_fn``, mean active_frac and
    energy_rescaled), each a float64 tensor [G]; weighted by batch size."""
    was = model.training
    model.eval()
    n = 0
    tot = {k: torch.zeros(G, dtype=torch.float64) for k in ("loss", "acc", "energy", "active_frac",
                                                              "energy_rescaled")}
    for x, y in ds.batches(batch_size, shuffle=False):
        b = len(y)
        logits = _as_group(model(x), G)
        C = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, C).float(), y.repeat(G), reduction="none").view(G, b).mean(1)
        tot["loss"] += ce.double() * b
        tot["acc"] += (logits.argmax(-1) == y).double().sum(1)
        if stats_fn is None:
            tot["energy"] += _energy(model, G).double() * b
        else:
            st = stats_fn(model, x)
            for k in ("energy", "active_frac", "energy_rescaled"):
                v = st.get(k)
                tot[k] += (torch.full((G,), float("nan")) if v is None else
                           _as_group(v.detach(), G).reshape(G).double()) * b
        n += b
    model.train(was)
    return {k: v / max(n, 1) for k, v in tot.items()}


def _f(t):
    v = float(t)
    return v if math.isfinite(v) else None


@torch.no_grad()
def finite_members(model, opt, G: int) -> torch.Tensor:
    """Per member ([G] bool): all its parameters and optimizer state tensors are finite.

    A parameter belongs to member ``g`` when it lives in ``model.members[g]`` (a loop
    ensemble) or, in a batched model, is row ``g`` of a tensor whose leading dimension is G;
    a non-finite value in any other (shared) tensor counts against every member.
    """
    owner = {id(p): g for g, m in enumerate(getattr(model, "members", None) or ()) for p in m.parameters()}
    ok = torch.ones(G, dtype=torch.bool)
    for p in model.parameters():
        state = opt.state.get(p, {})
        for t in [p] + [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]:
            if not t.is_floating_point():
                continue
            g = owner.get(id(p))
            if g is not None:
                ok[g] &= bool(torch.isfinite(t).all())
            elif G > 1 and t.dim() >= 1 and t.shape[0] == G:
                ok &= torch.isfinite(t.reshape(G, -1)).all(1)
            elif not bool(torch.isfinite(t).all()):
                ok[:] = False
    return ok


# ----------------------------------------------------------------------------- the group
def train_group(runs: list) -> list:
    """Train the runs of one group together; returns one ``{"run": row, "epochs": rows}`` per run."""
    from .. import backend as _backend

    t_start = time.perf_counter()
    cfg0 = runs[0]["config"]
    G = len(runs)
    for r in runs[1:]:
        c = dict(r["config"])
        for k in ("seed", "lam"):
            c[k] = cfg0[k]
        if c != cfg0:
            raise ValueError("runs of one group must differ only in seed and lam")
    arch, dataset, budget = cfg0["arch"], cfg0["dataset"], cfg0["budget"]
    torch.manual_seed(int(budget["data_seed"]))
    train, val, test = load_splits(dataset, budget, cfg0["data_opts"])
    meta = train.meta
    mm = _model_module(arch)
    seeds = [int(r["config"]["seed"]) for r in runs]
    model = mm.build(arch, meta, width=budget.get("width") or None, depth=budget.get("depth") or None,
                     energy=budget["energy"], activation=budget["activation"],
                     energy_reduction=budget["energy_reduction"], num_models=G, seeds=seeds)
    stats_fn = getattr(mm, "activation_stats", None)
    n_params = sum(p.numel() for p in model.parameters()) // G
    lam = torch.tensor([float(r["config"]["lam"]) for r in runs], dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    if budget["optimizer"] == "adam":
        opt = torch.optim.Adam(params, lr=budget["lr"], weight_decay=budget.get("weight_decay", 0.0),
                               fused=params[0].device.type == "cpu" or None)
    else:
        opt = torch.optim.SGD(params, lr=budget["lr"], weight_decay=budget.get("weight_decay", 0.0))
    backend_name = _backend.select("cpu")

    alive = torch.ones(G, dtype=torch.bool)
    diverged_at = [None] * G
    state_bad = [False] * G  # diverged through non-finite parameters / optimizer state, not the objective
    epoch_rows = [[] for _ in range(G)]
    train_time = 0.0
    bs, ebs = int(budget["batch_size"]), int(budget.get("eval_batch_size") or 512)
    for epoch in range(1, int(budget["epochs"]) + 1):
        t0 = time.perf_counter()
        model.train()
        s_ce = torch.zeros(G, dtype=torch.float64)
        s_acc = torch.zeros(G, dtype=torch.float64)
        s_e = torch.zeros(G, dtype=torch.float64)
        n = 0
        for x, y in train.batches(bs, shuffle=True, seed=int(budget["data_seed"]) * 100003 + epoch):
            b = len(y)
            logits = _as_group(model(x), G)
            C = logits.shape[-1]
            ce = F.cross_entropy(logits.reshape(-1, C), y.repeat(G), reduction="none").view(G, b).mean(1)
            e = _energy(model, G)
            obj = ce + lam.to(e.dtype) * e
            ok = torch.isfinite(obj.detach())
            newly = alive & ~ok
            if newly.any():
                for g in newly.nonzero().flatten().tolist():
                    diverged_at[g] = epoch
                alive &= ok
            if not alive.any():
                break
            loss = torch.where(alive, obj, torch.zeros_like(obj)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not bool(alive.all()):
                for p in params:
                    if p.grad is not None:
                        p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            with torch.no_grad():
                s_ce += ce.detach().double() * b
                s_acc += (logits.detach().argmax(-1) == y).double().sum(1)
                s_e += e.detach().double() * b
                n += b
        train_time += time.perf_counter() - t0
        bad_state = alive & ~finite_members(model, opt, G)  # e.g. Adam's second moment overflowed to inf
        for g in bad_state.nonzero().flatten().tolist():
            diverged_at[g], state_bad[g] = epoch, True
        alive &= ~bad_state
        if not alive.any():
            break
        v = evaluate(model, val, G, ebs)
        for g in range(G):
            if diverged_at[g] is not None:
                continue
            epoch_rows[g].append({
                "epoch": epoch, "train_loss": _f(s_ce[g] / max(n, 1)), "train_acc": _f(s_acc[g] / max(n, 1)),
                "val_loss": _f(v["loss"][g]), "val_acc": _f(v["acc"][g]), "energy": _f(s_e[g] / max(n, 1)),
                "val_energy": _f(v["energy"][g]), "wall_time_s": train_time / G,
            })
    te = evaluate(model, test, G, ebs, stats_fn=stats_fn) if alive.any() else None
    wall = (time.perf_counter() - t_start) / G
    out = []
    for g, r in enumerate(runs):
        c = r["config"]
        rows = epoch_rows[g]
        last = rows[-1] if rows else {}
        row = {
            "run_id": r["run_id"], "arch": arch, "dataset": dataset, "modality": getattr(meta, "modality", None),
            "lam": float(c["lam"]), "seed": int(c["seed"]), "config_json": json.dumps(c, sort_keys=True),
            "epochs": len(rows), "train_loss": last.get("train_loss"), "val_acc": last.get("val_acc"),
            "n_params": int(n_params), "wall_time_s": wall, "backend": backend_name, "group_size": G,
        }
        if diverged_at[g] is not None:
            what = ("non-finite parameters or optimizer state (e.g. Adam's second moment overflowed, so its "
                    "updates had stopped)" if state_bad[g] else "non-finite training objective")
            row.update(status="diverged", error=f"{what} in epoch {diverged_at[g]} "
                                                f"(member frozen; epochs before it are kept)")
        else:
            row.update(status="done", error=None, test_acc=_f(te["acc"][g]), test_loss=_f(te["loss"][g]),
                       test_energy=_f(te["energy"][g]), test_active_frac=_f(te["active_frac"][g]),
                       test_energy_rescaled=_f(te["energy_rescaled"][g]))
        out.append({"run": row, "epochs": rows})
    return out


def failed_records(runs: list, error: str) -> list:
    """One ``failed`` record per run of a group, carrying ``error``."""
    out = []
    for r in runs:
        c = r["config"]
        out.append({"run": {"run_id": r["run_id"], "arch": c["arch"], "dataset": c["dataset"], "lam": float(c["lam"]),
                            "seed": int(c["seed"]), "config_json": json.dumps(c, sort_keys=True),
                            "status": "failed", "error": error, "epochs": 0, "group_size": len(runs)},
                    "epochs": []})
    return out


def run_group(task: dict) -> dict:
    """Executor entry point: ``task = {"group_id", "runs", "threads"}``; never raises.

    Returns ``{"group_id", "records"}`` where records are :func:`train_group`'s, or
    ``failed`` records with the traceback when the group raised.
    """
    init_worker(int(task.get("threads", 1)))
    try:
        records = train_group(task["runs"])
    except Exception:
        records = failed_records(task["runs"], traceback.format_exc())
    return {"group_id": task["group_id"], "records": records}
