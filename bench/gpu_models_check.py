"""The study's architectures on a device: one training step of each (batched members: the cnn in its
grouped-convolution layout, the GPU's), on image, series, events and text stems, against the same model
on the CPU in float64. Two passes: float64 on the device (a tight comparison; on a GPU the triton backend hands
float64 to its plain-PyTorch specification, so this pass checks the models' routing and layouts), and float32
on the device (the GPU kernels themselves; a tolerance for float32 rounding). A check, not a benchmark: the
batched cnn once failed off the fused CPU pooling op, which a GPU never takes (6200b18).

    python bench/gpu_models_check.py --device cuda     # bench/gpu_check.sh runs it
    python bench/gpu_models_check.py --device cpu      # the same code path but the fused CPU ops (CI)

Exit status 1 when a model fails or differs from the CPU by more than the tolerance.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from minaction import models, total_energy
from minaction.data import DataMeta

STEMS = {
    "image": DataMeta("img", "vision", 4, (1, 12, 10), torch.float32),
    "events": DataMeta("ev", "neuromorphic", 4, (3, 2, 9, 9), torch.float32),
    "series": DataMeta("ecg", "physiological", 5, (1, 40), torch.float32),
    "text": DataMeta("txt", "text", 3, (20,), torch.int64, vocab_size=50),
}


def _batch(meta, B=6):
    g = torch.Generator().manual_seed(0)
    shape = (B,) + tuple(meta.input_shape)
    if meta.modality == "text":
        return torch.randint(1, meta.vocab_size, shape, generator=g), torch.randint(0, meta.num_classes, (B,), generator=g)
    return torch.rand(shape, generator=g, dtype=torch.float64), torch.randint(0, meta.num_classes, (B,), generator=g)


def _step(model, x, y, G):
    logits = model(x)
    E = total_energy(model)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(G)) + 1e-3 * E.sum()
    loss.backward()
    return logits.detach().cpu(), E.detach().cpu(), [p.grad.detach().cpu() for p in model.parameters()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tol", type=float, default=1e-8, help="relative tolerance of the float64 pass")
    ap.add_argument("--tol32", type=float, default=1e-4, help="relative tolerance of the float32 pass")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda":  # the float32 pass checks the kernels, not TF32 (cuDNN's convolutions default to it)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    bad = 0
    G = 3
    for dtype, tol in ((torch.float64, a.tol), (torch.float32, a.tol32)):
        for stem, meta in STEMS.items():
            for arch in models.ARCHITECTURES:
                what = f"{arch:<19} {stem:<7} G={G} {str(dtype)[6:]:<7}"
                try:
                    cpu = models.build(arch, meta, num_models=G, width=8, depth=2, dtype=torch.float64,
                                       batched=True)
                    on = copy.deepcopy(cpu).to(dev, dtype)
                    x, y = _batch(meta)
                    ref = _step(cpu, x, y, G)
                    got = _step(on, (x.to(dtype) if x.is_floating_point() else x).to(dev), y.to(dev), G)
                    err = max(float((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
                              for g, r in zip([got[0], got[1]] + got[2], [ref[0], ref[1]] + ref[2]))
                    ok = err <= tol
                    bad += not ok
                    print(f"{'ok  ' if ok else 'DIFF'} {what} max relative difference {err:.2e}")
                except Exception as exc:  # report every failure, not only the first
                    bad += 1
                    print(f"FAIL {what} {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    print(f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
