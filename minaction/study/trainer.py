"""Training one group of runs: the function every executor's workers call.

A *group* is a list of runs whose configurations differ only in ``seed`` (and, with
``group_by = "seed+lam"``, in ``lam``). It trains as **one** model built with
``num_models = len(group)`` and ``seeds = [run seeds]``, and the loss is

    loss = sum_g ( CE_g + lam_g * E_g )

which, with an element-wise optimizer (Adam, SGD), is exactly ``len(group)`` independent
trainings. With ``data_order = "seed"`` (the default) **each member draws its own training
subset and batch order from its run's seed**: the batch fed to the model is ``x[G, B, ...]``,
member g's rows gathered by its own index order. With ``data_order = "shared"`` every
member sees the order drawn from ``data_seed`` (one shared ``x[B, ...]``).

Evaluation and early stopping, per member:

* every ``eval_every`` optimizer steps and at the end of every epoch, each member still
  training is evaluated on the validation split; the point is recorded (``evals`` rows:
  steps, training samples, training FLOPs, validation loss/accuracy/energy, the member's
  training time);
* the member's best validation accuracy so far (strictly better counts) is kept as a copy
  of its weights; a member with no better validation accuracy for ``patience_epochs``
  epochs' worth of optimizer steps stops (its term leaves the loss; a model that can skip
  members, ``set_active_members`` — the cnn's loop of members on a CPU — no longer runs it
  at all, so a group costs what its members still training cost, as separate runs would);
* after training, each member's best-validation weights are restored (``restore_best``)
  and evaluated on the test split.

A member whose objective becomes non-finite is marked *diverged* at that step and frozen:
its term is masked out of the loss and its non-finite gradients are zeroed, so the other
members train on unaffected; it is recorded with status ``diverged`` and the epoch rows it
completed. The same holds for a member whose parameters or optimizer state stop being
finite while its objective stays finite (checked after every epoch): with a huge ``lam``,
Adam's second moment overflows to inf and its updates become exactly 0, a frozen model
that must not be recorded as ``done``.

:func:`run_group` never raises: an exception anywhere in a group yields a ``failed``
record for each member, with the traceback in ``error``.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import optim
from .plugins import import_plugins

_WORKER_READY = False


def init_worker(threads: int = 1) -> None:
    """Per-process setup: one torch thread, deterministic algorithms (without filling fresh memory)."""
    global _WORKER_READY
    if _WORKER_READY:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    _deterministic()
    # ... but not its debugging aid of filling every torch.empty with NaN: it changes no result (every
    # kernel writes its whole output) and cost 5.5% of a cnn member-step (idle AVX-512 EPYC, interleaved)
    torch.utils.deterministic.fill_uninitialized_memory = False
    warnings.filterwarnings("ignore", message=r"minaction: using the slow 'reference' backend")
    _pin_allocator()
    _WORKER_READY = True


def _deterministic() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, less its import of
    ``torch._inductor.config`` (which pulls in ``torch._dynamo``: 1.2-1.6 s in every fresh worker,
    2-core AMD EPYC) for a setting that only compiled code reads; set there too if it is loaded."""
    import sys

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


def _pin_allocator() -> bool:
    """Keep freed memory in glibc's heap (a fixed mmap threshold, no trimming), so that a batched
    step's large temporaries are reused memory, not fresh pages faulted in at every step.
    Measured idle on the 2-core AMD EPYC: a G = 50 layer's weight gradient (``bmm``, a 40 MB
    output) 65-79 ms unpinned against 45-46 ms pinned; an N-MNIST member's 9.5 MB gather 3.8 ms
    against 0.9 ms. glibc still maps blocks above its ceiling (~32-64 MB) afresh. A worker's
    resident memory stays at its peak. ``MINACTION_PIN_ALLOCATOR=0`` turns it off; a no-op off
    glibc."""
    if os.environ.get("MINACTION_PIN_ALLOCATOR", "1").strip() in ("0", "false", "no"):
        return False
    from .._alloc import keep_freed_memory

    return keep_freed_memory()


# ----------------------------------------------------------------------------- data and models
def _data_module(name):
    import minaction.data as data

    return data


def _model_module(arch):
    """The architecture's ``build`` and ``activation_stats`` (built in or registered)."""
    import minaction.models as models

    return models.architecture(arch)


@functools.lru_cache(maxsize=16)
def _load_split(name: str, split: str, opts_json: str):
    """Loaded once per worker process and kept (subsets are taken from it per run)."""
    opts = json.loads(opts_json)
    return _data_module(name).load(name, split, **opts)


