"""GPU benchmark of the fused energy layer (run by bench/gpu_check.sh; needs a CUDA GPU).

Prints one markdown table. Rows:

* ``4096x4096`` (batch 4096, 4096 -> 4096, ReLU, bfloat16 by default): one layer, forward
  and full step (forward + backward for x, w, b), for
  ``plain`` (``F.linear`` + ReLU, no energy), ``naive`` (plain + ``y.float().square()``
  energy in PyTorch), ``compile`` (``torch.compile`` of naive), ``triton`` and ``cuda``
  (``minaction.ops.energy_linear`` with that backend).
* ``mlp``: the study's 784-256-256-10 MLP, batch 128, one model, full step with cross
  entropy + λ E (same variants, float32 by default).
* ``batched``: 10 such models at once (weights ``[10, out, in]``) against a loop over the
  10 models; the ``x loop`` column is the loop's time divided by the batched time
  (the target is >= 5x).

* ``cnn epilogue``: the batched CNN's conv blocks (issue 13): G = 10 members' 3x3 convs as
  one ``F.conv2d(groups=G)`` (output ``[B, G*C, H, W]``), then the activation + per-member
  energy: ``plain`` (ReLU, no energy), ``naive`` (ReLU + ``[G]`` energies in PyTorch ops)
  and each backend's ``activation_energy(groups=G)`` on the ``[G, B, C, H, W]`` view of
  the conv output (the op makes it contiguous: that copy is counted). ``forward ms`` is
  conv + epilogue without grad, ``full step`` adds the backward for w and b; ``x loop`` is a
  loop over the G members (one conv + epilogue each, as ``LoopEnsemble`` runs them) over
  the batched time. Sizes: the MNIST cnn's first two blocks (16 x 28 x 28, 32 x 14 x 14).

Ratios in ``vs plain`` divide by the plain variant of the same size (target for the
fused full step at 4096 bf16: <= 1.05). Times are medians of CUDA-event timings.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import minaction
from minaction.backends import select as mb

LAM = 1e-3
NO_COMPILE = False
DEV = "cuda"  # --device cpu is a smoke test of this script's logic only (tiny sizes)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, budget_s=0.6, warmup=3, max_reps=200):
    """Median milliseconds of fn() over as many reps as fit in budget_s (after warmup)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() < t_end):
        if DEV == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def backends():
    out = []
    for name in ("triton", "cuda"):
        ok, why = mb.available(name, DEV)
        if ok:
            out.append(name)
        else:
            print(f"# backend {name} skipped: {why}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- one big layer
def layer_variants(M, K, N, dtype):
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(N, K, device=dev, dtype=dtype, generator=g) / K ** 0.5).requires_grad_()
    b = torch.zeros(N, device=dev, dtype=dtype).requires_grad_()
    gy = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
    ge = torch.tensor(LAM, device=dev)

    def plain_fwd():
        return torch.relu(F.linear(x, w, b)), None

    def naive_fwd():
        y = torch.relu(F.linear(x, w, b))
        return y, y.float().square().sum(1).mean()

    variants = {"plain": plain_fwd, "naive": naive_fwd}
    if not NO_COMPILE:
        variants["compile"] = torch.compile(naive_fwd)
    for be in backends():
        variants[be] = (lambda be=be: minaction.ops.energy_linear(x, w, b, "relu", "l2", backend=be))
    out = {}
    for name, fwd in variants.items():
        def step(fwd=fwd):
            y, e = fwd()
            if e is None:
                torch.autograd.backward([y], [gy])
            else:
                torch.autograd.backward([y, e], [gy, ge])

        def fwd_only(fwd=fwd):
            with torch.no_grad():
                fwd()

        out[name] = (bench(fwd_only), bench(step))
        x.grad = w.grad = b.grad = None
    return out


# ----------------------------------------------------------------------------- the study's MLP
SIZES = (784, 256, 256, 10)


