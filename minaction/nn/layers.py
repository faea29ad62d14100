"""``EnergyLinear``: ``nn.Linear`` + activation, with the layer's activation energy.

After each forward, ``layer.last_energy`` holds ``E_l`` (a 0-dim tensor, or ``[G]`` for a
batched layer of G models) on the autograd graph, so ``loss + lam * E`` trains with the
energy term and its gradient flows through the fused backward.

Lifetime of ``last_energy`` (see docs/core.md): it is replaced by the layer's next forward;
a backward through it frees the graph's saved tensors as for any other tensor; it is never
part of ``state_dict``, and pickling / ``copy.deepcopy`` / ``torch.save(model)`` drop it
(the copy starts with ``last_energy = None``). A value computed inside a ``torch.func``
transform reads as None once that transform has returned.
"""
from __future__ import annotations

import functools
import math
import numbers
import sys
import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from ..backends import select as _select
from ..ops import energy as _energy
from ..ops import energy_linear, validate_energy, validate_penalty
from ..ops.energy import make_plan

# the fast path's checks (ops.energy._fast_world's, inlined: a call per check costs in a step)
_compiling = torch.compiler.is_compiling
_exporting = _energy._is_exporting
_jit_tracing = _energy._jit_tracing
_any_autocast = _energy._any_autocast or (lambda: True)
_interpreter_stack = _energy._interpreter_stack


def _no_transform() -> bool:
    """No torch.func transform (vmap's batched tensors cannot answer a memory-format query); under
    torch.compile dynamo's own interpreter is on the stack, and its fake tensors can."""
    return _interpreter_stack() is None or _compiling()


_fwad = _energy._fwad
_env_backend = _energy._env_backend
_grad_enabled = torch.is_grad_enabled
# attributes whose assignment invalidates a layer's cached plan
_ENERGY_OPTIONS = ("activation", "energy", "energy_reduction")
_PLAN_FACTS = frozenset({"activation", "energy", "energy_reduction", "backend", "p", "weight", "bias",
                         "num_models", "in_features", "out_features", "penalty"})


def _dead_functorch_tensor(t: torch.Tensor) -> bool:
    """True for a tensor wrapped by a ``torch.func`` transform (vmap/grad/jacrev) that has returned."""
    fc = torch._C._functorch
    if not fc.is_functorch_wrapped_tensor(t):
        return False
    top = fc.peek_interpreter_stack()
    return top is None or fc.maybe_get_level(t) > top.level()


# the active minaction.record_energy tapes (model_api.EnergyTape), innermost last; a layer's forward
# hands each its energy. Read on every forward: an empty list is one global lookup
_TAPES: list = []


def _record(layer: nn.Module, e: torch.Tensor) -> None:
    for tape in _TAPES:
        tape._add(layer, e)


_graph_task = torch._C._current_graph_task_id  # -1 outside a backward
# what the energy's autograd node may be reached through from the energy tensor: reductions and views
# applied to the energy only (a batched layer's mean over samples, the reference backend's sums)
_ENERGY_ONLY_NODES = frozenset({"MeanBackward0", "MeanBackward1", "ViewBackward0", "SumBackward0", "SumBackward1",
                                "MulBackward0", "DivBackward0", "PowBackward0", "AbsBackward0", "ToCopyBackward0",
                                "UnsafeViewBackward0", "CloneBackward0",
                                "ConstantPadNdBackward0"})  # a loop ensemble's member energy spread to [G]
_LOST_CHECKS = 16  # forwards per layer that replace an unread energy and are checked (_replaced_unread)


def refuse_under_export(what: str) -> None:
    """Raise: the energy is read inside a forward that ``torch.export`` traces. The layers record no energy
    while exporting, so the value read would be the last eager forward's, frozen into the program."""
    raise RuntimeError(
        f"minaction: {what} was read inside a forward that torch.export is tracing (torch.onnx.export(..., "
        "dynamo=True) uses it). An exported program carries no activation energy: while exporting, the layers run "
        "plain aten ops and record none, so the value read here would be the last eager forward's energy, frozen "
        "into the program as a constant. Export a forward that returns the model's outputs only and compute the "
        "energy in eager PyTorch; torch.jit.trace does record a forward that returns it (docs/core.md, Export)")