#: feed Dataset.time_averaged() to models that declare ``reads_time_mean`` (tests turn it off to compare)
TIME_MEAN_INPUTS = True


def inputs_for(model, *datasets) -> tuple:
    """The datasets as ``model`` is fed them (by the trainer and by ``study plan``'s timing): for a
    model that reads its input only through the mean over a time axis (``reads_time_mean``), that
    mean (``Dataset.time_averaged()``: the same values, bit for bit, not T frames to gather, copy
    and average at every step); else as they are."""
    if (TIME_MEAN_INPUTS and getattr(model, "reads_time_mean", False) and datasets
            and datasets[0].x.dtype == next(model.parameters()).dtype):
        return tuple(d.time_averaged() for d in datasets)
    return datasets


def load_splits(dataset: str, budget: dict, data_opts: dict, subset_train: bool = True):
    """(train, val, test) datasets for one configuration; val and test subset (seeded by
    ``data_seed``) as the budget says. The train split is subset here only with
    ``subset_train`` (the trainer draws per-member train subsets itself)."""
    opts = json.dumps(data_opts, sort_keys=True)
    out = []
    for split, key in (("train", "train_subset"), ("val", "val_subset"), ("test", "test_subset")):
        ds = _load_split(dataset, split, opts)
        n = int(budget.get(key) or 0)
        if n > 0 and n < len(ds) and (split != "train" or subset_train):
            ds = ds.subset(n, seed=int(budget["data_seed"]))
        out.append(ds)
    return tuple(out)


def _as_group(t: torch.Tensor, G: int) -> torch.Tensor:
    """Logits [B, C] (one model) -> [1, B, C]; energies 0-dim -> [1]."""
    if G == 1 and t.dim() in (0, 2):
        return t.unsqueeze(0)
    return t


def _energy(model, G):
    from ..model_api import total_energy

    return _as_group(total_energy(model), G).reshape(G)


@torch.no_grad()
def _chunks(batches, rows: int):
    """The batches, each cut into pieces of at most ``rows`` rows (``rows`` <= 0: as they are)."""
    for x, y in batches:
        if rows <= 0 or len(y) <= rows:
            yield x, y
            continue
        for i in range(0, len(y), rows):
            yield x[i:i + rows], y[i:i + rows]


@torch.no_grad()
def evaluate(model, ds, G: int, batch_size: int, stats_fn=None, dtype=None):
    """Per member: mean CE, accuracy, mean E (and, with ``stats_fn``, mean active_frac and
    energy_rescaled), each a float64 tensor [G]; weighted by batch size. Runs without autograd
    (the training loop calls it with gradients on: a graph per batch made a cnn evaluation
    pass 1.3-1.5x slower)."""
    was = model.training
    model.eval()
    n = 0
    tot = {k: torch.zeros(G, dtype=torch.float64) for k in ("loss", "acc", "energy", "active_frac",
                                                              "energy_rescaled")}
    chunk = int(getattr(model, "eval_rows", 0) or 0)  # a model may ask for smaller pieces
    for x, y in _chunks(ds.batches(batch_size, shuffle=False), chunk):
        b = len(y)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        st = None
        if stats_fn is not None and getattr(stats_fn, "gives_output", False):
            st = stats_fn(model, x, output=True)  # the logits come from the stats' own forward
            logits = _as_group(st["output"], G)
        else:
            logits = _as_group(model(x), G)
        C = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, C).float(), y.repeat(G), reduction="none").view(G, b).mean(1)
        tot["loss"] += ce.double() * b
        tot["acc"] += (logits.argmax(-1) == y).double().sum(1)
        if stats_fn is None:
            tot["energy"] += _energy(model, G).double() * b
        else:
            if st is None:
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
                ok[g] &= bool(_finite_rows(t.reshape(1, -1))[0])
            elif G > 1 and t.dim() >= 1 and t.shape[0] == G:
                ok &= _finite_rows(t.reshape(G, -1))
            elif not bool(_finite_rows(t.reshape(1, -1))[0]):
                ok[:] = False
    return ok


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    """[rows] bool: every value of the row is finite. A row's sum is finite when all its values
    are (a NaN or an infinity reaches the sum), so only rows whose sum is not (a non-finite
    value, or finite values that overflow) are checked element by element: ``t.sum(1)`` reads
    at memory speed, ``isfinite(t).all(1)`` was ~40x slower (a tenth of an MLP group on sst2)."""
    ok = torch.isfinite(t.sum(1))
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        ok[bad] = torch.isfinite(t.index_select(0, bad)).all(1)
    return ok