def make_params(G, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    params = []
    for i, (k, n) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        shape_w = (G, n, k) if G else (n, k)
        shape_b = (G, n) if G else (n,)
        params.append(((torch.randn(*shape_w, device=DEV, dtype=dtype, generator=g) / k ** 0.5).requires_grad_(),
                       torch.zeros(*shape_b, device=DEV, dtype=dtype).requires_grad_()))
    return params


def mlp_loss(params, x, target, mode):
    """Cross entropy + LAM * sum of hidden-layer energies; mode: plain | naive | backend name."""
    h, energy = x, 0.0
    last = len(params) - 1
    for i, (w, b) in enumerate(params):
        if mode in ("plain", "naive"):
            if w.dim() == 3:
                hh = h if h.dim() == 3 else h.unsqueeze(0).expand(w.shape[0], -1, -1)
                z = torch.baddbmm(b.unsqueeze(1), hh, w.transpose(1, 2))
            else:
                z = F.linear(h, w, b)
            h = z if i == last else torch.relu(z)
            if mode == "naive" and i != last:
                energy = energy + h.float().square().sum(-1).mean(-1)
        else:
            act, en = ("identity", None) if i == last else ("relu", "l2")
            h, e = minaction.ops.energy_linear(h, w, b, act, en, backend=mode)
            if i != last:
                energy = energy + e
    logits = h
    if logits.dim() == 3:  # [G, B, C]: sum of per-model mean losses (independent trainings)
        G = logits.shape[0]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.repeat(G), reduction="none")
        loss = ce.view(G, -1).mean(1)
        return (loss + LAM * energy).sum() if mode != "plain" else loss.sum()
    loss = F.cross_entropy(logits.float(), target)
    return loss + LAM * energy if mode != "plain" else loss


