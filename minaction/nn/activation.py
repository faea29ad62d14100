"""``EnergyActivation``: an activation module that also computes its output's activation energy.

For the activations that do not follow a linear or convolution layer directly: Conv → BatchNorm →
ReLU, Linear → LayerNorm → GELU. ``minaction.convert`` puts it in place of such activation
modules; ``EnergyLinear`` / ``EnergyConv`` remain the choice where the activation follows the
layer (their kernels fuse the layer's epilogue too). The pass is the fused activation + energy
epilogue (:func:`minaction.ops.activation_energy`), so it costs about what the activation alone
costs.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Optional, Union

import torch
from torch import nn

from ..backends import energy_dtype
from ..errors import InputShapeError, InputTypeError
from ..ops import activation_energy
from ..ops.energy import with_penalty
from . import layers as _layers
from .layers import EnergyLayer

_ROWS = ("batch", "leading")
# elementwise activation modules without parameters or randomness that the fused kernels do not have: an
# EnergyActivation applies them as they are and computes the energy with plain PyTorch ops
UNFUSED_ACTIVATIONS = (nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                       nn.Mish, nn.Softplus, nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.LogSigmoid,
                       nn.Threshold)


_TORCH_FUSED = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
GELU_NAMES = {"none": "gelu", "tanh": "gelu_tanh"}  # nn.GELU(approximate=...) -> the fused kernels' name


def fused_name(module) -> Optional[str]:
    """The fused kernels' name of torch's own activation module ``module`` (``nn.ReLU()`` -> "relu",
    ``nn.GELU(approximate="tanh")`` -> "gelu_tanh"), or None."""
    if type(module) is nn.GELU:
        return GELU_NAMES.get(module.approximate)
    return _TORCH_FUSED.get(type(module))


class EnergyActivation(EnergyLayer):
    """``act(x)``, with ``last_energy`` the energy of its output.

    Args:
        activation: "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid" or "identity" (the fused
            activation + energy pass; torch's modules of these, ``nn.ReLU()``, ``nn.GELU(approximate=...)``,
            ``nn.SiLU()``, ``nn.Tanh()``, ``nn.Sigmoid()``, ``nn.Identity()``, run it too), or an
            elementwise activation module the kernels do not have
            (``nn.LeakyReLU(0.2)``, ``nn.ReLU6()``, ``nn.ELU()``, ``nn.Hardswish()``, ... see
            ``UNFUSED_ACTIVATIONS``): applied as it is, with the energy computed by plain PyTorch ops
            (unfused: it costs what the hand-written penalty costs). A custom module (a library's own
            class) is read from its ``forward()``: one computing a fused activation (timm's ``GELU``,
            transformers' ``NewGELUActivation``) runs the fused pass; another elementwise function of
            its input alone (``QuickGELUActivation``) is applied as it is, like ``nn.LeakyReLU``.
        energy, energy_reduction, backend, penalty: as :class:`~minaction.nn.EnergyLinear`.
        rows: what a sample is. ``"batch"`` (default): dim 0, every other dim a unit, as
            ``EnergyConv`` counts a feature map ``[B, C, *spatial]`` (after a ``BatchNorm2d``);
            ``"leading"``: every dim but the last, which holds the units, as ``EnergyLinear``
            counts ``[B, T, C]`` token features (after a ``LayerNorm``). The two agree on ``[B, C]``.

    A module applied more than once in one forward (a ResNet block's ``self.relu``, after the first
    norm and after the residual add) can count every call: :meth:`accumulate_in` registers a
    forward pre-hook on the module whose forward applies it, and ``last_energy`` is then the sum
    over the calls made since that module's forward began.
    """

    def __init__(self, activation: Union[str, nn.Module] = "relu", energy: Optional[str] = "l2",
                 energy_reduction: str = "sum", rows: str = "batch", backend: Optional[str] = None,
                 penalty: float = 0.0):
        super().__init__()
        if rows not in _ROWS:
            raise ValueError(f"rows must be one of {_ROWS}, got {rows!r}")
        fn = None
        if isinstance(activation, nn.Module):  # torch's own modules of the fused activations run the fused pass
            activation = fused_name(activation) or activation
        if isinstance(activation, nn.Module) and type(activation) not in UNFUSED_ACTIVATIONS:
            from .._custom_act import FUSED, read_activation

            read = read_activation(activation)
            if read in FUSED:  # a library's own class computing a fused activation (timm's GELU, NewGELU)
                activation = read
            elif read is None:
                raise ValueError(f"activation module {type(activation).__name__} is not one EnergyActivation applies "
                                 "(an elementwise activation without parameters or randomness: "
                                 f"{', '.join(c.__name__ for c in UNFUSED_ACTIVATIONS)}, or a custom module whose "
                                 "forward() torch.fx reads as elementwise ops on its input alone), nor one of the "
                                 "fused activations (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity or "
                                 "their names)")
        if isinstance(activation, nn.Module):
            fn = copy.deepcopy(activation)
            if getattr(fn, "inplace", False):
                fn.inplace = False  # the energy reads the output: the input is not overwritten
            activation = "identity"  # validates the energy options; the name is set below
        self._init_energy(activation, energy, energy_reduction, penalty)
        if fn is not None:
            self.__dict__["_fn"] = fn  # not a submodule: nothing in state_dict, as the module it replaces
            self.__dict__["activation"] = repr(fn)
        self.rows = rows
        self.backend = backend
        self.accumulate = False

    def accumulate_in(self, owner: nn.Module, path: str):
        """Sum the energies of every call made during each forward of ``owner``, which applies this
        module (at ``path``, relative to ``owner``) several times. Returns the hook's handle."""
        if owner.get_submodule(path) is not self:
            raise ValueError(f"{path!r} of {type(owner).__name__} is not this module")
        self.accumulate = True
        # a module-level function and a path, not a closure: copies of owner reset their own module
        return owner.register_forward_pre_hook(functools.partial(_start_accumulating, path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_activation(x, self.penalty)

    def _apply_activation(self, x: torch.Tensor, penalty: float) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            if isinstance(x, torch.fx.Proxy):
                return _layers._fx_leaf(self, x)
            if not isinstance(x, torch.Tensor):
                raise InputTypeError(f"{type(self).__name__} expects a tensor with a batch dimension, got "
                                     f"{type(x).__name__}")
            raise InputShapeError(f"{type(self).__name__} expects a tensor with a batch dimension, got a 0-dim tensor")
        old = None if _layers._compiling() else self.__dict__.get("_last_energy")
        kw = dict(backend=self.backend, penalty=penalty)
        fn = self.__dict__.get("_fn")
        if fn is not None:
            y, e = self._unfused(fn, x, penalty)
        elif self.rows == "leading" and x.dim() > 2:
            y, e = activation_energy(x.reshape(-1, x.shape[-1]), self.activation, self.energy, self.energy_reduction,
                                     **kw)
            y = y.view(x.shape)  # contiguous: each row's units must be one block for the pass (see the docs)
        elif x.dim() == 4 and not x.is_contiguous() and _layers._no_transform() \
                and x.is_contiguous(memory_format=torch.channels_last):  # (vmap's tensors cannot answer this)
            # channels-last (after a conv + BatchNorm2d in that format): the sample's units are one block of the
            # [B, H, W, C] view, and the output keeps the format, as nn.ReLU's does
            y, e = activation_energy(x.permute(0, 2, 3, 1), self.activation, self.energy, self.energy_reduction, **kw)
            y = y.permute(0, 3, 1, 2)
        else:
            # a 1-D input is one sample, its units in the last dim, for either `rows`: an unbatched input, as
            # EnergyLinear and the conv layers count theirs (an RL policy's state vector; reading it as samples of
            # one unit each under "batch" gave an energy N units times too small, session 23)
            x2 = x if x.dim() > 1 else x.unsqueeze(0)
            y, e = activation_energy(x2, self.activation, self.energy, self.energy_reduction, **kw)
            if x.dim() == 1:
                y = y.view(x.shape)  # no view otherwise: inductor cannot order a view's symbolic strides
        d = self.__dict__
        if _layers._exporting():
            return y  # torch.export: the energy is no output of the exported program, and no attribute is set
        d["_call_energy"] = e  # this call's own (energy_report's rows, an observer's penalty)
        if self.accumulate and not d.get("_fresh", True) and d.get("_last_energy") is not None:
            # a later call in the same forward of the owner: every call counts (the first one set the sum in this
            # forward, so reading it is safe under torch.compile too)
            self.last_energy = d["_last_energy"] + e
            if _layers._TAPES:
                _layers._record(self, e)
            return y
        if self.accumulate:
            d["_fresh"] = False
        self.last_energy = e
        _layers._after_forward(self, e, old)
        return y

    def _unfused(self, fn: nn.Module, x: torch.Tensor, penalty: float):
        """An activation the kernels do not have: the module itself, then the energy of its output in
        plain PyTorch ops (the same definition: a mean over rows of a sum or mean over units)."""
        y = fn(x)
        if not self.p:
            return y, torch.zeros((), dtype=energy_dtype(y.dtype), device=y.device)
        t = y.to(energy_dtype(y.dtype))
        # explicit sizes, not -1: an empty batch (0 rows) cannot infer one
        sh = tuple(t.shape)
        t = t.reshape(math.prod(sh[:-1]), sh[-1]) if self.rows == "leading" or len(sh) == 1 else \
            t.reshape(sh[0], math.prod(sh[1:]))  # (1-D: one sample, as above)
        t = t.abs() if self.p == 1 else t.square()
        per_row = t.mean(1) if self.energy_reduction == "mean" else t.sum(1)
        e = per_row.sum() / max(t.shape[0], 1)  # an empty batch: 0, as the fused pass gives
        return with_penalty(y, e, penalty), e

    def extra_repr(self) -> str:
        s = f"activation={self.activation!r}, energy={self.energy!r}"
        if self.energy_reduction != "sum":
            s += f", energy_reduction={self.energy_reduction!r}"
        if self.rows != "batch":
            s += f", rows={self.rows!r}"
        if self.penalty:
            s += f", penalty={self.penalty:g}"
        if self.accumulate:
            s += ", accumulate=True"
        return s


#: activations whose fused energy pass keeps its own output for the backward, never its input (on every path)
_FROM_OUTPUT = frozenset({"relu", "tanh", "sigmoid"})


class ActivationObserver(EnergyActivation):
    """Counts the energy of ``activation(t)`` for a tensor ``t`` that a model passes through an
    activation *call*, which no module conversion can replace: ``F.relu(self.bn1(self.conv1(x)))``
    (kuangliu's CIFAR ResNets, torchvision's GoogLeNet and Inception), ``torch.tanh(self.fc(x))``, a
    block that returns ``F.relu(out + shortcut)``.

    :meth:`attach` makes it a child of the module whose output ``t`` is (``bn1``; the block itself
    for its returned value) and registers a forward hook there: each forward of that module
    computes the activation of its output with the fused activation + energy pass and keeps the
    energy; the model's own call then applies the activation as before, so every value and every
    gradient of the model is unchanged (the extra pass costs about what the activation costs). With
    a ``penalty`` (``minaction.set_penalty``) the hook passes the output on as a view whose backward
    adds the penalty's gradient. ``copy=True`` (the call is in place, ``F.relu(x, inplace=True)``):
    the hook passes on a copy for the call to overwrite where the energy pass kept the output for its
    backward (gelu, silu, an unfused module) or passes on the penalty's view; relu, tanh and sigmoid keep
    their own result, so the call overwrites the output itself, as in the plain model.
    It has no parameters or buffers: ``state_dict`` is that of the model without it.
    """

    def __init__(self, activation: Union[str, nn.Module] = "relu", energy: Optional[str] = "l2",
                 energy_reduction: str = "sum", rows: str = "batch", backend: Optional[str] = None,
                 penalty: float = 0.0, copy: bool = False):
        if not isinstance(activation, (str, nn.Module)):
            raise ValueError("ActivationObserver takes an activation name (the fused kernels' activations) or an "
                             "activation module EnergyActivation applies unfused (nn.LeakyReLU(0.2), ...)")
        super().__init__(activation, energy, energy_reduction, rows, backend, penalty)
        self.copy = bool(copy)

    def forward(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Count the energy of ``activation(t)``; return what the observed module should output instead
        of ``t`` (None: ``t`` itself)."""
        if isinstance(t, torch.fx.Proxy):  # fx traced the observed module's forward: the call, as a leaf's
            _layers._fx_leaf(self, t)
            return None
        self._apply_activation(t, 0.0)
        out = t
        if self.penalty and not _layers._exporting():
            out = with_penalty(t, self.__dict__["_call_energy"], self.penalty)
        if self.copy and (out is not t or self.__dict__.get("_fn") is not None or self.activation not in _FROM_OUTPUT):
            # the call overwrites what it gets: a copy where that is the penalty's view, or where the energy pass
            # kept t for its backward (gelu, silu, an unfused module); relu, tanh, sigmoid kept their own output
            out = out.clone()
        return None if out is t else out

    def attach(self, module: nn.Module, name: str = "activation_energy", input: bool = False,
               home: Optional[nn.Module] = None):
        """Observe ``module``'s output (``input=True``: its first input, for an activation's output that
        the module takes), as the submodule ``<home>.<name>`` (``home`` defaults to ``module``; it must
        hold ``module``, so that ``total_energy`` and copies of it find this observer). Returns the
        hook's handle."""
        home = module if home is None else home
        if name in home._modules:
            raise ValueError(f"{type(home).__name__} already has a submodule {name!r}")
        rel = _path_in(home, module)
        home.add_module(name, self)
        return self._hook(module, home, rel, input)

    def _hook(self, module: nn.Module, home: nn.Module, rel: str, input: bool):
        # a module-level function holding this observer: a deep copy or pickle of the model maps it to the
        # copy's own observer (one memo for the whole model)
        if input:
            handle = module.register_forward_pre_hook(functools.partial(_observe_input, self))
        else:
            handle = module.register_forward_hook(functools.partial(_observe, self))
        # where the hook is, for detached(): plain attributes (not submodules); copies map them to the copy's
        self.__dict__["_hooked"] = (module, handle.id, bool(input), home, rel)
        return handle

    def detached(self, parent: Optional[nn.Module]) -> Optional[str]:
        """Why this observer no longer runs, or None while it does. ``parent``: the module that holds it
        in the model now (None: not known). A module swap after :meth:`attach`
        (``nn.SyncBatchNorm.convert_sync_batchnorm``, a frozen-BatchNorm swap, ``model.bn1 = ...``)
        builds a new module, which may copy this child but never the forward hook that runs it."""
        on = self.__dict__.get("_hooked")
        if on is None:  # not attached (a user calling the observer directly)
            return None
        module, hid, input, home, rel = on
        if parent is not None and parent is not home:
            return (f"it was attached in a {type(home).__name__} that is no longer in the model: the "
                    f"{type(parent).__name__} holding it now is a replacement, which copied it but not the hook")
        try:
            now = home.get_submodule(rel) if rel else home
        except AttributeError:
            now = None
        if now is not module:
            return (f"the {type(module).__name__} it observed ({rel}) was replaced by "
                    f"{type(now).__name__ if now is not None else 'nothing'}, which has no hook")
        if hid not in (module._forward_pre_hooks if input else module._forward_hooks):
            return f"its hook on the {type(module).__name__} it observes was removed"
        return None

    def reattach(self, module: nn.Module, home: nn.Module) -> None:
        """Hook this observer, a child of ``home``, on ``module`` again (``minaction.convert`` does this for
        an observer that :meth:`detached` finds no longer running); the old hook is removed."""
        module_old, hid, input, _, _ = self.__dict__["_hooked"]
        (module_old._forward_pre_hooks if input else module_old._forward_hooks).pop(hid, None)
        if self not in home._modules.values():
            raise ValueError(f"{type(home).__name__} does not hold this observer")
        self._hook(module, home, _path_in(home, module), input)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", copy=True" if self.copy else "")


def _path_in(home: nn.Module, module: nn.Module) -> str:
    """``module``'s path in ``home`` ("" for ``home`` itself)."""
    if module is home:
        return ""
    for path, m in home.named_modules():
        if m is module:
            return path
    raise ValueError(f"{type(module).__name__} is not in {type(home).__name__}: an observer's home holds the module "
                     "it observes")


def _observe(observer: nn.Module, module: nn.Module, args, output):
    """Forward hook of an observed module: its observer counts the energy of its output's activation."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{type(module).__name__}'s output is a {type(output).__name__}: its ActivationObserver "
                        "observes a tensor output")
    return observer(output)


def _observe_input(observer: nn.Module, module: nn.Module, args):
    """Forward pre-hook of a module that takes an activation's output: its observer counts that input."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError(f"{type(module).__name__}'s first input is not a tensor: its ActivationObserver observes one")
    new = observer(args[0])
    return None if new is None else (new,) + tuple(args[1:])


def _start_accumulating(path: str, owner: nn.Module, args) -> None:
    """Forward pre-hook of the module that applies an accumulating EnergyActivation: a new forward
    starts a new sum."""
    owner.get_submodule(path).__dict__["_fresh"] = True
