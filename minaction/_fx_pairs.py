"""Find layer + activation pairs in a module's ``forward()`` with ``torch.fx`` (for ``minaction.convert``).

``nn.Sequential`` shows its order in its structure; any other module applies its children in
``forward()``, e.g. nanoGPT's MLP::

    x = self.c_fc(x); x = self.gelu(x); x = self.c_proj(x)

:func:`find_pairs` traces one module's ``forward`` symbolically, every submodule a leaf (only
this forward's own code is read), and reports each child layer whose only use is an activation
module, or a ``relu`` call (relu is idempotent: after a fused relu layer the call changes nothing),
with a reason for every other child layer. A pair is convertible only when the activation module
is applied nowhere else in that forward and neither module is shared with another part of the
model, and only when the forward makes it in train and in eval mode alike (both are traced).
Tracing runs the forward's Python code on proxies: a forward that branches on a tensor value
cannot be traced, and then every child layer gets that reason.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

# functional activations: what to write instead of them
_FUNCTIONAL = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu", torch.tanh: "tanh",
               F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}
_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_SHARED = ("the layer or its activation module is shared with another part of the model (registered twice, or "
           "applied by another module's forward)")


class _LeafTracer(fx.Tracer):
    """Reads only the traced module's own forward: every submodule call is one node. A value's
    ``dtype`` and ``device`` are those of the module's parameters (a forward that tests
    ``x.dtype == torch.float16``, as transformers' BART encoder layer does before a clamp, reads as it
    runs for inputs like its weights; fx alone cannot branch on them)."""

    def __init__(self, dtype=None, device=None):
        super().__init__()
        self.value_dtype, self.value_device = dtype or torch.get_default_dtype(), device or torch.device("cpu")

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            # a module the traced one calls but does not hold (transformers' ClippedGELUActivation calls a
            # module-level GELUActivation instance): no node can name it, so the forward of one without parameters
            # or buffers is read inline (one with them keeps fx's own error, which says it is not a submodule)
            if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
                return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ReadProxy(node, self)


class _ReadProxy(fx.Proxy):
    def __getattr__(self, k):
        if k == "dtype":
            return self.tracer.value_dtype
        if k == "device":
            return self.tracer.value_device
        if k in ("is_cuda", "is_cpu"):  # DCGAN's `if input.is_cuda and self.ngpu > 1:` (data_parallel or not)
            return self.tracer.value_device.type == k[3:]
        return super().__getattr__(k)


def _value_type(module: nn.Module):
    """The dtype and device of ``module``'s first floating-point parameter (None, None without one)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype, t.device
    return None, None