def _replaced_unread(layer: nn.Module, old: Optional[torch.Tensor]) -> None:
    """A differentiable forward is about to replace an energy that nothing read (``total_energy``,
    ``last_energy``): if a backward later runs through that earlier call, its output went into a
    loss while its energy went into none, which is what ``total_energy`` does to a layer called
    twice per step (a Siamese tower, a layer in a loop). Hook the earlier call's autograd node
    (where the output's and the energy's graphs meet) to say so then; an earlier call that no
    backward reaches (an evaluation run with autograd on) costs nothing more. The first
    ``_LOST_CHECKS`` such forwards of a layer are checked (~2.5 us each; a layer called twice per
    step shows at its first step): a model whose energies nobody reads pays nothing after them."""
    d = layer.__dict__
    checks = d.get("_lost_checks", 0)
    if checks >= _LOST_CHECKS:
        return
    d["_lost_checks"] = checks + 1
    # a depth-first walk. An accumulating EnergyActivation's energy is a sum (AddBackward0) of its calls in
    # one forward of its owner (a ResNet block's relu applied twice), whose own node no backward reaches: the
    # Adds at the top of the energy's graph are walked through, and each call's node is hooked. Below a call's
    # energy an Add is the model's own (an identity activation of `h + p`): the walk stops there
    todo, hooked = [(getattr(old, "grad_fn", None), 0, bool(d.get("accumulate")))], 0
    while todo and hooked < 8:
        node, depth, in_sum = todo.pop()
        if node is None or depth > 8:
            continue
        name = node.name()
        if in_sum and name == "AddBackward0":
            todo.extend((n, depth + 1, True) for n, _ in reversed(node.next_functions))
        elif name in _ENERGY_ONLY_NODES:
            if node.next_functions:
                todo.append((node.next_functions[0][0], depth + 1, False))
        elif name != "torch::autograd::AccumulateGrad":
            node.register_prehook(functools.partial(_warn_lost_energy, weakref.ref(layer)))
            hooked += 1


def _warn_lost_energy(layer_ref, grad_outputs) -> None:
    lay = layer_ref()
    if lay is not None and not lay.__dict__.get("_ever_read"):
        return  # nothing ever read this layer's energy (a lam = 0 baseline, a model trained without the term)
    if lay is not None:  # once per layer and backward (an accumulating module's calls are hooked one by one)
        task = _graph_task()
        if lay.__dict__.get("_lost_warned") == task:
            return
        lay.__dict__["_lost_warned"] = task
    name = f"{type(lay).__name__}({lay.extra_repr()})" if lay is not None else "(since deleted)"
    if lay is not None and lay.__dict__.get("_path"):  # named by convert: where it is in the model
        name = f"{name} (at {lay.__dict__['_path']!r} in the model it was converted in)"
    warnings.warn(
        f"this backward runs through an earlier call of energy layer {name} whose energy is counted nowhere: a "
        "later call of the layer replaced it before total_energy or last_energy read it (both hold each layer's "
        "last call only). If the layer runs more than once per step (weights shared between inputs, as in a "
        "Siamese network; a layer applied in a loop; a discriminator run on real and on generated samples), count "
        "every call: run the forward inside `with minaction.record_energy(model) as tape:` and add "
        "lam * tape.total(), or put the term in the layers with minaction.set_penalty(model, lam) (which also "
        "adds it to any other loss differentiated through the model: a GAN's generator step through its "
        "discriminator; there use the tape)",
        UserWarning, stacklevel=2)


