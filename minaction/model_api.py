"""The public model-level API (re-exported from ``minaction``): ``convert`` (swap a model's
Linear/Conv + activation pairs for energy layers), ``total_energy``, ``energy_report`` and
``set_penalty``."""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import numbers
import operator
import threading
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._custom_act import ELEMENTWISE, FUSED, describe, read_activation
from .nn.activation import GELU_NAMES, UNFUSED_ACTIVATIONS, ActivationObserver, EnergyActivation, fused_name
from .nn.conv import EnergyConv1d, EnergyConv2d
from .nn.layers import EnergyLayer, EnergyLinear, refuse_under_export
from .ops.energy import full_energy

# dropout commutes with ReLU (it multiplies by a mask >= 0), so Linear-Dropout-ReLU can run as EnergyLinear-Dropout
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_SUPPORTED = "nn.ReLU, nn.GELU() and nn.GELU(approximate='tanh'), nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity"
_FUNCTIONAL_HINT = ("activation functions called in forward() (torch.tanh(self.fc1(x)), F.relu(self.bn(x))) cannot be "
                    "removed by module conversion: after a layer, a relu call is fused (relu is idempotent), and any "
                    "other call on a module's output gets an ActivationObserver that counts its energy (one extra "
                    "pass); for the fused speed build those layers as minaction.nn.EnergyLinear / EnergyConv2d(..., "
                    "activation='tanh') (they take nn.Linear's / nn.Conv2d's arguments and state_dict), or apply an "
                    "activation module (nn.Tanh()) instead of the function")
_log = logging.getLogger("minaction")


def _need_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"minaction.{fn} takes the model (an nn.Module), got {type(model).__name__}")


def set_penalty(model: nn.Module, lam: float) -> int:
    """Give every energy layer of ``model`` that counts energy the in-layer penalty ``lam``
    (``EnergyLinear``'s ``penalty``): ``loss.backward()`` then trains ``loss + lam * E``
    without ``E`` in the loss. ``lam = 0`` turns it off. Returns the number of layers set;
    a model without counting energy layers is an error (as for :func:`total_energy`)."""
    _need_module(model, "set_penalty")
    layers = energy_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no energy layers that count energy: nothing to penalise "
                         "(minaction.convert(model) swaps Linear/Conv + activation pairs for energy layers)")
    from .ops import validate_penalty

    value = 0.0 if type(lam) in (int, float) and lam == 0 else validate_penalty(lam, 1)
    _check_model(model)
    for _, m in layers:
        m.penalty = value
    return len(layers)


def energy_layers(model: nn.Module):
    """(name, layer) for every energy layer in ``model`` that counts energy."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EnergyLayer) and m.counts_energy]


def total_energy(model: nn.Module) -> torch.Tensor:
    """``E = sum_l E_l`` over the energy layers of ``model`` from its last forward.

    0-dim for ordinary models; ``[G]`` for batched models of G members. Layers built
    with ``energy=None`` (by default the logits layer) are not counted. The sum runs in
    module order (``model.modules()``). A layer called more than once in a forward counts
    with its last call only: record such a forward with :func:`record_energy` (a backward that
    runs through an earlier call whose energy nothing read warns, naming the layer). A layer that
    has never run, or not since its last ``train()`` / ``eval()`` switch, or not since an earlier
    ``total_energy(model)`` summed its energy, while others have, did not run in the last forward
    and is left out: an auxiliary head run in training only (GoogLeNet's, Inception v3's) read
    after an evaluation forward; a layer that LayerDrop skipped this step.
    """
    _need_module(model, "total_energy")
    if torch.compiler.is_exporting():
        refuse_under_export("total_energy")
    if not _compiling():
        fast = _fast_total(model)
        if fast is not None:
            total, reentrant = fast
            if reentrant and _grad_enabled():
                _warn_if_reentrant_checkpoint(model)
            return total
    total = None
    layers = found = energy_layers(model)
    if not layers:
        _refuse_no_energy_layers(model)
    if not _compiling():
        _check_model(model, loss_form=_grad_enabled())
        layers = _current(model, layers)
    for name, m in layers:
        e = full_energy(m.last_energy) if m.last_energy is not None else None
        if e is None:
            raise RuntimeError(f"energy layer {name or type(m).__name__!r} has no energy yet: run a forward first "
                               "(a forward inside a torch.func transform leaves none after the transform returns: "
                               "call total_energy inside the transformed function)" + _copied_hint(m))
        total = e if total is None else total + e
        if m.__dict__.get("_unread"):
            m.__dict__["_unread"] = False
            m.__dict__["_ever_read"] = True
    if not _compiling():
        _mark_read([m.__dict__ for _, m in layers], id(model))
        if _grad_enabled():  # each layer is asked: one outside the checkpoint gives the sum a gradient
            _warn_if_reentrant_checkpoint(model, found)
    return total


def _copied_hint(layer: nn.Module) -> str:
    """For a layer that is a copy (copy.deepcopy, pickle, torch.save/load) and has not run since: why a
    forward of the copied model may not have run it."""
    if not layer.__dict__.get("_copied"):
        return ""
    return ("; this layer is a copy (copy.deepcopy, pickle or torch.save/load) that has not run since it was "
            "copied: if the copied model did run a forward, " + _CLOSURE_CAUSE)


#: why a copied model's forward can leave its own layers unrun (the warning and the error both say it)
_CLOSURE_CAUSE = ("that forward called the original's modules instead, e.g. through a function that closes over "
                  "them (minGPT's MLP, self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))), which a copy "
                  "keeps pointing at the original. Make such a function a method (or rebuild it after copying)")


def _refuse_no_energy_layers(model: nn.Module) -> None:
    """The error for a model none of whose layers counts energy (a plain model: convert it first)."""
    if any(isinstance(m, EnergyLayer) for m in model.modules()):
        raise ValueError(f"every energy layer of {type(model).__name__} was built with energy=None: "
                         "nothing to sum; give the hidden layers energy='l2' or 'l1'")
    raise ValueError(
        f"{type(model).__name__} has no energy layers, so there is no activation energy to sum. "
        "minaction.convert(model) replaces nn.Linear / nn.Conv1d / nn.Conv2d followed by an activation "
        f"module ({_SUPPORTED}) in an nn.Sequential or a forward() that torch.fx can read; {_FUNCTIONAL_HINT}")


class EnergyTape:
    """The energies of every energy-layer call made while :func:`record_energy` was active, in call
    order: ``records`` is a list of (layer, ``E_l`` of that call)."""

    def __init__(self, model: Optional[nn.Module] = None):
        self.records: List[Tuple[nn.Module, torch.Tensor]] = []
        self._only = None if model is None else {id(m) for m in model.modules()}
        self._thread = None if torch.compiler.is_compiling() else threading.get_ident()  # (dynamo cannot trace it)
        self._warned = False
        # the backward this tape was opened in (-1: none). A checkpoint's recomputation inside another one (of
        # the forward this tape recorded) is not recorded again: it counted checkpointed calls twice
        self._task = -1 if torch.compiler.is_compiling() else torch._C._current_graph_task_id()

    def _add(self, layer: nn.Module, e: torch.Tensor) -> None:
        eager = not torch.compiler.is_compiling()  # (dynamo traces neither query below)
        if eager and torch._C._current_graph_task_id() != self._task:
            from .nn.layers import checkpoint_recomputing  # (imported here: only inside a backward)

            if checkpoint_recomputing():  # (a module run from a backward hook is recorded)
                return
        if layer.p and (self._only is None or id(layer) in self._only):
            if self._only is None and not self._warned and self._thread is not None and eager \
                    and threading.get_ident() != self._thread:
                self._warned = True
                warnings.warn(
                    "minaction.record_energy() without a model recorded an energy-layer call made in another thread: "
                    "a tape records every thread's layer calls, so a thread training its own model adds its energy "
                    "(and its graph) to this tape. Give the tape the model, record_energy(model), to record only its "
                    "layers (nn.DataParallel's replicas run in threads on purpose: there this is expected)",
                    UserWarning, stacklevel=4)
            self.records.append((layer, e))

    def __len__(self) -> int:
        return len(self.records)

    def total(self) -> torch.Tensor:
        """``sum`` of the recorded energies, every call counted (0-dim, or ``[G]`` for batched layers)."""
        if torch.compiler.is_exporting():
            refuse_under_export("record_energy's tape.total()")
        if not self.records:
            raise ValueError("no energy layer that counts energy ran while recording: run the model's forward "
                             "inside `with minaction.record_energy(...) as tape:` (layers built with energy=None, "
                             "and layers outside the model given to record_energy, are not recorded)")
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # calls made in use_reentrant=True's autograd-free first forward: the tape's total would not train them
            lost = [type(lay).__name__ for lay, e in self.records
                    if lay.__dict__.get("_reentrant_energy") is e and not lay.penalty]
            _warn_reentrant(sorted(set(lost)), stacklevel=3)
        total = full_energy(self.records[0][1])
        for _, e in self.records[1:]:
            total = total + full_energy(e)
        return total

    def clear(self) -> None:
        self.records.clear()


@contextlib.contextmanager
def record_energy(model: Optional[nn.Module] = None):
    """Record the energy of every energy-layer call inside the ``with`` block, for models that call a
    layer more than once per forward (shared weights, a cell unrolled over time), where
    ``total_energy`` (each layer's ``last_energy``) counts only the last call::

        with minaction.record_energy(model) as tape:
            out = model(x)
        loss = F.cross_entropy(out, y) + lam * tape.total()

    ``model`` limits the recording to its layers (None: every energy layer). Tapes nest; each keeps
    the energies on the autograd graph until the tape is dropped. The in-layer penalty
    (``set_penalty``) already counts every call and needs no tape."""
    if model is not None:
        _need_module(model, "record_energy")
        if not _compiling():  # what total_energy refuses (peft over an energy layer, a stopped observer) the tape does;
            _check_model(model)  # not the loss-form check (Opacus): a tape opened under grad may only log
            if not energy_layers(model):  # a plain model: its forward would record nothing, and tape.total() said
                _refuse_no_energy_layers(model)  # to run the forward inside the block, which it was
    from .nn import layers as _layers

    tape = EnergyTape(model)
    _layers._TAPES.append(tape)
    try:
        yield tape
    finally:
        _layers._TAPES.remove(tape)


def _warn_if_reentrant_checkpoint(model: nn.Module, layers=None) -> None:
    """Warn when the energy about to go into a loss was computed in the first, autograd-free
    forward of ``torch.utils.checkpoint(..., use_reentrant=True)`` (see nn.layers._note_no_grad_energy).
    ``layers``: ``energy_layers(model)``, where the caller has it already (else found again)."""
    names = [n or type(m).__name__ for n, m in (energy_layers(model) if layers is None else layers)
             if m.__dict__.get("_last_energy") is not None  # (a copy has neither: None is None)
             and m.__dict__.get("_reentrant_energy") is m.__dict__.get("_last_energy")
             and not m.penalty]  # a layer with its own penalty trains
    _warn_reentrant(names, stacklevel=4)


def _warn_reentrant(names, stacklevel: int) -> None:
    if names:
        warnings.warn(
            f"the energy of {len(names)} layer(s) ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) was "
            "computed inside torch.utils.checkpoint(..., use_reentrant=True) (torch's default when use_reentrant is "
            "not given), whose forward runs without autograd: that energy has no gradient, and a loss that adds "
            "lam * total_energy(model) trains without those layers' energy term (the other layers' still trains, "
            "so the sum may have a gradient). Checkpoint with use_reentrant=False, return the energy from inside "
            "the checkpointed function (def f(x): out = block(x); return out, minaction.total_energy(block)), or "
            "put the term in the layers with minaction.set_penalty(model, lam) (the recomputation in backward "
            "applies it)",
            UserWarning, stacklevel=stacklevel)


_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_Tensor = torch.Tensor


def _check_model(model: nn.Module, loss_form: bool = False, observers: bool = True) -> None:
    """Raise where the energy of ``model`` would be wrong without a word: an ActivationObserver that a
    module swap stopped; an energy layer that peft wraps as a ``base_layer``; and, for the loss form
    (``loss_form``: ``total_energy`` with grad enabled), an energy layer whose per-sample gradients Opacus
    takes from its output's gradient."""
    named = {}
    for name, m in model.named_modules():
        named[name] = m  # pre-order: a module's parent is in already
        base = m._modules.get("base_layer")
        if isinstance(base, EnergyLayer) and _is_peft(m):
            where = f"{name}.base_layer" if name else "base_layer"
            raise RuntimeError(
                f"{type(base).__name__} {where!r} is the base_layer of peft's {type(m).__name__}, which adds its "
                "adapter's term to the layer's output, already activated: act(W x + b) + B A x instead of "
                "act(W x + b + B A x), so the model computes something other than the adapted plain model. Apply "
                "peft (get_peft_model) to the plain model first, then minaction.convert(model): the adapted layers "
                "stay as they are, and their activations are counted by EnergyActivation modules or observers "
                "with the model's values unchanged")
        if loss_form and isinstance(m, (EnergyLinear, EnergyConv1d, EnergyConv2d)) and m.p and not m.penalty \
                and _opacus_hooked(m):
            raise RuntimeError(
                f"{type(m).__name__} {name!r} has Opacus's per-sample gradient hooks, which compute each sample's "
                "gradient from the gradient of the layer's output; the gradient of total_energy(model) in the loss "
                "reaches the weights another way, into p.grad, which Opacus replaces with its clipped per-sample "
                "gradients: the energy term would be dropped without a word. Use the penalty form: "
                "minaction.set_penalty(model, lam) and a loss without total_energy (each layer's backward adds "
                "lam * dE/dz, which Opacus's per-sample gradients include). To log the energy, call total_energy "
                "under torch.no_grad()")
        if not observers or not isinstance(m, ActivationObserver) or "_hooked" not in m.__dict__:
            continue
        why = m.detached(named[name.rpartition(".")[0]] if name else None)
        if why is not None:
            raise RuntimeError(
                f"the ActivationObserver {name!r} no longer runs: {why}. Module swaps after minaction.convert "
                "(nn.SyncBatchNorm.convert_sync_batchnorm, a frozen-BatchNorm swap, assigning a new module) build new "
                "modules without the observers' forward hooks, so this energy would be missing, or left from an "
                "earlier forward. Call minaction.convert(model) again after replacing modules: it hooks each observer "
                "on the module now in its place")


def _is_peft(module: nn.Module) -> bool:
    """Whether ``module`` is a peft tuner layer (LoRA, IA3, ...), which wraps its ``base_layer``."""
    return any(c.__module__.startswith("peft.") for c in type(module).__mro__)


def _opacus_hooked(module: nn.Module) -> bool:
    """Whether Opacus's GradSampleModule hooks ``module`` (its per-sample gradient hooks are bound methods)."""
    return any(type(getattr(h, "__self__", None)).__module__.startswith("opacus.")
               for h in module._forward_hooks.values())


def _fast_total(model: nn.Module):
    """The sum in the common case, without ``named_modules``' bookkeeping: every counting layer
    has a plain (not ``torch.func``-wrapped) energy. Returns (the sum, whether some layer's energy
    came from a reentrant checkpoint's autograd-free forward: see ``_warn_if_reentrant_checkpoint``),
    or None, which sends the caller to the full path, which explains what is missing."""
    total = None
    reentrant = False
    seen = set()
    stack = [model]
    rid, dicts, fresh, last_read = id(model), [], False, None
    while stack:  # pre-order, as model.modules(): a module shared twice is counted once
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, EnergyLayer) and m.p:
            d = m.__dict__
            r = d.get("_read", _NOT_SET)  # the total_energy calls that summed this energy (see _current)
            if r is _NOT_SET:
                return None  # a layer of an older pickle: the full path
            k = None if r is None else r.get(rid)
            if k is None:
                fresh = True
            elif last_read is None:
                last_read = k
            elif k != last_read:
                return None
            dicts.append(d)
            e = d.get("_last_energy")
            if e is None or _wrapped(e) or type(e) is not _Tensor:  # functorch-wrapped, or a DTensor
                return None
            at = d.get("_energy_at_switch")
            if at is not None and at() is e:  # from before a train()/eval() switch: the full path decides
                return None
            on = d.get("_hooked")  # an ActivationObserver: its home and the module it hooks are still in the model
            if on is not None and not (id(on[3]) in seen and id(on[0]) in seen
                                       and on[1] in (on[0]._forward_pre_hooks if on[2] else on[0]._forward_hooks)):
                return None  # the full path says why (pre-order visits both before the observer)
            total = e if total is None else total + e
            if d.get("_reentrant_energy") is e and not m.penalty:
                reentrant = True
            if d.get("_unread"):  # read: a next call replacing it is not a lost energy (nn.layers._replaced_unread)
                d["_unread"] = False
                d["_ever_read"] = True
            if m._forward_hooks and _opacus_hooked(m):  # the full path decides (the loss form is refused)
                return None
        sub = m._modules
        if sub:
            if isinstance(sub.get("base_layer"), EnergyLayer):  # a peft adapter around it? (the full path checks)
                return None
            stack.extend(reversed(sub.values()))
    if total is None:
        return None  # no counting layer: the full path says why
    if last_read is not None:
        if fresh:
            return None  # some layers did not run since this model's last sum: the full path leaves them out
        return total, reentrant  # every layer as this model's last sum read it (a second read of one forward)
    _mark_read(dicts, rid)
    return total, reentrant


