"""The conventional convolutional baseline (``cnn``), one member per module.

Per modality (``depth`` conv blocks, each an energy conv + max-pool by 2 where the size
allows; then adaptive pooling, one dense energy layer of ``width`` units, logits):

* vision ``(C, H, W)`` and neuromorphic ``(T, C, H, W)`` (mean over T first): 2-D
  convolutions, kernel 3, padding 1; adaptive average pooling to at most 8 x 8;
* physiological ``(C, L)``: 1-D convolutions, kernel 5, padding 2; adaptive average
  pooling to at most 16 positions;
* text ``(L,)`` ids: token embeddings ``[L, embed_dim]`` as channels, 1-D convolutions,
  kernel 5, padding 2; global max pooling over positions.

G members are built as **one** module (``batched = True``): every conv is an
:class:`~minaction.nn.EnergyConv2d`/``EnergyConv1d`` with ``num_models=G`` on the
member-major channel layout ``[B, G*C, *spatial]`` (the first conv reads the shared image or
series with the G weight sets stacked along its output channels; later convs and the text
stem's per-member embeddings use ``groups=G``), so pooling runs once for all members, the
dense and logits layers are :class:`~minaction.nn.EnergyLinear` with ``num_models=G``, logits
``[G, B, C]`` and ``last_energy`` ``[G]`` per layer. Member g's initialisation equals that of a
one-member model built with ``seeds[g]``, and it depends only on its own parameters.
Memory layout: contiguous (NCHW), measured faster here than channels-last (docs/models.md).
:class:`LoopEnsemble` (G separate members run one after another) is kept for comparisons.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.conv import EnergyConv1d, EnergyConv2d
from ..nn import layers as _layers
from ..errors import InputShapeError, InputTypeError
from ..nn.layers import EnergyLayer
from .common import EnergyNet, TokenEmbedding, as_int, check_input, column_norms, image_layout, time_mean
from .family import _check_act


def default_channels(modality: str, depth: int):
    if modality == "text":
        return [64] * depth
    return [16 * 2 ** min(i, 2) for i in range(depth)]


class ConvNet(EnergyNet):
    """One CNN member; see the module docstring for the layout per modality.

    Knobs: ``channels`` (list of ``depth`` ints; default 16, 32, 64, 64... — 64 each for
    text), ``kernel_size`` (3 for 2-D, 5 for 1-D), ``embed_dim`` (64, text),
    ``embed_init_std`` (0.1, text).
    """

    arch = "cnn"
    batched = True
    #: models.build(batched=None) runs the members as a LoopEnsemble on a CPU: there, once the
    #: pooling stopped being the bottleneck (ops.max_pool2), a loop of members beat the grouped
    #: convolutions at every G measured (idle 2-core AVX2, G = 2-10: 0.76-0.91x on images,
    #: 0.90x series, 0.88x text; bench/RESULTS.md): G members' feature maps together overflow
    #: the caches between the conv, the epilogue and the pool, one member's do not
    loop_on_cpu = True
    #: evaluation runs in chunks of at most this many rows (per member): a 2,000-row batch of
    #: 10 members' 28x28 feature maps is ~1 GB and memory-bound; measured on 2 cores (AVX2,
    #: load ~5), a cnn evaluation pass took 0.62x (mnist) and 0.49x (sst2) the time at 64 rows
    #: than at 1,000 (bench/RESULTS.md). Results are per sample, so chunks change nothing.
    eval_rows = 64
    KNOBS = {"embed_dim": 64, "embed_init_std": 0.1, "channels": None, "kernel_size": None}

    def __init__(self, meta, width: int, depth: int, energy="l2", activation="relu", energy_reduction="sum",
                 num_models: int = 1, embed_dim: int = 64, embed_init_std: float = 0.1,
                 channels: Optional[Sequence[int]] = None,
                 kernel_size: Optional[int] = None):
        super().__init__(meta, num_models)
        _check_act("activation", activation)
        self.width, self.depth = as_int("width", width), as_int("depth", depth)
        channels = (default_channels(meta.modality, self.depth) if channels is None
                    else [as_int("channels", c) for c in channels])
        if len(channels) != self.depth or min(channels) < 1:
            raise ValueError(f"channels must list {self.depth} positive ints (one per conv block), got {channels}")
        self.channels = channels
        self.modality = meta.modality
        if self.modality == "text":
            self.stem = TokenEmbedding(meta.vocab_size, embed_dim, self._G, embed_init_std)
            cin, spatial, self.has_time = int(embed_dim), (int(meta.input_shape[0]),), False
        else:
            cin, spatial, self.has_time = image_layout(meta)
            spatial = tuple(int(s) for s in spatial)
        self.dims = len(spatial)
        if self.dims not in (1, 2):
            raise ValueError(f"cnn supports 1-D (C, L) and 2-D (C, H, W) inputs, got input_shape {meta.input_shape}")
        k = as_int("kernel_size", kernel_size) if kernel_size is not None else (3 if self.dims == 2 else 5)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {k}")
        Conv = EnergyConv2d if self.dims == 2 else EnergyConv1d
        self.convs = nn.ModuleList()
        self._pool = []
        size = list(spatial)
        for c in channels:
            self.convs.append(Conv(cin, c, k, padding=k // 2, activation=activation, energy=energy,
                                   energy_reduction=energy_reduction, num_models=self._G))
            pool = all(s >= 2 for s in size)
            self._pool.append(pool)
            if pool:
                size = [s // 2 for s in size]
            cin = c
        if self.modality == "text":
            self.grid = (1,)
        else:
            cap = 8 if self.dims == 2 else 16
            self.grid = tuple(min(s, cap) for s in size)
        self.flat = cin * math.prod(self.grid)
        self.dense = self.linear(self.flat, self.width, activation, energy, energy_reduction)
        self.out = self.logits_layer(self.width)

    def stem_parameters(self):
        return list(self.stem.parameters()) if self.modality == "text" else []

    def forward(self, x):
        per_member = check_input(x, self.meta, self._G)  # x [G, B, ...]: one batch per member
        if self.modality == "text":
            h = self.stem.channels(x)  # [B, (G*)d, L]
        else:
            xs = x.flatten(0, 1) if per_member else x
            h = time_mean(xs.to(self.param_dtype()), self.has_time)
            if h.dim() == 2:  # a bare series (L,) -> one channel
                h = h.unsqueeze(1)
            if per_member:  # [G*B, C, ...] -> member-major channels [B, G*C, ...] (grouped first conv)
                G, B = x.shape[0], x.shape[1]
                h = h.view(G, B, *h.shape[1:]).transpose(0, 1).reshape(B, G * h.shape[1], *h.shape[2:])
        for conv, p in zip(self.convs, self._pool):
            # pooled: F.max_pool1d/2d(conv(h), 2) exactly, the activation, energy and pooling in one pass
            # where the backend allows (EnergyConvNd.forward_max_pool2)
            h = conv.forward_max_pool2(h) if p else conv(h)
        if self.modality == "text":
            h = h.amax(dim=-1)
        elif tuple(h.shape[2:]) == self.grid:
            pass  # adaptive pooling to the size it already has is the identity (each cell averages itself):
            # skipped, it cost ~7% of a batched image step (forward + backward, G = 10, bench/RESULTS.md)
        elif self.dims == 2:
            h = F.adaptive_avg_pool2d(h, self.grid)
        else:
            h = F.adaptive_avg_pool1d(h, self.grid)
        B = h.shape[0]
        if self._G is None:  # explicit sizes, not -1: an empty batch has nothing to infer it from
            h = h.reshape(B, self.flat)
        else:  # [B, G*C, *grid] -> [G, B, C*prod(grid)]: each member flattens its own channels
            h = h.reshape(B, self._G, self.flat).transpose(0, 1).contiguous()
        h = self.dense(h)
        return self.out(h)

    def rescale_factors(self):
        """Per conv channel c: L2 norm of every weight reading channel c (next conv's input
        channel c, or the dense columns of channel c's pooled cells); dense unit j: logits column j."""
        out = []
        lead = () if self._G is None else (self._G,)
        d = len(lead)
        for i, conv in enumerate(self.convs):
            if i + 1 < self.depth:  # next conv's weight [(G,) out, in, *k]: per input channel
                w = self.convs[i + 1].weight.detach()
                f = torch.sqrt((w ** 2).transpose(d, d + 1).reshape(lead + (w.shape[d + 1], -1)).sum(-1))
            else:  # dense weight [(G,) width, C * cells]: the columns of channel c's cells
                w = self.dense.weight.detach().reshape(lead + (self.width, conv.out_channels, -1))
                f = torch.sqrt((w ** 2).sum((d, d + 2)))
            out.append((conv, f))
        out.append((self.dense, column_norms(self.out.weight)))
        return out


class LoopEnsemble(nn.Module):
    """G independent one-member models run one after another; output ``[G, B, C]``.

    So that :func:`minaction.total_energy` returns ``[G]``, the ensemble's forward turns each
    member's ``last_energy`` into a length-G vector that is zero except at the member's index.
    A member called on its own (``ensemble.members[g](x)``, or a copy of it) is an ordinary
    one-member model: its energies are 0-dim, and it pickles.

    :meth:`set_active_members` leaves members out of the following forwards (a training loop
    whose members stop at different times): a member left out costs nothing, its logits are
    zeros and its energy is 0, neither connected to its parameters (so it gets no gradient and
    an optimizer leaves it as it is).
    """

    batched = False

    def __init__(self, members: Sequence[nn.Module], meta=None):
        super().__init__()
        if len(members) == 0:
            raise ValueError("LoopEnsemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.num_models = len(self.members)
        rows = getattr(self.members[0], "eval_rows", None)
        if rows:
            self.eval_rows = rows  # the trainer's evaluation pieces, as the members ask
        self.arch = getattr(self.members[0], "arch", "")
        self.meta = meta if meta is not None else getattr(self.members[0], "meta", None)
        if getattr(self.meta, "input_shape", None) is None:
            raise ValueError("LoopEnsemble needs the dataset's meta (its input_shape tells a per-member input "
                             "[G, B, ...] from a shared one [B, ...]): pass LoopEnsemble(members, meta=meta), "
                             "or give the members a .meta attribute")
        self._active = None  # None: every member runs; else a list of G bools

    #: inputs ``[G, B, ...]`` (or a shared ``[B, ...]``) and logits ``[G, B, C]``, one member included
    member_dim = True

    def _run(self, g: int, x):
        """Member g's logits; its energy layers' ``last_energy`` spread to length G. The ensemble does
        this rather than hooks on the members' layers: hooks went with a member taken out of the
        ensemble (its energy stayed ``[G]``) and, being closures, stopped ``torch.save`` of the model."""
        m = self.members[g]
        layers = [lay for lay in m.modules() if isinstance(lay, EnergyLayer)]
        before = [lay.__dict__.get("_last_energy") for lay in layers]  # not the getter: that marks it read
        tapes = list(_layers._TAPES)  # record_energy tapes: their records of this member are spread too
        starts = [len(t.records) for t in tapes]
        G = self.num_models

        def spread(e):
            return F.pad(e.reshape(1), (g, G - g - 1))

        try:
            return m(x)
        finally:  # also when the forward stops early: a non-reentrant checkpoint ends its recomputation
            # once it has what the backward needs, and the layers it ran held a member's 0-dim energy
            for lay, old in zip(layers, before):
                e = lay.__dict__.get("_last_energy")
                if e is not None and e is not old and e.dim() == 0:  # the layers this forward ran
                    lay.last_energy = spread(e)
            if tapes:
                mine = {id(lay) for lay in layers}
                for t, n0 in zip(tapes, starts):
                    for i in range(n0, len(t.records)):
                        lay, e = t.records[i]
                        if id(lay) in mine and e.dim() == 0:
                            t.records[i] = (lay, spread(e))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module``'s; a batched model's state (the GPU's cnn layout, ``[G, ...]`` tensors) is
        taken too, each member its slice (:mod:`minaction.models.members`)."""
        from .members import from_other_layout

        return super().load_state_dict(from_other_layout(self, state_dict), strict=strict, assign=assign)

    def set_active_members(self, mask=None):
        """Run only the members where ``mask`` (G bools, a list or a bool tensor) is true in the
        forwards that follow; ``None`` (or all true) runs every member again. At least one
        member must stay active."""
        if mask is None:
            self._active = None
            return
        m = [bool(v) for v in (mask.tolist() if torch.is_tensor(mask) else mask)]
        if len(m) != self.num_models:
            raise ValueError(f"set_active_members needs {self.num_models} flags (one per member), got {len(m)}")
        if not any(m):
            raise ValueError("set_active_members: at least one member must stay active (got none); "
                             "stop calling the model instead")
        self._active = None if all(m) else m

    @property
    def active_members(self):
        """The members the next forward runs (a list of G bools)."""
        return [True] * self.num_models if self._active is None else list(self._active)

    def forward(self, x):
        """``x [B, *input_shape]`` feeds every member; ``[G, B, *input_shape]`` gives member g ``x[g]``."""
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        shape = tuple(getattr(self.meta, "input_shape", ()))
        G = self.num_models
        if shape and x.dim() == len(shape) + 2:
            if x.shape[0] != G:
                raise InputShapeError(f"a per-member input [G, B, ...] needs G = {G}, got {tuple(x.shape)}")
            xs = x.unbind(0)
        else:
            xs = [x] * G
        if self._active is None:
            return torch.stack([self._run(g, xg) for g, xg in enumerate(xs)])
        outs = [self._run(g, xg) if on else None for g, (xg, on) in enumerate(zip(xs, self._active))]
        ref = next(o for o in outs if o is not None)
        zeros = torch.zeros_like(ref, requires_grad=False)
        for g, o in enumerate(outs):
            if o is None:
                for lay in self.members[g].modules():
                    if isinstance(lay, EnergyLayer):
                        lay.last_energy = torch.zeros(G, dtype=ref.dtype, device=ref.device)
        return torch.stack([zeros if o is None else o for o in outs])

    def stem_parameters(self):
        return [p for m in self.members for p in m.stem_parameters()]