def mlp_rows(dtype, batch=128, G=10):
    x = torch.rand(batch, SIZES[0], device=DEV, dtype=dtype)
    t = torch.randint(0, SIZES[-1], (batch,), device=DEV)
    modes = ["plain", "naive"] + backends()
    single, batched, loop = {}, {}, {}
    one = make_params(0, dtype)
    many = make_params(G, dtype)
    loop_params = [make_params(0, dtype, seed=s) for s in range(G)]
    for mode in modes:
        single[mode] = bench(lambda: mlp_loss(one, x, t, mode).backward())
        batched[mode] = bench(lambda: mlp_loss(many, x, t, mode).backward())

        def loop_step(mode=mode):
            for p in loop_params:
                mlp_loss(p, x, t, mode).backward()

        loop[mode] = bench(loop_step)
    try:
        if NO_COMPILE:
            return single, batched, loop
        cfn = torch.compile(lambda: mlp_loss(one, x, t, "naive"))
        single["compile"] = bench(lambda: cfn().backward())
    except Exception as exc:  # report, never abort the table
        print(f"# torch.compile of the MLP failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return single, batched, loop


# ----------------------------------------------------------------------------- batched CNN conv epilogue
CONV_CASES = ((1, 16, 28), (16, 32, 14))  # (in channels, out channels, H = W): the MNIST cnn's conv blocks


def _conv_forward(mode, x, w, b, G, C):
    """Grouped 3x3 conv of G members + activation/energy; returns (y, e or None)."""
    z = F.conv2d(x, w, b, padding=1, groups=G)  # [B, G*C, H, W]
    B, _, H, W = z.shape
    if mode == "plain":
        return torch.relu(z), None
    if mode == "naive":
        y = torch.relu(z)
        return y, y.view(B, G, -1).float().square().sum(-1).mean(0)
    zg = z.view(B, G, C, H, W).transpose(0, 1)  # [G, B, C, H, W] view of the grouped output
    return minaction.ops.activation_energy(zg, "relu", "l2", groups=G, backend=mode)


def conv_epilogue_rows(dtype, batch=128, G=10):
    """{case: {variant: (forward ms, full step ms, loop step ms)}} for CONV_CASES."""
    out = {}
    modes = ["plain", "naive"] + backends()
    for cin, C, hw in CONV_CASES:
        g = torch.Generator(device=DEV).manual_seed(cin + C)
        x = torch.randn(batch, G * cin, hw, hw, device=DEV, dtype=dtype, generator=g)
        w = (torch.randn(G * C, cin, 3, 3, device=DEV, dtype=dtype, generator=g) / (9 * cin) ** 0.5).requires_grad_()
        b = torch.zeros(G * C, device=DEV, dtype=dtype).requires_grad_()
        gy = torch.randn(batch, G * C, hw, hw, device=DEV, dtype=dtype, generator=g)
        ge = torch.full((G,), LAM, device=DEV)
        # the loop: G members' own tensors (contiguous), as LoopEnsemble holds them
        xs = [x[:, i * cin:(i + 1) * cin].contiguous() for i in range(G)]
        ws = [w.detach()[i * C:(i + 1) * C].clone().requires_grad_() for i in range(G)]
        bs = [b.detach()[i * C:(i + 1) * C].clone().requires_grad_() for i in range(G)]
        gys = [gy[:, i * C:(i + 1) * C].contiguous() for i in range(G)]
        rows = {}
        for mode in modes:
            def step(mode=mode):
                y, e = _conv_forward(mode, x, w, b, G, C)
                gyv = gy if y.shape == gy.shape else gy.view(y.shape[1], G, C, hw, hw).transpose(0, 1)
                torch.autograd.backward([y] + ([e] if e is not None else []), [gyv] + ([ge] if e is not None else []))

            def fwd(mode=mode):
                with torch.no_grad():
                    _conv_forward(mode, x, w, b, G, C)

            def loop_step(mode=mode):
                for i in range(G):
                    y, e = _conv_forward(mode, xs[i], ws[i], bs[i], 1, C)
                    if e is None:
                        torch.autograd.backward([y], [gys[i]])
                    else:
                        torch.autograd.backward([y, e], [gys[i].view(y.shape), ge[:1].view(e.shape)])

            rows[mode] = (bench(fwd), bench(step), bench(loop_step))
            w.grad = b.grad = None
        out[f"cnn epilogue G={G} b{batch} {cin}->{C}x{hw}x{hw}"] = rows
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="M = K = N of the big layer")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the big layer")
    ap.add_argument("--mlp-dtype", default="float32", help="dtype of the study-size MLP")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test this script at tiny sizes")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args(argv)
    global DEV, NO_COMPILE
    DEV, NO_COMPILE = args.device, args.no_compile
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    mdtype = getattr(torch, args.mlp_dtype)
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke test)"
    lines = [f"device: {name} | torch {torch.__version__} | "
             f"triton {__import__('triton').__version__} | TF32 matmul {torch.backends.cuda.matmul.fp32_precision}", "",
             "| case | variant | forward ms | full step ms | vs plain (step) | x loop |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    t0 = time.time()
    n = args.size
    res = layer_variants(n, n, n, dtype)
    base = res["plain"][1]
    for name, (f, s) in res.items():
        lines.append(f"| layer {n}x{n}x{n} {args.dtype} | {name} | {f:.3f} | {s:.3f} | {s / base:.3f} | |")
    print(f"# big layer done in {time.time() - t0:.0f}s", file=sys.stderr)
    single, batched, loop = mlp_rows(mdtype)
    base = single["plain"]
    for name, s in single.items():
        lines.append(f"| mlp 784-256-256-10 b128 {args.mlp_dtype} | {name} | | {s:.3f} | {s / base:.3f} | |")
    for name, s in batched.items():
        lines.append(f"| batched G=10 (vs loop of 10, same variant) | {name} | | {s:.3f} | "
                     f"{s / batched['plain']:.3f} | {loop[name] / s:.2f} |")
    for name, s in loop.items():
        lines.append(f"| loop of 10 models | {name} | | {s:.3f} | {s / loop['plain']:.3f} | |")
    t1 = time.time()
    try:
        conv = conv_epilogue_rows(mdtype, batch=128 if DEV == "cuda" else 4)
    except Exception as exc:  # report, never abort the table
        conv = {}
        print(f"# cnn epilogue rows failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    for case, rows in conv.items():
        base = rows["plain"][1]
        for name, (f, s, lp) in rows.items():
            lines.append(f"| {case} {args.mlp_dtype} | {name} | {f:.3f} | {s:.3f} | {s / base:.3f} | {lp / s:.2f} |")
    print(f"# cnn epilogue rows done in {time.time() - t1:.0f}s", file=sys.stderr)
    best_fused = min((batched[m] for m in batched if m not in ("plain", "naive")), default=float("nan"))
    lines.append("")
    lines.append(f"batched fused (best backend) vs loop of 10 naive-energy models: {loop['naive'] / best_fused:.2f}x "
                 f"(target >= 5x)")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    print(f"# total {time.time() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