_READS = itertools.count(1)
_NOT_SET = object()


def _mark_read(dicts, rid: int) -> None:
    """Record that this call of ``total_energy(model)`` (``rid = id(model)``) summed these layers' energies."""
    k = next(_READS)
    for d in dicts:
        r = d.get("_read")
        if r is None:
            d["_read"] = {rid: k}
        else:
            r[rid] = k


def _current(model: nn.Module, layers):
    """The layers whose energy is from ``model``'s last forward, when some are not. A layer keeps the
    energy of its last call, so one the last forward did not run would add an old energy (whose graph
    a backward may have freed already): a layer that has never run; one that has not run since its
    ``train()``/``eval()`` switch (an auxiliary head run in training only, read in evaluation); one
    whose energy an earlier ``total_energy(model)`` summed already, while others are new (a layer a
    LayerDrop skipped this step). With every layer in one of these, the layers of the most recent
    sum count (``total_energy`` called twice after one forward gives the same value)."""
    rid = id(model)
    ran = [nm for nm in layers if nm[1].last_energy is not None]
    if ran and _grad_enabled():
        copies = [nm[0] or type(nm[1]).__name__ for nm in layers
                  if nm[1].last_energy is None and nm[1].__dict__.get("_copied")]
        if copies:  # the loss would train without their term and nothing would say so
            warnings.warn(
                f"{len(copies)} energy layer(s) ({', '.join(copies[:4])}{', ...' if len(copies) > 4 else ''}) are "
                "copies (copy.deepcopy, pickle or torch.save/load) that have not run since they were copied, while "
                "other layers of the model have: the sum leaves them out. If the model's forward should have run "
                "them, " + _CLOSURE_CAUSE, UserWarning, stacklevel=3)
    layers = ran or layers
    switched = [nm[1].stale() for nm in layers]
    if any(switched) and not all(switched):
        layers = [nm for nm, s in zip(layers, switched) if not s]
    reads = [(nm[1].__dict__.get("_read") or {}).get(rid) for nm in layers]
    if None in reads:
        return [nm for nm, k in zip(layers, reads) if k is None]
    last = max(reads, default=None)
    return [nm for nm, k in zip(layers, reads) if k == last]


def _act_name(mod: nn.Module):
    if isinstance(mod, nn.GELU):  # subclasses too
        return GELU_NAMES.get(mod.approximate)
    name = fused_name(mod)
    if name is not None:
        return name
    act = read_activation(mod)  # a library's own class (timm's GELU, transformers' GELUActivation, NewGELU)
    return act if act in FUSED else None


def _unfused_ok(mod: nn.Module) -> bool:
    """An activation module EnergyActivation applies as it is, the energy from plain ops."""
    return type(mod) in UNFUSED_ACTIVATIONS or read_activation(mod) == ELEMENTWISE


def _custom_note(mod: nn.Module, act: str) -> str:
    return f" ({describe(mod, act)})" if read_activation(mod) is not None else ""