def owner_of(root: nn.Module, path: str) -> nn.Module:
    """The module whose ``forward()`` applies the submodule at ``path`` (relative to ``root``): its
    nearest ancestor that is not a plain container (ModuleList / ModuleDict / Sequential)."""
    owner = cur = root
    for part in path.split(".")[:-1]:
        cur = cur._modules[part]
        if not isinstance(cur, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            owner = cur
    return owner


#: a buffer or tensor attribute up to this size is copied before a trace (up to 8x this in all, the traced
#: module's own first), so that an in-place update made while tracing can be undone; a larger one is only
#: watched, and a change to it is named in a warning
SNAPSHOT_COPY_BYTES = 8 << 20


def _snapshot(module: nn.Module) -> list:
    """The attributes of ``module`` and its submodules, with their lists and sets copied: tracing runs
    the forward's Python code, and one that stores an intermediate (``self.cache = x``,
    ``self.attn_maps.append(att)``, ``self.block.last = x``) would leave an fx proxy there. Dicts
    are not copied: nn.Module's own (``_modules``, the hook dicts, which hook handles refer to)
    must stay the same objects. The values of buffers and tensor attributes are copied too (up to
    :data:`SNAPSHOT_COPY_BYTES` each): an in-place update with constant arguments runs for real while fx
    traces (timm's ``BatchNormAct2d`` counts ``num_batches_tracked.add_(1)``), and it is undone."""
    out, seen = [], set()
    budget = 8 * SNAPSHOT_COPY_BYTES  # copies in all, module first (its own forward is the one traced)
    for m in module.modules():
        tensors = []
        for name, t in list(m._buffers.items()) + [(k, v) for k, v in m.__dict__.items() if type(v) is torch.Tensor]:
            if t is None or id(t) in seen or isinstance(t, nn.Parameter):
                continue
            seen.add(id(t))
            try:
                version = t._version
            except RuntimeError:  # an inference tensor (no version counter): it cannot be updated in place anyway
                continue
            size = t.numel() * t.element_size()
            small = size <= SNAPSHOT_COPY_BYTES and budget >= size and t.device.type != "meta"
            if small:
                budget -= size
            tensors.append((name, t, version, t.detach().clone() if small else None))
        out.append((m, {k: (type(v)(v) if type(v) in (list, set) else v) for k, v in m.__dict__.items()},
                    {k: v for k, v in m.__dict__.items() if type(v) in (list, set)}, tensors, dict(m._buffers)))
    return out


def _restore(saved: list) -> None:
    for m, state, containers, tensors, buffers in saved:
        for k, v in containers.items():  # the original list/set objects, with their original contents
            v.clear()
            if isinstance(v, set):
                v.update(state[k])
            else:
                v.extend(state[k])
            state[k] = v
        m.__dict__.clear()
        m.__dict__.update(state)
        # `self.steps = self.steps + 1` rebinds the buffer (its dict is nn.Module's own): compared by identity
        if m._buffers.keys() != buffers.keys() or any(m._buffers[k] is not v for k, v in buffers.items()):
            m._buffers.clear()
            m._buffers.update(buffers)
        for name, t, version, copy in tensors:
            if t._version == version:
                continue
            if copy is not None:
                with torch.no_grad():
                    t.copy_(copy)
            else:
                warnings.warn(f"minaction.convert: reading {type(saved[0][0]).__name__}.forward() with torch.fx "
                              f"updated {type(m).__name__}'s tensor {name!r} in place, which was not copied beforehand "
                              f"(over {SNAPSHOT_COPY_BYTES} bytes, or past the copies' total: "
                              "minaction._fx_pairs.SNAPSHOT_COPY_BYTES), so the update stays: check it",
                              UserWarning, stacklevel=2)


def _inplace(node: fx.Node) -> bool:
    return bool(node.kwargs.get("inplace")) or (node.op == "call_function" and len(node.args) > 1
                                                and node.args[1] is True)


def _describe(node: fx.Node, module: nn.Module) -> str:
    if node.op == "call_module":
        return f"{type(module.get_submodule(node.target)).__name__} ({node.target})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        owner = getattr(node.target, "__module__", None)
        if owner in ("torch.nn.functional", "torch._C._nn"):
            return f"F.{name}"
        return f"torch.{name}" if owner in (None, "torch") else (f"operator.{name}" if owner == "_operator" else name)
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the module's output"
    return node.op


def _functional_act(node: fx.Node, arg: fx.Node) -> Optional[str]:
    """The kernel activation a functional call on ``arg`` computes (None if it is not one)."""
    if not node.args or node.args[0] is not arg:
        return None
    if node.op == "call_function" and node.target in _FUNCTIONAL:
        act = _FUNCTIONAL[node.target]
        if act == "gelu":
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(node.kwargs.get("approximate", "none"))
        return act
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        return _METHODS[node.target]
    return None


_CACHES: list = []  # the traces of the convert call in progress: {(id(module), flip): (module, graph or error)}


@contextlib.contextmanager
def cached_traces():
    """Within the block each forward is traced once per mode: ``convert`` reads the same forwards for
    the output layer, the pairs and the activations. The modules it traces (the ones that apply
    others) are never the ones it replaces, so their graphs stay valid while it works."""
    _CACHES.append({})
    try:
        yield
    finally:
        _CACHES.pop()


def _trace(module: nn.Module, flip: bool = False) -> fx.Graph:
    """``module.forward`` as an fx graph, every submodule a leaf; with ``flip``, in the other of train /
    eval mode. Optional arguments at their defaults: the path a model takes when called on its input
    alone. The module's attributes are restored afterwards (a forward that stores an intermediate
    would keep a proxy). Inside :func:`cached_traces`, a forward traced before is not traced again."""
    if not _CACHES:
        return _trace_now(module, flip)
    cache, key = _CACHES[-1], (id(module), flip)
    hit = cache.get(key)
    if hit is None or hit[0] is not module:
        try:
            hit = (module, _trace_now(module, flip))
        except Exception as exc:  # noqa: BLE001 - remembered and raised again, as a second trace would
            # without its traceback: the frames it holds (this one among them, whose `hit` holds it) made a
            # reference cycle that kept the model alive after convert until a full garbage collection
            hit = (module, exc.with_traceback(None))
        cache[key] = hit
    if isinstance(hit[1], Exception):
        del hit, cache  # no local of the frame the traceback will hold refers to the exception
        raise _CACHES[-1][key][1]
    return hit[1]


def _trace_now(module: nn.Module, flip: bool) -> fx.Graph:
    saved = _snapshot(module)
    cls = type(module)
    try:
        if flip:
            module.train(not module.training)  # undone by _restore: every submodule's flag is in its __dict__
        inner = inspect.unwrap(cls.forward)
        explicit = _explicit_args(inner)
        if explicit is not cls.forward:
            # a forward wrapped by a decorator (functools.wraps), such as transformers' gradient-checkpointing
            # wrapper `forward_with_checkpointing(self, *args, **kwargs)`, or one taking **kwargs (transformers'
            # layers pass them on: `self.self_attn(..., **kwargs)`), which fx cannot expand: read the function it
            # wraps, called with its named arguments only, through a subclass for this trace only (its forward
            # set after class creation: an __init_subclass__ that wraps forwards runs first)
            reader = type(cls.__name__, (cls,), {"__module__": cls.__module__})
            reader.forward = explicit
            module.__class__ = reader
        params = list(inspect.signature(explicit).parameters.values())
        concrete = {p.name: p.default for p in params[1:]
                    if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
        tracer = _LeafTracer(*_value_type(module))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tracer.trace(module, concrete_args=concrete or None)
        finally:
            # the tracer is left in reference cycles (its proxies point back at it): without its root the model is
            # freed at `del`, not at the next full garbage collection (a GPU model's memory stayed held)
            tracer.root = None
            tracer.__dict__.pop("submodule_paths", None)
    finally:
        module.__class__ = cls
        _restore(saved)


def _explicit_args(fn):
    """For a ``fn`` taking ``**kwargs`` (and no ``*args``): a function of its named parameters alone (same
    names and defaults) that calls it with them, the call a model makes with no extra keyword
    arguments, which fx can trace (it cannot expand a proxy of ``**kwargs``); else ``fn`` itself."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    kinds = [p.kind for p in sig.parameters.values()]
    if inspect.Parameter.VAR_KEYWORD not in kinds or inspect.Parameter.VAR_POSITIONAL in kinds:
        return fn  # nothing to drop; or inputs passed as *args, which a call without them would not read
    named = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    if any(p.name.startswith("_minaction_") for p in named):
        return fn
    env, params, args, star = {"_minaction_fn": fn}, [], [], False  # names no parameter can shadow
    for i, p in enumerate(named):
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        params.append(p.name if p.default is p.empty else f"{p.name}=_minaction_d{i}")
        if p.default is not p.empty:
            env[f"_minaction_d{i}"] = p.default
        args.append(p.name if p.kind is p.POSITIONAL_ONLY or i == 0 else f"{p.name}={p.name}")
    exec(f"def forward({', '.join(params)}):\n    return _minaction_fn({', '.join(args)})\n", env)  # noqa: S102
    return env["forward"]


# what passes a value on to the module's output unchanged in content: shape changes, copies, dropout, and the
# clipping of a prediction to its range (a VAE's `torch.clamp(torch.sigmoid(self.fc4(h)), eps, 1 - eps)`)
_PASS_METHODS = frozenset({"view", "reshape", "squeeze", "unsqueeze", "flatten", "contiguous", "permute",
                           "transpose", "view_as", "reshape_as", "float", "double", "to", "clone", "t",
                           "clamp", "clip", "clamp_min", "clamp_max"})
_PASS_FUNCTIONS = {torch.flatten, torch.squeeze, torch.unsqueeze, torch.reshape, torch.permute, torch.transpose,
                   F.dropout, torch.clone, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PASS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten) + _DROPOUT_MODULES


def _passes(node: fx.Node, module: nn.Module) -> bool:
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS or node.target is operator.getitem
    if node.op == "call_module":
        return isinstance(module.get_submodule(node.target), _PASS_MODULES)
    return False


def _only_to_output(node: fx.Node, module: nn.Module, depth: int = 0) -> bool:
    """Every use of ``node`` ends in the forward's output, through ops that change no value
    (views, copies, dropout, indexing): its value is (part of) what the module returns."""
    if not node.users or depth > 16:
        return False
    return all(u.op == "output" or (_passes(u, module) and _only_to_output(u, module, depth + 1))
               for u in node.users)


#: child names that hold a model's prediction by convention (a head may be registered before the body it reads).
#: Not `fc`, `out` or `final`: a GAN generator's `fc` is its noise projection, registered first, and taking it
#: as the output counted the generator's real output layer as hidden energy
_HEAD_NAMES = frozenset({"head", "classifier", "decoder", "output", "logits", "lm_head"})


def output_modules(model: nn.Module, notes: Optional[list] = None, guessed: Optional[set] = None) -> Tuple[set, set]:
    """What gives ``model``'s output: ``(ids of modules whose output is returned as the model's output,
    or part of it, unchanged in value; ids of the layers whose activation's result is)``. A layer
    counts by the call after it, not by the activation module, which may also serve hidden layers.
    Found from the root down: an ``nn.Sequential``'s last module and the value-preserving modules
    after it (Identity, Flatten, Dropout); in any other module, the calls whose results flow only
    into the forward's output (read with torch.fx). A forward fx cannot read (a branch on a tensor's
    value) says nothing about its output: its last registered submodule, where a model's head is by
    convention, is taken as the output (the last one named like a head, ``head``, ``classifier``,
    ``decoder``, ``output``, ``logits``, ``lm_head``, if there is one: word_language_model registers
    ``decoder`` before ``input_emb``), and ``notes`` gets (path, why) for the report; ``guessed`` (if
    given) gets the ids of the modules and layers found through such a guess. The guess errs towards
    leaving a hidden layer plain rather than counting the model's prediction as hidden energy."""
    modules, layers = {id(model)}, set()
    todo = [(model, False)]  # (module, reached through a guess)
    while todo:
        m, guess = todo.pop()
        _output_step(m, guess, model, modules, layers, todo, notes, guessed)
    return modules, layers


def _output_step(m, guess, model, modules, layers, todo, notes, guessed) -> None:
    """One module of :func:`output_modules`' walk: what of it gives its output, added to ``modules`` /
    ``layers`` (and to ``guessed``, where given), its contributing children pushed on ``todo``."""
    def keep(child, walk=True, by_guess=guess):
        modules.add(id(child))
        if walk:
            todo.append((child, by_guess))
        if by_guess and guessed is not None:
            guessed.add(id(child))

    def keep_layer(layer):
        layers.add(id(layer))
        if guess and guessed is not None:
            guessed.add(id(layer))

    if isinstance(m, nn.Sequential):
        children = [c for c in m._modules.values() if c is not None]
        last = len(children) - 1
        while last > 0 and isinstance(children[last], _PASS_MODULES):  # trailing value-preserving modules
            keep(children[last], walk=False)
            last -= 1
        if last >= 0:
            keep(children[last])
            before = last - 1
            while before >= 0 and isinstance(children[before], _DROPOUT_MODULES):
                before -= 1
            if before >= 0:  # the layer that the last module (an activation, if a pair) follows
                keep_layer(children[before])
        return
    if type(m).__module__.startswith("torch.nn.parallel") and isinstance(getattr(m, "module", None), nn.Module):
        # DistributedDataParallel / DataParallel: the output is the wrapped module's (fx cannot read their
        # forward, and the guess below warned on every rank although it guessed right)
        keep(m.module)
        return
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)) or not m._modules or type(m).__module__.startswith(
            "torch.nn.modules"):
        return  # a leaf, or torch's own module (its forward is known: its output is not a child's)
    try:
        graph = _trace(m)
    except Exception as exc:  # noqa: BLE001 - unreadable: guess the last submodule
        named = [(n, c) for n, c in m._modules.items() if c is not None]
        if named:
            name, child = ([nc for nc in named if nc[0].lower() in _HEAD_NAMES] or named)[-1]
            keep(child, by_guess=True)
            if notes is not None:
                path = next((n for n, sub in model.named_modules() if sub is m), "")
                why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                which = "submodule named like a head" if name.lower() in _HEAD_NAMES else "last submodule"
                notes.append((path or type(m).__name__,
                              f"{type(m).__name__}.forward could not be read with torch.fx ({why}), so what gives "
                              f"its output is not known: its {which} {(path + '.' if path else '') + name!r} is "
                              "taken as the output (a guess) and its "
                              "final layer and activation are left plain "
                              "(convert(model, include_output=True) converts them too)"))
        return
    for node in graph.nodes:
        if not _only_to_output(node, m):
            continue
        if node.op == "call_module":
            child = m.get_submodule(node.target)
            if id(child) not in modules:
                keep(child)
            if next(child.parameters(), None) is not None:
                continue  # a layer or block, not an activation: what it takes is not the output's activation
        elif _functional_act(node, node.args[0] if node.args else None) is None:
            continue
        src = node.args[0] if node.args else None  # the layer this call follows (through a dropout)
        if (isinstance(src, fx.Node) and src.op == "call_module" and src.args
                and isinstance(m.get_submodule(src.target), _DROPOUT_MODULES)):
            src = src.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module":
            keep_layer(m.get_submodule(src.target))


