"""The energy term under the ways training scripts scale or split a loss: gradient accumulation
(``(loss / k).backward()`` per micro-batch), ``torch.amp.GradScaler`` and
``DistributedDataParallel`` (gloo, two processes on this machine).

The explicit form ``ce + lam * total_energy(model)`` is part of the loss and scales with it. The
in-layer penalty (``penalty=lam``) is added by the layer's backward at weight ``lam`` whatever
happened to the loss, which docs/core.md states; these tests pin both behaviours down.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minaction
from minaction.nn import EnergyLinear

LAM = 0.1


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(EnergyLinear(20, 16), EnergyLinear(16, 8, activation="tanh"), nn.Linear(8, 3))


def _data(n: int = 48):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _close(a, b, tol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_accumulation_penalty_over_k_equals_the_loss_form(k):
    """k micro-batches, each ``((ce + lam*E) / k).backward()``, equal ``penalty = lam / k`` with
    ``(ce / k).backward()``; ``penalty = lam`` instead counts the term k times."""
    x, y = _data()
    chunks = list(zip(x.chunk(k), y.chunk(k)))

    explicit = _model()
    for xs, ys in chunks:
        ((F.cross_entropy(explicit(xs), ys) + LAM * minaction.total_energy(explicit)) / k).backward()

    def in_layer(lam):
        m = _model()
        minaction.set_penalty(m, lam)
        for xs, ys in chunks:
            (F.cross_entropy(m(xs), ys) / k).backward()
        return _grads(m)

    _close(in_layer(LAM / k), _grads(explicit))

    unscaled = _model()  # what penalty=lam trains: the energy term not divided by k
    for xs, ys in chunks:
        (F.cross_entropy(unscaled(xs), ys) / k + LAM * minaction.total_energy(unscaled)).backward()
    _close(in_layer(LAM), _grads(unscaled))


def test_grad_scaler_scales_the_loss_form_and_not_the_penalty():
    """``GradScaler`` multiplies the loss by S and ``unscale_`` divides every gradient by S: the
    explicit energy term comes out unchanged, the in-layer penalty comes out divided by S (so a
    script with a GradScaler puts ``lam * total_energy`` into its loss)."""
    x, y = _data()
    scale = 2.0 ** 10

    def scaled(penalty: bool):
        m = _model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        if penalty:
            minaction.set_penalty(m, LAM)
            loss = F.cross_entropy(m(x), y)
        else:
            loss = F.cross_entropy(m(x), y) + LAM * minaction.total_energy(m)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        return _grads(m)

    def plain(lam):
        m = _model()
        (F.cross_entropy(m(x), y) + lam * minaction.total_energy(m)).backward()
        return _grads(m)

    _close(scaled(penalty=False), plain(LAM))
    _close(scaled(penalty=True), plain(LAM / scale))


_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.nn.functional as F
    from torch import nn
    import minaction
    from minaction.nn import EnergyLinear
    rank, world, init, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(EnergyLinear(20, 16), EnergyLinear(16, 8, activation="tanh"), nn.Linear(8, 3))
    if mode == "penalty":
        minaction.set_penalty(model, {lam})
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 20, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    for _ in range(3):
        loss = F.cross_entropy(ddp(xs), ys)
        if mode == "loss":
            loss = loss + {lam} * minaction.total_energy(ddp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], out)
    dist.destroy_process_group()
""").format(lam=LAM)


@pytest.mark.parametrize("mode", ["loss", "penalty"])
def test_ddp_two_processes_train_as_one_process_over_the_whole_batch(mode, tmp_path):
    """DistributedDataParallel averages the ranks' gradients, so each rank's ``lam * E`` of its
    shard becomes ``lam`` times the mean energy over the shards, in both forms: three SGD steps
    on two gloo ranks equal one process that accumulates the two shards as ``(ce + lam*E) / 2``."""
    world = 2
    init = "file://" + str(tmp_path / "rendezvous")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(world), init, mode,
                               str(tmp_path / f"rank{r}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    _close(ranks[0], ranks[1], tol=0)  # DDP keeps the replicas identical

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(world), y.chunk(world)):
            (F.cross_entropy(model(xs), ys) / world + LAM * minaction.total_energy(model) / world).backward()
        opt.step()
    _close(ranks[0], [p.detach() for p in model.parameters()])


_REPORT_WORKER = textwrap.dedent("""
    import datetime, sys, torch, torch.distributed as dist
    from torch import nn
    import minaction
    rank, world, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = minaction.convert(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
    ddp = nn.parallel.DistributedDataParallel(model)  # buffers: its forward broadcasts them, a collective
    x = torch.randn(5, 6)
    if rank == 0:  # one rank alone logs the report
        df = minaction.energy_report(ddp, x)
        ref = minaction.energy_report(model, x)
        assert df["energy"].tolist() == ref["energy"].tolist(), (df, ref)
        print("report ok", float(df["energy"].iloc[-1]))
    dist.barrier()
    dist.destroy_process_group()
""")


def test_energy_report_on_one_ddp_rank_does_not_wait_for_the_others(tmp_path):
    """energy_report runs a forward: through the DDP wrapper that forward broadcasts the buffers, a collective
    that one rank alone would wait on until the process group's time-out (a DDP trial, session 24). It runs the
    wrapped module's forward instead."""
    world = 2
    init = "file://" + str(tmp_path / "rendezvous")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _REPORT_WORKER, str(r), str(world), init], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    assert "report ok" in logs[0]
