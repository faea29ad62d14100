"""What the study's group invariance costs (session 19): the trainer's Adam updating each member on its own
view (``optim.Adam(members=G)``) against one update of the whole ``[G, ...]`` tensors, and the text stem's
embedding bag with its per-member backward against ``F.embedding_bag``'s own.

A study step of the batched MLP-family models at the faithful widths on MNIST-shaped input (G = 10,
batch 128: forward, ``CE + 1e-3 * total_energy``, backward, Adam step), and the embedding bag forward +
backward at SST-2 (V = 13,395, L = 64) and 20 Newsgroups (V = 20,000, L = 256) sizes (G = 10, batch 128,
half of each sample padding). One torch thread (as a study worker), the two variants interleaved in every
round, medians. Run: ``python bench/group_invariance_cost.py [rounds]``.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import minaction
from minaction import models
from minaction.data.core import DataMeta
from minaction.models.common import _MemberBag
from minaction.study import optim

torch.set_num_threads(1)
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
G, B = 10, 128


def interleaved(fns: dict, rounds: int, warm: int = 5) -> dict:
    ts = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds + warm):
        for k in (keys if r % 2 else keys[::-1]):
            t = time.perf_counter()
            fns[k]()
            if r >= warm:
                ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def study_steps():
    meta = DataMeta("mnist", "vision", 10, (1, 28, 28), torch.float32)
    x, y = torch.rand(G, B, 1, 28, 28), torch.randint(0, 10, (G, B))
    for arch in ("mlp", "bimodal_true", "physics_lagrangian"):
        fns = {}
        for name, members in (("whole tensors", 0), ("per member", G)):
            m = models.build(arch, meta, num_models=G, seeds=list(range(G)))
            opt = optim.make("adam", list(m.parameters()), lr=1e-3, members=members)

            def step(m=m, opt=opt):
                logits = m(x)
                ce = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="none").view(G, B).mean(1)
                loss = (ce + 1e-3 * minaction.total_energy(m)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            fns[name] = step
        t = interleaved(fns, ROUNDS)
        print(f"| {arch} step, G = {G} | {t['whole tensors'] * 1e3:.2f} ms | {t['per member'] * 1e3:.2f} ms | "
              f"{t['per member'] / t['whole tensors']:.3f} |")


def embedding_bags():
    for what, V, L in (("SST-2", 13395, 64), ("20 Newsgroups", 20000, 256)):
        d = 64
        W = torch.randn(G, V, d, requires_grad=True)
        ids = torch.randint(1, V, (G, B, L))
        ids[..., L // 2:] = 0
        mask = (ids != 0).float()
        w = mask / mask.sum(-1, keepdim=True).clamp_min(1)
        flat = (ids + (torch.arange(G) * V).view(G, 1, 1)).reshape(G * B, L)

        def plain():
            F.embedding_bag(flat, W.reshape(G * V, d), mode="sum", per_sample_weights=w.reshape(G * B, L)).sum().backward()
            W.grad = None

        def member():
            _MemberBag.apply(ids, W, w).sum().backward()
            W.grad = None
        t = interleaved({"embedding_bag": plain, "per member": member}, ROUNDS // 2)
        print(f"| embedding bag fwd + bwd, {what} sizes | {t['embedding_bag'] * 1e3:.2f} ms | "
              f"{t['per member'] * 1e3:.2f} ms | {t['per member'] / t['embedding_bag']:.3f} |")


if __name__ == "__main__":
    print("| what | before (whole tensors / embedding_bag) | per member | ratio |")
    print("| --- | --- | --- | --- |")
    study_steps()
    embedding_bags()