_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}


def feeds_softmax(node: fx.Node, module: nn.Module, depth: int = 6) -> bool:
    """Whether ``node``'s value reaches a softmax through functions alone (masking with ``torch.where``,
    scaling, dropout), no module in between: an attention score, such as GAT's ``leakyrelu(e)``,
    not a hidden representation. A module on the way (a layer that consumes it) ends the search."""
    if depth == 0:
        return False
    for user in node.users:
        if user.op == "call_function" and user.target in _SOFTMAX_FUNCTIONS:
            return True
        if user.op == "call_method" and user.target in ("softmax", "log_softmax"):
            return True
        if user.op == "call_module":
            sub = module.get_submodule(user.target)
            if isinstance(sub, (nn.Softmax, nn.LogSoftmax)):
                return True
            if not isinstance(sub, _DROPOUT_MODULES):
                continue
        elif user.op not in ("call_function", "call_method"):
            continue
        if feeds_softmax(user, module, depth - 1):
            return True
    return False


def keeps_relu(module: nn.Module, act_path: Optional[str]) -> bool:
    """An ``nn.ReLU`` module (not in place) may stay after a layer fused with relu: relu is idempotent,
    so applying it again changes nothing. Used where it cannot become ``nn.Identity`` (it is shared,
    or applied to other values too, or follows a layer that stays plain)."""
    if act_path is None:
        return False
    m = module.get_submodule(act_path)
    return type(m) is nn.ReLU and not m.inplace