def _unsupported_act_reason(mod: nn.Module):
    """Why an activation-like module cannot be fused (None if it does not look like an activation)."""
    if read_activation(mod) == ELEMENTWISE:
        return (f"{describe(mod, ELEMENTWISE)}: the layer stays plain, and the module becomes an EnergyActivation "
                "that applies it as it is and computes its energy with plain PyTorch ops, unless "
                "wrap_activations=False")
    hint = _custom_gelu_hint(mod)
    if hint:
        return hint
    if type(mod).__module__ == "torch.nn.modules.activation" and _act_name(mod) is None:
        also = (" (the layer stays plain, and the activation becomes an EnergyActivation that computes its energy "
                "with plain PyTorch ops, unless wrap_activations=False)" if type(mod) in UNFUSED_ACTIVATIONS else "")
        return (f"{type(mod).__name__} is not an activation the fused kernels implement (they do relu, gelu (exact "
                f"and tanh-approximated), silu, tanh, sigmoid, identity){also}")
    return None


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` and ``skipped`` are lists of (module path, description)."""

    converted: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[Tuple[str, str]] = field(default_factory=list)  # (module path, what convert had to assume)
    # ids of the modules and layers taken as the model's output by a guess (a forward fx could not read)
    guessed: set = field(default_factory=set, repr=False, compare=False)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} module(s)"] + [f"  {n}: {d}" for n, d in self.converted]
        if self.skipped:
            lines += [f"left {len(self.skipped)} layer(s) unchanged"] + [f"  {n}: {d}" for n, d in self.skipped]
        if self.notes:
            lines += ["notes"] + [f"  {n}: {d}" for n, d in self.notes]
        return "\n".join(lines)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _hook_kinds(mod) -> List[str]:
    """The kinds of module hooks registered on ``mod`` (forward pre-hook, forward hook, ...)."""
    if not isinstance(mod, nn.Module):
        return []
    return [k.strip("_").replace("_", " ")[:-1] for k in _HOOK_DICTS if getattr(mod, k, None)]


def _hooked_reason(mod: nn.Module, act_mod=None) -> Optional[str]:
    """Why a layer (or its activation module) with module hooks stays plain, or None."""
    for m, role in ((mod, "the layer"), (act_mod, "its activation module")):
        kinds = _hook_kinds(m)
        if not kinds:
            continue
        computed = [n for n in ("weight_orig", "weight_g", "weight_v", "weight_u") if hasattr(m, n)]
        what = (f" (its weight is recomputed by a {kinds[0]}: torch.nn.utils.prune or the old "
                f"torch.nn.utils.weight_norm / spectral_norm)" if computed else "")
        return (f"{role} ({type(m).__name__}) has module hooks ({', '.join(kinds)}){what}: a fused energy layer "
                "applies the activation inside the layer, so the hooks would see other values or no call at all; "
                "left as is (the activation's energy is still counted, by an EnergyActivation that keeps the "
                "activation module's hooks, unless wrap_activations=False). To fuse it, convert before registering "
                "hooks, or use torch.nn.utils.parametrize / parametrizations, which the energy layers run")
    return None


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` (an EnergyActivation computing what ``old`` computed, from the same input) runs ``old``'s module
    hooks: the same dicts, so a handle that ``old.register_*_hook`` returned still removes its hook."""
    for k in _HOOK_DICTS + ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                            "_forward_pre_hooks_with_kwargs"):
        d = getattr(old, k, None)
        if d:
            setattr(new, k, d)
    if getattr(old, "_backward_hooks", None):
        new._is_full_backward_hook = getattr(old, "_is_full_backward_hook", None)


def _energy_twin(mod: nn.Module, act: str, energy, energy_reduction, backend, act_mod=None):
    """The energy layer replacing ``mod`` + ``act`` with the same weights, or a reason string why none can."""
    if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
        return (f"{type(mod).__name__} has no weights yet (a lazy module takes its input size from its first "
                "forward): run one forward (a dummy batch) before minaction.convert, and it fuses with its activation")
    hooked = _hooked_reason(mod, act_mod)  # (after the lazy check: an uninitialised lazy module has its own pre-hook)
    if hooked is not None:
        return hooked
    # built on the meta device: no init draws from the global RNG (a converted model trained from the same seed
    # as the plain one shuffled and dropped out differently) and no init pass over weights about to be replaced
    kw = dict(activation=act, energy=energy, energy_reduction=energy_reduction, backend=backend,
              device="meta", dtype=mod.weight.dtype)
    sizes = ((getattr(mod, "in_features", None), getattr(mod, "out_features", None)) if type(mod) is nn.Linear
             else (getattr(mod, "in_channels", None), getattr(mod, "out_channels", None)))
    if 0 in sizes and type(mod) is not nn.Linear:  # EnergyLinear takes zero features (session 22); the convs do not
        return (f"{type(mod).__name__} has a zero-size channel dimension {sizes} (nn.Conv*d allows one; the "
                f"energy convolutions do not): left as is")
    if type(mod) is nn.Linear:
        new = EnergyLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, **kw)
    elif type(mod) in (nn.Conv1d, nn.Conv2d):
        cls = EnergyConv1d if type(mod) is nn.Conv1d else EnergyConv2d
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                  dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
                  padding_mode=mod.padding_mode, **kw)
    elif torch.nn.utils.parametrize.is_parametrized(mod):
        base = next((c.__name__ for c in (nn.Linear, nn.Conv1d, nn.Conv2d) if isinstance(mod, c)), None)
        if base is None:
            return f"{type(mod).__name__} has no energy counterpart (Linear, Conv1d and Conv2d do)"
        return (f"this {base} has parametrizations ({', '.join(mod.parametrizations)}; torch.nn.utils.parametrize), "
                f"which convert does not move: left as is (the activation's energy is still counted, by an "
                f"EnergyActivation, unless wrap_activations=False). To fuse it, convert first and register the "
                f"parametrization on the energy layer, which runs it")
    else:
        return f"{type(mod).__name__} has no energy counterpart (Linear, Conv1d and Conv2d do)"
    # the same Parameter objects (the twins mirror nn's names and shapes): ties, optimizers and hooks still hold
    new.weight = mod.weight
    if mod.bias is not None:
        new.bias = mod.bias
    left = [n for n, t in itertools.chain(new.named_parameters(), new.named_buffers()) if t.is_meta]
    if left and not mod.weight.is_meta:
        raise RuntimeError(f"minaction.convert: {type(new).__name__} kept meta tensors {left} (a bug: please report)")
    new.train(mod.training)
    return new


_LAYER_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.Bilinear)


def _output_reason(model: nn.Module, act: str, guessed: bool = False) -> str:
    gives = (f"is taken to give {type(model).__name__}'s output (a prediction, not a hidden activation; a guess, "
             "since torch.fx could not read a forward: see the report's notes)" if guessed
             else f"gives {type(model).__name__}'s output (a prediction, not a hidden activation)")
    return (f"its {act} {gives}: left as is, as "
            "the logits layer is (convert(model, include_output=True) converts it too, for a model that is part of a "
            "larger one)")


def _convert_sequential(seq: nn.Sequential, prefix: str, rep: ConversionReport, opts, outputs=None) -> set:
    """Convert the (layer, [dropout,] activation) runs of one Sequential; return the ids of the layers looked at.
    ``outputs``: (the model, ids of the layers whose activation gives its output) to leave the output layer
    plain."""
    keys = list(seq._modules.keys())
    seen = set()
    for i, k in enumerate(keys):
        mod = seq._modules[k]
        if not isinstance(mod, _LAYER_LIKE) or isinstance(mod, EnergyLayer):
            continue
        seen.add(id(mod))
        path = f"{prefix}{k}"
        nxt = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
        act_idx, drop = i + 1, None
        if isinstance(nxt, _DROPOUTS) and i + 2 < len(keys):
            drop, act_idx = nxt, i + 2
        act_mod = seq._modules[keys[act_idx]] if act_idx < len(keys) else None
        act = _act_name(act_mod) if act_mod is not None else None
        if act is None:
            why = _unsupported_act_reason(act_mod) if act_mod is not None else None
            after = seq._modules[keys[act_idx + 1]] if act_idx + 1 < len(keys) else None
            if why is None and after is not None and (_act_name(after) is not None or _unfused_ok(after)):
                why = (f"{type(act_mod).__name__} sits between the layer and {type(after).__name__}: the fused layer "
                       "applies the activation right after the affine map, so the layer stays plain (the activation "
                       "after the norm becomes a minaction.nn.EnergyActivation, unless wrap_activations=False)")
            if why is None:
                what = "nothing" if act_mod is None else type(act_mod).__name__
                why = (f"followed by {what}, not by an activation module ({_SUPPORTED}): left as is"
                       + (" (a logits layer stays a plain layer)" if act_mod is None else ""))
            rep.skipped.append((path, why))
            continue
        if drop is not None and act not in ("relu", "identity"):
            rep.skipped.append((path, f"{type(drop).__name__} sits between the layer and {type(act_mod).__name__}, "
                                      f"and {act} does not commute with dropout (only ReLU does)"))
            continue
        new = _energy_twin(mod, act, *opts, act_mod=act_mod)  # a reason string where there is no twin
        if isinstance(new, str):
            rep.skipped.append((path, new))
            continue
        if outputs is not None and id(mod) in outputs[1]:
            rep.skipped.append((path, _output_reason(outputs[0], type(act_mod).__name__, id(mod) in rep.guessed)))
            continue
        seq._modules[k] = new
        seq._modules[keys[act_idx]] = nn.Identity().train(act_mod.training)
        desc = (f"{type(mod).__name__}+{type(act_mod).__name__} -> {type(new).__name__}(activation={act!r})"
                f"{_custom_note(act_mod, act)}")
        if drop is not None:
            desc += (f"; the {type(drop).__name__} now follows the activation (identical output: dropout commutes "
                     "with ReLU), so the energy is that of the activation before dropout")
        rep.converted.append((path, desc))
    return seen


def _use_counts(model: nn.Module) -> dict:
    """``{id(module): the number of places it is registered in model}`` (a module registered twice is shared)."""
    uses: dict = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


def _convert_traced(model: nn.Module, seen: set, rep: ConversionReport, opts, outputs=None) -> set:
    """Convert the layer + activation pairs that modules other than ``nn.Sequential`` apply in their
    ``forward()`` (read with torch.fx, see ``_fx_pairs``); return the ids of the layers decided.
    ``outputs``: (ids of the modules that give the model's output, ids of the layers whose activation
    does; see ``_fx_pairs.output_modules``) to leave the output layer plain."""
    from ._fx_pairs import find_pairs, keeps_relu, owner_of

    uses = _use_counts(model)

    foreign: set = set()  # modules that a forward other than their owner's applies (parent.forward: self.block.act)

    def shared(m):
        return uses.get(id(m), 0) > 1 or id(m) in foreign

    decided: set = set()
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict) + _LAYER_LIKE
    for name, mod in list(model.named_modules()):  # parents first: a forward that calls self.block.fc decides it
        if isinstance(mod, containers) or isinstance(mod, EnergyLayer):
            continue
        todo = [p for p, m in mod.named_modules(remove_duplicate=False)
                if p and isinstance(m, _LAYER_LIKE) and not isinstance(m, EnergyLayer)
                and id(m) not in seen and id(m) not in decided]
        if not todo:
            continue
        called: list = []
        pairs, reasons = find_pairs(mod, todo, _traced_act_name, _DROPOUTS, shared, _traced_unsupported_reason,
                                    _SUPPORTED.replace(", nn.Identity", ""), called)
        foreign.update(id(mod.get_submodule(t)) for t in called if owner_of(mod, t) is not mod)
        prefix = f"{name}." if name else ""
        swaps = []  # every pair is read before any module is replaced: an activation may serve several layers
        for path, act_path, drop, fn in pairs:
            layer = mod.get_submodule(path)
            act_mod = mod.get_submodule(act_path) if act_path is not None else None
            act = _act_name(act_mod) if act_mod is not None else "relu"
            new = _energy_twin(layer, act, *opts, act_mod=act_mod)  # a reason string where there is no twin
            if isinstance(new, str):
                reasons[path] = new
                continue
            if outputs is not None and id(layer) in outputs[1]:
                act_text = (type(act_mod).__name__ if act_mod is not None else
                            fn[0] if isinstance(fn, tuple) else f"{fn} call")
                reasons[path] = _output_reason(model, act_text, id(layer) in rep.guessed)
                continue
            if isinstance(fn, tuple):  # an nn.ReLU module that cannot become nn.Identity stays after the layer
                desc = (f"{type(layer).__name__}+{fn[0]} -> {type(new).__name__}(activation='relu'), paired in "
                        f"{type(mod).__name__}.forward(); {prefix}{fn[0].split('(')[-1].rstrip(')')} stays, since "
                        f"{fn[1]}, and re-applies relu to an output that is already rectified (the same values and "
                        "gradients, one extra pass)")
            elif act_path is None:
                desc = (f"{type(layer).__name__}+{fn} -> {type(new).__name__}(activation='relu'), paired in "
                        f"{type(mod).__name__}.forward(); the {fn} call stays and now re-applies relu to an "
                        "output that is already rectified (the same values and gradients, one extra pass; drop "
                        "the call for the fused speed)")
            else:
                desc = (f"{type(layer).__name__}+{type(act_mod).__name__} -> "
                        f"{type(new).__name__}(activation={act!r}), paired in {type(mod).__name__}.forward(); "
                        f"{prefix}{act_path} is now nn.Identity{_custom_note(act_mod, act)}")
            if drop is not None:
                desc += (f"; {prefix}{drop} now follows the activation (identical output: dropout commutes with "
                         "ReLU), so the energy is that of the activation before dropout")
            swaps.append((path, act_path, layer, new, desc))
        # an activation module that also follows a layer which cannot be converted must keep working for it
        blocked = {act_path: path for path, act_path, _, _ in pairs if path in reasons and act_path is not None}
        for path, act_path, layer, new, desc in swaps:
            if act_path in blocked:
                if not keeps_relu(mod, act_path):
                    reasons[path] = (f"{act_path} also follows {prefix}{blocked[act_path]}, which cannot be converted, "
                                     "so it cannot become nn.Identity")
                    continue
                desc = (f"{type(layer).__name__}+ReLU ({act_path}) -> {type(new).__name__}(activation='relu'), paired "
                        f"in {type(mod).__name__}.forward(); {prefix}{act_path} stays, since it also follows "
                        f"{prefix}{blocked[act_path]}, which stays plain, and re-applies relu to an output that is "
                        "already rectified (the same values and gradients, one extra pass)")
                act_path = None
            _set_submodule(mod, path, new)
            if act_path is not None:
                _set_submodule(mod, act_path, nn.Identity().train(mod.get_submodule(act_path).training))
            decided.add(id(layer))
            rep.converted.append((prefix + path, desc))
        for path, why in reasons.items():
            m = mod.get_submodule(path)
            if id(m) in decided:
                continue
            if "could not be traced" in why and owner_of(mod, path) is not mod:
                continue  # a layer inside a child module: that module's own forward may still be readable
            if outputs is not None and id(m) in outputs[1] and "and drop that call" in why:
                call = why.split(" in ")[0].replace("followed by ", "")
                why = (f"its {call} call gives {type(model).__name__}'s output (a prediction, not a hidden "
                       "activation): left as is, as the logits layer is")
            decided.add(id(m))
            rep.skipped.append((prefix + path, why))
    return decided


def _traced_act_name(mod: nn.Module):
    # in a forward(), an nn.Identity is a placeholder (timm's drop_path / norm / act slots), not a chosen activation
    return None if isinstance(mod, nn.Identity) else _act_name(mod)


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)


def _traced_unsupported_reason(mod: nn.Module):
    if isinstance(mod, nn.Identity):
        return "an nn.Identity in forward() is a placeholder, not an activation: left as is"
    if isinstance(mod, _NORMS):
        return ("a norm, not an activation: the fused layer applies its activation right after the affine map, so "
                "the layer stays plain (an activation module after the norm, such as nn.ReLU(), becomes a "
                "minaction.nn.EnergyActivation, and a call such as F.relu(norm(...)) gets an ActivationObserver "
                "that counts its energy, unless wrap_activations=False)")
    return _unsupported_act_reason(mod)


def _custom_gelu_hint(mod: nn.Module):
    if "gelu" in type(mod).__name__.lower() and not isinstance(mod, nn.GELU):
        return (f"{type(mod).__name__} is a custom module whose forward() torch.fx could not read as elementwise "
                "ops on its input alone (custom GELUs such as minGPT's NewGELU or timm's GELU are read and convert); "
                "if it computes GELU, nn.GELU() or nn.GELU(approximate='tanh') computes the same function and "
                "converts to activation='gelu' / 'gelu_tanh'")
    return None


_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _identity(x):
    """The activation of a converted transformer layer's feed-forward block (its linear1 applies it)."""
    return x


