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
study finds its checkpoints. Halving goes on past the even share while it shortens the busiest
worker's time under the longest-first order (:func:`makespan`), in which the driver submits
the pieces (:func:`arrange`).
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
    docstring), in their given order. ``cost(group)`` returns seconds or None (unknown);
    ``ckpt_dir``: the study's checkpoint folder (None: checkpoints off)."""
    return [p for p, _ in _pieces(groups, workers, cost, ckpt_dir)]


def arrange(groups: list, workers: int, cost: Callable[[list], Optional[float]], ckpt_dir=None) -> list:
    """:func:`balance`'s pieces, costliest first (the order the driver submits them in), each
    piece's cost taken as its members' share of its group's measured cost; the given order
    when a cost is unknown."""
    pieces = _pieces(groups, workers, cost, ckpt_dir)
    if any(pm is None for _, pm in pieces):
        return [p for p, _ in pieces]
    return [p for p, pm in sorted(pieces, key=lambda t: -t[1] * len(t[0]))]


def _pieces(groups, workers, cost, ckpt_dir) -> list:
    """[(piece, seconds per member or None)] in the given order."""
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
    pieces: list = []
    for g in groups:  # first, the splits that checkpoints on disk record
        pieces.extend(_as_checkpointed(g, ckpt_dir) or [g])
    costs = [cost(g) for g in pieces] if pieces else []
    if any(c is None for c in costs):
        return [(g, None) for g in pieces]
    # a piece's cost is taken as proportional to its members (a split group's halves are not
    # in the measured table under their own size)
    per_member = [c / len(g) for c, g in zip(costs, pieces)]
    if workers < 2:
        return list(zip(pieces, per_member))
    share = sum(costs) / workers

    def locked(piece):
        return ckpt_dir is not None and checkpoint.path_for(ckpt_dir, piece).exists()

    out = []
    for g, pm in zip(pieces, per_member):
        stack = [g]
        while stack:
            piece = stack.pop(0)
            if len(piece) > 1 and pm * len(piece) > share and not locked(piece):
                stack[:0] = list(_halves(piece))
            else:
                out.append((piece, pm))
    # then, while the longest-first assignment leaves one worker busy past the others, halve the
    # costliest piece that can be halved, as long as that shortens the assignment by over 1 %
    # (two cnn halves and a mid-size group on two workers: 11.4 s of work against 10.2 s)
    for _ in range(4 * len(out) + 8):
        span = makespan([pm * len(p) for p, pm in out], workers)
        can = [i for i, (p, _) in enumerate(out) if len(p) > 1 and not locked(p)]
        if not can:
            break
        i = max(can, key=lambda j: out[j][1] * len(out[j][0]))
        a, b = _halves(out[i][0])
        trial = out[:i] + [(a, out[i][1]), (b, out[i][1])] + out[i + 1:]
        if makespan([pm * len(p) for p, pm in trial], workers) >= 0.99 * span:
            break
        out = trial
    return out


def makespan(costs: list, workers: int) -> float:
    """The busiest worker's seconds when ``costs`` are handed out longest first, each to the
    worker that frees up first (the order of :func:`arrange`)."""
    loads = [0.0] * max(1, int(workers))
    for c in sorted(costs, reverse=True):
        i = loads.index(min(loads))
        loads[i] += c
    return max(loads)