def _new_call() -> bool:
    """False for a forward that ``torch.utils.checkpoint`` runs inside a backward to recompute the layer.
    Its energy is stored as any forward's, but it is no new call for ``total_energy``: which calls read the
    energy (``_read``) stays, so that a sum taken after ``backward()`` counts every layer again, where it
    counted only the layers the recomputation had reached (a non-reentrant checkpoint stops once it has
    what the backward needs; session 22). Tapes open before the backward do not record it
    (:class:`minaction.model_api.EnergyTape`). A module run from a backward hook is a new call. Always True
    while torch.compile traces (dynamo cannot trace the query; a compiled graph recomputes inside its own
    backward)."""
    return _compiling() or _graph_task() < 0 or not checkpoint_recomputing()


_CHECKPOINT_FILE = []  # [torch.utils.checkpoint's source file], found lazily


def checkpoint_recomputing() -> bool:
    """Whether ``torch.utils.checkpoint`` (either ``use_reentrant``) is on the Python stack: called only
    inside a backward (the graph task is set), where a forward is either such a recomputation or a
    module run from a backward hook. ~50 ns a frame, 256 frames at most, once per layer call in a backward."""
    if not _CHECKPOINT_FILE:
        ckpt = sys.modules.get("torch.utils.checkpoint")
        if ckpt is None:
            return False
        _CHECKPOINT_FILE.append(ckpt.__file__)
    target = _CHECKPOINT_FILE[0]
    f = sys._getframe(1)
    for _ in range(256):
        if f is None:
            return False
        if f.f_code.co_filename == target:
            return True
        f = f.f_back
    return False


def _after_forward(layer: nn.Module, e: torch.Tensor, old: Optional[torch.Tensor]) -> None:
    """What an energy module does with its forward's energy ``e`` (``old``: the one it replaced): hand
    it to the active ``record_energy`` tapes, or, for a differentiable forward outside
    ``torch.compile`` and ``torch.func``, mark it unread where only ``last_energy`` keeps it (no
    in-layer penalty counts it). A recomputation inside a backward (``torch.utils.checkpoint``) is
    not a new call. (EnergyLinear's fast path inlines this.)"""
    if _TAPES:
        _record(layer, e)
    elif (_grad_enabled() and not _compiling() and _interpreter_stack() is None and not layer.penalty
          and _graph_task() < 0):
        d = layer.__dict__
        if d.get("_unread"):
            _replaced_unread(layer, old)
        d["_unread"] = True


_REENTRANT_FORWARD = []  # [code object of torch.utils.checkpoint.CheckpointFunction.forward], found lazily


def _note_no_grad_energy(layer: nn.Module, e: torch.Tensor) -> None:
    """Called for a forward run without autograd. Inside ``torch.utils.checkpoint(...,
    use_reentrant=True)`` (torch's default when ``use_reentrant`` is not given) the first forward
    runs under ``no_grad`` and only the recomputation in backward is differentiable, so ``lam * E``
    taken from this forward has no gradient: remember ``e`` so that ``total_energy`` can say so.
    Costs a walk up the Python stack (~0.05 us a frame, 32 at most), and only for forwards
    without autograd of a layer in training mode, outside inference mode (an evaluation does not
    look)."""
    if not layer.training or torch.is_inference_mode_enabled():  # no training step follows
        return
    if not _REENTRANT_FORWARD:
        ckpt = sys.modules.get("torch.utils.checkpoint")
        fn = getattr(getattr(ckpt, "CheckpointFunction", None), "forward", None)
        if fn is None:
            return
        _REENTRANT_FORWARD.append(fn.__code__)
    code = _REENTRANT_FORWARD[0]
    f = sys._getframe(1)
    for _ in range(32):  # the checkpointed function's own depth: 3 frames per module call
        if f is None:
            return
        if f.f_code is code:
            layer.__dict__["_reentrant_energy"] = e
            return
        f = f.f_back