def _function_act(fn) -> Optional[str]:
    """The fused activation a feed-forward block's ``activation`` (a function or a module) computes."""
    from ._fx_pairs import _FUNCTIONAL

    return _act_name(fn) if isinstance(fn, nn.Module) else _FUNCTIONAL.get(fn)


def _convert_transformer_layers(model: nn.Module, rep: ConversionReport, opts) -> set:
    """torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``, whose forward fx cannot
    read (it branches on its inputs): their feed-forward block is ``linear2(dropout(activation(
    linear1(x))))``, so ``linear1`` + ``activation`` is a pair. ``activation`` becomes the identity
    and torch's fused inference path for the layer is turned off (``activation_relu_or_gelu = 0``):
    it reads ``linear1``'s weights directly, so it would compute no energy. Returns the ids of the
    layers decided."""
    from ._fx_pairs import _SHARED

    uses = _use_counts(model)
    decided = set()
    for name, blk in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(blk, nn.MultiheadAttention) and isinstance(blk.out_proj, nn.Linear):
            decided.add(id(blk.out_proj))
            rep.skipped.append((prefix + "out_proj", "the attention's output projection (MultiheadAttention applies it "
                                                     "itself, with no activation): left as is"))
            continue
        base = next((c for c in _TRANSFORMER_LAYERS if isinstance(blk, c)), None)
        if base is None or type(blk)._ff_block is not base._ff_block:  # a subclass may change the block
            continue
        lin, fn = blk._modules.get("linear1"), blk.__dict__.get("activation", blk._modules.get("activation"))
        if isinstance(blk._modules.get("linear2"), nn.Linear) and not isinstance(blk.linear2, EnergyLayer):
            decided.add(id(blk.linear2))
            rep.skipped.append((prefix + "linear2", f"the output projection of {type(blk).__name__}'s feed-forward "
                                                    "block (dropout and the residual add follow): left as is"))
        if not isinstance(lin, nn.Linear) or isinstance(lin, EnergyLayer):
            continue
        decided.add(id(lin))
        act = _function_act(fn)
        if act is None or act == "identity":
            why = _unsupported_act_reason(fn) if isinstance(fn, nn.Module) else None
            rep.skipped.append((prefix + "linear1", why or f"{type(blk).__name__}'s activation {fn!r} is not one the "
                                                          f"fused kernels implement ({_SUPPORTED})"))
            continue
        if uses.get(id(lin), 0) > 1 or (isinstance(fn, nn.Module) and uses.get(id(fn), 0) > 1):
            rep.skipped.append((prefix + "linear1", _SHARED))
            continue
        new = _energy_twin(lin, act, *opts, act_mod=fn if isinstance(fn, nn.Module) else None)
        if isinstance(new, str):
            rep.skipped.append((prefix + "linear1", new))
            continue
        blk.linear1 = new
        # a module-level function, not nn.Identity: torch's __setstate__ (deepcopy, pickle) replaces an activation
        # that is not in the instance's __dict__ by F.relu
        blk._modules.pop("activation", None)
        blk.activation = _identity
        blk.activation_relu_or_gelu = 0  # torch's fused inference path would bypass linear1 (and its energy)
        rep.converted.append((prefix + "linear1", (
            f"Linear+{act} (the feed-forward block of {type(blk).__name__}) -> EnergyLinear(activation={act!r}); "
            f"{prefix}activation is now the identity, and torch's fused inference path is off for this layer (it "
            "would bypass linear1 and compute no energy)")))
    return decided


# what an activation module may follow where every leading dim is a row ([..., C] features, as EnergyLinear counts
# tokens); after anything else (a BatchNorm, conv, pooling, a residual add) a sample is dim 0: a feature map
_ROW_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.Linear, nn.Embedding, nn.Bilinear)


def _rows_after(prev: Optional[nn.Module]) -> str:
    if isinstance(prev, _ROW_MODULES):
        return "leading"
    # a library's own linear layer (transformers' Conv1D of GPT-2, a quantized linear): a 2-D weight, not a conv
    w = getattr(prev, "weight", None)
    if (isinstance(w, torch.Tensor) and not isinstance(prev, nn.modules.conv._ConvNd)
            and not torch.nn.parameter.is_lazy(w) and w.dim() == 2):
        return "leading"
    return "batch"


