"""Pieces shared by every architecture: meta checks, input stems, the token embedding,
the logits layer and per-member seeded initialisation.

The "MLP family" (``mlp``, ``bimodal_true``, ``physics_lagrangian``) is built once for
G members: every :class:`~minaction.nn.EnergyLinear` holds ``[G, out, in]`` weights,
the same input batch feeds all members, and the logits come out ``[G, B, C]``. With
``G == 1`` the same classes build ordinary un-batched layers (``[out, in]``), output
``[B, C]``, unless built with ``member_dim=True`` (:func:`minaction.models.build`): then one
member keeps the leading member dimension (``[1, out, in]``, logits ``[1, B, C]``) and computes
with the batched kernels, exactly as it would inside a group.
"""
from __future__ import annotations

import contextvars
import math
import numbers
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import MODALITIES, as_int  # noqa: F401  (as_int: the models' too)
from ..errors import InputShapeError, InputTypeError
from ..nn.layers import EnergyLinear


# ----------------------------------------------------------------------------- meta
def check_meta(meta) -> None:
    """Raise a clear error when ``meta`` lacks what the models need (DataMeta contract)."""
    missing = [f for f in ("name", "modality", "num_classes", "input_shape") if not hasattr(meta, f)]
    if missing:
        raise TypeError(f"meta must be a minaction.data.DataMeta (or alike); it lacks {', '.join(missing)}")
    if meta.modality not in MODALITIES:
        raise ValueError(f"meta.modality must be one of {MODALITIES}, got {meta.modality!r}")
    if int(meta.num_classes) < 2:
        raise ValueError(f"meta.num_classes must be >= 2, got {meta.num_classes}")
    shape = tuple(meta.input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"meta.input_shape must be a non-empty tuple of positive ints, got {meta.input_shape!r}")
    if meta.modality == "text":
        if len(shape) != 1:
            raise ValueError(f"text input_shape must be (L,) token ids, got {shape}")
        if not getattr(meta, "vocab_size", None) or int(meta.vocab_size) < 2:
            raise ValueError(f"text meta needs vocab_size >= 2 (ids 0 = padding, 1 = unknown), got "
                             f"{getattr(meta, 'vocab_size', None)!r}")


def check_input(x: torch.Tensor, meta, num_models: Optional[int] = None, time_mean_ok: bool = False) -> bool:
    """Check ``x`` against ``meta``; returns True when ``x`` holds one batch per member
    (``[G, B, *input_shape]`` with ``G == num_models``), False for a shared ``[B, *input_shape]``.
    ``time_mean_ok``: a time axis (neuromorphic ``(T, C, H, W)``) may also come averaged already,
    with length 1 (``Dataset.time_averaged``), for a stem that reads only its time mean."""
    shape = tuple(meta.input_shape)
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    shapes = (shape, (1,) + shape[1:]) if time_mean_ok and image_layout(meta)[2] else (shape,)
    per_member = bool(num_models) and x.dim() == len(shape) + 2 and tuple(x.shape[2:]) in shapes
    if per_member and x.shape[0] != num_models:
        raise InputShapeError(f"{meta.name}: a per-member input [G, B, ...] needs G = {num_models} (the model's "
                              f"members), got {tuple(x.shape)}")
    if not per_member and tuple(x.shape[1:]) not in shapes:
        more = (f" or one batch per member [{num_models}, B, {', '.join(map(str, shape))}]" if num_models else "")
        raise InputShapeError(f"{meta.name}: expected input [B, {', '.join(map(str, shape))}]{more}, "
                              f"got {tuple(x.shape)}")
    if meta.modality == "text" and x.dtype not in (torch.int64, torch.int32):
        raise InputTypeError(f"{meta.name}: text input must be integer token ids, got {x.dtype}")
    if meta.modality != "text" and not x.is_floating_point():
        raise InputTypeError(f"{meta.name}: {meta.modality} input must be floating point, scaled as the dataset "
                             f"gives it (e.g. pixels in [0, 1]), got {x.dtype}; a uint8 image cast as it is would be "
                             f"255x that scale (divide by 255 first)")
    return per_member


def image_layout(meta):
    """(channels, spatial shape, has_time) of a vision/neuromorphic/physiological input.

    Neuromorphic ``(T, C, H, W)`` inputs have a time axis (dim 1 of the batch) that the
    stems average away (rate decoding).
    """
    shape = tuple(meta.input_shape)
    has_time = meta.modality == "neuromorphic" and len(shape) == 4
    if has_time:
        shape = shape[1:]
    if len(shape) == 1:  # a bare series (L,): one channel
        return 1, shape, has_time
    return shape[0], shape[1:], has_time