# ----------------------------------------------------------------------------- per-member data order
def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def _order_keys(budget: dict, seed: int) -> tuple:
    """The entropy a member's data draws come from: its run seed, or the shared data_seed."""
    if budget.get("data_order", "seed") == "shared":
        return (int(budget["data_seed"]), 0)
    return (int(budget["data_seed"]), 1, int(seed))


def member_train_indices(n_total: int, budget: dict, seed: int) -> np.ndarray:
    """Indices into the train split that form this member's training set (sorted)."""
    n = int(budget.get("train_subset") or 0)
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(_rng(*_order_keys(budget, seed), 7).permutation(n_total)[:n])


def member_epoch_order(indices: np.ndarray, budget: dict, seed: int, epoch: int) -> np.ndarray:
    """This member's training indices in the order of epoch ``epoch``."""
    return indices[_rng(*_order_keys(budget, seed), 11, epoch).permutation(len(indices))]


def _spike_seed(budget: dict, seed: int, epoch: int) -> int:
    return int(_rng(*_order_keys(budget, seed), 13, epoch).integers(0, 2 ** 31))


def _gather(train, orders: list, sl: slice, budget: dict, seeds: list, epoch: int, batch_index: int, shared: bool):
    """The step's inputs and labels: shared ``(x [B, ...], y [B])`` or per member
    ``(x [G, B, ...], y [G, B])``, member g's rows taken from ``orders[g][sl]``."""
    # a dataset that does not say its encode is the identity (a plugin's) is encoded per member
    encode = getattr(train, "encode", None) if getattr(train, "encodes", True) else None

    def one(order, seed):
        idx = torch.from_numpy(order[sl])
        x = train.x.index_select(0, idx.to(train.x.device))
        if encode is not None:
            x = encode(x, seed=_spike_seed(budget, seed, epoch), batch_index=batch_index)
        return x, train.y.index_select(0, idx.to(train.y.device))

    if shared:
        return one(orders[0], seeds[0])
    if encode is None:  # one copy of every member's rows, already [G, B, ...] (no stack of G copies)
        parts = [torch.from_numpy(o[sl]) for o in orders]
        B = len(parts[0])
        if all(len(p) == B for p in parts):
            idx = torch.cat(parts)
            x = train.x.index_select(0, idx.to(train.x.device))
            y = train.y.index_select(0, idx.to(train.y.device))
            return x.view((len(parts), B) + tuple(x.shape[1:])), y.view((len(parts), B) + tuple(y.shape[1:]))
    xs, ys = zip(*(one(o, s) for o, s in zip(orders, seeds)))
    return torch.stack(xs), torch.stack(ys)


# ----------------------------------------------------------------------------- per-member weights
def member_tensors(model, G: int) -> list:
    """For each member g, the list of tensors (views) holding its parameters and buffers.

    A model may define ``member_parameters(g)``; otherwise: one member (G == 1), a loop of
    members (``model.members``), or batched tensors whose leading dimension is G.
    """
    if hasattr(model, "member_parameters"):
        return [list(model.member_parameters(g)) for g in range(G)]
    if G == 1:
        return [list(model.parameters()) + list(model.buffers())]
    if hasattr(model, "members"):
        return [list(m.parameters()) + list(m.buffers()) for m in model.members]
    tensors = list(model.parameters()) + list(model.buffers())
    bad = [tuple(t.shape) for t in tensors if t.dim() == 0 or t.shape[0] != G]
    if bad:
        raise ValueError(f"cannot split the batched model into its {G} members: tensors of shape {bad} have no "
                         f"leading member dimension (give the model a member_parameters(g) method)")
    return [[t[g] for t in tensors] for g in range(G)]


def training_flops_per_sample(model, x, G: int) -> float:
    """Training FLOPs of one member on one sample: one training step of the model on the batch ``x``
    (shared by its ``G`` members) -- the forward, the objective ``cross_entropy + E`` and its backward --
    divided by ``G * len(x)``, counted as ``torch.utils.flop_counter.FlopCounterMode`` counts it.

    What it counts: every matrix product and convolution of the step (``2 * multiply-adds``): the dense and
    convolution layers, the logits, and any other product in the forward such as physics_lagrangian's
    force ``-W_V^T r``; their backward, the input gradient only where one is needed (the first layer of
    an image, event or series model needs none: its backward costs one forward, the others' two). Not
    counted: elementwise work (bias, activations, the energy), embedding lookups, pooling and the
    optimizer update. Nothing of the model changes (no backward is run, the RNG state is restored).

    The count comes from one forward with hooks on the product layers (energy layers, and plain
    ``nn.Linear`` / ``nn.Conv*d`` that a registered model keeps, such as converted logits): each layer's
    products times 1 + the gradients its backward computes, plus the products a model declares with
    ``weight_products()`` (layers
    whose weight enters a product of the layer's own size outside it: physics_lagrangian's force). A
    registered architecture with other products outside its energy layers declares them the same way.
    Not FlopCounterMode: a dispatch mode imports ``torch._dynamo`` (1.1-1.6 s in every fresh worker), and
    torch 2.13's counts a grouped convolution's weight gradient G times. tests/study/test_study_flops.py
    checks this count against FlopCounterMode's on a real step for every built-in architecture and stem."""
    return _hooked_flops(model, x) / (G * len(x))