def _convert_activations(model: nn.Module, rep: ConversionReport, opts, outputs) -> None:
    """Activation modules that no energy layer absorbed (Conv → BatchNorm → ReLU, Linear → LayerNorm →
    GELU) become :class:`~minaction.nn.EnergyActivation`, which computes the same activation and the
    energy of its output, when each is registered once and does not give the model's output. One
    applied several times in a forward (a ResNet block's ``self.relu``) sums the energies of its
    calls in each forward of the module that applies it (``EnergyActivation.accumulate_in``). One
    that follows an energy layer (whose energy already counts it) stays."""
    from ._fx_pairs import _trace, feeds_softmax, owner_of

    energy, energy_reduction, backend = opts
    uses = _use_counts(model)
    graphs: dict = {}
    names = {id(m): n for n, m in model.named_modules()}  # the owners: never replaced below

    def replace(path, mod, prev, where):
        act = _act_name(mod)
        rows = _rows_after(prev)
        new = EnergyActivation(act if act is not None else mod, energy, energy_reduction, rows=rows,
                               backend=backend).train(mod.training)
        _carry_hooks(mod, new)  # the same input and output: its hooks see what they saw
        _set_submodule(model, path, new)
        after = f" after {type(prev).__name__}" if prev is not None else ""
        how = (f"the same activation, and the energy of its output{_custom_note(mod, act)}" if act is not None else
               f"the same module, and the energy of its output computed with plain PyTorch ops (the fused kernels "
               f"have no {type(mod).__name__}: this pass costs what the hand-written penalty does)")
        rep.converted.append((path, f"{type(mod).__name__}{after} -> EnergyActivation(activation={new.activation!r}, "
                                    f"rows={rows!r}){where}: {how}"))
        return new

    for path, mod in list(model.named_modules()):
        act = _act_name(mod) if path else None
        if (act is None and (not path or not _unfused_ok(mod))) or act == "identity" \
                or uses.get(id(mod), 0) != 1:
            continue
        if outputs is not None and id(mod) in outputs[0]:
            continue  # the model's output (its layer, if any, is reported as the output layer)
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, nn.Sequential):
            keys = list(parent._modules.keys())
            i = keys.index(leaf)
            prev = parent._modules[keys[i - 1]] if i > 0 else None
            if isinstance(prev, _DROPOUTS) and i > 1:
                prev = parent._modules[keys[i - 2]]
            if isinstance(prev, EnergyLayer):
                continue
            replace(path, mod, prev, "")
            continue
        owner = owner_of(model, path)
        if isinstance(owner, _TRANSFORMER_LAYERS):
            # an activation the kernels do not have (LeakyReLU, Mish) left linear1 plain: the feed-forward block's
            # activation module itself counts the energy, per token as EnergyLinear does
            base = next(c for c in _TRANSFORMER_LAYERS if isinstance(owner, c))
            lin = owner._modules.get("linear1")
            if (leaf == "activation" and owner._modules.get("activation") is mod and act is None
                    and type(owner)._ff_block is base._ff_block and type(lin) is nn.Linear):
                new = replace(path, mod, lin, f", the activation of {type(owner).__name__}'s feed-forward block")
                owner.activation_relu_or_gelu = 0  # (0 already for such an activation: torch's fast path is relu/gelu)
                if isinstance(owner, nn.TransformerDecoderLayer):
                    # torch's TransformerDecoderLayer.__setstate__ (deepcopy, pickle) puts F.relu over an activation
                    # that is not in the instance's __dict__: the module goes there too (one module, two references)
                    object.__setattr__(owner, "activation", new)
            continue
        if isinstance(owner, nn.MultiheadAttention):
            continue
        owner_path = names[id(owner)]
        if id(owner) not in graphs:
            try:  # in train and in eval mode: a module applied in one mode only would keep a stale energy
                graphs[id(owner)] = (_trace(owner), _trace(owner, flip=True))
            except Exception:  # noqa: BLE001 - unreadable: nothing known about how often the module runs
                graphs[id(owner)] = None
        if graphs[id(owner)] is None:
            continue
        rel = path[len(owner_path) + 1:] if owner_path else path
        nodes, flipped = ([n for n in g.nodes if n.op == "call_module" and n.target == rel] for g in graphs[id(owner)])
        if not nodes or len(nodes) != len(flipped):
            if nodes or flipped:
                rep.skipped.append((path, f"{type(owner).__name__}.forward() applies {type(mod).__name__} in one of "
                                          "train and eval mode only (its energy would go stale in the other): it "
                                          "stays a plain activation"))
            continue
        if any(feeds_softmax(node, owner) for node in nodes + flipped):
            rep.skipped.append((path, f"{type(mod).__name__}'s output reaches a softmax in {type(owner).__name__}."
                                      "forward(): an attention score, not a hidden representation, so it is not "
                                      "counted"))
            continue
        prevs = []
        for node in nodes:  # the module each call follows (through a dropout)
            src = node.args[0] if node.args else None
            prev = owner.get_submodule(src.target) if getattr(src, "op", None) == "call_module" else None
            if isinstance(prev, _DROPOUTS) and src.args and getattr(src.args[0], "op", None) == "call_module":
                prev = owner.get_submodule(src.args[0].target)
            prevs.append(prev)
        if any(isinstance(prev, EnergyLayer) for prev in prevs):
            if len(nodes) > 1:
                rep.skipped.append((path, f"{type(mod).__name__} is applied {len(nodes)} times in "
                                          f"{type(owner).__name__}.forward(), once after an energy layer whose energy "
                                          "already counts that call: it stays a plain activation"))
            continue
        where = f", applied in {type(owner).__name__}.forward()"
        if len(nodes) > 1:
            where = (f", applied {len(nodes)} times in {type(owner).__name__}.forward(), every call counted (the "
                     f"sum restarts at each forward of {owner_path or type(owner).__name__})")
        new = replace(path, mod, prevs[0], where)
        if len(nodes) > 1:
            new.accumulate_in(owner, rel)


def _observe_activation_calls(model: nn.Module, rep: ConversionReport, opts, outputs) -> None:
    """Activation *calls* that no module conversion can replace (``F.relu(self.bn1(self.conv1(x)))``,
    ``torch.tanh(self.fc(x))``, a block returning ``F.relu(out)``) get an
    :class:`~minaction.nn.ActivationObserver` on the module whose output they activate, or on the
    block whose returned value they are: it counts the energy of the activation and leaves the
    model's values alone. A call after an energy layer (a relu after a layer fused with relu) is
    counted already; one giving the model's output is not a hidden activation."""
    from ._fx_pairs import _describe, _trace, feeds_softmax

    energy, energy_reduction, backend = opts
    uses = _use_counts(model)
    skipped = {p: i for i, (p, _) in enumerate(rep.skipped)}
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, EnergyLayer) + _TRANSFORMER_LAYERS
    for owner_path, owner in list(model.named_modules()):
        if not owner._modules or isinstance(owner, containers) or type(owner).__module__.startswith("torch."):
            continue
        try:
            graphs = (_trace(owner), _trace(owner, flip=True))
        except Exception:  # noqa: BLE001 - unreadable: reported by the pairs already
            continue
        found = [_activation_calls(g) for g in graphs]
        where = f"in {type(owner).__name__}.forward()"
        for key, act, inplace in found[0].keys() & found[1].keys():
            target, once = key
            call = found[0][(key, act, inplace)]
            if feeds_softmax(call, owner):
                continue  # an attention score, not a hidden representation
            if target is None:  # an activation of a computed value mid-forward: nothing to attach an observer to
                src = call.args[0]
                rep.skipped.append((owner_path or type(owner).__name__,
                                    f"the {act} call ({_describe(call, owner)}) on a computed value ({src.name}) "
                                    f"{where} is not counted: no module gives that value or takes it; apply an "
                                    "activation module there (it becomes an EnergyActivation)"))
                continue
            if target.startswith(">"):
                _observe_input_of(owner, owner_path, target[1:], once, call, act, rep, opts, uses)
                continue
            observed = owner if target == "" else owner.get_submodule(target)
            path = owner_path if target == "" else (f"{owner_path}.{target}" if owner_path else target)
            if not owner_path and target == "":
                continue  # the model's own output
            if target == "" and id(owner) in (outputs[0] if outputs is not None else ()):
                continue  # the block's value is the model's output
            if target != "" and outputs is not None and id(observed) in outputs[1]:
                continue  # the activation gives the model's output
            # a Sequential's output is its last module's (a child there would be applied as a layer)
            observed, path = _into_sequential(observed, path, uses, last=True)
            if isinstance(observed, (nn.Sequential, nn.ModuleList, nn.ModuleDict, EnergyLayer)):
                continue  # a container; or an energy layer, which counts the activation already
            if isinstance(observed, _DROPOUTS) and target != "":
                # layer -> dropout module -> act call (reinforce.py's affine1 -> dropout -> F.relu): the layer was
                # fused with the activation (relu commutes with dropout) and counts it; an observer would count the
                # same activation twice
                d_call = call.args[0] if call.args else None
                src = d_call.args[0] if isinstance(d_call, torch.fx.Node) and d_call.args else None
                if isinstance(src, torch.fx.Node) and src.op == "call_module":
                    layer = owner.get_submodule(src.target)
                    if isinstance(layer, EnergyLayer) and getattr(layer, "activation", None) == act:
                        continue
            rel = path[len(owner_path) + 1:] if owner_path else path  # relative to the owner ("": its own value)
            if _observed_already(observed, owner, rel, owner_path, rep) or uses.get(id(observed), 0) != 1 or not once:
                continue  # observed already (a second convert), shared, or called more than once
            if target == "":
                up = call.args[0]
                while isinstance(up, torch.fx.Node) and up.op != "call_module" and up.args:
                    up = up.args[0]
                prev = owner.get_submodule(up.target) if isinstance(up, torch.fx.Node) and up.op == "call_module" \
                    else None
            else:
                prev = observed
            rows = _rows_after(prev)
            unfused = act not in FUSED
            fn = _unfused_module(call) if unfused else act
            obs = ActivationObserver(fn, energy, energy_reduction, rows=rows, backend=backend,
                                     copy=inplace and target != "").train(observed.training)
            at = _attach_observer(observed, obs, owner, rel)
            if at is None:
                rep.skipped.append((path, f"{type(observed).__name__}'s forward() applies its children generically "
                                          "(or could not be read to rule that out), and so does "
                                          f"{type(owner).__name__}'s, so an observer child would change them: the "
                                          f"{act} call {where} is not counted"))
                continue
            at = f"{owner_path}.{at}" if owner_path else at
            what = f"the {act} call ({_describe(call, owner)}) {where}"
            of = (f"the value {type(owner).__name__}.forward() returns" if target == "" else
                  f"{type(observed).__name__} ({target})'s output")
            extra = (" The call is in place, so the hook passes on a copy for it to overwrite." if obs.copy else "")
            rep.converted.append((at, f"{what} cannot be replaced by a module, so an ActivationObserver (rows={rows!r}) "
                                  f"hooked on {of} counts its energy: the model's values and gradients are unchanged, "
                                  + ("at the cost of the activation and its energy in plain PyTorch ops (the fused "
                                     "kernels do not have it), what the hand-written penalty costs." if unfused else
                                     "at the cost of one more activation pass (apply an activation module there, or "
                                     "build the layer as an energy layer, for the fused speed).") + extra))
            if path in skipped:
                p, why = rep.skipped[skipped[path]]
                if unfused:
                    why = (f"followed by the {_describe(call, owner)} call {where}, an activation the fused kernels "
                           "do not have: the layer stays plain")
                rep.skipped[skipped[path]] = (p, f"{why} (its {act}'s energy is counted by an observer: {at})")