def find_pairs(module: nn.Module, layer_paths: List[str], act_name: Callable, dropouts: tuple,
               shared: Callable[[nn.Module], bool], unsupported: Callable = lambda m: None, supported: str = "",
               called: Optional[List[str]] = None) -> Tuple[List[tuple], Dict[str, str]]:
    """Pairs ``(layer, activation module, dropout, relu call)`` among ``layer_paths`` (paths relative
    to ``module``; the activation module is None where a relu *call* follows the layer, and the call
    is named instead, or where an ``nn.ReLU`` module that cannot become ``nn.Identity`` stays after
    the layer, named as ``(its description, why it stays)``), and ``{layer path: reason}`` for the
    rest of those that ``forward()`` calls. ``act_name(m)`` names a supported activation module (or
    None); ``shared(m)`` says ``m`` is used elsewhere in the model; ``unsupported(m)`` says why an
    activation-like module cannot be fused, and ``supported`` lists the modules that can. The paths
    of every submodule this forward calls are appended to ``called`` when given."""
    graphs = []
    for flip in (False, True):  # the forward as it runs now, and in the other of train / eval mode
        try:
            graphs.append(_trace(module, flip))
        except Exception as exc:  # noqa: BLE001 - any failure means: no pairs can be read from this forward
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            mode = f" in {'eval' if module.training else 'train'} mode" if flip else ""
            cls = type(module)  # a library's class by its full name: peft's lora "Linear" is not nn.Linear
            name = cls.__name__ if cls.__module__.split(".")[0] in ("torch", "__main__") else \
                f"{cls.__module__}.{cls.__qualname__}"
            why = (f"{name}.forward() could not be traced by torch.fx{mode} ({msg[:160]}), so "
                   "whether an activation follows its layers cannot be read")
            return [], {p: why for p in layer_paths}
    (out, reasons), (out_flipped, reasons_flipped) = (
        _analyse(module, g, layer_paths, act_name, dropouts, shared, unsupported, supported, called) for g in graphs)
    # a pair holds only if the forward makes it in train and in eval mode alike
    for path, why in reasons_flipped.items():
        reasons.setdefault(path, why)
    for entry in out + out_flipped:
        if (entry in out) != (entry in out_flipped) and entry[0] not in reasons:
            reasons[entry[0]] = (f"{type(module).__name__}.forward() applies a different activation to it in "
                                 "train and in eval mode")
    return [e for e in out if e in out_flipped and e[0] not in reasons], reasons


