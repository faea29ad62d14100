"""Which groups go to the workers: split a group that would keep one worker busy long after the
others have run out of work.

A cell's seeds train as one batched group on one worker. When one group costs more than an even
share of the whole (a ``cnn`` on images beside small MLP groups, or a single group on two
workers), the other workers finish and idle while it runs: the run's wall time is that group's.
:func:`balance` halves such a group (members kept in order, so a half is again a deterministic
group) until no group costs more than ``total / workers`` or it has one member. It splits only
on measured costs (the ``study plan`` table: ``plan.cost_lookup``); with any cost unknown the
groups are left as they are. A group with a checkpoint on disk is never split, and a group whose
halves have checkpoints (a split run that was killed) is split the same way again, so a resumed
study finds its checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from . import checkpoint


def _halves(group: list) -> tuple:
    h = (len(group) + 1) // 2
    return group[:h], group[h:]


def _as_checkpointed(group: list, ckpt_dir) -> Optional[list]:
    """The pieces ``group`` was trained as, if its checkpoints say it was split; else None."""
    if ckpt_dir is None or len(group) < 2 or checkpoint.path_for(ckpt_dir, group).exists():
        return None
    a, b = _halves(group)
    pa, pb = _as_checkpointed(a, ckpt_dir), _as_checkpointed(b, ckpt_dir)
    found = pa is not None or pb is not None or checkpoint.path_for(ckpt_dir, a).exists() \
        or checkpoint.path_for(ckpt_dir, b).exists()
    return ((pa or [a]) + (pb or [b])) if found else None


def balance(groups: list, workers: int, cost: Callable[[list], Optional[float]], ckpt_dir=None) -> list:
    """``groups`` with every group that costs more than ``total / workers`` halved (see the module
    docstring). ``cost(group)`` returns seconds or None (unknown); ``ckpt_dir``: the study's
    checkpoint folder (None: checkpoints off)."""
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
    pieces: list = []
    for g in groups:  # first, the splits that checkpoints on disk record
        pieces.extend(_as_checkpointed(g, ckpt_dir) or [g])
    if workers < 2 or len(pieces) == 0:
        return pieces
    costs = [cost(g) for g in pieces]
    if any(c is None for c in costs):
        return pieces
    # a piece's cost is taken as proportional to its members (a split group's halves are not
    # in the measured table under their own size)
    per_member = [c / len(g) for c, g in zip(costs, pieces)]
    share = sum(costs) / workers
    out = []
    for g, pm in zip(pieces, per_member):
        stack = [g]
        while stack:
            piece = stack.pop(0)
            locked = ckpt_dir is not None and checkpoint.path_for(ckpt_dir, piece).exists()
            if len(piece) > 1 and pm * len(piece) > share and not locked:
                stack[:0] = list(_halves(piece))
            else:
                out.append(piece)
    return out