def _observe_input_of(owner, owner_path, target, once, call, act, rep, opts, uses) -> None:
    """An activation call on a computed value that one module takes (``self.conv2(F.relu(out + x))``): an
    observer on that module's input counts the energy of the value as it is (it is the activation's output)."""
    from ._fx_pairs import _describe

    energy, energy_reduction, backend = opts
    taker = owner.get_submodule(target)
    path = f"{owner_path}.{target}" if owner_path else target
    taker, path = _into_sequential(taker, path, uses, last=False)  # a Sequential's input is its first module's
    where = f"in {type(owner).__name__}.forward()"
    what = f"the {act} call ({_describe(call, owner)}) on a computed value ({call.args[0].name}) {where}"
    rel = path[len(owner_path) + 1:] if owner_path else path
    if _observed_already(taker, owner, rel, owner_path, rep):
        return  # a second convert
    if (isinstance(taker, (nn.Sequential, nn.ModuleList, nn.ModuleDict, EnergyLayer)) or not once
            or uses.get(id(taker), 0) != 1 or getattr(taker, "inplace", False)):
        rep.skipped.append((path, f"{what} is not counted: {type(taker).__name__} ({path}), which takes it, is "
                                  "shared, called more than once, in place or a container; apply an activation "
                                  "module there (it becomes an EnergyActivation)"))
        return
    rows = _rows_after(_past_pass_modules(taker, owner, rel, call))  # a Linear takes token rows; a conv, samples
    obs = ActivationObserver("identity", energy, energy_reduction, rows=rows, backend=backend).train(taker.training)
    at = _attach_observer(taker, obs, owner, rel, input=True)
    if at is None:
        rep.skipped.append((path, f"{what} is not counted: {type(taker).__name__}'s and {type(owner).__name__}'s "
                                  "forward() apply their children generically (or could not be read to rule that "
                                  "out)"))
        return
    rep.converted.append((f"{owner_path}.{at}" if owner_path else at,
                          f"{what} goes into {type(taker).__name__} ({path}), so an ActivationObserver (rows="
                          f"{rows!r}) on that module's input counts the energy of the {act}'s output: the model's "
                          "values and gradients are unchanged, at the cost of one energy pass (an activation module "
                          "there would be faster)"))


def _past_pass_modules(taker: nn.Module, owner: nn.Module, rel: str, call) -> nn.Module:
    """The module that decides what a row of ``taker``'s input is: ``taker`` itself, or, for a dropout or
    identity that passes the value on unchanged, the module it goes into next (in its Sequential, or in
    ``owner``'s traced forward). A dropout said nothing, and its "batch" rows made a per-token activation
    count one row per sample: an energy T tokens times too large (session 23)."""
    passes = _DROPOUTS + (nn.Identity,)
    parent_path, _, leaf = rel.rpartition(".")
    parent = owner.get_submodule(parent_path) if parent_path else None
    mod = taker
    if isinstance(parent, nn.Sequential):  # the next child in taker's Sequential
        keys = list(parent._modules)
        for k in keys[keys.index(leaf) + 1:]:
            mod = parent._modules[k]
            if not isinstance(mod, passes):
                return mod
        return taker
    node = next((n for n in call.graph.nodes if n.op == "call_module" and n.target == rel), None)
    for _ in range(8):
        if not isinstance(mod, passes) or node is None:
            break
        users = [u for u in node.users if u.op == "call_module"]
        if len(users) != 1 or len(node.users) != 1:
            return taker  # it goes on to more than one place, or through functions: nothing known
        node = users[0]
        mod = owner.get_submodule(node.target)
    return mod if not isinstance(mod, passes) else taker


def _into_sequential(mod: nn.Module, path: str, uses: dict, last: bool):
    """The module inside (nested) Sequentials, registered once, whose output (``last``) or input is theirs,
    and its path."""
    while isinstance(mod, nn.Sequential) and len(mod) and uses.get(id(mod), 0) == 1:
        key = list(mod._modules)[-1 if last else 0]
        mod, path = mod._modules[key], f"{path}.{key}"
    return mod, path


def _activation_calls(graph) -> dict:
    """The activation calls in one traced forward: ``{((what they activate, applied once), activation,
    in place): node}``. What they activate: a submodule's output (its target), the returned value
    (``""``), or a computed value (None)."""
    from ._fx_pairs import _functional_act, _inplace

    calls, out = {}, next(n for n in graph.nodes if n.op == "output").args[0]
    counts: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            continue
        act, inplace = _functional_act(node, src), _inplace(node)
        if act is None and node.args[0] is src and len(node.args) == 1 and not node.kwargs:
            act = _INPLACE_CALLS.get((node.op, node.target))  # F.relu_(x), x.relu_(), x.tanh_(), ...
            inplace = act is not None
        if act is None:  # F.leaky_relu(x, 0.2), F.elu, F.relu6, ...: observed unfused, as the module
            spec = _unfused_call(node)
            if spec is None:
                continue
            cls, kwargs, inplace = spec
            act = f"{node.target.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        if src.op == "call_module":
            key = (src.target, counts[src.target] == 1)
        elif node is out:
            key = ("", True)
        else:  # a computed value: observed at the input of the one module that takes it, if there is one
            takers = _takers(node)
            values = [u for u in node.users if not _size_query(u, node)]
            if not takers and len(values) == 1 and _keeps_rows(values[0], node):
                takers = _takers(values[0])  # F.relu(...) -> flatten(1) -> fc: fc's input, flattened
            key = (">" + takers[0].target, counts[takers[0].target] == 1) if len(takers) == 1 else (None, False)
        calls[(key, act, inplace)] = node
    return calls


def _takers(node) -> list:
    """The module calls that take ``node`` as their first argument."""
    return [u for u in node.users if u.op == "call_module" and u.args and u.args[0] is node]


def _keeps_rows(u, node) -> bool:
    """Whether ``u`` only flattens each sample of ``node`` to one row (``flatten(1)``, ``view(x.size(0), -1)``,
    ``reshape(x.shape[0], n)``) and ``node`` is its only tensor: each sample's units keep their values in one
    row, so the energy of ``u``'s output is ``node``'s (a sum over a sample's units, a mean over samples). A
    reshape to more dims (``flatten(2)``, ``view(B, -1, 8)``) is not followed: a Linear taking it reads one row
    per position, and its input observer would split each sample's energy over them."""
    if u.op == "call_function" and u.target is torch.flatten or u.op == "call_method" and u.target == "flatten":
        if not u.args or u.args[0] is not node:
            return False
        start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
        end = u.args[2] if len(u.args) > 2 else u.kwargs.get("end_dim", -1)
        return start == 1 and end == -1  # [B, units]: a flatten(2) keeps rows a Linear would read per position
    if not (u.op == "call_method" and u.target in ("view", "reshape")
            or u.op == "call_function" and u.target is torch.reshape):
        return False
    if not u.args or u.args[0] is not node:
        return False
    sizes = u.args[1:] if u.op == "call_method" else u.args[1:2]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) != 2 or isinstance(sizes[1], torch.fx.Node):  # [B, units] only (see flatten above)
        return False
    first = sizes[0]  # node.size(0), or node.shape[0]
    if not isinstance(first, torch.fx.Node):
        return False
    if first.op == "call_method" and first.target == "size":
        return first.args == (node, 0)
    return (first.op == "call_function" and first.target is operator.getitem and first.args[1:] == (0,)
            and isinstance(first.args[0], torch.fx.Node) and _size_query(first.args[0], node))


def _size_query(u, node) -> bool:
    """Whether ``u`` reads ``node``'s sizes only (``node.shape``, ``node.size()``, ``node.size(0)``)."""
    return (u.op == "call_function" and u.target is getattr and u.args == (node, "shape")
            or u.op == "call_method" and u.target == "size" and u.args[:1] == (node,))


_INPLACE_CALLS = {("call_function", F.relu_): "relu", ("call_function", torch.relu_): "relu",
                  ("call_method", "relu_"): "relu", ("call_function", torch.tanh_): "tanh",
                  ("call_method", "tanh_"): "tanh", ("call_function", torch.sigmoid_): "sigmoid",
                  ("call_method", "sigmoid_"): "sigmoid"}
# functional activations the kernels do not have: (the module an observer applies, its arguments after the input)
_UNFUSED_CALLS = {
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace")), F.elu: (nn.ELU, ("alpha", "inplace")),
    F.relu6: (nn.ReLU6, ("inplace",)), F.hardswish: (nn.Hardswish, ("inplace",)),
    F.hardsigmoid: (nn.Hardsigmoid, ("inplace",)), F.mish: (nn.Mish, ("inplace",)),
    F.softplus: (nn.Softplus, ("beta", "threshold")), F.selu: (nn.SELU, ("inplace",)),
    F.celu: (nn.CELU, ("alpha", "inplace")), F.hardtanh: (nn.Hardtanh, ("min_val", "max_val", "inplace")),
}


def _unfused_call(node):
    """For a call of an activation the kernels do not have (``F.leaky_relu(x, 0.2)``): ``(the module class,
    its arguments, whether the call is in place)``; None for any other node, or arguments computed in
    forward() (not a fixed module)."""
    spec = _UNFUSED_CALLS.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return None
    cls, params = spec
    given = dict(zip(params, node.args[1:]))
    given.update(node.kwargs)
    if set(given) - set(params) or any(isinstance(v, torch.fx.Node) for v in given.values()):
        return None
    inplace = bool(given.pop("inplace", False))
    return cls, given, inplace


