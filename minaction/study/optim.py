"""The trainer's optimizers: torch's own update kernels, without ``torch.optim``'s machinery.

:class:`Adam` runs ``torch._fused_adam_`` exactly as ``torch.optim.Adam(fused=True)`` does
(the same state, ``step`` a float32 tensor on the parameter's device, counted up before the
update), and :class:`SGD` the loop of ``torch.optim.SGD`` without momentum, so a group trains to
the same bits as with ``torch.optim`` (tested). They keep ``torch.optim``'s ``state``,
``param_groups``, ``state_dict()`` and ``load_state_dict()`` layout, so checkpoints written
with either load into the other.

Why not ``torch.optim``: its constructor and its ``step`` import ``torch._dynamo`` (through
``torch._disable_dynamo``) on first use, 1.1-1.5 s in every fresh worker process before its first
group can train, and its ``step`` spends ~80 us of Python on each call (a G = 10 MLP's six
tensors, 2-core AMD EPYC: 369 us against 286 us for the same fused update). Where torch lacks the
fused kernel (``torch._fused_adam_``), :func:`make` falls back to ``torch.optim``.
"""
from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["Adam", "SGD", "make"]


class _Base:
    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        self.defaults = dict(defaults)
        self.param_groups = [dict(defaults, params=params)]
        self.state = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.requires_grad_(False)
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict``'s layout: state keyed by parameter index."""
        index, groups = {}, []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = []
            for p in g["params"]:
                index.setdefault(id(p), len(index))
                packed["params"].append(index[id(p)])
            groups.append(packed)
        state = {index[id(p)]: s for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        params = {i: p for a, b in zip(groups, self.param_groups) for i, p in zip(a["params"], b["params"])}
        state = defaultdict(dict)
        for i, s in sd["state"].items():
            p = params[int(i)]
            state[p] = {k: (v.to(device=p.device, dtype=(torch.float32 if k == "step" else p.dtype))
                            if torch.is_tensor(v) else v) for k, v in s.items()}
        self.state = state
        for a, b in zip(groups, self.param_groups):
            b.update({k: v for k, v in a.items() if k != "params"})


class Adam(_Base):
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay, fused=True)``'s update (L2 weight
    decay added to the gradient, no amsgrad); every parameter floating point, on a device with a
    fused kernel (CPU, CUDA)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 members: int = 0):
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                                      maximize=False, foreach=None, capturable=False, differentiable=False,
                                      fused=True, decoupled_weight_decay=False))
        for p in self.param_groups[0]["params"]:
            if not p.is_floating_point():
                raise ValueError(f"Adam needs floating-point parameters, got {p.dtype}")
        # members = G > 1: every parameter is G members' tensors stacked on dim 0 (a batched model), and the update
        # runs on each member's own view. On the whole [G, ...] tensor the CPU kernel rounds an element
        # differently (1 ulp) depending on where it falls in the tensor (the vector loop or its tail), so a
        # member's weights would depend on how many members share its tensor: its results on its group.
        self.members = int(members) if members and int(members) > 1 else 0
        self._views = {}  # id(param) -> (exp_avg, exp_avg_sq, the member views of param, exp_avg, exp_avg_sq, ptr)

    def _split(self, p, s):
        """(params, exp_avgs, exp_avg_sqs) as the lists the kernel takes: [p] or p's member views."""
        G = self.members
        if not G or p.dim() == 0 or p.shape[0] != G:
            return [p], [s["exp_avg"]], [s["exp_avg_sq"]]
        got = self._views.get(id(p))
        if got is None or got[0] is not s["exp_avg"] or got[1] is not s["exp_avg_sq"] or got[5] != p.data_ptr():
            # new (or loaded) state, or a parameter given new storage
            got = (s["exp_avg"], s["exp_avg_sq"], p.unbind(0), s["exp_avg"].unbind(0), s["exp_avg_sq"].unbind(0),
                   p.data_ptr())
            self._views[id(p)] = got
        return got[2], got[3], got[4]

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            batches = {}  # (device, dtype) -> the lists torch._fused_adam_ takes, in parameter order
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients")
                s = self.state[p]
                if not s:
                    s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                b = batches.setdefault((p.device, p.dtype), ([], [], [], [], [], []))
                ps, ms, vs = self._split(p, s)
                b[0].extend(ps)
                b[1].extend(p.grad.unbind(0) if len(ps) > 1 else (p.grad,))
                b[2].extend(ms)
                b[3].extend(vs)
                b[4].extend((s["step"],) * len(ps))  # read by the kernel: each view counts its parameter's steps
                b[5].append(s["step"])
            b1, b2 = g["betas"]
            for ps, gs, m, v, steps, own in batches.values():
                torch._foreach_add_(own, 1)
                torch._fused_adam_(ps, gs, m, v, [], steps, amsgrad=False, lr=g["lr"], beta1=b1, beta2=b2,
                                   weight_decay=g["weight_decay"], eps=g["eps"], maximize=False)


class SGD(_Base):
    """``torch.optim.SGD(params, lr, weight_decay)`` without momentum: ``p -= lr * (grad + wd * p)``,
    one parameter at a time as torch's single-tensor path does."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0):
        if not lr >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"invalid SGD settings: lr={lr}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=0, dampening=0, weight_decay=weight_decay, nesterov=False,
                                      maximize=False, foreach=None, differentiable=False, fused=None))

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                p.add_(d, alpha=-lr)


def make(name: str, params, lr: float, weight_decay: float = 0.0, members: int = 0):
    """The trainer's optimizer ``name`` ("adam" or "sgd") over ``params``; ``torch.optim``'s where
    this torch has no fused Adam kernel or a parameter sits on a device without one. ``members``:
    G when every parameter stacks G members on dim 0 (each member is then updated on its own view,
    so that its weights do not depend on G; see :class:`Adam`)."""
    params = list(params)
    if name == "adam":
        if hasattr(torch, "_fused_adam_") and all(p.device.type in ("cpu", "cuda") for p in params):
            return Adam(params, lr=lr, weight_decay=weight_decay, members=members)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adam or sgd)")