def time_mean(x: torch.Tensor, has_time: bool) -> torch.Tensor:
    return x.mean(dim=1) if has_time else x


# ----------------------------------------------------------------------------- token embedding
class _MemberBag(torch.autograd.Function):
    """``F.embedding_bag(mode="sum")`` of G members' bags (ids ``[G, B, L]`` into tables ``[G, V, d]``,
    weights ``[G, B, L]``), whose backward accumulates each member's table gradient on its own, in
    token order (``index_add_``). ``embedding_bag``'s own backward sorts all G*B*L ids together and
    sums a token's rows in an order that depends on G: a member's gradient, and so its results,
    then depended on how many members shared its batch (1-ulp differences that grew, seen on SST-2).
    Its cost against ``embedding_bag``'s own: bench/group_invariance_cost.py, bench/RESULTS.md."""

    @staticmethod
    def forward(ctx, ids, weight, w):
        G, V, d = weight.shape
        B, L = ids.shape[1:]
        ctx.save_for_backward(ids, w)
        ctx.table = weight.shape
        off = (torch.arange(G, device=ids.device) * V).view(G, 1, 1)
        return F.embedding_bag((ids + off).reshape(G * B, L), weight.reshape(G * V, d), mode="sum",
                               per_sample_weights=w.reshape(G * B, L)).view(G, B, d)

    @staticmethod
    def backward(ctx, grad_out):
        ids, w = ctx.saved_tensors
        grad = grad_out.new_zeros(ctx.table)
        d = ctx.table[-1]
        for g in range(ctx.table[0]):
            grad[g].index_add_(0, ids[g].reshape(-1), (w[g].unsqueeze(-1) * grad_out[g].unsqueeze(1)).reshape(-1, d))
        return None, grad, None