def _unfused_module(node) -> nn.Module:
    """The module computing what the unfused activation call ``node`` computes."""
    cls, kwargs, _ = _unfused_call(node)
    return cls(**kwargs)


def _observed_already(observed: nn.Module, owner: nn.Module, rel: str, owner_path: str, rep: ConversionReport) -> bool:
    """Whether an earlier ``convert`` attached an observer there (at ``observed`` or at its owner). One that
    no longer runs, because a module swap since then copied it into a new module without its hook
    (``nn.SyncBatchNorm.convert_sync_batchnorm``), is hooked on ``observed`` again."""
    path = f"{owner_path}.{rel}" if owner_path and rel else (owner_path or rel)
    for home, name, at in _observer_homes(observed, owner, rel, always_owner=True):
        at = f"{owner_path}.{at}" if owner_path else at
        obs = home._modules.get(name)
        if obs is None:
            continue
        why = obs.detached(home) if isinstance(obs, ActivationObserver) else None
        if why is not None:
            obs.reattach(observed, home)
            rep.converted.append((at, f"the ActivationObserver no longer ran ({why}): hooked again on the "
                                      f"{type(observed).__name__} now at {path or 'the model'}"))
        return True
    return False


def _attach_observer(observed: nn.Module, obs: ActivationObserver, owner: nn.Module, target: str,
                     input: bool = False) -> Optional[str]:
    """Attach ``obs``, hooked on ``observed``, where its being a child changes nothing: ``observed`` itself
    (torch's own leaf modules never apply their children; another forward is read again after attaching:
    one that applies every child, such as a loop over ``self.children()``, would now apply the observer),
    else ``owner``, whose forward applies ``observed`` at ``target`` (read again the same way: a layer
    library's module whose forward fx cannot read, such as PyTorch Geometric's convolutions). Returns the
    observer's path relative to ``owner``, or None where neither home is safe."""
    from ._fx_pairs import _trace_now

    def unchanged(home, name):
        if type(home).__module__.startswith("torch.nn.modules"):
            return True
        try:
            graphs = (_trace_now(home, False), _trace_now(home, True))
        except Exception:  # noqa: BLE001 - unreadable: the child's effect cannot be ruled out
            return False
        return not any(n.op == "call_module" and n.target.split(".")[0] == name for g in graphs for n in g.nodes)

    for home, name, rel in _observer_homes(observed, owner, target):
        if name in home._modules:
            continue
        handle = obs.attach(observed, name, input=input, home=home)
        if unchanged(home, name):
            return rel
        handle.remove()
        del home._modules[name]
    return None


def _observer_homes(observed: nn.Module, owner: nn.Module, target: str, always_owner: bool = False):
    """Where an observer of ``observed`` (at ``target`` in ``owner``; "" for the owner itself) may live:
    (home, child name, path relative to ``owner``), the observed module first, then the owner."""
    homes = [(observed, "activation_energy", f"{target}.activation_energy" if target else "activation_energy")]
    if observed is not owner or always_owner:
        name = "activation_energy_" + target.replace(".", "_")
        homes.append((owner, name, name))
    return homes


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[leaf] = new


def convert(model: nn.Module, energy="l2", energy_reduction: str = "sum", backend=None, *,
            include_output: bool = False, wrap_activations: bool = True, return_report: bool = False):
    """Replace layer + activation-module pairs with energy layers, in place.

    ``nn.Linear`` -> :class:`~minaction.nn.EnergyLinear`, ``nn.Conv1d`` / ``nn.Conv2d`` ->
    :class:`~minaction.nn.EnergyConv1d` / ``EnergyConv2d``, when the layer's output goes only to
    an activation module: ``nn.ReLU``, ``nn.GELU()`` (exact, or ``approximate="tanh"``),
    ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.Identity``. Pairs are found in two places:

    - inside an ``nn.Sequential``: the next module;
    - in any other module's ``forward()``, read with ``torch.fx`` (each submodule a leaf), as
      nanoGPT's MLP ``x = self.c_fc(x); x = self.gelu(x); x = self.c_proj(x)``. The activation
      module must be applied only to such layers in that forward and be used nowhere else in
      the model (a ResNet's ``self.relu``, applied after a residual add too, cannot go; a
      non-in-place ``nn.ReLU`` then stays in place and its layer still converts: relu is idempotent).

    The new layer holds the same ``Parameter`` objects (weight ties and optimizers that hold them
    stay valid) and training flag; the activation module becomes ``nn.Identity``.
    ``layer, Dropout, ReLU`` is converted too (the dropout then follows the fused layer: same
    output, since dropout commutes with ReLU; the energy is that of the activation before
    dropout).

    A layer followed by a relu *call* (``F.relu(self.fc1(x))``, ``torch.relu``, ``x.relu()``, as
    in pytorch/examples' MNIST net) is converted too, with ``activation="relu"``: relu is
    idempotent, so the call, which stays in ``forward()``, leaves the fused output unchanged (the
    same values and gradients; one extra pass, which dropping the call saves).

    torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (whose forward fx cannot
    read) convert their feed-forward ``linear1`` + ``activation``; see docs/core.md.

    The output layer stays plain, as the logits layer does (the energy is that of the hidden
    layers): a layer whose activation gives the model's output (``nn.Sequential(..., nn.Linear(8, 1),
    nn.Sigmoid())``, a GAN discriminator's last conv + sigmoid, a decoder's last layer), found from
    the model's own ``forward()`` down through the modules whose output it returns unchanged in
    value (views, ``nn.Flatten``, dropout). ``include_output=True`` converts it too: for a model that
    is a part of a larger one (a backbone converted on its own).

    An activation module that follows no layer directly (Conv → BatchNorm → ReLU, a ReLU after a
    residual add) becomes a :class:`~minaction.nn.EnergyActivation` (the same activation and the
    energy of its output; one applied several times per forward, as a ResNet block's
    ``self.relu``, counts every call); ``wrap_activations=False`` leaves them alone.

    A library's own activation class (timm's ``GELU``, transformers' ``GELUActivation`` /
    ``NewGELUActivation``, minGPT's ``NewGELU``) counts as the activation it computes: its
    ``forward()`` is read with ``torch.fx`` (only elementwise, deterministic ops on its input, no
    parameters or buffers, the same in train and eval mode) and its values are compared in float64
    with relu, gelu, gelu_tanh, silu, tanh and sigmoid; another elementwise function (CLIP's
    ``QuickGELU``) becomes an unfused ``EnergyActivation``, as ``LeakyReLU`` does.

    Left unchanged, each with its reason in the report: layers with no activation after them
    (the logits layer), ``LeakyReLU`` and other activations the kernels do not implement
    (their module becomes an unfused ``EnergyActivation``), custom modules whose forward is not
    such an elementwise function, layers followed by another activation *function* (``torch.tanh``,
    ``F.gelu``: applied twice, it would change the output; an in-place ``F.relu(..., inplace=True)``
    would modify the output the layer keeps for backward; the report says what to write instead),
    layers in a ``forward()`` that ``torch.fx`` cannot trace (Python control flow on tensor
    values; tracing runs the forward's Python code on proxies, with optional arguments at their
    defaults and no ``**kwargs``, in train and in eval mode: a pair must hold in both; a forward
    wrapped by a decorator, as transformers 5 wraps its layers', is read from the function it wraps).

    Each conversion is logged (logger ``"minaction"``, INFO); when nothing was converted and
    the model has no energy layers, a warning says why. Returns ``model``, or
    ``(model, ConversionReport)`` with ``return_report=True``.
    """
    _need_module(model, "convert")
    from ._fx_pairs import cached_traces, owner_of
    from .ops.energy import validate_energy

    validate_energy("relu", energy, energy_reduction)  # a bad option is an error even where nothing converts
    if backend is not None:
        from .backends.select import _check_name

        _check_name(backend)

    _check_model(model, observers=False)  # a stopped observer is hooked again below
    with cached_traces():
        rep = _convert(model, energy, energy_reduction, backend, include_output, wrap_activations)
        _note_repeated_calls(model, rep)
        # (inside the cache: _holds_activation reads custom activation modules the conversion has read already)
        unread = [] if return_report or not rep.converted else [
            (n, d) for n, d in rep.skipped if "could not be traced by torch.fx" in d
            and isinstance(_submodule_or_none(model, n), (nn.Linear, nn.Conv1d, nn.Conv2d))
            and _holds_activation(owner_of(model, n))]
    for path, m in model.named_modules():  # the name a warning gives the layer (it cannot find it at that time)
        if isinstance(m, EnergyLayer):
            m.__dict__["_path"] = path or type(model).__name__
    for path, desc in rep.converted:
        _log.info("minaction.convert: %s: %s", path, desc)
    if not return_report:
        for path, note in rep.notes:  # an assumption about the model that the user should check
            warnings.warn(f"minaction.convert: {path}: {note}", UserWarning, stacklevel=2)
    if unread:
        # something converted, so no 'converted nothing' warning: the layers a forward fx cannot read applies
        # (ALBERT's pooler + tanh, written inline in AlbertModel.forward()) would stay plain with no word
        names = ", ".join(n for n, _ in unread[:6]) + (f" (and {len(unread) - 6} more)" if len(unread) > 6 else "")
        warnings.warn(f"minaction.convert left {len(unread)} layer(s) plain because the forward that applies them "
                      f"could not be read by torch.fx: {names} ({unread[0][1]}); an activation applied to them "
                      "there is not counted. Build those layers as EnergyLinear / EnergyConv*d, or apply an "
                      "activation module (return_report=True lists every layer with its reason)", UserWarning,
                      stacklevel=2)
    if not rep.converted and not any(isinstance(m, EnergyLayer) for m in model.modules()):
        # reasons about the layers themselves first, fx's failures to read a forward (attention's slicing) last
        skipped = sorted(rep.skipped, key=lambda nd: "could not be traced by torch.fx" in nd[1])
        reasons = "; ".join(f"{n}: {d}" for n, d in skipped[:6]) or "it has no Linear or Conv layers"
        more = f" (and {len(rep.skipped) - 6} more)" if len(rep.skipped) > 6 else ""
        warnings.warn(f"minaction.convert converted nothing in {type(model).__name__}: {reasons}{more}. "
                      f"Note: {_FUNCTIONAL_HINT}.", UserWarning, stacklevel=2)
    return (model, rep) if return_report else model


