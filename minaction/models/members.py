"""One member of a group, in and out: the state of member g as a one-member model's
``state_dict``, loading such a state into member g, and the two layouts of a group of G
(``batched``: every tensor ``[G, ...]``; a :class:`~minaction.models.cnn.LoopEnsemble`:
``members.<g>.<name>``) converted into each other when a state_dict of one is loaded into the
other (a cnn trained on a GPU, batched, evaluated on a CPU, where ``build`` makes a loop).

A built-in batched model's tensors are its one-member model's tensors stacked along a new
first dimension, with the same names (checked for every architecture and stem by the tests),
so member g of a batched state is ``{name: t[g]}``.
"""
from __future__ import annotations

import operator
import re
from typing import Dict, Mapping

import torch
from torch import nn

_MEMBER_KEY = re.compile(r"^members\.(\d+)\.(.+)$")


def _layout(model: nn.Module) -> str:
    if getattr(model, "members", None) is not None and hasattr(model, "num_models"):
        return "loop"
    if getattr(model, "_G", None) is not None:
        return "batched"
    return "lone"


def _check_member(model: nn.Module, g) -> int:
    G = int(getattr(model, "num_models", 1))
    if isinstance(g, bool):
        raise TypeError(f"member index must be an integer, got {g!r}")
    try:
        i = operator.index(g)  # a numpy integer or a one-element integer tensor (argmax's) too
    except TypeError:
        raise TypeError(f"member index must be an integer, got {type(g).__name__}") from None
    if not 0 <= i < G:
        raise IndexError(f"member index {i} out of range for a model of {G} member(s)")
    return i


def member_state_dict(model: nn.Module, g: int) -> Dict[str, torch.Tensor]:
    """Member ``g``'s state as a one-member model of the same configuration has it (``build(arch, meta,
    ..., seeds=[s])``, ordinary layers): load it there with ``load_state_dict``. The tensors are
    detached copies. A one-member model without member dimension has only member 0."""
    g = _check_member(model, g)
    kind = _layout(model)
    if kind == "loop":
        state = model.members[g].state_dict()
    elif kind == "batched":
        state = {k: v[g] for k, v in model.state_dict().items()}
    else:
        state = model.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def load_member(model: nn.Module, g: int, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a one-member model's ``state_dict`` into member ``g`` of ``model`` (either layout); the other
    members are left as they are. Names and shapes must match a one-member model's, else ValueError
    naming the first difference."""
    g = _check_member(model, g)
    kind = _layout(model)
    state = _unwrap_loop_of_one(state)
    own = (model.members[g] if kind == "loop" else model).state_dict(keep_vars=True)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"load_member: the state does not fit member {g}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (give a one-member model's state_dict)")
    dsts = {k: t[g] if kind == "batched" else t for k, t in own.items()}
    if all(tuple(state[k].shape) == (1,) + tuple(d.shape) for k, d in dsts.items()):
        state = {k: v[0] for k, v in state.items()}  # a one-member model that keeps its member dimension
    for k, dst in dsts.items():
        if tuple(state[k].shape) != tuple(dst.shape):
            raise ValueError(f"load_member: {k!r} has shape {tuple(state[k].shape)}, member {g} needs "
                             f"{tuple(dst.shape)}")
    for k, dst in dsts.items():  # every shape checked first: a refused state changes nothing
        dst.copy_(state[k])


def loop_to_batched(state: Mapping[str, torch.Tensor], G: int) -> Dict[str, torch.Tensor]:
    """A loop ensemble's state (``members.<g>.<name>``) as the batched model of G has it (``[G, ...]``)."""
    per: Dict[str, Dict[int, torch.Tensor]] = {}
    for k, v in state.items():
        m = _MEMBER_KEY.match(k)
        if m is None:
            raise ValueError(f"not a loop ensemble's state_dict: key {k!r} names no member")
        per.setdefault(m.group(2), {})[int(m.group(1))] = v
    out = {}
    for name, by_g in per.items():
        if sorted(by_g) != list(range(G)):
            raise ValueError(f"the loop ensemble's state has members {sorted(by_g)} for {name!r}; "
                             f"this model has {G}")
        out[name] = torch.stack([by_g[g] for g in range(G)])
    return out


def batched_to_loop(state: Mapping[str, torch.Tensor], G: int) -> Dict[str, torch.Tensor]:
    """A batched model's state (``[G, ...]`` tensors) as a loop ensemble of G has it."""
    out = {}
    for k, v in state.items():
        if v.dim() == 0 or v.shape[0] != G:
            raise ValueError(f"not a batched state of {G} members: {k!r} has shape {tuple(v.shape)}")
        for g in range(G):
            out[f"members.{g}.{k}"] = v[g]
    return out


def from_other_layout(model: nn.Module, state: Mapping[str, torch.Tensor]):
    """``state`` converted to ``model``'s layout when it is a group of the other layout (a loop's
    ``members.*`` keys given to a batched model, or a batched model's keys given to a loop), else
    ``state`` itself: load_state_dict's own errors then name what does not fit."""
    kind = _layout(model)
    keys = list(state)
    if not keys:
        return state
    looped = all(_MEMBER_KEY.match(k) for k in keys)
    G = int(getattr(model, "num_models", 1))
    if kind == "batched" and looped:
        return loop_to_batched(state, G)
    if G == 1 and kind in ("batched", "loop") and not looped:  # a lone model's state into a group of one
        own = model.state_dict()
        member = {k[len("members.0."):]: v for k, v in own.items()} if kind == "loop" else \
            {k: v[0] for k, v in own.items()}
        if set(member) == set(keys) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in member.items()):
            return ({f"members.0.{k}": v for k, v in state.items()} if kind == "loop"
                    else {k: v.unsqueeze(0) for k, v in state.items()})
    if kind == "loop" and not any(_MEMBER_KEY.match(k) for k in keys):
        return batched_to_loop(state, G)
    if kind == "lone":
        return _unwrap_loop_of_one(state)
    return state


def _unwrap_loop_of_one(state):
    """A loop of one's state (every key ``members.0.*``) as its member's; any other state as it is."""
    keys = [_MEMBER_KEY.match(k) for k in state]
    if keys and all(m is not None and m.group(1) == "0" for m in keys):
        return {m.group(2): v for m, v in zip(keys, state.values())}
    return state
