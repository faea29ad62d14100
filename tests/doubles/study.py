"""Test-only stand-ins for ``minaction.data`` and ``minaction.models``, registered on import.

Never used by the shipped presets. They let the study runner's own tests exercise the
store, grouping, executors, resume and failure handling in seconds, on any machine.
Importing this module registers them through the public hooks
(:func:`minaction.data.register_dataset`, :func:`minaction.models.register_architecture`);
the study's workers import it again by name (:mod:`minaction.study.plugins`):

- dataset ``"synthetic"``: a seeded 4-class problem of 1x8x8 "images" (modality
  ``"synthetic"``), with the ``minaction.data`` dataset interface (``meta``, ``x``, ``y``,
  ``len``, ``batches``, ``subset``). Option ``n`` (train size, default 256).
- architectures ``"tiny_mlp"`` (a batched two-layer EnergyLinear MLP) and
  ``"tiny_fail"`` (raises ``RuntimeError`` in its first forward: a run that fails) and
  ``"tiny_crash"`` (kills its own worker process with ``os._exit``: a lost worker) and
  ``"tiny_hang"`` (its forward waits on an event that is never set: a model that hangs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minaction import data, models
from minaction.nn import EnergyLinear

DATASETS = ("synthetic", "synthetic_vision")  # the second: the same data, modality "vision" (for the cnn)
ARCHITECTURES = ("tiny_mlp", "tiny_fail", "tiny_crash", "tiny_hang")


@dataclass(frozen=True)
class SyntheticMeta:
    name: str = "synthetic"
    modality: str = "synthetic"
    num_classes: int = 4
    input_shape: tuple = (1, 8, 8)
    input_dtype: str = "float32"
    vocab_size: int = None
    spike_encoded: bool = False
    extra: dict = field(default_factory=dict)


class SyntheticDataset:
    def __init__(self, x, y, meta=None):
        self.x, self.y, self.meta = x, y, meta or SyntheticMeta()

    def __len__(self):
        return len(self.y)

    def subset(self, n, seed=0):
        if n <= 0 or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return SyntheticDataset(self.x[idx], self.y[idx], self.meta)

    def batches(self, batch_size, shuffle=True, seed=0, drop_last=False):
        n = len(self)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            j = idx[i:i + batch_size]
            if drop_last and len(j) < batch_size:
                break
            yield self.x[j], self.y[j]


def load(name, split, data_dir=None, seed=0, n=256, **opts):
    """A seeded linearly-separable-ish 4-class problem; the splits use disjoint streams."""
    if name not in DATASETS:
        raise ValueError(f"unknown synthetic dataset {name!r}")
    sizes = {"train": int(n), "val": max(int(n) // 4, 8), "test": max(int(n) // 4, 8)}
    if split not in sizes:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    proto = torch.Generator().manual_seed(1234)
    centers = torch.randn(4, 64, generator=proto)
    g = torch.Generator().manual_seed({"train": 1, "val": 2, "test": 3}[split] + 100 * int(seed))
    y = torch.randint(0, 4, (sizes[split],), generator=g)
    x = centers[y] + 1.5 * torch.randn(sizes[split], 64, generator=g)
    x = torch.sigmoid(x).reshape(-1, 1, 8, 8).float()
    meta = SyntheticMeta(name=name, modality="vision") if name == "synthetic_vision" else SyntheticMeta()
    return SyntheticDataset(x, y, meta)


class TinyMLP(nn.Module):
    """64 -> width -> width -> classes, G members in batched EnergyLinear layers."""

    def __init__(self, meta, width=16, num_models=1, seeds=None, energy="l2", activation="relu",
                 energy_reduction="sum", fail=None):
        super().__init__()
        G = num_models
        self.num_models, self.batched, self.fail = G, True, fail
        d = 1
        for s in meta.input_shape:
            d *= s
        kw = dict(num_models=G, energy=energy, energy_reduction=energy_reduction)
        self.l1 = EnergyLinear(d, width, activation=activation, **kw)
        self.l2 = EnergyLinear(width, width, activation=activation, **kw)
        self.out = EnergyLinear(width, meta.num_classes, activation="identity", energy=None, num_models=G)
        seeds = list(range(G)) if seeds is None else list(seeds)
        for g, s in enumerate(seeds):
            gen = torch.Generator().manual_seed(int(s))
            for layer in (self.l1, self.l2, self.out):
                layer.reset_parameters(generator=gen, model=g)

    def forward(self, x):
        if self.fail == "tiny_fail":
            raise RuntimeError("tiny_fail: this architecture always raises (test hook)")
        if self.fail == "tiny_crash":
            import os

            os._exit(3)  # the worker process dies without a Python exception
        if self.fail == "tiny_hang":
            import threading

            threading.Event().wait()  # never set: the process hangs here until it is killed
        per_member = self.num_models > 1 and x.dim() == 5  # [G, B, 1, 8, 8]: one batch per member
        h = x.reshape(x.shape[0], x.shape[1], -1) if per_member else x.reshape(x.shape[0], -1)
        y = self.out(self.l2(self.l1(h)))
        return y[0] if self.num_models == 1 else y


def build(arch, meta, width=None, depth=None, energy="l2", activation="relu", energy_reduction="sum",
          num_models=1, seeds=None):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown synthetic architecture {arch!r}")
    return TinyMLP(meta, width=width or 16, num_models=num_models, seeds=seeds, energy=energy,
                   activation=activation, energy_reduction=energy_reduction, fail=arch if arch != "tiny_mlp" else None)


@torch.no_grad()
def activation_stats(model, x):
    """``energy``, ``active_frac`` and ``energy_rescaled`` ([G]) for :class:`TinyMLP`."""
    was = model.training
    model.eval()
    h = x.reshape(x.shape[0], -1)
    a1 = model.l1(h)
    a2 = model.l2(a1)
    model.out(a2)
    model.train(was)
    e = model.l1.last_energy + model.l2.last_energy
    act = torch.cat([(a1 != 0).float().mean((1, 2)).unsqueeze(1), (a2 != 0).float().mean((1, 2)).unsqueeze(1)], 1)
    # each hidden unit times the L2 norm of the outgoing weights that read it
    n1 = model.l2.weight.norm(dim=1)            # [G, width]: column norms of the next layer
    n2 = model.out.weight.norm(dim=1)
    er = ((a1 * n1.unsqueeze(1)) ** 2).sum(-1).mean(-1) + ((a2 * n2.unsqueeze(1)) ** 2).sum(-1).mean(-1)
    G = model.num_models
    return {"energy": e.reshape(G), "active_frac": act.mean(1).reshape(G), "energy_rescaled": er.reshape(G)}


TIME_DATASETS = ("synthetic_events", "synthetic_spikes")  # with a time axis, as minaction.data datasets


def load_timed(name, split, data_dir=None, seed=0, n=96, **opts):
    """minaction.data datasets with a time axis: ``synthetic_events`` (event counts ``[N, 4, 2, 6, 6]``,
    a plain ``Dataset``) and ``synthetic_spikes`` (a ``SpikeDataset``: images ``[N, 1, 6, 6]`` drawn as
    T = 5 rate-coded frames)."""
    from minaction.data.core import DataMeta, Dataset, SpikeDataset

    sizes = {"train": int(n), "val": max(int(n) // 4, 8), "test": max(int(n) // 4, 8)}
    g = torch.Generator().manual_seed({"train": 1, "val": 2, "test": 3}[split] + 100 * int(seed))
    y = torch.randint(0, 3, (sizes[split],), generator=g)
    if name == "synthetic_events":
        rate = 0.5 + y.float().view(-1, 1, 1, 1, 1)
        x = torch.poisson(rate.expand(-1, 4, 2, 6, 6).contiguous(), generator=g)
        return Dataset(x, y, DataMeta(name, "neuromorphic", 3, (4, 2, 6, 6), torch.float32), split)
    img = torch.rand(sizes[split], 1, 6, 6, generator=g) * (0.3 + 0.3 * y.float().view(-1, 1, 1, 1))
    return SpikeDataset(img, y, DataMeta(name, "neuromorphic", 3, (5, 1, 6, 6), torch.float32, spike_encoded=True),
                        split)


for _name in DATASETS:
    data.register_dataset(_name, load)
for _name in TIME_DATASETS:
    data.register_dataset(_name, load_timed)
for _name in ARCHITECTURES:
    models.register_architecture(_name, build, activation_stats=activation_stats)


# ----------------------------------------------------------------------------- helpers for the study's tests
def one_group(spec) -> list:
    """The runs of ``spec`` (a preset dict that makes exactly one group), as that group."""
    from minaction.study import presets

    (g,) = presets.make_groups(presets.expand(spec), spec["group_by"], spec["max_group"])
    return g


def without_timings(records) -> list:
    """Everything a group records but its timings (``wall_time_s``), comparable across runs."""
    out = []
    for rec in records:
        run = {k: v for k, v in rec["run"].items() if k != "wall_time_s"}
        rows = [[{k: v for k, v in r.items() if k != "wall_time_s"} for r in rec[t]] for t in ("epochs", "evals")]
        out.append((run, rows))
    return out