def _note_repeated_calls(model: nn.Module, rep: ConversionReport) -> None:
    """A converted layer inside a module that its owner's forward applies several times (ALBERT's one shared
    layer group at every depth): its report line says that ``total_energy`` counts the last call only."""
    from ._fx_pairs import _trace

    if not rep.converted:
        return
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, EnergyLayer)
    converted = [p for p, _ in rep.converted]
    notes: dict = {}
    for owner_path, owner in model.named_modules():
        if not owner._modules or isinstance(owner, containers) or type(owner).__module__.startswith("torch."):
            continue
        if owner_path and not any(p.startswith(owner_path + ".") for p in converted):
            continue  # no converted layer below it: nothing to say (and no trace to pay for)
        try:
            graph = _trace(owner)
        except Exception:  # noqa: BLE001 - an unreadable forward is reported by the pairs already
            continue
        calls: dict = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for target, n in calls.items():
            prefix = f"{owner_path}.{target}" if owner_path else target
            for path, _ in rep.converted:  # (a module applied twice itself is an accumulating one, said already)
                if n > 1 and path.startswith(prefix + ".") and path not in notes:
                    notes[path] = (f"; {type(owner).__name__}.forward() applies {target} {n} times, and "
                                   "total_energy counts each energy layer's last call: record_energy(model) or "
                                   "set_penalty(model, lam) counts every call")
    if notes:
        rep.converted = [(p, d + notes.get(p, "")) for p, d in rep.converted]


def _holds_activation(owner: nn.Module) -> bool:
    """Whether ``owner`` holds an activation module of its own (a sign that its forward activates a layer)."""
    return any(not isinstance(c, EnergyLayer) and (_act_name(c) is not None or _unfused_ok(c))
               for c in owner.children())


def _submodule_or_none(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _convert(model, energy, energy_reduction, backend, include_output, wrap_activations) -> ConversionReport:
    """``convert``'s work: the report of what was replaced and what stayed."""
    from ._fx_pairs import output_modules

    rep = ConversionReport()
    opts = (energy, energy_reduction, backend)
    _order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    outputs = None if include_output else output_modules(model, rep.notes, rep.guessed)  # before any module is replaced
    seen: set = _convert_transformer_layers(model, rep, opts)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Sequential):
            seen |= _convert_sequential(mod, f"{name}." if name else "", rep, opts,
                                        None if outputs is None else (model, outputs[1]))
    seen |= _convert_traced(model, seen, rep, opts, outputs)
    if wrap_activations:
        _convert_activations(model, rep, opts, outputs)
        _observe_activation_calls(model, rep, opts, outputs)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
            rep.skipped.append((name or type(mod).__name__,
                                f"{type(mod).__name__}: its hidden states are computed inside torch's recurrent "
                                "kernel, so their energy is not counted (to count the hidden states it returns, pass "
                                "its output through minaction.nn.EnergyActivation('identity', rows='leading'); to "
                                "count the gates too, write the cell from EnergyLinear layers and step it in "
                                "forward(), with record_energy counting every step)"))
            continue
        if isinstance(mod, _LAYER_LIKE) and not isinstance(mod, EnergyLayer) and id(mod) not in seen:
            rep.skipped.append((name or type(mod).__name__,
                                f"{type(mod).__name__} is not called by a forward() that torch.fx could read "
                                "(nor inside an nn.Sequential), so no activation could be paired with it"))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False) \
                and any(isinstance(m, EnergyLayer) for m in mod.layers.modules()):
            # its evaluation fast path packs a padded batch (src_key_padding_mask) into a nested tensor, which the
            # energy layers cannot take; off, the layers see the padded batch, as in training
            mod.use_nested_tensor = False
            prefix = f"{name}.layers." if name else "layers."
            i = next((i for i, (p, _) in enumerate(rep.converted) if p.startswith(prefix)), None)
            if i is not None:  # said with its first converted layer: the encoder itself is no converted module
                p, desc = rep.converted[i]
                rep.converted[i] = (p, desc + f"; {name or type(mod).__name__}.use_nested_tensor is now False (with a "
                                    "src_key_padding_mask in evaluation, torch would pass its energy layers a nested "
                                    "tensor; now the outputs at padded positions are computed, not zero, the valid "
                                    "positions are unchanged, and the energy counts every position, padded or not, "
                                    "as in training)")
    for entries in (rep.converted, rep.skipped):  # module order, whichever way each layer was read
        entries.sort(key=lambda item: _order.get(item[0], len(_order)))
    return rep


def weight_density(w: torch.Tensor, rel_tol: float = 1e-3) -> float:
    """Fraction of weights with ``|w| > rel_tol * max|w|`` (non-negligible weights)."""
    a = w.detach().abs()
    m = a.max()
    if m == 0:
        return 0.0
    return float((a > rel_tol * m).float().mean())


def _scalar(v) -> bool:
    """A Python, numpy or 0-dim tensor number (not a bool)."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _takes(model: nn.Module, *args) -> bool:
    """Whether ``model``'s forward accepts these positional arguments (True where its signature is unknown)."""
    try:
        inspect.signature(model.forward).bind(*args)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


@torch.no_grad()
def _units(mod: nn.Module, y: torch.Tensor) -> int:
    """The units one row of ``mod``'s energy sums over (what ``energy_reduction='mean'`` divides by): a Linear's
    (and a per-token activation's) last dim, whatever the tokens; a conv's or a per-sample activation's units of
    one sample (one member's, for a layer of ``num_models`` members)."""
    if y.dim() <= 1:
        return int(y.shape[0]) if y.dim() == 1 else 1
    if isinstance(mod, EnergyLinear) or getattr(mod, "rows", None) == "leading":
        return int(y.shape[-1])
    return int(math.prod(y.shape[1:])) // (getattr(mod, "num_models", None) or 1)


def energy_report(model: nn.Module, x, *args, rel_tol: float = 1e-3, **kwargs):
    """Per energy layer: E, units, active-unit fraction, weight density and forward FLOPs.

    Runs one forward ``model(x, *args, **kwargs)`` (in eval mode, restored afterwards: a Siamese
    net's two inputs, an LSTM language model's hidden state; for a ``DistributedDataParallel`` wrapper,
    the forward of the module it wraps, so one rank alone can report) and returns
    a pandas DataFrame with one row per energy layer and a final ``total`` row. Per row: ``energy`` (this
    call's E), ``units`` (what one row of E sums over: a Linear's outputs per token, a conv's C·H·W per
    sample), ``active_fraction`` (the share of nonzero outputs: a sparsity measure for relu, 1.0 for smooth
    activations), ``weight_density`` and ``flops`` (the layer's forward); the ``total`` row sums the energy
    layers' rows only, so its FLOPs are not the whole model's (attention products, norms and plain layers are
    not in it). The joules
    measured over that forward (RAPL / NVML where the hardware exposes them, see
    :class:`minaction.energy_meter.EnergyMeter`) are in ``df.attrs["measured_joules"]``, with
    ``df.attrs["measured_reasons"]`` saying why a source gave no number. For a batched layer
    (``num_models=G``) a row's ``energy`` is the sum over its G members (``total_energy`` gives them
    one by one, ``[G]``).
    """
    _need_module(model, "energy_report")
    if len(args) == 1 and not kwargs and _scalar(args[0]) and not _takes(model, x, *args):
        # the old signature energy_report(model, x, rel_tol), where the model takes no second input
        raise TypeError("energy_report(model, x, rel_tol): rel_tol is keyword-only (further positional arguments "
                        "are the model's inputs): pass rel_tol=...")
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, numbers.Real):
        raise TypeError(f"rel_tol must be a number, got {rel_tol!r}")
    if not 0 <= rel_tol < 1:
        raise ValueError(f"rel_tol must be a number in [0, 1) (a weight counts when |w| > rel_tol * max|w|), got "
                         f"{rel_tol!r}")
    from .energy_meter import EnergyMeter

    import pandas as pd

    _check_model(model)  # an observer a module swap detached would have no row
    rows, hooks = [], []

    def hook(name):
        def fn(mod, inp, out):
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(mod, ActivationObserver):  # its output is not the model's: the activation of its input
                y = mod._apply_activation(inp[0], 0.0)
            xs = inp[0].shape if inp else ()
            weights = [
                p for n, p in mod.named_parameters(recurse=False) if n.endswith("weight")]
            e = mod.__dict__.get("_call_energy", mod.last_energy)  # an accumulating EnergyActivation: this call's
            rows.append({
                "layer": name, "type": type(mod).__name__, "activation": getattr(mod, "activation", None),
                "energy": float(e.detach().sum()) if e is not None else float("nan"),
                "units": _units(mod, y),
                "active_fraction": float((y != 0).float().mean()),
                "weight_density": weight_density(weights[0], rel_tol) if weights else float("nan"),
                "flops": int(mod.forward_flops(xs, tuple(y.shape))),
            })
        return fn

    for name, m in model.named_modules():
        if isinstance(m, EnergyLayer):
            hooks.append(m.register_forward_hook(hook(name)))
    # a DDP wrapper: its own forward would broadcast buffers, a collective that hangs a report made on one rank; the
    # wrapped module computes the same values (DataParallel's forward, which only scatters, runs as it is)
    run = model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        run = model.module
        if model.device_ids:  # DDP's forward would move the inputs to its device: so does the report
            dev = model.device
            x, args, kwargs = torch.utils._pytree.tree_map(
                lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, (x, args, kwargs))
    was_training = model.training
    model.eval()
    try:
        # no graph: the report only reads values (a graph would cost memory, and float() of a tensor that requires
        # grad warns)
        with EnergyMeter() as meter, torch.no_grad():
            run(x, *args, **kwargs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not rows:
        raise ValueError(f"{type(model).__name__} has no energy layers: see minaction.convert, or build it from "
                         "minaction.nn layers (EnergyLinear, EnergyConv1d/2d)")
    df = pd.DataFrame(rows)
    counted = {n for n, _ in energy_layers(model)}
    df["counted"] = df["layer"].isin(counted)
    total = {"layer": "total", "type": "", "activation": None,
             "energy": float(df.loc[df.counted, "energy"].sum()), "units": int(df.units.sum()),
             "active_fraction": float("nan"), "weight_density": float("nan"), "flops": int(df.flops.sum()),
             "counted": True}
    out = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    out.attrs["measured_joules"] = dict(meter.joules)
    out.attrs["measured_reasons"] = dict(meter.reasons)
    out.attrs["seconds"] = meter.seconds
    return out