def _hooked_flops(model, x) -> float:
    """A model's training-step FLOPs from one forward (see training_flops_per_sample)."""
    from ..nn.layers import EnergyLayer

    calls = []
    plain = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def hook(mod, inp, out):
        y = out[0] if isinstance(out, tuple) else out
        if not inp or not torch.is_tensor(inp[0]) or not torch.is_tensor(y):
            return
        xs, ys = tuple(inp[0].shape), tuple(y.shape)
        if isinstance(mod, EnergyLayer):
            fwd = mod.forward_flops(xs, ys) - (math.prod(ys) if mod.bias is not None else 0)  # products only
        elif isinstance(mod, nn.Linear):  # a layer convert left plain (a registered model's logits)
            fwd = 2 * math.prod(ys) * mod.in_features
        else:
            fwd = 2 * math.prod(ys) * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        calls.append((mod, fwd, bool(inp[0].requires_grad)))

    # the product layers: energy ones (an EnergyActivation or an ActivationObserver computes no product) and
    # the plain ones a registered architecture may keep, as FlopCounterMode counts every product of the step
    layers = [m for m in model.modules()
              if (isinstance(m, EnergyLayer) and hasattr(m, "forward_flops") and getattr(m, "weight", None) is not None)
              or (isinstance(m, plain) and not isinstance(m, EnergyLayer))]
    hooks = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    reused = {id(l) for m in [model] + list(getattr(model, "members", None) or ())
              for l in (m.weight_products() if hasattr(m, "weight_products") else ())}
    total = 0.0
    for mod, fwd, need_x in calls:
        need_w = mod.weight.requires_grad
        total += fwd * (1 + need_w + need_x)
        if id(mod) in reused:  # the same product again outside the layer, both its gradients needed
            total += fwd * 3
    return total


def _count_flops(model, ds, dtype, G: int) -> float:
    """:func:`training_flops_per_sample` on the first (up to 8) samples of ``ds``."""
    n = min(len(ds), 8)
    x0 = ds.encode(ds.x[:n]) if hasattr(ds, "encode") else ds.x[:n]
    x0 = x0.to(dtype) if dtype and x0.is_floating_point() else x0
    return training_flops_per_sample(model, x0, G)


def _build(arch, meta, budget, seeds, dtype):
    """The batched model of ``len(seeds)`` members of one configuration, as the study trains it."""
    import minaction.models as models

    # a built-in batched model keeps its member dimension for one member, so that a lone run (a group of one,
    # the last member after compaction) computes with the batched kernels exactly as inside a group
    extra = {"member_dim": True} if arch in models.ARCHITECTURES else {}
    m = _model_module(arch).build(arch, meta, width=budget.get("width") or None, depth=budget.get("depth") or None,
                                  energy=budget["energy"], activation=budget["activation"],
                                  energy_reduction=budget["energy_reduction"], num_models=len(seeds),
                                  seeds=list(seeds), **extra)
    return m.to(dtype) if dtype is not None else m


def config_training_flops(config: dict) -> float:
    """:func:`training_flops_per_sample` of one run's configuration (``runs.config_json``): one
    member built as :func:`train_group` builds it, counted on its validation split's first samples."""
    arch, dataset, budget = config["arch"], config["dataset"], config["budget"]
    dtype = torch.float64 if budget.get("dtype") == "float64" else None
    val = _load_split(dataset, "val", json.dumps(config["data_opts"], sort_keys=True))
    m = _build(arch, val.meta, budget, [int(config["seed"])], dtype)
    (val,) = inputs_for(m, val)
    return _count_flops(m, val, dtype, 1)


