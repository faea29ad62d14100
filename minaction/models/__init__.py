"""Architectures of the study: two conventional baselines and two energy-first designs.

>>> from minaction import data, models
>>> ds = data.load("mnist", "train")
>>> net = models.build("bimodal_true", ds.meta)              # one member, logits [B, C]
>>> nets = models.build("mlp", ds.meta, num_models=10, seeds=range(10))  # logits [10, B, C]

``ARCHITECTURES``: ``mlp`` and ``cnn`` (baselines), ``bimodal_true`` and
``physics_lagrangian`` (energy-first; equations and reasoning in docs/models.md — this
project's interpretation, the paper's are not public). Every hidden activation is an
energy layer, so :func:`minaction.total_energy` is comparable across architectures.

Default widths are *parameter-matched*: ``mlp`` uses width 256 (depth 2); every other
architecture takes the width (a multiple of 8) whose parameter count, stem excluded, is
closest to that ``mlp``'s on the same dataset (:func:`default_width`).

Other architectures (a user's experiment, the study runner's test doubles) join through
:func:`register_architecture`; :func:`build` and the study then accept their names.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..registration import check_registration
from .cnn import ConvNet, LoopEnsemble
from .common import KEEP_MEMBER_DIM, as_int, check_meta
from .family import MLP, BimodalTrue, PhysicsLagrangian
from .members import load_member, member_state_dict
from .stats import activation_stats

ARCHITECTURES = ("mlp", "cnn", "bimodal_true", "physics_lagrangian")
BASELINES = ("mlp", "cnn")  # the report's "conventional" architectures
ENERGY_FIRST = ("bimodal_true", "physics_lagrangian")
_CLASSES = {"mlp": MLP, "cnn": ConvNet, "bimodal_true": BimodalTrue, "physics_lagrangian": PhysicsLagrangian}
DEFAULT_DEPTH = {"mlp": 2, "cnn": 2, "bimodal_true": 2, "physics_lagrangian": 2}
REFERENCE_WIDTH = 256  # the mlp's default width; the others are matched to it
_WIDTH_RANGE = (8, 8192)

__all__ = ["ARCHITECTURES", "BASELINES", "ENERGY_FIRST", "build", "activation_stats", "count_parameters",
           "default_width", "knobs", "MLP", "ConvNet", "BimodalTrue", "PhysicsLagrangian", "LoopEnsemble",
           "Architecture", "register_architecture", "architecture", "architecture_names", "member_state_dict",
           "load_member"]


@dataclass(frozen=True)
class Architecture:
    """What the study needs of an architecture: ``build(arch, meta, width=, depth=, energy=,
    activation=, energy_reduction=, num_models=, seeds=)`` (the signature of :func:`build`),
    ``activation_stats(model, x)`` and ``module``, the importable module that registered it
    (``None`` for the four built in): the study's worker processes import it to register the
    architecture there too."""

    name: str
    build: Callable
    activation_stats: Callable
    module: Optional[str] = None


_REGISTERED: Dict[str, Architecture] = {}


def register_architecture(name: str, build: Callable, activation_stats: Optional[Callable] = None) -> None:
    """Make ``name`` an architecture: :func:`build` and the study then accept it.

    ``build`` is called as ``build(name, meta, width=..., depth=..., energy=..., activation=...,
    energy_reduction=..., num_models=G, seeds=[...], **options)`` and returns a module whose
    forward gives logits ``[B, C]`` (G = 1) or ``[G, B, C]``. ``activation_stats(model, x)``
    (default: :func:`activation_stats`) gives the per-member ``energy``, ``active_frac`` and
    ``energy_rescaled`` the study records; one that sets the attribute ``gives_output = True``
    also takes ``output=True`` and then returns the forward's logits under ``"output"``, so the
    study's test evaluation runs the model once per batch instead of twice.

    Register at the top level of an importable module (not inside a function, not in a
    script run as ``__main__``): the study's workers are other processes, and they import
    that module (``build.__module__``) to register the name there. Registering a name again
    replaces the earlier registration; the built-in names cannot be replaced.
    """
    check_registration("architecture", name, _CLASSES, {"build": build}, {"activation_stats": activation_stats})
    _REGISTERED[name] = Architecture(name, build, activation_stats or globals()["activation_stats"],
                                     getattr(build, "__module__", None))


def architecture_names() -> Tuple[str, ...]:
    """The built-in :data:`ARCHITECTURES`, then every registered name."""
    return ARCHITECTURES + tuple(n for n in _REGISTERED if n not in ARCHITECTURES)


def architecture(name: str) -> Architecture:
    """The :class:`Architecture` named ``name`` (built in or registered)."""
    if name in _CLASSES:
        return Architecture(name, build, activation_stats)
    if name in _REGISTERED:
        return _REGISTERED[name]
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(architecture_names())}")


def knobs(arch: str) -> dict:
    """The architecture-specific options of ``arch`` with their defaults."""
    return dict(_cls(arch).KNOBS)


def _cls(arch):
    if arch not in _CLASSES:
        if arch in _REGISTERED:
            raise ValueError(f"architecture {arch!r} is registered (register_architecture), not built in: "
                             f"it has no knobs or matched default width here")
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(architecture_names())}")
    return _CLASSES[arch]


def count_parameters(model: nn.Module, exclude_stem: bool = False) -> int:
    """Trainable parameters of one member (the total divided by ``model.num_models``).

    ``exclude_stem=True`` leaves out the modality stem (the text embedding table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters takes an nn.Module, got {type(model).__name__}")
    G = int(getattr(model, "num_models", 1))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if exclude_stem and hasattr(model, "stem_parameters"):
        n -= sum(p.numel() for p in model.stem_parameters() if p.requires_grad)
    return n // G


def _meta_key(meta):
    return (meta.name, meta.modality, int(meta.num_classes), tuple(int(s) for s in meta.input_shape),
            getattr(meta, "vocab_size", None))


class _FrozenMeta:
    """Hashable stand-in for a DataMeta (its ``extra`` dict is unhashable)."""

    def __init__(self, key):
        self.name, self.modality, self.num_classes, self.input_shape, self.vocab_size = key


def _count(arch, key, width, depth, knob_items):
    with torch.device("meta"):
        m = _cls(arch)(_FrozenMeta(key), width, depth, **dict(knob_items))
    return count_parameters(m, exclude_stem=True)


@functools.lru_cache(maxsize=512)
def _matched_width(arch, key, depth, knob_items):
    target = _count("mlp", key, REFERENCE_WIDTH, DEFAULT_DEPTH["mlp"], (("embed_dim", dict(knob_items).get(
        "embed_dim", 64)),))
    lo, hi = _WIDTH_RANGE[0] // 8, _WIDTH_RANGE[1] // 8  # search over multiples of 8
    while lo < hi:  # smallest multiple of 8 whose count reaches the target (counts grow with width)
        mid = (lo + hi) // 2
        if _count(arch, key, 8 * mid, depth, knob_items) >= target:
            hi = mid
        else:
            lo = mid + 1
    cands = {8 * lo, 8 * max(lo - 1, _WIDTH_RANGE[0] // 8)}
    return min(sorted(cands), key=lambda w: abs(math.log(_count(arch, key, w, depth, knob_items) / target)))


def default_width(arch: str, meta, depth: Optional[int] = None, **arch_knobs) -> int:
    """The default width of ``arch`` on ``meta``: 256 for ``mlp``; for the others the multiple
    of 8 whose parameter count (stem excluded) is closest in ratio to ``mlp``'s at width 256."""
    _cls(arch)
    check_meta(meta)
    depth = DEFAULT_DEPTH[arch] if depth is None else int(depth)
    if arch == "mlp":
        return REFERENCE_WIDTH
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in arch_knobs.items()))
    return _matched_width(arch, _meta_key(meta), depth, items)


def build(arch: str, meta, width: Optional[int] = None, depth: Optional[int] = None, energy: Optional[str] = "l2",
          activation: str = "relu", energy_reduction: str = "sum", num_models: int = 1,
          seeds: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None, device=None,
          batched: Optional[bool] = None, member_dim: bool = False, **arch_knobs) -> nn.Module:
    """Build ``num_models`` members of architecture ``arch`` for the dataset described by ``meta``.

    Args:
        arch: one of :data:`ARCHITECTURES`, or a registered name.
        meta: a :class:`minaction.data.DataMeta` (or an object with its fields).
        width, depth: ``None`` = the defaults (:func:`default_width`, depth 2); meaning per
            architecture in docs/models.md.
        energy, activation, energy_reduction: passed to every hidden energy layer.
        num_models, seeds: G members; member g is initialised exactly like a one-member
            model built with ``seeds[g]`` (default ``range(G)``).
        dtype, device: cast/move the built model.
        batched: G members as one module sharing batched kernels (True) or a
            :class:`~minaction.models.cnn.LoopEnsemble` of separate members run one after another
            (False). ``None``: the architecture's choice for ``device`` (None = the CPU): every
            built-in is batched, except ``cnn`` on a CPU, whose members run faster one by one
            there (idle 2-core AVX2, after the uint8 max-pool: 37-38 against 46-50 ms per member-step
            on images, 0.88-0.90x for series and text; bench/RESULTS.md); on a GPU it is batched.
        member_dim: with ``num_models=1``, a batched model keeps its member dimension (weights
            ``[1, out, in]``, logits ``[1, B, C]``) and runs the batched kernels, so that its arithmetic
            is exactly a member's inside a group (the study trains a lone run this way: torch's
            ``mm`` and ``bmm`` round differently). A loop layout (``cnn`` on a CPU) then gives a
            one-member :class:`~minaction.models.cnn.LoopEnsemble`: the same shapes, and the member
            computes as it does inside a loop of G. Ignored by registered architectures.
        **arch_knobs: architecture options, see :func:`knobs`.

    Returns a module with ``forward(x [B, *meta.input_shape])`` -> logits ``[B, C]`` (one
    member) or ``[G, B, C]``, and attributes ``arch``, ``num_models``, ``batched`` (True:
    members share batched kernels; False: a loop over separate members, see ``batched``).
    A registered architecture (:func:`register_architecture`) is built by its own ``build``.
    """
    if arch in _REGISTERED:
        if batched is not None:
            raise ValueError(f"batched= applies to the built-in architectures; {arch!r} is registered and "
                             "builds its members its own way")
        model = _REGISTERED[arch].build(arch, meta, width=width, depth=depth, energy=energy, activation=activation,
                                        energy_reduction=energy_reduction, num_models=num_models, seeds=seeds,
                                        **arch_knobs)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        return model
    cls = _cls(arch)
    check_meta(meta)
    unknown = sorted(set(arch_knobs) - set(cls.KNOBS))
    if unknown:
        raise TypeError(f"{arch} has no option(s) {', '.join(unknown)}; its options: "
                        f"{', '.join(f'{k}={v!r}' for k, v in cls.KNOBS.items())}")
    G = as_int("num_models", num_models)
    if G < 1:
        raise ValueError(f"num_models must be >= 1, got {num_models}")
    seeds = list(range(G)) if seeds is None else [as_int("seeds", s) for s in seeds]
    if len(seeds) != G:
        raise ValueError(f"seeds must list num_models={G} ints, got {len(seeds)}")
    bad = [s for s in seeds if not -2 ** 63 <= s < 2 ** 64]  # torch.manual_seed's range
    if bad:
        raise ValueError(f"seeds must lie in [-2**63, 2**64) (torch.manual_seed's range), got {bad[0]}")
    depth = DEFAULT_DEPTH[arch] if depth is None else as_int("depth", depth)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if width is None:
        width = default_width(arch, meta, depth, **arch_knobs)
    if as_int("width", width) < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    kw = dict(energy=energy, activation=activation, energy_reduction=energy_reduction, **arch_knobs)
    if batched is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        batched = cls.batched and not (on_cpu and getattr(cls, "loop_on_cpu", False))
    elif batched and not cls.batched:
        raise ValueError(f"{arch} cannot be built as one batched module (batched=True); it runs as a loop")
    if batched:
        token = KEEP_MEMBER_DIM.set(bool(member_dim))
        try:
            model = cls(meta, int(width), depth, num_models=G, **kw)
        finally:
            KEEP_MEMBER_DIM.reset(token)
        model.init_members(seeds)
    else:
        members = []
        for s in seeds:
            m = cls(meta, int(width), depth, **kw)
            m.init_members([s])
            members.append(m)
        model = members[0] if G == 1 and not member_dim else LoopEnsemble(members)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model
