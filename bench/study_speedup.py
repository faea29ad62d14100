"""The study runner against a plain-PyTorch study runner, side by side (a bench, not a test).

Two ways to train the same runs (same preset, same architectures' shapes, same budget, same
number of worker processes, one torch thread each):

* **library**: ``minaction study run --preset SLICE.toml --db ... --workers W`` (the CLI, in
  its own process): G seeds of one (architecture, dataset, lambda) train as one batched model
  built from minaction's layers (``EnergyLinear(num_models=G)``, grouped ``EnergyConv``);
* **plain**: what a careful researcher would write without this library (:func:`train_one`):
  one model per run, ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` + ``torch.relu`` (tanh /
  sigmoid where the architecture says so), the energy penalty added by hand (per hidden layer
  the mean over rows of the sum over units of ``act(z)**2``), ``torch.optim.Adam`` with its
  defaults, the data layer's own ``Dataset.batches``, early stopping and best-checkpoint restore
  as the budget says; a ``multiprocessing`` pool of W workers, one run per task.

The slice covers the four architectures and the four modalities (``--slice diagonal``: 4 cells,
one per architecture and modality; ``grid``: all 16; or ``arch:dataset,...``) at the faithful
budget of the ``full`` preset (batch 128, lr, Adam, eval cadence, patience, best-checkpoint
restore; 10 seeds = the study's group of 10) with two reductions, both printed: each run's
training set is a seeded subset of ``--train-subset`` samples and its epoch cap is the fewest
epochs giving ``--steps`` optimizer steps (never above the faithful cap); validation and test are
seeded subsets (``--val-subset``, ``--test-subset``). Rounds are interleaved (plain, library;
then library, plain; ...) in one process, so machine load hits both alike.

Reported: per runner the median wall time of a round (process start, imports, pool start,
data loading and every run), runs/hour from it, and the **ratio** plain / library; also the
steady-state figure (runs per worker-hour from the summed per-run times, which the tail of a
short slice — one batched group left on one worker — does not distort), and per cell the test
accuracy mean ± sd over seeds of both runners with Welch's t (equal in distribution: |t| < 3).
Before the rounds, ``minaction study plan`` runs once, untimed, so the CLI's start-up estimate
reads its cost table instead of measuring inside the timed rounds (its estimate is printed too).

    python bench/study_speedup.py                       # the official figures (idle machine)
    python bench/study_speedup.py --rounds 3 --workers 2 --slice grid
    python bench/study_speedup.py --quick               # CI smoke: tiny sizes, one round

Timings on a shared machine swing with other load: the load average is printed with every round.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = ("mlp", "cnn", "bimodal_true", "physics_lagrangian")
#: one dataset per modality (the slice's modalities)
MODALITY_DATASET = {"image": "mnist", "text": "sst2", "event": "nmnist", "series": "ecg5000"}
#: every architecture once and every modality once
DIAGONAL = (("cnn", "mnist"), ("mlp", "sst2"), ("bimodal_true", "nmnist"), ("physics_lagrangian", "ecg5000"))


def parse_slice(text: str) -> list:
    """``diagonal`` | ``grid`` | ``arch:dataset,arch:dataset,...`` -> [(arch, dataset), ...]."""
    if text == "diagonal":
        return list(DIAGONAL)
    if text == "grid":
        return [(a, d) for d in MODALITY_DATASET.values() for a in ARCHS]
    cells = []
    for part in text.split(","):
        arch, sep, ds = part.strip().partition(":")
        if not sep or arch not in ARCHS or not ds:
            raise ValueError(f"--slice: expected 'diagonal', 'grid' or arch:dataset pairs with arch in {ARCHS}, "
                             f"got {part!r}")
        cells.append((arch, ds))
    if not cells:
        raise ValueError("--slice names no cell")
    return cells


# ----------------------------------------------------------------------------- the slice preset
def slice_spec(cells, seeds, lams, train_subset, steps, val_subset, test_subset, base="full", n_train=None) -> dict:
    """A preset dict: ``base``'s faithful budget per dataset, reduced as the module docstring says.

    ``n_train(dataset)`` gives a train split's size (to turn ``steps`` into an epoch cap)."""
    from minaction.study.presets import load_preset, run_config

    src = load_preset(base)
    datasets = sorted({d for _, d in cells}, key=[d for _, d in cells].index)
    by_ds = {}
    for ds in datasets:
        b = dict(run_config(src, cells[0][0], ds, 0.0, 0)["budget"])
        n = int(n_train(ds)) if n_train else train_subset
        n_used = min(n, train_subset) if train_subset else n
        spe = -(-n_used // int(b["batch_size"]))
        b.update(train_subset=(train_subset if train_subset and train_subset < n else 0),
                 val_subset=int(val_subset), test_subset=int(test_subset),
                 epochs=max(1, min(int(b["epochs"]), -(-int(steps) // spe))))
        by_ds[ds] = b
    spec = {"name": "study-speedup", "description": "bench/study_speedup.py slice", "archs": sorted(
        {a for a, _ in cells}, key=ARCHS.index), "datasets": datasets, "lams": [float(x) for x in lams],
        "seeds": [int(s) for s in seeds], "group_by": src["group_by"], "max_group": src["max_group"],
        "budget": dict(by_ds[datasets[0]]), "budget_by_dataset": {d: by_ds[d] for d in datasets[1:]}}
    spec["budget"]["name"] = "faithful-slice"
    for d in datasets[1:]:
        spec["budget_by_dataset"][d] = {k: v for k, v in by_ds[d].items() if spec["budget"].get(k) != v}
    full = {(a, d) for a in spec["archs"] for d in datasets}
    spec["_cells"] = [list(c) for c in cells]
    if full != set(cells):  # keep only the named cells: the first dataset's block plus one extra block per cell
        spec["archs"], spec["datasets"] = [cells[0][0]], [cells[0][1]]
        spec["extra"] = [{"archs": [a], "datasets": [d]} for a, d in cells[1:]]
    return spec


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_toml(spec: dict, path: Path) -> None:
    """The preset dict as a TOML file ``minaction study run --preset`` reads (flat values, one
    level of tables, ``[[extra]]`` blocks)."""
    lines = []
    for k, v in spec.items():
        if not k.startswith("_") and not isinstance(v, dict) and k != "extra":
            lines.append(f"{k} = {_toml_value(v)}")
    for blk in spec.get("extra", []):
        lines.append("\n[[extra]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in blk.items()]
    lines.append("\n[budget]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in spec["budget"].items()]
    for ds, over in spec.get("budget_by_dataset", {}).items():
        lines.append(f"\n[budget_by_dataset.{ds}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in over.items()]
    for ds, opts in spec.get("data_opts", {}).items():
        lines.append(f"\n[data_opts.{ds}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in opts.items()]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the plain runner
def _plain_modules():
    """The plain models (built lazily so the driver does not import torch before forking)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def energy(y):  # mean over rows of the sum over units of y^2 (y = act(z))
        return y.pow(2).flatten(1).sum(1).mean()

    def layout(meta):
        shape = tuple(meta.input_shape)
        has_time = meta.modality == "neuromorphic" and len(shape) == 4
        if has_time:
            shape = shape[1:]
        return (1, shape, has_time) if len(shape) == 1 else (shape[0], shape[1:], has_time)

    def embedding(meta, d, bag):
        emb = (nn.EmbeddingBag(meta.vocab_size, d, mode="mean", padding_idx=0) if bag
               else nn.Embedding(meta.vocab_size, d, padding_idx=0))
        with torch.no_grad():
            emb.weight.normal_(0.0, 0.1)  # the architectures' embedding init (std 0.1, padding row 0)
            emb.weight[0].zero_()
        return emb

    class Stem(nn.Module):
        def __init__(self, meta, embed_dim=64):
            super().__init__()
            self.text = meta.modality == "text"
            if self.text:
                self.emb = embedding(meta, embed_dim, bag=True)
                self.out_features = embed_dim
            else:
                c, spatial, self.has_time = layout(meta)
                self.out_features = c * math.prod(spatial)

        def forward(self, x, dtype):
            if self.text:
                return self.emb(x.long())
            x = x.to(dtype)
            if self.has_time:
                x = x.mean(1)
            return x.flatten(1)

    class MLP(nn.Module):
        def __init__(self, meta, width, depth):
            super().__init__()
            self.stem = Stem(meta)
            dims = [self.stem.out_features] + [width] * depth
            self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
            self.out = nn.Linear(dims[-1], meta.num_classes)

        def forward(self, x):
            h, e = self.stem(x, self.out.weight.dtype), 0.0
            for lin in self.hidden:
                h = torch.relu(lin(h))
                e = e + energy(h)
            return self.out(h), e

    class Bimodal(nn.Module):
        def __init__(self, meta, width, depth, glia_domain=8, coupling=1.0):
            super().__init__()
            self.stem = Stem(meta)
            self.width, self.domain, self.c = width, glia_domain, coupling
            d = self.stem.out_features
            self.neurons, self.glia = nn.ModuleList(), nn.ModuleList()
            for _ in range(depth):
                self.neurons.append(nn.Linear(d, width))
                self.glia.append(nn.Linear(d, math.ceil(width / glia_domain)))
                d = width
            self.out = nn.Linear(d, meta.num_classes)

        def forward(self, x):
            h, e = self.stem(x, self.out.weight.dtype), 0.0
            for neu, gli in zip(self.neurons, self.glia):
                n = torch.relu(neu(h))
                g = torch.sigmoid(gli(h))
                e = e + energy(n) + energy(g)
                supply = g.repeat_interleave(self.domain, dim=-1)[:, : self.width]
                h = n * ((1.0 - self.c) + 2.0 * self.c * supply)
            return self.out(h), e

    class Physics(nn.Module):
        def __init__(self, meta, width, depth, step=1.0, potential_ratio=0.5):
            super().__init__()
            self.stem = Stem(meta)
            self.tau = step
            pw = max(1, round(potential_ratio * width))
            self.encoder = nn.Linear(self.stem.out_features, width)
            self.kinetic = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
            self.potential = nn.ModuleList(nn.Linear(width, pw) for _ in range(depth))
            self.constraint = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
            self.out = nn.Linear(width, meta.num_classes)

        def forward(self, x):
            q = torch.relu(self.encoder(self.stem(x, self.out.weight.dtype)))
            e = energy(q)
            for kin, pot, con in zip(self.kinetic, self.potential, self.constraint):
                v = torch.tanh(kin(q))
                r = torch.relu(pot(q))
                c = torch.sigmoid(con(q))
                e = e + energy(v) + energy(r) + energy(c)
                force = -(r @ pot.weight)  # -W_V^T r (tied weights)
                q = q + self.tau * (c * (v + self.tau * force))
            return self.out(q), e

    class CNN(nn.Module):
        def __init__(self, meta, width, depth, embed_dim=64):
            super().__init__()
            self.text = meta.modality == "text"
            if self.text:
                self.emb = embedding(meta, embed_dim, bag=False)
                cin, spatial, self.has_time = embed_dim, (int(meta.input_shape[0]),), False
                channels = [64] * depth
            else:
                cin, spatial, self.has_time = layout(meta)
                channels = [16 * 2 ** min(i, 2) for i in range(depth)]
            self.dims = len(spatial)
            k = 3 if self.dims == 2 else 5
            Conv = nn.Conv2d if self.dims == 2 else nn.Conv1d
            self.convs, self.pool = nn.ModuleList(), []
            size = list(spatial)
            for c in channels:
                self.convs.append(Conv(cin, c, k, padding=k // 2))
                self.pool.append(all(s >= 2 for s in size))
                if self.pool[-1]:
                    size = [s // 2 for s in size]
                cin = c
            cap = 8 if self.dims == 2 else 16
            self.grid = (1,) if self.text else tuple(min(s, cap) for s in size)
            self.dense = nn.Linear(cin * math.prod(self.grid), width)
            self.out = nn.Linear(width, meta.num_classes)

        def forward(self, x):
            if self.text:
                h = self.emb(x.long()).transpose(1, 2)  # [B, d, L]
            else:
                h = x.to(self.out.weight.dtype)
                if self.has_time:
                    h = h.mean(1)
                if h.dim() == 2:
                    h = h.unsqueeze(1)
            e = 0.0
            pool = F.max_pool2d if self.dims == 2 else F.max_pool1d
            for conv, p in zip(self.convs, self.pool):
                h = torch.relu(conv(h))
                e = e + energy(h)
                if p:
                    h = pool(h, 2)
            if self.text:
                h = h.amax(-1)
            elif tuple(h.shape[2:]) == tuple(self.grid):
                pass  # as the library's cnn: adaptive pooling to the size it has is the identity
            elif self.dims == 2:
                h = F.adaptive_avg_pool2d(h, self.grid)
            else:
                h = F.adaptive_avg_pool1d(h, self.grid)
            h = torch.relu(self.dense(h.flatten(1)))
            return self.out(h), e + energy(h)

    return {"mlp": MLP, "cnn": CNN, "bimodal_true": Bimodal, "physics_lagrangian": Physics}


def build_plain(arch: str, meta, budget: dict):
    """The plain model of ``arch`` with the library's default (parameter-matched) width and depth."""
    from minaction.models import DEFAULT_DEPTH, default_width

    if (budget.get("energy"), budget.get("activation"), budget.get("energy_reduction")) != ("l2", "relu", "sum"):
        raise ValueError("the plain runner implements energy 'l2', activation 'relu', energy_reduction 'sum' only")
    depth = int(budget.get("depth") or DEFAULT_DEPTH[arch])
    width = int(budget.get("width") or default_width(arch, meta, depth))
    return _plain_modules()[arch](meta, width, depth)


_DATA: dict = {}


def _splits(dataset, budget, data_opts):
    """(train, val, test) of the data layer, kept per worker; val/test subsets seeded by data_seed
    (the same evaluation samples the library uses)."""
    key = (dataset, json.dumps(data_opts, sort_keys=True), budget["val_subset"], budget["test_subset"],
           budget["data_seed"])
    if key not in _DATA:
        from minaction import data

        out = [data.load(dataset, "train", **data_opts)]
        for split, k in (("val", "val_subset"), ("test", "test_subset")):
            ds = data.load(dataset, split, **data_opts)
            n = int(budget[k] or 0)
            out.append(ds.subset(n, seed=int(budget["data_seed"])) if 0 < n < len(ds) else ds)
        _DATA[key] = tuple(out)
    return _DATA[key]


def train_one(run: dict) -> dict:
    """One run, the plain way; returns its result row (test accuracy, epochs, seconds)."""
    import copy

    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    cfg = run["config"]
    b = cfg["budget"]
    seed, lam = int(cfg["seed"]), float(cfg["lam"])
    train, val, test = _splits(cfg["dataset"], b, cfg["data_opts"])
    n = int(b["train_subset"] or 0)
    if 0 < n < len(train):
        train = train.subset(n, seed=seed)
    torch.manual_seed(seed)
    model = build_plain(cfg["arch"], train.meta, b)
    if b["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=b["lr"], weight_decay=b.get("weight_decay", 0.0))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=b["lr"], weight_decay=b.get("weight_decay", 0.0))

    @torch.no_grad()
    def evaluate(ds):
        model.eval()
        correct, loss, en, m = 0, 0.0, 0.0, 0
        for x, y in ds.batches(int(b["eval_batch_size"]), shuffle=False):
            logits, e = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            en += float(e) * len(y)
            m += len(y)
        model.train()
        return correct / m, loss / m, en / m

    bs = int(b["batch_size"])
    steps_per_epoch = -(-len(train) // bs)
    eval_every = int(b["eval_every"] or 0)
    patience = float(b["patience_epochs"] or 0)
    patience_steps = math.ceil(patience * steps_per_epoch) if patience > 0 else None
    best_acc, best_step, best_state = -1.0, 0, None
    step, status, epochs_done, stop = 0, "done", 0, False
    model.train()
    for epoch in range(1, int(b["epochs"]) + 1):
        running = 0.0
        for i, (x, y) in enumerate(train.batches(bs, shuffle=True, seed=seed * 100003 + epoch)):
            logits, e = model(x)
            loss = F.cross_entropy(logits, y) + lam * e
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
            if not math.isfinite(running):
                status, stop = "diverged", True
                break
            if (eval_every and step % eval_every == 0) or i == steps_per_epoch - 1:
                acc = evaluate(val)[0]
                if acc > best_acc:
                    best_acc, best_step = acc, step
                    if b["restore_best"]:
                        best_state = copy.deepcopy(model.state_dict())
                elif patience_steps is not None and step - best_step >= patience_steps:
                    stop = True
                    break
        epochs_done = epoch
        if stop:
            break
    row = {"run_id": run["run_id"], "arch": cfg["arch"], "dataset": cfg["dataset"], "seed": seed, "lam": lam,
           "status": status, "epochs": epochs_done, "val_acc": best_acc, "test_acc": None}
    if status == "done":
        if best_state is not None:
            model.load_state_dict(best_state)
        row["test_acc"], row["test_loss"], row["test_energy"] = evaluate(test)
    row["seconds"] = time.perf_counter() - t0
    return row


def _init_plain_worker():
    import torch

    torch.set_num_threads(1)


def plain_main(preset: str, out: str, workers: int) -> None:
    """The plain runner: every run of ``preset`` in a pool of ``workers`` processes; rows to ``out``."""
    import multiprocessing as mp

    from minaction.study.presets import expand, load_preset

    runs = expand(load_preset(preset))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "minaction.data", "minaction.models"])
    with ctx.Pool(workers, initializer=_init_plain_worker) as pool:
        rows = list(pool.imap_unordered(train_one, runs, chunksize=1))
    Path(out).write_text(json.dumps(rows))


# ----------------------------------------------------------------------------- profile (issue 13 item 2)
PHASES = ("data gather", "forward", "energy", "loss", "backward", "optimizer step", "evaluation", "bookkeeping")


def _phase_of(func) -> str | None:
    """The phase of a function called directly from ``trainer.train_group`` (None: not a phase)."""
    path, _, name = func
    if name == "_gather" or name == "member_epoch_order":
        return "data gather"
    if name in ("_wrapped_call_impl", "_call_impl"):
        return "forward"
    if name == "_energy":
        return "energy"
    if name == "cross_entropy":
        return "loss"
    if name == "backward":
        return "backward"
    if "optim" in path and name in ("wrapper", "step", "zero_grad", "_use_grad"):
        return "optimizer step"
    if name == "do_eval":
        return "evaluation"
    if name in ("load_splits", "build", "_model_module", "member_train_indices", "member_tensors", "__init__",
                "select", "to", "evaluate", "__exit__", "__enter__"):
        return None  # setup and the final test: once per run, not part of an epoch
    return "bookkeeping"


def profile_member_epoch(arch: str, dataset: str, G: int = 10, steps: int = 32, base: str = "full") -> dict:
    """One epoch of a G-member group through ``trainer.train_group`` under cProfile.

    The epoch is the faithful one when the train split has at most ``steps`` batches; otherwise a
    seeded subset of ``steps`` batches whose validation work is scaled to the faithful epoch's
    (validation samples per trained sample = evaluations per epoch x val size / train size, one
    evaluation at the epoch end). Returns seconds per member-epoch per phase (scaled to the full
    epoch's steps), the unprofiled wall time of the same epoch, and the profile's top functions."""
    import cProfile
    import pstats

    from minaction import data
    from minaction.study import plan, presets, trainer

    trainer.init_worker(1)
    src = presets.load_preset(base)
    b = dict(presets.run_config(src, arch, dataset, 1e-4, 0)["budget"])
    n_full, n_val = len(data.load(dataset, "train")), len(data.load(dataset, "val"))
    bs = int(b["batch_size"])
    spe_full = -(-n_full // bs)
    if spe_full <= steps:
        budget = dict(b, epochs=1, test_subset=100, patience_epochs=0)
        scale = 1.0
    else:
        n_sub = steps * bs
        epe = plan.evals_per_epoch(spe_full, int(b["eval_every"] or 0))
        val_sub = max(1, min(n_val, round(epe * n_val * n_sub / n_full)))
        budget = dict(b, epochs=1, train_subset=n_sub, val_subset=val_sub, test_subset=100, eval_every=0,
                      patience_epochs=0)
        scale = spe_full / steps
    spec = presets.load_preset({"name": "profile", "archs": [arch], "datasets": [dataset], "lams": [1e-4],
                                "seeds": list(range(G)), "group_by": "seed", "max_group": G, "budget": budget})
    runs = presets.expand(spec)
    trainer.train_group(runs)  # warm-up: data in memory, kernels loaded, allocator warm
    t = time.perf_counter()
    trainer.train_group(runs)
    wall = time.perf_counter() - t
    prof = cProfile.Profile()
    prof.enable()
    trainer.train_group(runs)
    prof.disable()
    st = pstats.Stats(prof)
    step_s = dict.fromkeys(PHASES, 0.0)   # grows with the steps (and validation samples) of an epoch
    epoch_s = dict.fromkeys(PHASES, 0.0)  # once per epoch (the epoch's orders, the finiteness check)
    tg = next(f for f in st.stats if f[2] == "train_group")
    once, top = 0.0, []
    for func, (_, _, _, _, callers) in st.stats.items():
        edge = callers.get(tg)
        if edge is None:
            continue
        ph, t = _phase_of(func), edge[3]
        if func[2] == "decorate_context":  # torch.no_grad-decorated: the test evaluation and finite_members
            fm = sum(v[3] for f, v in st.stats.items() if f[2] == "finite_members")
            epoch_s["bookkeeping"] += fm
            once += t - fm
            top += [(fm, "trainer.py:finite_members", "bookkeeping (per epoch)"),
                    (t - fm, "trainer.py:evaluate (test)", "once per run")]
            continue
        if func[2] == "<listcomp>":  # the epoch's per-member orders (and a few once-per-run lists)
            ph = "data gather"
        elif func[2] == "inner" and "_compile" in func[0]:  # Optimizer.zero_grad (dynamo-disabled wrapper)
            ph = "optimizer step"
        top.append((t, f"{Path(func[0]).name}:{func[2]}", ph or "once per run"))
        if ph is None:
            once += t
        elif func[2] in ("member_epoch_order", "<listcomp>"):
            epoch_s[ph] += t
        else:
            step_s[ph] += t
    step_s["bookkeeping"] += st.stats[tg][2]  # train_group's own lines
    prof_epoch = sum(step_s.values()) + sum(epoch_s.values())
    phases = {k: (step_s[k] * scale + epoch_s[k]) / G for k in PHASES}  # profiled s per member, whole epoch
    total = sum(phases.values())
    # unprofiled: the group's wall minus its once-per-run parts (in the profile's proportion), scaled alike
    factor = wall * prof_epoch / (prof_epoch + once) / prof_epoch
    return {"arch": arch, "dataset": dataset, "G": G, "steps_profiled": min(steps, spe_full),
            "steps_per_epoch": spe_full, "val_subset": budget.get("val_subset"), "scale": scale,
            "member_epoch_s": total * factor, "phases_s": {k: v * factor for k, v in phases.items()},
            "phases_pct": {k: 100.0 * v / total for k, v in phases.items()},
            "top": [(round(t / G, 5), n, ph) for t, n, ph in sorted(top, reverse=True)[:12]], "load": _load()}


def format_profile(rows: list) -> str:
    lines = ["| arch × dataset (G = 10) | member-epoch s (unprofiled) | " + " | ".join(PHASES) + " | load |",
             "| --- | ---: | " + " | ".join("---:" for _ in PHASES) + " | --- |"]
    for r in rows:
        lines.append(f"| {r['arch']} × {r['dataset']} ({r['steps_profiled']}/{r['steps_per_epoch']} steps) | "
                     f"{r['member_epoch_s']:.3f} | "
                     + " | ".join(f"{r['phases_pct'][k]:.0f}%" for k in PHASES) + f" | {r['load']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the faithful preset's estimate
def plan_estimate(preset: str = "full", workers: int = 2, eval_subset: int = 500, steps: int = 3) -> dict:
    """``minaction.study.plan.plan(preset)`` with its own per-group measurement (``plan.measure``:
    the trainer's step on the real data and model, G = the preset's group), except that the
    validation and test evaluations are timed on ``eval_subset`` samples and scaled linearly to the
    whole split (the plain plan evaluates whole splits: tens of minutes per preset on 2 busy cores)."""
    from minaction.study import plan, trainer

    def measure_fn(group, calibrate_steps):
        cfg = group[0]["config"]
        b = cfg["budget"]
        _, va, te = trainer.load_splits(cfg["dataset"], dict(b, val_subset=0, test_subset=0), cfg["data_opts"],
                                        subset_train=False)
        sv, st = min(eval_subset, len(va)), min(eval_subset, len(te))
        small = [dict(r, config=dict(r["config"], budget=dict(b, val_subset=sv, test_subset=st))) for r in group]
        m = plan.measure(small, calibrate_steps)
        m.update(t_eval=m["t_eval"] * len(va) / sv, t_test=m["t_test"] * len(te) / st, n_val=len(va))
        return m

    t = time.perf_counter()
    p = plan.plan(preset, workers=workers, calibrate_steps=steps, refresh=True, measure_fn=measure_fn)
    p["measured_in_s"] = time.perf_counter() - t
    p["load"] = _load()
    return p


# ----------------------------------------------------------------------------- driver
def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def run_library(toml: Path, db: Path, workers: int, env: dict) -> tuple:
    cmd = [sys.executable, "-m", "minaction.cli", "study", "run", "--preset", str(toml), "--db", str(db),
           "--workers", str(workers), "--no-progress"]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode not in (0, 1):
        raise RuntimeError(f"minaction study run failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    con = sqlite3.connect(str(db))
    try:
        rows = [dict(zip(("run_id", "arch", "dataset", "seed", "lam", "status", "epochs", "val_acc", "test_acc",
                          "seconds"), r)) for r in con.execute(
            "SELECT run_id, arch, dataset, seed, lam, status, epochs, val_acc, test_acc, wall_time_s FROM runs")]
    finally:
        con.close()
    return wall, rows


def run_plain(toml: Path, out: Path, workers: int, env: dict) -> tuple:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", str(toml), "--plain-out", str(out),
           "--workers", str(workers)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"plain runner failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return wall, json.loads(out.read_text())


def welch(a: list, b: list) -> float:
    """Welch's t of mean(a) - mean(b) (0 when both are constant and equal, inf when only the means differ)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    d = statistics.fmean(a) - statistics.fmean(b)
    return d / se if se > 0 else (0.0 if d == 0 else math.copysign(float("inf"), d))


def summarize(rounds: list, cells: list, n_runs: int, workers: int) -> dict:
    """The speed table and the per-cell accuracy comparison from the rounds' rows."""
    out = {"runs": n_runs, "workers": workers, "rounds": len(rounds)}
    for who in ("plain", "library"):
        walls = [r[who]["wall_s"] for r in rounds]
        busy = [sum(x["seconds"] or 0.0 for x in r[who]["rows"]) for r in rounds]
        w = statistics.median(walls)
        out[who] = {"wall_s": walls, "median_wall_s": w, "runs_per_hour": 3600.0 * n_runs / w,
                    "worker_s": busy, "runs_per_worker_hour": 3600.0 * n_runs / statistics.median(busy),
                    "failed": sum(x["status"] == "failed" for r in rounds for x in r[who]["rows"]),
                    "diverged": sum(x["status"] == "diverged" for r in rounds for x in r[who]["rows"])}
    out["ratio_per_round"] = [r["plain"]["wall_s"] / r["library"]["wall_s"] for r in rounds]
    out["ratio"] = statistics.median(out["ratio_per_round"])
    out["ratio_steady"] = out["library"]["runs_per_worker_hour"] / out["plain"]["runs_per_worker_hour"]
    acc = []
    for arch, ds in cells:
        row = {"arch": arch, "dataset": ds}
        for who in ("plain", "library"):
            v = [x["test_acc"] for x in rounds[0][who]["rows"]  # results do not depend on the round
                 if x["arch"] == arch and x["dataset"] == ds and x["test_acc"] is not None]
            row[who] = v
            row[who + "_mean"] = statistics.fmean(v) if v else float("nan")
            row[who + "_sd"] = statistics.stdev(v) if len(v) > 1 else float("nan")
            row[who + "_worker_s"] = statistics.median(
                sum(x["seconds"] or 0.0 for x in r[who]["rows"] if x["arch"] == arch and x["dataset"] == ds)
                for r in rounds)
        row["t"] = welch(row["library"], row["plain"])
        row["equal"] = bool(math.isfinite(row["t"]) and abs(row["t"]) < 3.0) or row["t"] == 0.0
        acc.append(row)
    out["accuracy"] = acc
    return out


def format_tables(s: dict, info: dict) -> str:
    lines = [f"slice: {info['slice']} — {s['runs']} runs ({info['seeds']} seeds x lambdas {info['lams']}), "
             f"{s['workers']} workers x 1 thread, {s['rounds']} interleaved round(s); budget: {info['budget']}", "",
             "| runner | wall per round (median) | runs / hour | runs / worker-hour (steady) | rounds' walls s | "
             "load avg per round |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for who, label in (("plain", "plain PyTorch (one model per run)"), ("library", "`minaction study run`")):
        r = s[who]
        lines.append(f"| {label} | {r['median_wall_s']:.1f} s | {r['runs_per_hour']:,.0f} | "
                     f"{r['runs_per_worker_hour']:,.0f} | {', '.join(f'{w:.1f}' for w in r['wall_s'])} | "
                     f"{'; '.join(info['loads'][who])} |")
    lines.append(f"| **ratio library / plain** | | **{s['ratio']:.2f}x** (rounds: "
                 f"{', '.join(f'{x:.2f}' for x in s['ratio_per_round'])}) | {s['ratio_steady']:.2f}x | | |")
    lines += ["", "| cell | plain test acc mean ± sd (n) | library test acc mean ± sd (n) | Welch t | "
                  "equal in distribution (abs t < 3) | worker-s plain / library (ratio) |",
              "| --- | ---: | ---: | ---: | --- | ---: |"]
    for a in s["accuracy"]:
        lines.append(f"| {a['arch']} × {a['dataset']} | {a['plain_mean']:.4f} ± {a['plain_sd']:.4f} "
                     f"({len(a['plain'])}) | {a['library_mean']:.4f} ± {a['library_sd']:.4f} ({len(a['library'])}) | "
                     f"{a['t']:.2f} | {'yes' if a['equal'] else 'NO'} | {a['plain_worker_s']:.1f} / "
                     f"{a['library_worker_s']:.1f} ({a['plain_worker_s'] / max(a['library_worker_s'], 1e-9):.2f}x) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--slice", default="diagonal", help="'diagonal' (4 cells), 'grid' (16) or arch:dataset,...")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of both runners (default 2)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds per cell (default 10: the study's group)")
    ap.add_argument("--lams", default="1e-4", help="comma-separated lambdas (default 1e-4)")
    ap.add_argument("--train-subset", type=int, default=2048, help="training samples per run (0 = all)")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps per run: sets the epoch cap")
    ap.add_argument("--val-subset", type=int, default=1000)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--base", default="full", help="preset whose budget is used (default full: faithful)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 2 seeds, 256 samples, 4 steps, 1 round")
    ap.add_argument("--out", default=None, help="also write the summary as JSON here")
    ap.add_argument("--profile", nargs="?", const="mlp:mnist,cnn:mnist,bimodal_true:mnist,physics_lagrangian:mnist",
                    default=None, metavar="CELLS", help="instead of the race: profile one member-epoch of the "
                    "trainer per arch:dataset cell (G = 10; default the four architectures on mnist)")
    ap.add_argument("--profile-steps", type=int, default=32, help="steps profiled per epoch (scaled to the epoch)")
    ap.add_argument("--plan", nargs="?", const="full", default=None, metavar="PRESET",
                    help="instead of the race: the faithful preset's estimated wall time on this machine "
                         "(minaction study plan's model; evaluations timed on --plan-eval-subset samples)")
    ap.add_argument("--plan-eval-subset", type=int, default=500)
    ap.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plain-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.plain_worker:
        plain_main(a.plain_worker, a.plain_out, a.workers)
        return 0
    if a.plan:
        from minaction.study.plan import format_plan

        p = plan_estimate(a.plan, a.workers, a.plan_eval_subset)
        print(format_plan(p))
        print(f"(measured in {p['measured_in_s']:.0f} s; load average {p['load']})")
        if a.out:
            Path(a.out).write_text(json.dumps(p, indent=1, default=str))
        return 0
    if a.profile:
        rows = [profile_member_epoch(arch, ds, G=a.seeds, steps=2 if a.quick else a.profile_steps, base=a.base)
                for arch, ds in parse_slice(a.profile)]
        print(format_profile(rows))
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1))
        return 0
    if a.quick:
        a.rounds, a.seeds, a.train_subset, a.steps, a.val_subset, a.test_subset = 1, 2, 256, 4, 128, 128
    for k in ("rounds", "workers", "seeds", "steps"):
        if getattr(a, k) < 1:
            ap.error(f"--{k} must be >= 1")
    cells = parse_slice(a.slice)
    lams = [float(x) for x in a.lams.split(",") if x.strip()]
    from minaction import data

    spec = slice_spec(cells, range(a.seeds), lams, a.train_subset, a.steps, a.val_subset, a.test_subset,
                      base=a.base, n_train=lambda ds: len(data.load(ds, "train")))
    from minaction.study.presets import expand

    n_runs = len(expand({k: v for k, v in spec.items() if not k.startswith("_")}))
    budget_note = (f"{a.base}'s budget per dataset (batch, lr, optimizer, eval cadence, patience, restore-best), "
                   f"train subset {a.train_subset or 'all'} per run (seeded), epoch cap = fewest epochs giving "
                   f"{a.steps} steps (<= the faithful cap), val/test subsets {a.val_subset}/{a.test_subset}")
    info = {"slice": ", ".join(f"{x}×{y}" for x, y in cells), "seeds": a.seeds, "lams": lams, "budget": budget_note,
            "loads": {"plain": [], "library": []}}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="study_speedup_") as tmp:
        tmp = Path(tmp)
        toml = tmp / "slice.toml"
        write_toml(spec, toml)
        print(f"# {n_runs} runs per runner per round; preset {toml}", file=sys.stderr, flush=True)
        if a.quick:
            info["plan"] = "not made (--quick: the library's first round measures it, inside its time)"
        else:  # untimed: fills the plan's cost table, so `study run`'s start-up estimate does not measure in a round
            p = subprocess.run([sys.executable, "-m", "minaction.cli", "study", "plan", "--preset", str(toml),
                                "--workers", str(a.workers)], env=env, capture_output=True, text=True)
            info["plan"] = (p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip()
                            else p.stderr.strip())
        for i in range(a.rounds):
            order = ("plain", "library") if i % 2 == 0 else ("library", "plain")
            rnd = {}
            for who in order:
                load0 = _load()
                if who == "plain":
                    wall, rows = run_plain(toml, tmp / f"plain{i}.json", a.workers, env)
                else:
                    wall, rows = run_library(toml, tmp / f"lib{i}.sqlite", a.workers, env)
                info["loads"][who].append(f"{load0} → {_load()}")
                rnd[who] = {"wall_s": wall, "rows": rows}
                print(f"# round {i + 1} {who}: {wall:.1f} s, {len(rows)} runs, load {info['loads'][who][-1]}",
                      file=sys.stderr, flush=True)
            rounds.append(rnd)
    s = summarize(rounds, cells, n_runs, a.workers)
    s["info"] = info
    print(format_tables(s, info))
    print(f"\nplan estimate for this slice (`minaction study plan`): {info['plan']}")
    if a.out:
        Path(a.out).write_text(json.dumps(s, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