def _set_active(model, active) -> None:
    """Tell a model that can skip members (``set_active_members``, e.g. the cnn's loop of
    members on a CPU) which ones still train: an early-stopped or diverged member then costs
    no forward, backward, optimizer or validation work. Its results are unchanged: it is
    tested with its best-validation weights (``restore_best``), and otherwise with the
    weights it had when it stopped. Batched modules run every member regardless."""
    f = getattr(model, "set_active_members", None)
    if f is not None:
        f(None if active is None or bool(active.all()) else active)


def _spread(t: torch.Tensor, live: list, G: int) -> torch.Tensor:
    """Per-member values of the model's members ``live`` -> a [G] vector over the group (0 elsewhere)."""
    if len(live) == G:
        return t
    out = torch.zeros(G, dtype=t.dtype, device=t.device)
    out[live] = t
    return out


def _compactable(model, G: int) -> bool:
    """A batched model whose every parameter and buffer has the member dimension first, so a
    model of fewer members can take over a subset of them (see ``train_group``'s compaction)."""
    if G < 2 or hasattr(model, "member_parameters") or hasattr(model, "members"):
        return False
    return all(t.dim() >= 1 and t.shape[0] == G for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def _take(src: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst`` <- the members ``pos`` of ``src`` (member dimension first; a one-member model may
    have none)."""
    dst.copy_(src.index_select(0, pos.to(src.device)).reshape(dst.shape))


@torch.no_grad()
def _carry_over(old, old_opt, old_params, new, new_opt, new_params, pos: torch.Tensor) -> None:
    """The members ``pos`` of ``old`` (weights, buffers, optimizer state) into ``new``, built
    with those members' seeds: the same modules, one member dimension shorter."""
    for a, b in zip(list(old.parameters()) + list(old.buffers()), list(new.parameters()) + list(new.buffers())):
        _take(a, pos, b)
    for a, b in zip(old_params, new_params):
        st = old_opt.state.get(a)
        if not st:
            continue
        carried = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == a.shape:  # per-element state (Adam's moments, momentum)
                carried[k] = torch.empty_like(b)
                _take(v, pos, carried[k])
            else:  # per-tensor state (Adam's step count)
                carried[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
        new_opt.state[b] = carried


# ----------------------------------------------------------------------------- the group
def train_group(runs: list, ckpt=None) -> list:
    """Train the runs of one group together; returns one ``{"run": row, "epochs": rows,
    "evals": rows}`` per run (plus ``"resumed_from"``: ``{"epoch", "batch", "step"}`` or None).

    ``ckpt``: a :class:`minaction.study.checkpoint.GroupCheckpoint`; the group resumes from it
    when it holds a matching checkpoint, and saves to it at an epoch end once
    ``ckpt.epoch_every_s`` seconds passed since the last save and at the first mid-epoch
    evaluation once ``ckpt.every_s`` seconds passed."""
    from ..backends import select as _backend

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
    dtype = torch.float64 if budget.get("dtype") == "float64" else None
    train, val, test = load_splits(dataset, budget, cfg0["data_opts"], subset_train=False)
    meta = train.meta
    mm = _model_module(arch)
    seeds = [int(r["config"]["seed"]) for r in runs]

    def make(live):
        """The model of the members ``live`` (run indices, in order) and its optimizer."""
        m = _build(arch, meta, budget, [seeds[g] for g in live], dtype)
        ps = [p for p in m.parameters() if p.requires_grad]
        # a batched model (every tensor [G, ...]): the optimizer updates each member on its own view, so that a
        # run's weights, and so its results, do not depend on the other runs in its group
        G_m = len(live)
        batched = G_m > 1 and not hasattr(m, "members") and not hasattr(m, "member_parameters")
        o = optim.make(budget["optimizer"], ps, lr=budget["lr"], weight_decay=budget.get("weight_decay", 0.0),
                       members=G_m if batched else 0)
        return m, o, ps

    live = list(range(G))  # the runs the model holds, in its member order (see _compact)
    model, opt, params = make(live)
    train, val, test = inputs_for(model, train, val, test)
    stats_fn = getattr(mm, "activation_stats", None)
    n_params = sum(p.numel() for p in model.parameters()) // G
    lam = torch.tensor([float(r["config"]["lam"]) for r in runs], dtype=dtype or torch.float32)
    backend_name = _backend.select("cpu")

    # each member's training set and (per epoch) order
    shared = budget.get("data_order", "seed") == "shared" or (G == 1 and not getattr(model, "member_dim", False))
    indices = [member_train_indices(len(train), budget, s) for s in seeds]
    n_train = len(indices[0])
    bs, ebs = int(budget["batch_size"]), int(budget.get("eval_batch_size") or 512)
    steps_per_epoch = -(-n_train // bs)
    eval_every = int(budget.get("eval_every") or 0)
    patience = float(budget.get("patience_epochs") or 0.0)
    patience_steps = math.ceil(patience * steps_per_epoch) if patience > 0 else None
    restore = bool(budget.get("restore_best", True))
    flops_step = None  # training FLOPs per member and sample, counted at the first evaluation

    skips = hasattr(model, "set_active_members")
    compacts = not skips and _compactable(model, G)
    members = dict(enumerate(member_tensors(model, G)))  # run index -> the views of its weights in the model
    dropped_w = {}  # run index -> its weights when it left the model (see _compact)
    alive = torch.ones(G, dtype=torch.bool)       # not diverged
    stopped = torch.zeros(G, dtype=torch.bool)    # early-stopped
    diverged_at = [None] * G
    state_bad = [False] * G  # diverged through non-finite parameters / optimizer state, not the objective
    epoch_rows = [[] for _ in range(G)]
    eval_rows = [[] for _ in range(G)]
    best_acc = [-math.inf] * G
    best_step = [0] * G
    best_w = [None] * G
    member_time = torch.zeros(G, dtype=torch.float64)  # each member's own training time
    step = 0
    samples = 0
    last_epoch = [0] * G
    win = {"ce": torch.zeros(G, dtype=torch.float64), "n": 0}  # training CE since the last evaluation

    def do_eval(epoch):
        nonlocal flops_step
        active = alive & ~stopped
        if flops_step is None:
            _set_active(model, None)  # every member's layers counted
            flops_step = _count_flops(model, val, dtype, len(live))
            _set_active(model, active[live])
        v = {k: _spread(t, live, G) for k, t in evaluate(model, val, len(live), ebs, dtype=dtype).items()}
        for g in active.nonzero().flatten().tolist():
            acc = _f(v["acc"][g])
            eval_rows[g].append({
                "step": step, "epoch": samples / n_train, "samples": samples,
                "flops": flops_step * samples,
                "train_loss": _f(win["ce"][g] / win["n"]) if win["n"] else None,
                "val_loss": _f(v["loss"][g]), "val_acc": acc, "val_energy": _f(v["energy"][g]),
                "wall_time_s": float(member_time[g]), "best": 0,
            })
            if acc is not None and acc > best_acc[g]:
                best_acc[g], best_step[g] = acc, step
                eval_rows[g][-1]["best"] = 1
                if restore:
                    best_w[g] = [t.detach().clone() for t in members[g]]
            elif patience_steps is not None and step - best_step[g] >= patience_steps:
                stopped[g] = True
        win["ce"].zero_()
        win["n"] = 0
        return v

    # ---- checkpoint / resume (minaction.study.checkpoint): the whole loop state at a safe point
    def loop_state(epoch, next_batch, sums):
        return {"epoch": epoch, "next_batch": next_batch, "epoch_sums": sums, "step": step, "samples": samples,
                "alive": alive.clone(), "stopped": stopped.clone(), "diverged_at": list(diverged_at),
                "state_bad": list(state_bad), "epoch_rows": epoch_rows, "eval_rows": eval_rows,
                "best_acc": list(best_acc), "best_step": list(best_step), "best_w": best_w,
                "member_time": member_time.clone(), "last_epoch": list(last_epoch), "flops_step": flops_step,
                "live": list(live), "dropped_w": dropped_w,
                "win_ce": win["ce"].clone(), "win_n": win["n"], "elapsed_s": time.perf_counter() - t_start,
                "torch_rng": torch.get_rng_state()}

    def compact():
        """Rebuild the model without the members that stopped or diverged, carrying the
        others' weights and optimizer state over (a batched model runs every member it
        holds; a smaller one costs what its members still training cost)."""
        nonlocal model, opt, params, live, members
        keep = [g for g in live if bool(alive[g]) and not bool(stopped[g])]
        if not compacts or not keep or len(keep) == len(live):
            return
        for g in live:
            if g not in keep:
                dropped_w[g] = [t.detach().clone() for t in members[g]]
        pos = torch.tensor([live.index(g) for g in keep])
        new, new_opt, new_params = make(keep)
        _carry_over(model, opt, params, new, new_opt, new_params, pos)
        model, opt, params, live = new, new_opt, new_params, keep
        members = dict(zip(live, member_tensors(model, len(live))))

    first_epoch, first_batch, resume_sums, resumed_from = 1, 0, None, None
    saved = None
    if ckpt is not None:
        want = ckpt.peek_live() if compacts else None  # a checkpoint of a compacted group: build that model first
        if want is not None and list(want) != live:
            model, opt, params = make(list(want))
            saved = ckpt.load(model, opt)
            if saved is None:  # unusable after all: the group starts over, whole
                model, opt, params = make(live)
            else:
                live = list(want)
                members = dict(zip(live, member_tensors(model, len(live))))
        else:
            saved = ckpt.load(model, opt)
    if saved is not None:
        dropped_w.update(saved.get("dropped_w") or {})
        step, samples, flops_step = saved["step"], saved["samples"], saved["flops_step"]
        alive.copy_(saved["alive"])
        stopped.copy_(saved["stopped"])
        member_time.copy_(saved["member_time"])
        diverged_at[:], state_bad[:] = saved["diverged_at"], saved["state_bad"]
        epoch_rows[:], eval_rows[:] = saved["epoch_rows"], saved["eval_rows"]
        best_acc[:], best_step[:], best_w[:] = saved["best_acc"], saved["best_step"], saved["best_w"]
        last_epoch[:] = saved["last_epoch"]
        win["ce"].copy_(saved["win_ce"])
        win["n"] = saved["win_n"]
        t_start = time.perf_counter() - saved["elapsed_s"]
        torch.set_rng_state(saved["torch_rng"])
        first_epoch, first_batch, resume_sums = saved["epoch"], saved["next_batch"], saved["epoch_sums"]
        resumed_from = {"epoch": first_epoch, "batch": first_batch, "step": step}

    model.train()
    for epoch in range(first_epoch, int(budget["epochs"]) + 1):
        s_ce = torch.zeros(G, dtype=torch.float64)
        s_acc = torch.zeros(G, dtype=torch.float64)
        s_e = torch.zeros(G, dtype=torch.float64)
        n_ep = torch.zeros(G, dtype=torch.float64)
        if resume_sums is not None:  # resumed mid-epoch: the epoch's running sums so far
            s_ce, s_acc, s_e, n_ep = (t.clone() for t in resume_sums)
            resume_sums = None
        orders = [member_epoch_order(ix, budget, s, epoch) for ix, s in zip(indices, seeds)]
        v = None
        for b in range(first_batch, steps_per_epoch):
            active = alive & ~stopped
            if not active.any():
                break
            Gm = len(live)
            _set_active(model, active[live])  # members that stopped or diverged cost nothing (where the model can skip them)
            t0 = time.perf_counter()
            x, y = _gather(train, [orders[g] for g in live], slice(b * bs, (b + 1) * bs), budget,
                           [seeds[g] for g in live], epoch, b, shared)
            nb = y.shape[-1]
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            logits = _as_group(model(x[0] if Gm == 1 and not shared and not getattr(model, "member_dim", False)
                                     else x), Gm)
            C = logits.shape[-1]
            yy = y.repeat(Gm) if y.dim() == 1 else y.reshape(-1)
            ce = F.cross_entropy(logits.reshape(-1, C), yy, reduction="none").view(Gm, nb).mean(1)
            e = _energy(model, Gm)
            obj = ce + lam[live].to(e.dtype) * e
            ok = torch.ones(G, dtype=torch.bool)
            ok[live] = torch.isfinite(obj.detach())
            newly = active & ~ok
            if newly.any():
                for g in newly.nonzero().flatten().tolist():
                    diverged_at[g] = epoch
                alive &= ok
                active &= ok
            if not active.any():
                break
            loss = torch.where(active[live], obj, torch.zeros_like(obj)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not bool(alive[live].all()):
                for p in params:
                    if p.grad is not None:
                        p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            dt = time.perf_counter() - t0
            step += 1
            samples += nb
            with torch.no_grad():
                a = active.double()
                member_time += a * dt / (float(active.sum()) if skips else Gm)  # the members that ran share dt
                yg = y if y.dim() == 2 else y.unsqueeze(0)
                ce_g = _spread(ce.detach().double(), live, G)
                s_ce += ce_g * nb * a
                s_acc += _spread((logits.detach().argmax(-1) == yg).double().sum(1), live, G) * a
                s_e += _spread(e.detach().double(), live, G) * nb * a
                n_ep += nb * a
                win["ce"] += ce_g * nb
                win["n"] += nb
            for g in active.nonzero().flatten().tolist():
                last_epoch[g] = epoch
            end_of_epoch = b == steps_per_epoch - 1
            if end_of_epoch or (eval_every and step % eval_every == 0):
                was_active = alive & ~stopped
                v = do_eval(epoch)
                for g in was_active.nonzero().flatten().tolist():
                    if end_of_epoch or bool(stopped[g]):  # an epoch row at each epoch end or early stop
                        ev = eval_rows[g][-1]
                        epoch_rows[g].append({
                            "epoch": epoch, "train_loss": _f(s_ce[g] / max(float(n_ep[g]), 1)),
                            "train_acc": _f(s_acc[g] / max(float(n_ep[g]), 1)), "val_loss": ev["val_loss"],
                            "val_acc": ev["val_acc"], "energy": _f(s_e[g] / max(float(n_ep[g]), 1)),
                            "val_energy": ev["val_energy"], "wall_time_s": float(member_time[g]),
                        })
                if not end_of_epoch:
                    compact()  # members that stopped at this evaluation leave the model
                if ckpt is not None and not end_of_epoch and ckpt.due():
                    ckpt.save(model, opt, loop_state(epoch, b + 1, [s_ce, s_acc, s_e, n_ep]))
        first_batch = 0
        fin = torch.ones(G, dtype=torch.bool)
        fin[live] = finite_members(model, opt, len(live))
        bad_state = alive & ~fin  # e.g. Adam's second moment overflowed to inf
        for g in bad_state.nonzero().flatten().tolist():
            diverged_at[g], state_bad[g] = epoch, True
        alive &= ~bad_state
        if not (alive & ~stopped).any():
            break
        compact()
        if ckpt is not None and epoch < int(budget["epochs"]) and ckpt.due_at_epoch_end():
            ckpt.save(model, opt, loop_state(epoch + 1, 0, None))
    _set_active(model, None)  # every member is tested
    if len(live) < G:  # members left the model: the whole group again, each with its weights
        full, _, _ = make(list(range(G)))
        views = member_tensors(full, G)
        with torch.no_grad():
            for g in range(G):
                src = members[g] if g in members else dropped_w[g]
                for t, w in zip(views[g], src):
                    t.copy_(w.view_as(t))  # a one-member model may keep a member dimension of 1
        model, live = full, list(range(G))
        members = dict(enumerate(views))
    if restore:
        with torch.no_grad():
            for g in range(G):
                if best_w[g] is not None and diverged_at[g] is None:
                    for t, w in zip(members[g], best_w[g]):
                        t.copy_(w.view_as(t))  # a one-member model may keep a member dimension of 1
    te = evaluate(model, test, G, ebs, stats_fn=stats_fn, dtype=dtype) if alive.any() else None
    wall = (time.perf_counter() - t_start) / G
    out = []
    for g, r in enumerate(runs):
        c = r["config"]
        rows = epoch_rows[g]
        last = rows[-1] if rows else {}
        if not restore:
            for ev in eval_rows[g]:
                ev["best"] = 0
            if eval_rows[g]:
                eval_rows[g][-1]["best"] = 1  # the weights tested are the last ones
        else:  # exactly one row marks the checkpoint that was tested
            for ev in eval_rows[g]:
                ev["best"] = int(ev["step"] == best_step[g] and ev["val_acc"] == best_acc[g])
        row = {
            "run_id": r["run_id"], "arch": arch, "dataset": dataset, "modality": getattr(meta, "modality", None),
            "lam": float(c["lam"]), "seed": int(c["seed"]), "config_json": json.dumps(c, sort_keys=True),
            "epochs": len(rows), "train_loss": last.get("train_loss"),
            "val_acc": (best_acc[g] if restore and math.isfinite(best_acc[g]) else last.get("val_acc")),
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
        out.append({"run": row, "epochs": rows, "evals": eval_rows[g], "resumed_from": resumed_from})
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
    """Executor entry point: ``task = {"group_id", "runs", "threads", "plugins"}`` and, optionally,
    ``"checkpoint_dir"`` (resume from / save to the group's checkpoint there) and
    ``"checkpoint_every_s"``; never raises.

    Returns ``{"group_id", "records"}`` where records are :func:`train_group`'s, or
    ``failed`` records with the traceback when the group raised.
    """
    init_worker(int(task.get("threads", 1)))
    try:
        import_plugins(task.get("plugins"))  # registered architectures/datasets (minaction.study.plugins)
        ckpt = None
        if task.get("checkpoint_dir"):
            from .checkpoint import GroupCheckpoint

            ckpt = GroupCheckpoint(task["checkpoint_dir"], task["runs"], task.get("checkpoint_every_s"))
        records = train_group(task["runs"], ckpt=ckpt)
    except Exception:
        records = failed_records(task["runs"], traceback.format_exc())
    return {"group_id": task["group_id"], "records": records}
