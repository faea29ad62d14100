"""``EnergyConv1d`` / ``EnergyConv2d``: a convolution followed by the fused activation + energy epilogue.

The convolution itself is PyTorch's (``F.conv1d`` / ``F.conv2d``, i.e. oneDNN on CPU,
cuDNN on GPU); the activation and the layer's activation energy are computed in one
pass over the conv output by :func:`minaction.ops.activation_energy`, on whichever
backend is selected (``reference``, ``cpu``, ``triton``, ...).

Energy follows the project definition: ``E_l`` = mean over the samples of the sum (or,
with ``energy_reduction="mean"``, the mean) over every output unit — channels times
positions — of ``|y|^p``. So a conv layer's energy is comparable with an
``EnergyLinear``'s of the same number of output units.

``num_models=G`` holds G independent convolutions in one layer (weight
``[G, out, in/groups, *k]``, bias ``[G, out]``) run as **one** grouped convolution on the
"member-major channel" layout: activations ``[B, G*C, *spatial]`` where channels
``g*C .. (g+1)*C - 1`` belong to member g. The input is either shared by all members
(``[B, in, *spatial]``, e.g. the image: one ungrouped convolution with the G weight sets
stacked along the output channels) or per member (``[B, G*in, *spatial]``: ``groups=G``).
The activation and the energy stay one fused pass: the conv output, contiguous, is seen as
``B*G`` groups of one row each (one (sample, member) pair per row) and the per-member
energy is the mean of its rows, ``last_energy`` ``[G]``. Member g's output depends only on
member g's parameters, so a non-finite member cannot leak into the others.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from ..backends import energy_dtype
from ..errors import InputShapeError, InputTypeError
from ..ops import activation_energy, activation_energy_max_pool2, conv2d_act_energy_max_pool2, max_pool2
from ..ops.energy import _check_tensor
from . import layers as _layers
from .layers import EnergyLayer

_IntOrTuple = Union[int, Tuple[int, ...]]


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _reversed_padding(padding, kernel_size, dilation) -> list:
    """``F.pad``'s argument for ``padding`` (last dim first, each side), as nn.Conv*d computes it for a padding
    mode other than zeros: 'same' puts the odd extra element on the right."""
    if padding == "valid":
        return [0, 0] * len(kernel_size)
    if padding == "same":
        sides = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, kernel_size)]
    else:
        sides = [(p, p) for p in padding]
    return [v for pair in reversed(sides) for v in pair]


def _tuple(v, n: int, name: str) -> Tuple[int, ...]:
    """``v`` as n ints; anything else (a float, a string, a tuple holding one) raises TypeError, as
    ``nn.Conv*d`` does (``int()`` would truncate 2.7 to 2 and read '3' as 3 without a word)."""
    def whole(a):
        return isinstance(a, int) and not isinstance(a, bool) or (torch.is_tensor(a) and a.dim() == 0
                                                                   and not a.is_floating_point())
    if whole(v):
        return (int(v),) * n
    if not isinstance(v, (tuple, list)) or not all(whole(a) for a in v):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {v!r}")
    if len(v) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {v!r}")
    return tuple(int(a) for a in v)


class _EnergyConvNd(EnergyLayer):
    _dims = 0
    padding_mode = "zeros"  # layers pickled before padding_mode existed padded with zeros

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrTuple, stride: _IntOrTuple = 1,
                 padding: Union[_IntOrTuple, str] = 0, dilation: _IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 activation: str = "relu", energy: Optional[str] = "l2", energy_reduction: str = "sum",
                 backend: Optional[str] = None, num_models: Optional[int] = None, device=None, dtype=None,
                 penalty: float = 0.0, padding_mode: str = "zeros"):
        nn.Module.__init__(self)  # not nn.Conv*d.__init__: the parameters are built below (and batched)
        _layers._check_dtype(type(self), dtype)
        n = self._dims
        try:  # an integer (numpy's too); 2.7 or "2" were truncated or parsed before
            G = None if num_models is None or isinstance(num_models, bool) else operator.index(num_models)
        except TypeError:
            G = None
        if num_models is not None and (G is None or G <= 0):
            raise ValueError(f"num_models must be a positive int (or None for one model), got {num_models!r}")
        self.num_models = G
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if isinstance(activation, str) and activation in _PADDING_MODES:  # nn.Conv*d's 9th positional argument
            raise ValueError(f"activation={activation!r} is a padding mode: nn.Conv{n}d's 9th positional argument is "
                             f"padding_mode, this layer's is activation; pass padding_mode={activation!r} by keyword")
        self._init_energy(activation, energy, energy_reduction, penalty)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        self.stride = _tuple(stride, n, "stride")
        self.dilation = _tuple(dilation, n, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
            self.padding = padding
        else:
            self.padding = _tuple(padding, n, "padding")
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.dilation) <= 0:
            raise ValueError("kernel_size, stride and dilation must be positive")
        if padding == "same" and max(self.stride) != 1:
            raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv*d)")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        # nn.Conv*d's attributes, so code written for nn.Conv*d reads this layer as one
        self.transposed, self.output_padding = False, (0,) * n
        self._reversed_padding_repeated_twice = _reversed_padding(self.padding, self.kernel_size, self.dilation)
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        lead = () if self.num_models is None else (self.num_models,)
        self.weight = nn.Parameter(torch.empty(lead + (out_channels, in_channels // groups) + self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(lead + (out_channels,), **kw)) if bias else None
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, model: Optional[int] = None) -> None:
        """``nn.ConvNd``'s initialisation: weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
        for G members each member (or only ``model``) in turn, weight then bias, so member g
        drawn from a generator gets exactly what a one-model layer drawn from it gets."""
        wbound, bound = _layers._kaiming_bound(self.fan_in), 1.0 / math.sqrt(self.fan_in)
        if self.num_models is None:
            if model is not None:
                raise ValueError("this EnergyConv layer holds one model; reset_parameters(model=...) must be None")
            members = [None]
        else:
            if model is not None and not 0 <= int(model) < self.num_models:
                raise ValueError(f"model={model} is outside 0..{self.num_models - 1}")
            members = [int(model)] if model is not None else range(self.num_models)
        for g in members:
            (self.weight if g is None else self.weight[g]).uniform_(-wbound, wbound, generator=generator)
            if self.bias is not None:
                (self.bias if g is None else self.bias[g]).uniform_(-bound, bound, generator=generator)

    _convfn = None  # staticmethod(F.conv1d) / staticmethod(F.conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _layers._fx_leaf(self, x)
        if self._unbatched(x):  # [C, *spatial], as nn.Conv accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        old = None if _layers._compiling() else self.__dict__.get("_last_energy")
        y = self._run(x, pool=False)
        _layers._after_forward(self, self.__dict__["_last_energy"], old)
        return y

    def forward_max_pool2(self, x: torch.Tensor) -> torch.Tensor:
        """``max_pool2(self(x), dims)`` (the conv block of a CNN: this layer, then a max-pool by 2
        over its spatial dims), with ``last_energy`` set as ``self(x)`` sets it.

        The activation, its energy and the pooling run as one fused pass where the backend
        allows (:func:`minaction.ops.activation_energy_max_pool2`): the full-size activation
        is never stored. The layer's own forward (pre-)hooks, backward hooks and global module
        hooks observe ``self(x)`` itself, so while any is registered this runs ``self(x)`` then
        the pooling, and the hooks see what they always see."""
        if self._unbatched(x):
            return self.forward_max_pool2(x.unsqueeze(0)).squeeze(0)
        if not self._hooks_allow_fusion():
            return max_pool2(self(x), self._dims)
        old = None if _layers._compiling() else self.__dict__.get("_last_energy")
        y = self._run(x, pool=True)
        _layers._after_forward(self, self.__dict__["_last_energy"], old)
        for hook in self._forward_hooks.values():  # energy-only hooks (see _hooks_allow_fusion)
            hook(self, (x,), y)
        return y

    def _hooks_allow_fusion(self) -> bool:
        """No hook could observe the unpooled output: only forward hooks marked
        ``_minaction_energy_only`` (they read ``last_energy``, not the output), no pre-, backward or
        global hooks."""
        if (self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks):
            return False
        return all(getattr(h, "_minaction_energy_only", False) for h in self._forward_hooks.values())

    def _first_block_shape(self, x: torch.Tensor) -> bool:
        """A 2-D layer of one input channel, square odd kernel, padding k // 2, stride and dilation 1, no
        groups (a CNN's first block on images): :func:`conv2d_act_energy_max_pool2` applies."""
        k = self.kernel_size
        return (self._dims == 2 and self.in_channels == 1 and self.groups == 1 and k[0] == k[1] and k[0] % 2 == 1
                and self.padding_mode == "zeros"
                and tuple(self.padding) == (k[0] // 2,) * 2 and tuple(self.stride) == (1, 1)
                and tuple(self.dilation) == (1, 1))

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], groups: int) -> torch.Tensor:
        """The convolution, padded as ``nn.Conv*d`` pads for ``padding_mode``."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._convfn(x, w, b, self.stride, 0, self.dilation, groups)
        return self._convfn(x, w, b, self.stride, self.padding, self.dilation, groups)

    def _unbatched(self, x) -> bool:
        """Whether ``x`` is one unbatched sample ``[C, *spatial]`` (a one-model layer takes it, as nn.Conv*d
        does), its channel count checked and named with the shape the caller passed; a non-tensor is refused."""
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self._dims + 1 or self.num_models is not None:
            return False
        if not torch.jit.is_tracing() and x.shape[0] != self.in_channels:
            raise InputShapeError(f"{type(self).__name__} expects {self.in_channels} input channels, "
                                  f"got {x.shape[0]} (unbatched input shape {tuple(x.shape)})")
        return True

    def _run(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        if x.dim() != self._dims + 2:
            spatial = "length" if self._dims == 1 else "height, width"
            G = self.num_models
            unbatched = (f" or [channels, {spatial}] ({self._dims + 1}-D)" if G is None
                         else f" (a layer of {G} models needs the batch dimension: it takes a batch [batch, "
                              f"{self.in_channels}, {spatial}] shared by "
                              f"every model, or one per model stacked member-major along the channels, [batch, "
                              f"{G}x{self.in_channels}, {spatial}]: x.transpose(0, 1).flatten(1, 2) of a [{G}, batch, "
                              f"{self.in_channels}, {spatial}] stack)")
            raise InputShapeError(f"{type(self).__name__} expects input [batch, channels, {spatial}]"
                                  f" ({self._dims + 2}-D){unbatched}, got shape {tuple(x.shape)}")
        if x.dtype != self.weight.dtype and not _layers._any_autocast():  # (autocast casts them for the conv)
            _check_tensor("input", x)  # named as EnergyLinear names it, where torch's conv said "bias type"
            _check_tensor("weight", self.weight, x)
        G = self.num_models
        if G is None:
            if not torch.jit.is_tracing() and x.shape[1] != self.in_channels:  # traced sizes: the conv checks
                raise InputShapeError(f"{type(self).__name__} expects {self.in_channels} input channels, "
                                      f"got {x.shape[1]} (input shape {tuple(x.shape)})")
            if pool and self._first_block_shape(x):  # one input channel: conv, epilogue and pooling in one op
                y, e = conv2d_act_energy_max_pool2(x, self.weight, self.bias, self.activation, self.energy,
                                                   self.energy_reduction, backend=self.backend, penalty=self.penalty)
                self.last_energy = e
                return y
            z = self._conv(x, self.weight, self.bias, self.groups)
            # (inside a torch.func transform, vmap's batched tensors cannot answer the channels-last query: the
            # transforms run the reference path on whatever layout, so the plain branch below is right there)
            channels_last = z.dim() == 4 and not z.is_contiguous() and _layers._no_transform() \
                and z.is_contiguous(memory_format=torch.channels_last)
            if pool:
                y, e = activation_energy_max_pool2(z, self.activation, self.energy, self.energy_reduction,
                                                   dims=self._dims, backend=self.backend, penalty=self.penalty)
                if channels_last:  # as F.max_pool2d keeps it (the fused pass itself runs on NCHW)
                    y = y.contiguous(memory_format=torch.channels_last)
            elif channels_last:
                # channels-last (oneDNN/cuDNN keep the input's format): the epilogue runs on the [B, H, W, C]
                # view, where each sample's units are still one block, and the output stays channels-last
                y, e = activation_energy(z.permute(0, 2, 3, 1), self.activation, self.energy, self.energy_reduction,
                                         backend=self.backend, penalty=self.penalty)
                y = y.permute(0, 3, 1, 2)
            else:
                y, e = activation_energy(z, self.activation, self.energy, self.energy_reduction, backend=self.backend,
                                         penalty=self.penalty)
            self.last_energy = e
            return y
        C = x.shape[1]
        if C == G * self.in_channels:  # per member: member-major channels
            groups = G * self.groups
        elif C == self.in_channels:  # one input shared by every member
            if self.groups == 1:
                groups = 1  # one convolution, the G weight sets stacked along the output channels
            else:
                x, groups = x.repeat((1, G) + (1,) * self._dims), G * self.groups
        else:
            raise InputShapeError(f"{type(self).__name__} with {G} models expects {self.in_channels} input channels "
                                  f"(shared by all models) or {G}x{self.in_channels}={G * self.in_channels} "
                                  f"(member-major), got {C} (input shape {tuple(x.shape)})")
        w = self.weight.reshape((G * self.out_channels,) + tuple(self.weight.shape[2:]))
        b = self.bias.reshape(-1) if self.bias is not None else None
        z = self._conv(x, w, b, groups)
        B = z.shape[0]
        if B == 0:  # no samples (groups=B*G would read as "no groups"): an empty output, each member's energy 0
            self.last_energy = torch.zeros(G, dtype=energy_dtype(z.dtype), device=z.device)
            return max_pool2(z, self._dims) if pool else z
        # rows = (sample, member) pairs: the fused pass gives one sum per row, the energy is their batch mean
        # the penalty on last_energy = the mean of each member's B rows: lam / B on each row's energy
        penalty = self.penalty / B
        # a channels-last z (member-major channels are not one block per member in it): the epilogue reads a
        # contiguous copy, and the output is given back channels-last, as nn.Conv2d + ReLU (+ max_pool2d) keep it
        channels_last = z.dim() == 4 and not z.is_contiguous() and _layers._no_transform() \
            and z.is_contiguous(memory_format=torch.channels_last)
        if pool:  # [B*G, 1, out, *spatial]: the same rows, the spatial dims kept for the pooling
            y, e = activation_energy_max_pool2(z.reshape((B * G, 1, self.out_channels) + tuple(z.shape[2:])),
                                               self.activation, self.energy, self.energy_reduction, groups=B * G,
                                               dims=self._dims, backend=self.backend, penalty=penalty)
            self.last_energy = e.view(B, G).mean(0)
            y = y.reshape((B, G * self.out_channels) + tuple(y.shape[3:]))
        else:
            y, e = activation_energy(z.reshape(B * G, 1, -1), self.activation, self.energy, self.energy_reduction,
                                     groups=B * G, backend=self.backend, penalty=penalty)
            self.last_energy = e.view(B, G).mean(0)
            y = y.view(z.shape)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    def member_view(self, y: torch.Tensor) -> torch.Tensor:
        """This layer's output ``[B, G*out, *spatial]`` seen as ``[G, B, out, *spatial]`` (a view)."""
        if self.num_models is None:
            return y.unsqueeze(0)
        G = self.num_models
        return y.view((y.shape[0], G, self.out_channels) + tuple(y.shape[2:])).transpose(0, 1)

    def forward_flops(self, x_shape, y_shape) -> int:
        out = math.prod(y_shape)  # all members' outputs: the fan-in is per member
        return 2 * out * self.fan_in + (out if self.bias is not None else 0)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if max(self.dilation) != 1:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.num_models is not None:
            s += f", num_models={self.num_models}"
        s += f", activation={self.activation!r}, energy={self.energy!r}"
        if self.energy_reduction != "sum":
            s += f", energy_reduction={self.energy_reduction!r}"
        if self.penalty:
            s += f", penalty={self.penalty:g}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class EnergyConv1d(_EnergyConvNd, nn.Conv1d):
    """``act(conv1d(x))`` with its activation energy; parameters as ``nn.Conv1d`` (``padding_mode`` included).

    A subclass of ``nn.Conv1d``, as ``EnergyLinear`` is of ``nn.Linear``: ``isinstance(m, nn.Conv1d)`` init
    loops and parameter splits treat it as one; its ``forward`` also applies the activation.

    Input ``[B, C_in, L]`` -> output ``[B, C_out, L_out]``; ``last_energy`` is 0-dim. With
    ``num_models=G``: input ``[B, C_in, L]`` (shared) or ``[B, G*C_in, L]`` -> ``[B, G*C_out, L_out]``,
    ``last_energy`` ``[G]``.
    """

    _dims = 1
    _convfn = staticmethod(F.conv1d)


class EnergyConv2d(_EnergyConvNd, nn.Conv2d):
    """``act(conv2d(x))`` with its activation energy; parameters as ``nn.Conv2d`` (``padding_mode`` included).

    A subclass of ``nn.Conv2d``, as ``EnergyLinear`` is of ``nn.Linear``: ``isinstance(m, nn.Conv2d)`` init
    loops and parameter splits treat it as one; its ``forward`` also applies the activation.

    Input ``[B, C_in, H, W]`` -> output ``[B, C_out, H_out, W_out]``; ``last_energy`` is 0-dim. With
    ``num_models=G``: input ``[B, C_in, H, W]`` (shared) or ``[B, G*C_in, H, W]`` ->
    ``[B, G*C_out, H_out, W_out]``, ``last_energy`` ``[G]``.
    """

    _dims = 2
    _convfn = staticmethod(F.conv2d)


__all__ = ["EnergyConv1d", "EnergyConv2d"]