class TokenEmbedding(nn.Module):
    """Embedding table for token ids (0 = padding, excluded; 1 = unknown, an ordinary row).

    ``num_models=G`` holds ``G`` tables ``[G, V, d]``. :meth:`bag` returns the mean of the
    embeddings of the non-padding tokens of each sample (``[B, d]`` or ``[G, B, d]``),
    computed with one ``F.embedding_bag`` call for all members (in training, with a backward that
    gives each member the gradient it gets alone); :meth:`seq` returns the
    sequence ``[B, L, d]`` (padding positions zero), :meth:`channels` the sequence as conv
    channels, ``[B, d, L]`` or member-major ``[B, G*d, L]``. Initialised ``N(0, init_std^2)``
    (default 0.1: with Adam at lr 1e-3, ``nn.Embedding``'s N(0, 1) learns far slower —
    SST-2 validation 0.63 vs 0.80 after the same short run), the padding row zero.
    """

    def __init__(self, vocab_size: int, dim: int, num_models: Optional[int] = None, init_std: float = 0.1):
        super().__init__()
        if not float(init_std) > 0:
            raise ValueError(f"embed_init_std must be positive, got {init_std}")
        self.vocab_size, self.dim, self.num_models = int(vocab_size), int(dim), num_models
        self.init_std = float(init_std)
        lead = () if num_models is None else (num_models,)
        self.weight = nn.Parameter(torch.empty(lead + (self.vocab_size, self.dim)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, model: Optional[int] = None) -> None:
        models = [None] if self.num_models is None else ([model] if model is not None else range(self.num_models))
        for g in models:
            w = self.weight if g is None else self.weight[g]
            w.normal_(0.0, self.init_std, generator=generator)
            w[0].zero_()

    def _check(self, ids):
        if ids.dim() != 2:
            raise InputShapeError(f"token ids must be [B, L], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise InputShapeError(f"token ids must lie in [0, {self.vocab_size}), got range "
                                  f"[{int(ids.min())}, {int(ids.max())}]")

    def bag(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, L]`` (shared by the members) or ``[G, B, L]`` (one batch per member)."""
        per_member = self.num_models is not None and ids.dim() == 3
        self._check(ids.flatten(0, 1) if per_member else ids)
        ids = ids.long()
        mask = (ids != 0).to(self.weight.dtype)
        w = mask / mask.sum(-1, keepdim=True).clamp_min(1.0)
        if torch.is_grad_enabled() and self.weight.requires_grad and not torch.jit.is_tracing() and \
                torch._C._functorch.peek_interpreter_stack() is None:  # training: G-independent gradients
            # (not while tracing: jit.trace's check reruns the model without grad, and two paths failed it)
            if self.num_models is None:
                return _MemberBag.apply(ids.unsqueeze(0), self.weight.unsqueeze(0), w.unsqueeze(0))[0]
            G = self.num_models
            if not per_member:
                ids, w = ids.expand(G, -1, -1), w.expand(G, -1, -1)
            return _MemberBag.apply(ids, self.weight, w)
        if self.num_models is None:
            return F.embedding_bag(ids, self.weight, mode="sum", per_sample_weights=w)
        G, V = self.num_models, self.vocab_size
        B, L = ids.shape[-2:]
        off = (torch.arange(G, device=ids.device) * V).view(G, 1, 1)
        flat = (ids + off) if per_member else (ids.unsqueeze(0) + off)
        out = F.embedding_bag(flat.reshape(G * B, L), self.weight.reshape(G * V, self.dim),
                              mode="sum", per_sample_weights=w.reshape(G * B, L) if per_member else w.repeat(G, 1))
        return out.view(G, B, self.dim)

    def seq(self, ids: torch.Tensor) -> torch.Tensor:
        if self.num_models is not None:
            raise NotImplementedError("TokenEmbedding.seq is for one model")
        self._check(ids)
        ids = ids.long()
        return F.embedding(ids, self.weight) * (ids != 0).unsqueeze(-1).to(self.weight.dtype)

    def channels(self, ids: torch.Tensor) -> torch.Tensor:
        """The sequence as conv channels: ``[B, d, L]`` (one model) or ``[B, G*d, L]`` with
        member g's embeddings in channels ``g*d .. (g+1)*d - 1`` (padding positions zero);
        ``ids`` is ``[B, L]`` (shared by the members) or ``[G, B, L]`` (one batch per member)."""
        if self.num_models is None:
            return self.seq(ids).transpose(1, 2)
        G, V = self.num_models, self.vocab_size
        if ids.dim() == 3:  # one batch per member [G, B, L]
            self._check(ids.flatten(0, 1))
            ids = ids.long()
            B, L = ids.shape[1:]
            off = (torch.arange(G, device=ids.device) * V).view(G, 1, 1)
            e = F.embedding(ids + off, self.weight.reshape(G * V, self.dim))  # [G, B, L, d]
            e = e * (ids != 0).unsqueeze(-1).to(self.weight.dtype)
            return e.permute(1, 0, 3, 2).reshape(B, G * self.dim, L)
        self._check(ids)
        ids = ids.long()
        B, L = ids.shape
        off = (torch.arange(G, device=ids.device) * V).view(1, G, 1)
        e = F.embedding(ids.unsqueeze(1) + off, self.weight.reshape(G * V, self.dim))  # [B, G, L, d]
        e = e * (ids != 0).view(B, 1, L, 1).to(self.weight.dtype)
        return e.transpose(2, 3).reshape(B, G * self.dim, L)

    def extra_repr(self) -> str:
        s = f"{self.vocab_size}, {self.dim}"
        return s + (f", num_models={self.num_models}" if self.num_models is not None else "")


# ----------------------------------------------------------------------------- feature stem (MLP family)
class FeatureStem(nn.Module):
    """Input ``[B, *input_shape]`` -> features ``[B, d]`` (or ``[G, B, d]`` for batched text).

    * vision ``(C, H, W)`` and physiological ``(C, L)``: flattened (raw pixels / raw series);
    * neuromorphic ``(T, C, H, W)`` (N-MNIST event counts, rate-coded spikes): mean over the
      T time steps (rate decoding), then flattened; ``(1, C, H, W)`` is taken as that mean
      already made (the study feeds ``Dataset.time_averaged()`` to models that declare
      ``reads_time_mean``);
    * text ``(L,)`` ids: mean of the token embeddings of the non-padding tokens
      (:class:`TokenEmbedding`, ``embed_dim`` wide, init std ``embed_init_std``, one table
      per member).

    Float inputs are cast to the dtype of the model's parameters.
    """

    def __init__(self, meta, embed_dim: int = 64, num_models: Optional[int] = None, embed_init_std: float = 0.1):
        super().__init__()
        self.meta = meta
        self.modality = meta.modality
        self.num_models = num_models
        if self.modality == "text":
            self.embedding = TokenEmbedding(meta.vocab_size, embed_dim, num_models, embed_init_std)
            self.out_features = int(embed_dim)
        else:
            c, spatial, self.has_time = image_layout(meta)
            self.out_features = c * math.prod(spatial)

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # a time axis may arrive averaged already (length 1): its mean is then itself, exactly
        per_member = check_input(x, self.meta, self.num_models, time_mean_ok=True)
        if self.modality == "text":
            return self.embedding.bag(x)
        if per_member:  # [G, B, ...] -> [G, B, d]
            G, B = x.shape[:2]
            x = time_mean(x.to(dtype).flatten(0, 1), self.has_time)
            return x.reshape(G, B, self.out_features)  # explicit sizes: an empty batch has no -1 to infer
        x = time_mean(x.to(dtype), self.has_time)
        return x.reshape(x.shape[0], self.out_features)


# ----------------------------------------------------------------------------- model bases
class EnergyNet(nn.Module):
    """Base of one architecture instance (one member, or G batched members).

    Subclasses build their layers in ``__init__`` (registration order = initialisation
    order), implement ``forward`` and :meth:`rescale_readers`.
    """

    arch = ""
    batched = True

    def __init__(self, meta, num_models: int):
        super().__init__()
        check_meta(meta)
        self.meta = meta
        self.num_models = int(num_models)
        # EnergyLinear's num_models: None (ordinary layers) for one member, unless built to keep the member dimension
        self._G = None if self.num_models == 1 and not KEEP_MEMBER_DIM.get() else self.num_models

    @property
    def member_dim(self) -> bool:
        """Inputs ``[G, B, ...]`` and logits ``[G, B, C]``, one member included."""
        return self._G is not None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module``'s; a loop ensemble's state (``members.<g>.*``, the CPU's cnn layout) is taken
        too, its members stacked (:mod:`minaction.models.members`)."""
        from .members import from_other_layout

        return super().load_state_dict(from_other_layout(self, state_dict), strict=strict, assign=assign)

    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def linear(self, i: int, o: int, activation: str, energy, reduction: str) -> EnergyLinear:
        return EnergyLinear(i, o, activation=activation, energy=energy, energy_reduction=reduction,
                            num_models=self._G)

    def logits_layer(self, i: int) -> EnergyLinear:
        lay = EnergyLinear(i, int(self.meta.num_classes), activation="identity", energy=None, num_models=self._G)
        lay.is_logits = True
        return lay

    def stem_parameters(self) -> List[nn.Parameter]:
        """Parameters of the modality stem (the token embedding), excluded from width matching."""
        stem = getattr(self, "stem", None)
        return list(stem.parameters()) if stem is not None else []

    def rescale_readers(self) -> list:  # pragma: no cover - overridden
        """``[(energy layer, reader spec), ...]``, see :func:`minaction.models.stats.activation_stats`."""
        return []

    @torch.no_grad()
    def init_members(self, seeds: Sequence[int]) -> None:
        """Member g gets exactly the initialisation of a one-member model built with ``seeds[g]``."""
        seeds = list(seeds)
        if len(seeds) != self.num_models:
            raise ValueError(f"need {self.num_models} seeds, got {len(seeds)}")
        layers = [m for m in self.modules() if m is not self and hasattr(m, "reset_parameters")
                  and any(True for _ in m.parameters(recurse=False))]
        for g, s in enumerate(seeds):
            gen = torch.Generator().manual_seed(int(s))
            for m in layers:
                m.reset_parameters(generator=gen, model=None if self._G is None else g)


#: set (by :func:`minaction.models.build` with ``member_dim=True``) while a one-member model is built that keeps
#: its member dimension
KEEP_MEMBER_DIM: contextvars.ContextVar = contextvars.ContextVar("minaction_keep_member_dim", default=False)


def column_norms(*weights: torch.Tensor) -> torch.Tensor:
    """L2 norm of the columns (input units) over all given weights that read the same units.

    Each weight is ``[out, in]`` or ``[G, out, in]``; returns ``[in]`` or ``[G, in]``.
    """
    return torch.sqrt(sum((w.detach() ** 2).sum(-2) for w in weights))


def as_number(name: str, v) -> float:
    """``v`` as a float, or TypeError naming ``name`` (a string or a bool is refused, not read)."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)) or (
            isinstance(v, torch.Tensor) and (v.dim() != 0 or v.is_complex())):
        raise TypeError(f"{name} must be a number, got {v!r}")
    return float(v)
