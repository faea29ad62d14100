"""Ahead-of-time compilation of every Triton kernel for given GPU targets (no GPU needed).

The interpreter accepts programs the GPU compiler rejects; compiling each kernel variant
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` closes that gap
in CI. Run as ``python -m minaction.kernels.aot [--full] [cc ...]`` (default 90 80) with
``TRITON_INTERPRET`` unset: it prints one line per variant and exits non-zero on a failure.
"""
from __future__ import annotations

import itertools
import os
import sys
import time


def variants(full=False):
    """(kernel, signature, constexprs) covering every kernel.

    The default is a covering set: every dtype, activation, energy exponent and flag of each
    kernel appears at least once (22 variants; a second target compiles the 8 matmul variants
    and one of each elementwise kernel, see ``_lean``); ``full=True``
    is the whole product (378 variants).
    """
    from minaction.backends import ACT_CODES, NEEDS_Z

    from . import energy_linear as k

    dts = ("fp32", "fp16", "bf16")
    n_act = len(ACT_CODES)
    keep_z = {ACT_CODES[a] for a in NEEDS_Z}
    out = []
    if full:
        fwd = [(dt, a, p, hb, dt == "fp32") for dt in dts for a in range(n_act) for p in (0, 1, 2)
               for hb in (True, False)]
        ew = [(dt, a, p, nb) for dt in dts for a in range(n_act) for p in (0, 1, 2) for nb in (True, False)]
    else:
        fwd = [(dts[i % 3], i, i % 3, i % 2 == 0, True) for i in range(n_act)] + [("fp32", 1, 2, True, False)]
        ew = [(dts[i % 3], i, (i + 1) % 3, i % 2 == 1) for i in range(n_act)]
    for dt, act, p, has_b, tf32 in fwd:
        sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "z_ptr": f"*{dt}",
               "part_ptr": "*fp32"}
        for n in ("M", "N", "K", "stride_xg", "stride_xm", "stride_xk", "stride_wg", "stride_wn", "stride_wk",
                  "stride_bg", "stride_yg", "stride_ym", "M_BUCKET"):
            sig[n] = "i32"
        const = {"HAS_BIAS": has_b, "ACT": act, "P": p, "KEEP_Z": act in keep_z, "ALLOW_TF32": tf32 and dt == "fp32",
                 "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64 if dt != "fp32" else 32, "GROUP_M": 8}
        for c in const:
            sig[c] = "constexpr"
        out.append((k.linear_fwd_kernel, sig, const))
    for dt, act, p, _ in ew:
        sig = {"z_ptr": f"*{dt}", "y_ptr": f"*{dt}", "part_ptr": "*fp32", "L": "i32",
               "ACT": "constexpr", "P": "constexpr", "BLOCK": "constexpr"}
        out.append((k.act_fwd_kernel, sig, {"ACT": act, "P": p, "BLOCK": 2048}))
    for dt, act, p, nb in ew:
        sig = {"gy_ptr": f"*{dt}", "ge_ptr": "*fp32", "y_ptr": f"*{dt}", "z_ptr": f"*{dt}", "gz_ptr": f"*{dt}",
               "gb_ptr": "*fp32", "scale": "fp32", "M": "i32", "N": "i32",
               "ACT": "constexpr", "P": "constexpr", "NEED_B": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr"}
        out.append((k.act_bwd_kernel, sig, {"ACT": act, "P": p, "NEED_B": nb, "BLOCK_M": 64, "BLOCK_N": 128}))
    return out


def _lean(vs):
    """For a second target: every matmul variant (the tl.dot lowering is what differs between
    architectures) and the first variant of each elementwise kernel."""
    seen, out = set(), []
    for fn, sig, const in vs:
        if fn.__name__ == "linear_fwd_kernel" or fn.__name__ not in seen:
            out.append((fn, sig, const))
            seen.add(fn.__name__)
    return out


def compile_all(ccs=(90, 80), limit=None, stream=sys.stdout, full=False):
    """Compile every variant for each compute capability; return a list of failure strings."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled ahead of time")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    vs = variants(full)
    if limit is not None:
        vs = vs[:limit]
    for cc in ccs:
        target = GPUTarget("cuda", cc, 32)
        todo = vs if (full or cc == ccs[0]) else _lean(vs)
        for fn, sig, const in todo:
            t0 = time.time()
            tag = f"sm_{cc} {fn.__name__} {sig[next(iter(sig))]} " + " ".join(f"{a}={b}" for a, b in const.items())
            try:
                ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
                ok = "cubin" in ck.asm and len(ck.asm["cubin"]) > 0
                if not ok:
                    raise RuntimeError("no cubin produced")
                print(f"ok   {tag} ({time.time() - t0:.2f}s)", file=stream)
            except Exception as exc:  # report every failure, not only the first
                msg = f"FAIL {tag}: {type(exc).__name__}: {str(exc)[:2000]}"
                print(msg, file=stream)
                failures.append(msg)
    return failures


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m minaction.kernels.aot",
                                description="Compile the Triton kernels ahead of time for CUDA targets, without a "
                                            "GPU (a covering set of variants; --full: every one).")
    p.add_argument("--full", action="store_true", help="compile every variant, not a covering set")
    p.add_argument("cc", nargs="*", type=int, help="compute capabilities, e.g. 90 80 (default: 90 80)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    fails = compile_all(tuple(a.cc) or (90, 80), full=a.full)
    print(f"{len(fails)} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