def _analyse(module: nn.Module, graph: fx.Graph, layer_paths: List[str], act_name: Callable, dropouts: tuple,
             shared: Callable[[nn.Module], bool], unsupported: Callable, supported: str,
             called: Optional[List[str]]) -> Tuple[List[tuple], Dict[str, str]]:
    """``find_pairs``' reading of one traced graph of ``module.forward``."""
    calls: Dict[str, List[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    if called is not None:
        called.extend(calls)
    reasons: Dict[str, str] = {}
    found: Dict[str, Tuple[str, Optional[str]]] = {}
    for path in layer_paths:
        nodes = calls.get(path)
        if not nodes:
            continue  # not called by this forward: another module's forward may call it
        pairs = set()
        for a in nodes:
            users = list(a.users)
            if len(users) != 1:
                reasons[path] = (f"its output is used {len(users)} times in {type(module).__name__}.forward(), "
                                 "so no single activation follows it" if users else
                                 f"its output is unused in {type(module).__name__}.forward()")
                break
            b, drop = users[0], None
            if (b.op == "call_module" and isinstance(module.get_submodule(b.target), dropouts)
                    and len(b.users) == 1 and b.args == (a,) and not b.kwargs):
                drop, b = b.target, next(iter(b.users))
                arg = users[0]
            else:
                arg = a
            functional = _functional_act(b, arg)
            if functional == "relu" and not _inplace(b):
                # relu is idempotent: the fused layer applies it and the call then leaves its output unchanged
                pairs.add((None, drop, _describe(b, module)))
                continue
            if functional is not None:
                why = ("an in-place relu would modify the output that the energy layer keeps for its backward"
                       if functional == "relu" else "which module conversion cannot remove")
                reasons[path] = (f"followed by {_describe(b, module)} in {type(module).__name__}.forward(), {why}: "
                                 "build it as minaction.nn.EnergyLinear / "
                                 f"EnergyConv2d(..., activation={functional!r}) and drop that call")
                break
            act = act_name(module.get_submodule(b.target)) if b.op == "call_module" else None
            if act is None or b.args != (arg,) or b.kwargs:
                where = f"in {type(module).__name__}.forward()"
                if b.op == "output":
                    reasons[path] = f"its output is returned by {type(module).__name__}.forward(), with no " \
                                    "activation there: left as is (an activation module that another forward " \
                                    "applies to it, after a norm for instance, cannot be fused and becomes an " \
                                    "EnergyActivation that counts it; with none, it is a logits or projection " \
                                    "layer, which stays plain)"
                elif b.op != "call_module":
                    reasons[path] = (f"its output goes to {_describe(b, module)} {where}, not to an activation: "
                                     "left as is (a logits or projection layer stays a plain layer)")
                else:
                    why = unsupported(module.get_submodule(b.target))
                    reasons[path] = f"followed by {_describe(b, module)} {where}: " + (
                        why or f"not an activation module the kernels implement ({supported})")
                break
            if drop is not None and act not in ("relu", "identity"):
                reasons[path] = (f"a dropout sits between it and {b.target}, and {act} does not commute with "
                                 "dropout (only ReLU does)")
                break
            pairs.add((b.target, drop, None))
        else:
            if len(pairs) != 1:
                reasons[path] = f"called {len(nodes)} times in {type(module).__name__}.forward() with different uses"
            else:
                found[path] = next(iter(pairs))

    # an activation module becomes nn.Identity: every one of its calls must follow a converted layer
    fed = {}
    for path, (act, drop, _) in found.items():
        if act is not None:
            fed.setdefault(act, set()).update(id(n) for n in calls[path])
    out = []
    for path, (act, drop, fn) in found.items():
        foreign_layer = shared(module.get_submodule(path)) or owner_of(module, path) is not module
        if act is None:  # a relu call: nothing becomes nn.Identity, only the layer must be this forward's own
            if foreign_layer:
                reasons[path] = _SHARED
            else:
                out.append((path, None, drop, fn))
            continue
        sources = set()
        for n in calls[act]:
            src = n.args[0] if n.args else None
            if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(
                    module.get_submodule(src.target), dropouts) and src.args:
                src = src.args[0]
            sources.add(id(src))
        act_mod = module.get_submodule(act)
        relu_mod = _describe(calls[act][0], module)
        if not sources <= fed[act]:
            if keeps_relu(module, act) and not foreign_layer:
                out.append((path, None, drop, (relu_mod, f"it is also applied to other values in "
                                                         f"{type(module).__name__}.forward()")))
                continue
            reasons[path] = (f"{type(act_mod).__name__} ({act}) is also applied to other values in "
                             f"{type(module).__name__}.forward(), so it cannot become nn.Identity")
        elif foreign_layer or shared(act_mod) or owner_of(module, act) is not module:
            if keeps_relu(module, act) and not foreign_layer:
                out.append((path, None, drop, (relu_mod, "it is shared with another part of the model")))
                continue
            reasons[path] = _SHARED
        else:
            out.append((path, act, drop, None))
    # an activation module becomes nn.Identity only if every layer it follows is fused
    failed = {act: path for path, (act, _, _) in found.items() if path in reasons and act is not None}
    for path, act, drop, fn in list(out):
        if act is not None and act in failed:
            out.remove((path, act, drop, fn))
            if keeps_relu(module, act):
                out.append((path, None, drop, (_describe(calls[act][0], module),
                                               f"it also follows {failed[act]}, which stays plain")))
                continue
            reasons[path] = (f"{act} also follows {failed[act]}, which cannot be converted, so it cannot become "
                             "nn.Identity")
    return out, reasons