def _kaiming_bound(fan_in: int) -> float:
    """The weight bound of ``nn.init.kaiming_uniform_(w, a=sqrt(5))`` (nn.Linear's and nn.ConvNd's init),
    computed as torch computes it: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in exact arithmetic, and the same
    float64 draws bit for bit (1/sqrt(fan_in) itself differs from it in the last bit)."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _check_dtype(cls: type, dtype) -> None:
    """A layer built for a dtype the kernels do not compute in (complex, integer) refuses at construction,
    rather than at its first forward."""
    if dtype is not None and dtype not in _energy._FLOAT_DTYPES:
        raise TypeError(f"{cls.__name__} computes in float32, float64, bfloat16 or float16; got dtype={dtype!r}"
                        + (" (a string: pass torch.float32, ...)" if isinstance(dtype, str) else ""))


def _fx_leaf(module: nn.Module, x) -> "torch.fx.Proxy":
    """torch.fx traced into this layer: fx's tracers treat only torch.nn's own modules as leaves, so
    ``symbolic_trace`` (torchvision's ``create_feature_extractor``, FX quantization) called this forward with
    a Proxy, and the layer's checks and op failed on it. Record the call as one ``call_module`` node, as fx
    records ``nn.Linear``: the traced module calls the layer itself, which runs its fused op and keeps its energy."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


class EnergyLayer(nn.Module):
    """Base of every layer whose activation energy ``minaction.total_energy`` sums.

    A subclass calls ``self._init_energy(activation, energy, energy_reduction, penalty=0.0)`` in its
    ``__init__`` (it validates the options and sets the exponent ``p``) and stores the energy of each
    forward with ``self.last_energy = e``; ``counts_energy`` is False when the layer was built with
    ``energy=None``. Assigning ``activation``, ``energy`` or ``energy_reduction`` later validates the new
    value and updates ``p``.
    """

    def _init_energy(self, activation, energy, energy_reduction, penalty=0.0):
        """Validate and set the energy options (``activation``, ``energy``, ``energy_reduction``, ``penalty``)
        and the exponent ``p`` they give. A subclass of :class:`EnergyLayer` calls this in its ``__init__``."""
        self.p = validate_energy(activation, energy, energy_reduction)
        self.__dict__.update(activation=activation, energy=energy, energy_reduction=energy_reduction)  # (p: the plan
        # was dropped when it was set above)
        self.penalty = penalty
        self.__dict__["_last_energy"] = None

    @property
    def last_energy(self) -> Optional[torch.Tensor]:
        """``E_l`` of the last forward (on the autograd graph), or None before the first one."""
        if _exporting():
            refuse_under_export("last_energy")
        d = self.__dict__
        e = d.get("_last_energy")
        if d.get("_unread"):
            d["_unread"] = False
            d["_ever_read"] = True
        if e is not None and not torch.compiler.is_compiling() and _dead_functorch_tensor(e):
            # a vmap/grad transform's wrapper is meaningless after the transform returned
            self.__dict__["_last_energy"] = e = None
        return e

    @last_energy.setter
    def last_energy(self, value: Optional[torch.Tensor]) -> None:
        if _exporting():
            return  # torch.export: the energy is no output of the program; a tensor attribute set now would warn
        self.__dict__["_last_energy"] = value
        if _new_call():
            self.__dict__["_read"] = None  # which total_energy calls summed it (model_api._current): none yet
        if value is not None and not _grad_enabled() and not _compiling():
            _note_no_grad_energy(self, value)

    def train(self, mode: bool = True):
        was = self.training
        out = super().train(mode)
        if self.training != was:
            # which energy was current at the switch (a weak reference: it holds no graph): one this layer has
            # not replaced since is from the other mode, and total_energy leaves it out once other layers have
            # run in this mode (an auxiliary head that runs in training only, read after an evaluation forward)
            e = self.__dict__.get("_last_energy")
            self.__dict__["_energy_at_switch"] = None if e is None else weakref.ref(e)
        return out

    def stale(self) -> bool:
        """Whether this layer's ``last_energy`` is from before its last ``train()`` / ``eval()`` switch: it
        has not run since."""
        d = self.__dict__
        at = d.get("_energy_at_switch")
        e = d.get("_last_energy")
        return at is not None and e is not None and at() is e

    def __getstate__(self):
        # deepcopy, pickle and torch.save(model) copy the layer, never the last step's graph
        state = super().__getstate__()
        state["_last_energy"] = None
        state.pop("_energy_at_switch", None)  # a weak reference: it cannot be pickled, and the copy has no energy
        state.pop("_reentrant_energy", None)
        for transient in ("_unread", "_lost_checks", "_call_energy", "_fresh", "_read", "_ever_read"):  # the last steps' bookkeeping
            state.pop(transient, None)
        state.pop("_plan", None)  # a cached call plan refers to this copy's tensors: rebuilt on first forward
        state["_copied"] = True  # named by total_energy's "no energy yet" (a closure may still run the original)
        return state

    def __setattr__(self, name, value):
        if name in _PLAN_FACTS:
            self.__dict__.pop("_plan", None)
            if name == "penalty":  # checked on every assignment: layer.penalty = lam is the scheduling API
                # (a falsy None, '' or [] was read as 0, and a 1-D tensor's truth value raised torch's own error)
                value = 0.0 if type(value) in (int, float) and value == 0 else validate_penalty(value, self.p)
            elif name == "backend" and value is not None:
                from ..backends.select import _check_name

                value = _check_name(value)  # an unknown name now, not at the first forward 15 frames deep
            elif name in _ENERGY_OPTIONS and all(k in self.__dict__ for k in _ENERGY_OPTIONS):
                self._reset_energy_option(name, value)  # layer.energy = "l1": p follows (it was left stale)
                return
        super().__setattr__(name, value)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _ENERGY_OPTIONS or name in ("p", "penalty", "counts_energy"):
                raise AttributeError(f"{type(self).__name__} has no {name!r}: a subclass of EnergyLayer calls "
                                     f"self._init_energy(activation, energy, energy_reduction) in its __init__ "
                                     f"(see EnergyLayer's docstring)") from None
            raise

    def _reset_energy_option(self, name, value) -> None:
        d = self.__dict__
        opts = {k: d[k] for k in _ENERGY_OPTIONS}
        opts[name] = value
        unfused = "_fn" in d and name != "activation"  # an EnergyActivation applying a module keeps it
        p = validate_energy("identity" if unfused else opts["activation"], opts["energy"], opts["energy_reduction"])
        if p == 0 and d.get("penalty"):
            raise ValueError(f"{type(self).__name__}.{name} = {value!r} leaves no energy, but the layer's penalty is "
                             f"{d['penalty']}: set layer.penalty = 0 first")
        if name == "activation":
            d.pop("_fn", None)  # a fused activation by name replaces an applied module
        d[name] = value
        d["p"] = p

    def __delattr__(self, name):
        if name in _PLAN_FACTS:
            self.__dict__.pop("_plan", None)
        super().__delattr__(name)

    def _apply(self, fn, recurse=True):
        # .to() / .double() / .cuda() keep the Parameter objects but change their dtype or device
        self.__dict__.pop("_plan", None)
        return super()._apply(fn, recurse)

    def __setstate__(self, state):
        state = dict(state)
        state.pop("last_energy", None)  # pickles written before last_energy became a property
        state.setdefault("_last_energy", None)
        state.setdefault("penalty", 0.0)  # pickles written before the in-layer penalty
        super().__setstate__(state)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: say what works instead
        raise RuntimeError(
            f"torch.jit.script cannot compile minaction's {type(self).__name__} (its forward is Python that "
            "TorchScript does not support). Use torch.jit.trace(model, example_input), or torch.export.export / "
            "torch.onnx.export(..., dynamo=True): all three record standard aten ops (the traced or exported model "
            "runs without minaction); see docs/core.md, Export")

    @property
    def counts_energy(self) -> bool:
        return self.p != 0

    def forward_flops(self, x_shape, y_shape) -> int:  # pragma: no cover - overridden
        return 0


class EnergyLinear(EnergyLayer, nn.Linear):
    """``act(x @ W.T + b)`` with its activation energy computed in the same pass.

    A subclass of ``nn.Linear`` (same ``in_features``, ``out_features``, ``weight``,
    ``bias``), so code that finds linear layers with ``isinstance(m, nn.Linear)`` (weight
    decay / no-decay splits, ``_init_weights`` functions, FSDP wrap policies) treats it as
    one. Its ``forward`` is not ``nn.Linear``'s: it also applies the activation. Code that
    re-implements a Linear from ``m.weight``/``m.bias`` (``F.linear(x, m.weight, m.bias)``,
    LoRA adapters, Linear+BatchNorm fusion) would miss the activation; eager
    ``quantize_dynamic({nn.Linear})`` looks types up exactly and leaves it in float.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (same parameter names and
            shapes, so ``state_dict`` moves freely between the two).
        activation: one of "relu", "gelu" (exact, erf), "gelu_tanh" (``F.gelu(z, approximate="tanh")``),
            "silu", "tanh", "sigmoid", "identity".
        energy: "l2" (sum of y^2, default), "l1" (sum of |y|) or None (no energy).
        energy_reduction: "sum" over units (default) or "mean" over units; always a
            mean over the samples (rows) of the batch.
        num_models: if set, G independent models in one layer: weight ``[G, out, in]``,
            input ``[G, B, in]`` or a shared ``[B, in]``, output ``[G, B, out]``,
            ``last_energy`` ``[G]``.
        backend: force a kernel backend for this layer (default: automatic, see
            ``minaction.backend_info()``). It wins over ``MINACTION_BACKEND`` and
            ``minaction.set_backend``, and a pickled layer keeps it.
        penalty: ``lam`` of an energy penalty that the layer applies itself (default 0: none).
            The backward then adds ``lam * dE_l/d(inputs)``, so ``loss.backward()`` trains
            ``loss + lam * E_l`` without ``E_l`` in the loss (no loss arithmetic per step:
            on the ``cpu`` backend the coefficient goes straight into the backward kernel).
            ``last_energy`` still holds ``E_l``; adding it to the loss as well counts it twice.
            Assign ``layer.penalty`` (or call ``minaction.set_penalty(model, lam)``) to change it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 energy: Optional[str] = "l2", energy_reduction: str = "sum", num_models: Optional[int] = None,
                 backend: Optional[str] = None, device=None, dtype=None, penalty: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the parameters are built below (and batched)
        _check_dtype(type(self), dtype)
        for what, v in (("in_features", in_features), ("out_features", out_features), ("num_models", num_models)):
            if (v is not None or what != "num_models") and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise TypeError(f"{type(self).__name__}: {what} must be an int, got {v!r}")
        if in_features < 0 or out_features < 0:  # zero is allowed, as nn.Linear allows it
            raise ValueError(f"in_features and out_features must be >= 0, got {in_features}, {out_features}")
        if num_models is not None and num_models <= 0:
            raise ValueError(f"num_models must be positive, got {num_models}")
        self._init_energy(activation, energy, energy_reduction, penalty)
        self.in_features, self.out_features, self.num_models = in_features, out_features, num_models
        self.backend = backend
        lead = () if num_models is None else (num_models,)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(lead + (out_features, in_features), **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(lead + (out_features,), **kw))
        else:
            self.register_parameter("bias", None)  # as nn.Linear
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, model: Optional[int] = None) -> None:
        """``nn.Linear``'s initialisation; for a batched layer, each model (or only ``model``) in turn."""
        # no inputs: nn.Linear's bias bound is 0 then (and its weight has no elements)
        wbound, bound = ((_kaiming_bound(self.in_features), 1.0 / math.sqrt(self.in_features))
                         if self.in_features else (0.0, 0.0))
        if model is not None and (self.num_models is None or not 0 <= int(model) < self.num_models):
            raise ValueError(f"reset_parameters(model={model}): this layer holds "
                             + ("one model (model must be None)" if self.num_models is None
                                else f"models 0..{self.num_models - 1}"))
        models = [None] if self.num_models is None else ([model] if model is not None else range(self.num_models))
        for g in models:
            w = self.weight if g is None else self.weight[g]
            w.uniform_(-wbound, wbound, generator=generator)
            if self.bias is not None:
                (self.bias if g is None else self.bias[g]).uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fast path: one C++ call, with only the checks that the op cannot make itself (see
        # ops.energy.LinearPlan). A call the op rejects (shape, dtype, device) falls through to
        # the full path, which validates and raises the clear error.
        plan = self.__dict__.get("_plan")
        if (plan is not None and type(x) is Tensor and x.is_cpu
                and not (_compiling() or _any_autocast() or _interpreter_stack() is not None or _exporting()
                         or _fwad._current_level >= 0
                         or _jit_tracing() is not None)):
            params = self._parameters  # not self.weight: nn.Module.__getattr__ costs ~0.5 us per lookup
            w = params.get("weight")  # None under parametrize / weight_norm: the full path below
            b = params.get("bias")
            if w is plan.weight and b is plan.bias and (plan.units < 0 or w.shape[-2] == plan.units) and (
                    not plan.auto or (_select._forced is plan.forced and _env_backend() == plan.env)):
                try:
                    y, e = plan.op(x, w, b, plan.code, plan.p, plan.inv, plan.penalty)
                except (RuntimeError, ValueError, TypeError, IndexError):
                    pass
                else:
                    d = self.__dict__
                    if _TAPES:
                        _record(self, e)
                    task = _graph_task()
                    if task < 0 or not checkpoint_recomputing():  # not a checkpoint's recomputation (_new_call)
                        d["_read"] = None  # a new energy: no total_energy call has summed it (model_api._current)
                    if not _grad_enabled():
                        d["_last_energy"] = e  # skips nn.Module.__setattr__'s bookkeeping (see last_energy)
                        _note_no_grad_energy(self, e)
                        return y
                    if not (_TAPES or plan.penalty) and task < 0:  # _after_forward, inlined
                        if d.get("_unread"):
                            _replaced_unread(self, d["_last_energy"])
                        d["_unread"] = True
                    d["_last_energy"] = e
                    return y
        # the full path: validation, autocast, backend choice; then remember the decision
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        w, b = self.weight, self.bias
        y, e = energy_linear(x, w, b, self.activation, self.energy, self.energy_reduction, backend=self.backend,
                             penalty=self.penalty)
        old = None if _compiling() else self.__dict__.get("_last_energy")  # dynamo would trace the old graph's tensor
        if _exporting():
            return y  # the energy is no output of an exported program; a tensor attribute set now would warn
        self.__dict__["_last_energy"] = e
        if _new_call():
            self.__dict__["_read"] = None
        _after_forward(self, e, old)
        if not _grad_enabled() and not _compiling():
            _note_no_grad_energy(self, e)
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            # compiled: the plain function; torch.jit.trace: no plan made while tracing, so the trace's
            # check run (a second trace) takes this same path and records the same graph
            self.__dict__["_plan"] = make_plan(x, w, b, self.activation, self.energy, self.energy_reduction,
                                               self.backend, self.penalty)
        return y

    def forward_flops(self, x_shape, y_shape) -> int:
        rows = math.prod(y_shape[:-1])
        return 2 * rows * self.in_features * self.out_features + (rows * self.out_features if self.bias is not None
                                                                 else 0)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
            f"activation={self.activation!r}, energy={self.energy!r}"
        if self.energy_reduction != "sum":
            s += f", energy_reduction={self.energy_reduction!r}"
        if self.num_models is not None:
            s += f", num_models={self.num_models}"
        if self.penalty:
            s += f", penalty={self.penalty:g}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s
