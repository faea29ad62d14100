"""A plain-PyTorch model beside its energy twin: keep the plain model's activation outputs (the
penalty written by hand is taken on them), and train both side by side, checking that each step's
loss and the final parameters agree."""
from __future__ import annotations

from typing import Callable, Iterable, List, Tuple

import torch
from torch import nn


def keep_outputs(modules: Iterable[nn.Module], clone: bool = False) -> Tuple[List[torch.Tensor], list]:
    """Forward hooks that append each module's output (cloned if ``clone``) to one list; returns
    ``(that list, the hook handles)``. Clear the list before each forward."""
    outs: List[torch.Tensor] = []

    def keep(mod, inp, out):
        outs.append(out.clone() if clone else out)

    return outs, [m.register_forward_hook(keep) for m in modules]


def train_in_lockstep(plain: nn.Module, model: nn.Module, plain_loss: Callable[[], torch.Tensor],
                      model_loss: Callable[[], torch.Tensor], optimizer=torch.optim.SGD, steps: int = 3,
                      **opt_kw) -> None:
    """``steps`` optimizer steps of ``plain`` (its loss with the penalty written by hand) and of
    ``model`` (the energy layers): each step's two losses are equal, and so is every parameter after
    the last step (in the order of ``plain.named_parameters()``)."""
    opt_p, opt_m = optimizer(plain.parameters(), **opt_kw), optimizer(model.parameters(), **opt_kw)
    for _ in range(steps):
        loss_p, loss_m = plain_loss(), model_loss()
        torch.testing.assert_close(loss_m, loss_p)
        for opt, loss in ((opt_p, loss_p), (opt_m, loss_m)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (n, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, msg=n)
